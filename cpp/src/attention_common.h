// Pieces shared by the attention forward and backward drivers.
#pragma once
#include <algorithm>
#include <cassert>
#include <limits>
#include <vector>

#include "qkv/attention.h"

namespace qkv {
namespace detail {

// lim(b, i) of Note [attention masking].
inline idx key_limit(const AttentionArgs& a, idx b, idx i) {
  const idx seq_q = a.q.seq_of(b), seq_k = a.k.seq_of(b);
  idx lim = seq_k;
  if (a.key_lengths) lim = std::min(lim, a.key_lengths[b]);
  if (a.causal) lim = std::min(lim, i + (seq_k - seq_q) + 1);
  return std::max<idx>(lim, 0);
}

// The additive bias seen from query q0 and key k0 of (b, h): rows are queries.
inline BiasView bias_block(const AttentionArgs& a, idx b, idx h, idx q0, idx k0) {
  BiasView v;
  if (a.bias) {
    v.ptr = a.bias + b * a.bias_bs + h * a.bias_hs + q0 * a.bias_qs + k0 * a.bias_ks;
    v.rs = a.bias_qs;
    v.cs = a.bias_ks;
  }
  return v;
}

// Offset of lse(b, h, 0): (batch, heads, seq_q) dense, (heads, total_q) packed.
inline idx lse_offset(const AttentionArgs& a, idx b, idx h) {
  return a.q.cu ? h * a.q.cu[a.q.batch] + a.q.cu[b] : (b * a.q.heads + h) * a.q.seq;
}

// Tasks (batch, head, block) enumerated over sequences of different lengths:
// sequence b owns tasks [first[b], first[b+1]), heads × ceil(len(b) / block) of them.
class BlockTasks {
 public:
  BlockTasks(const Tensor4& t, idx heads, idx block) : heads_(heads), block_(block) {
    first_.resize(static_cast<size_t>(t.batch) + 1);
    first_[0] = 0;
    for (idx b = 0; b < t.batch; ++b) first_[b + 1] = first_[b] + heads * ceil_div(t.seq_of(b), block);
  }
  idx count() const { return first_.back(); }
  // task -> (b, h, block start)
  void decode(idx task, idx* b, idx* h, idx* start) const {
    const idx bb = std::upper_bound(first_.begin(), first_.end(), task) - first_.begin() - 1;
    const idx r = task - first_[bb], n_blocks = (first_[bb + 1] - first_[bb]) / heads_;
    *b = bb;
    *h = r / n_blocks;
    *start = (r % n_blocks) * block_;
  }

 private:
  idx heads_, block_;
  std::vector<idx> first_;
};

// Rows per query block and keys per key block: multiples of the micro-tile's
// rows and columns where possible (96 = lcm(12, 32) for AVX-512, 2·lcm(6, 16) for
// AVX2), so that the products inside a block have few ragged tiles. A sequence of
// up to 1.5 blocks (seq_q, seq_k: the longest) is one block rather than a full
// block and a ragged one.
// key_blocks: keys per key block in query blocks. The forward takes 2: each key
// block's P·V micro-tiles run twice as long for one load and store of their O rows,
// and O is rescaled half as often. One process, old/new taking turns, Zen 5, forward:
// (4, 16, 1024, 64) +2.4-2.7% on 1 and 2 threads, (1, 16, 2048, 64, causal) +1.5-3.2%,
// (2, 12, 300, 80) +4-6%; d = 128 keeps 96 keys (the 64 KiB bound below), unchanged.
// (Query blocks of 192 instead: -2% to -7% except at (4, 16, 1024, 64).)
struct Blocks {
  idx bq, bk;
};
inline Blocks choose_blocks(const KernelTable& kt, idx seq_q, idx seq_k, idx d, idx dv, idx key_blocks = 1) {
  idx l = kt.mr;
  while (l % kt.nr != 0) l += kt.mr;  // lcm(mr, nr)
  idx bq = std::max<idx>(l, (128 / l) * l);
  idx bk = key_blocks * bq;
  if (seq_q > 0 && seq_q <= bq + bq / 2) bq = seq_q;
  if (seq_k > 0 && seq_k <= bk + bk / 2) bk = seq_k;
  // the backward packs K and V blocks (bk × max(d, dv)): keep each within ~64 KiB
  // (and the forward's K and V blocks, which its micro-tiles read in place, too)
  const idx dmax = std::max<idx>({d, dv, 1});
  while (bk > l && bk * dmax * 4 > 64 * 1024) bk -= l;
  return {bq, bk};
}

// Note [query blocks per task]
// A forward task walks every key block of its head. With one query block per task,
// a head's K and V are read from L3 or memory once per query block: for (1, 8, 4096,
// 128) that is 4 MB per 96 queries, and the micro-tiles wait on it whenever L3 is
// busy (the machines are shared). So a task takes up to g consecutive query blocks
// of one head and runs the key blocks outermost: each K/V block is read once and
// serves the g query blocks from L2. The working set is the g blocks' packed Qᵀ and O
// rows (g·bq·(d + dv) floats), kept within kBlockGroupBytes (a budget for the
// 512 KB-2 MB of L2 per core of current x86 parts); g shrinks while there would be
// fewer than 4 tasks per thread (the causal schedule balances on many tasks). Each
// query's sums run in the same order for any g: the result is bit-identical.
// One process, old and new builds taking turns, Zen 4: (1, 8, 4096, 128)
// 1 thread 1.15x, causal 1.04x; 2 threads 1.00-1.20x and (1, 32, 2048, 128, causal)
// 1.10x, depending on how busy the shared L3 was; shapes whose K/V fit L2 unchanged.
//
// Note [key blocks per task]
// The backward's key-block tasks walk every query block of their heads, reading Q
// and dO (and dQ, fused) per key block: the same streaming, the same remedy. A task
// takes up to g key blocks and runs the query blocks outermost; its working set is
// the g blocks' packed Kᵀ, Vᵀ and dK, dV rows (2·g·bk·(d + dv) floats). Every dK/dV
// row sums over the query blocks, and every dQ row over the key blocks, in the same
// order for any g, so the gradients are bit-identical. One process, old and new
// builds taking turns, Zen 4: (1, 8, 4096, 128) 1 thread 1.07x, causal 1.05x (1 and
// 2 threads); d = 64 shapes whose Q/dO fit L2 unchanged.
constexpr idx kMaxBlocksPerTask = 8;

// Note [task chunks]
// schedule(dynamic, 1) costs every task a fetch-and-add on a counter the whole team
// shares, a cache line that moves between cores at each task. A packed batch of short
// texts is hundreds of forward tasks of about 1 us each (32 texts of 24 tokens, 12
// heads: 384). So the dynamic schedule deals tasks out in chunks of about kChunkFlops
// of work, and at most n_tasks / (8·nt) tasks, so that chunks stay many enough to
// balance; tasks of more work than that go one by one. One process, old/new taking
// turns, Zen 5, 2 threads: 64 texts of 12 tokens 163 -> 147 us, 32 of 24 tokens
// 165 -> 159 us, 32 of 3-45 tokens 155 -> 151 us; 1 thread and dense shapes (one task
// per chunk) unchanged; the encoder's throughput within noise. The backward's three
// task loops likewise: 32 texts of 3-45 tokens, forward + backward 1141 -> 1070 us.
constexpr double kChunkFlops = 2.0e6;
inline idx task_chunk(double flops, idx n_tasks, int nt) {
  if (nt <= 1 || n_tasks <= 0 || flops <= 0.0) return 1;
  const double per_chunk = kChunkFlops / (flops / static_cast<double>(n_tasks));
  const idx most = std::max<idx>(1, n_tasks / (8 * static_cast<idx>(nt)));
  return per_chunk >= static_cast<double>(most) ? most : std::max<idx>(1, static_cast<idx>(per_chunk));
}

// FLOPs of the two products over every (batch, head): 2·seq_q·seq_k·(d + d_v) each,
// with each sequence's own lengths in a packed batch; half that when causal.
inline double attention_flops(const AttentionArgs& a) {
  double pairs = 0.0;
  for (idx b = 0; b < a.q.batch; ++b) pairs += static_cast<double>(a.q.seq_of(b)) * static_cast<double>(a.k.seq_of(b));
  return 2.0 * pairs * static_cast<double>(a.q.heads) * static_cast<double>(a.q.dim + a.v.dim) * (a.causal ? 0.5 : 1.0);
}
constexpr idx kBlockGroupBytes = 640 * 1024;
// g for `blocks` blocks of `block_bytes` each (working set per block, as above),
// shrunk while tasks_per_block·ceil(blocks / g) < min_tasks (4 per thread; 0 where
// the task count does not depend on g).
inline idx blocks_per_task(idx blocks, idx block_bytes, idx tasks_per_block, idx min_tasks) {
  const idx fit = std::max<idx>(1, kBlockGroupBytes / std::max<idx>(block_bytes, 1));
  idx g = std::max<idx>(1, std::min<idx>({kMaxBlocksPerTask, blocks, fit}));
  while (g > 1 && tasks_per_block * ceil_div(blocks, g) < min_tasks) --g;
  return g;
}

// Requests every 64-byte line of rows [0, rows) (cols floats each, row stride ss)
// into L1: a hint only, it never faults.
inline void prefetch_rows(const float* p, idx ss, idx rows, idx cols) {
  for (idx i = 0; i < rows; ++i)
    for (idx c = 0; c < cols; c += kLineFloats) __builtin_prefetch(p + i * ss + c, 0, 3);
}

// Packs rows [j0, j0+n) of a (seq, dim) matrix transposed into micro-panels of nr
// keys: dst[panel][d][jj] (dim × nr each), keys past n zero. The panels are the B
// operand of S = Q·Kᵀ (and dP = dO·Vᵀ).
inline void pack_transposed(const KernelTable& kt, const float* src, idx ss, idx j0, idx n, idx dim, float* dst) {
  const int nr = kt.nr;
  // Every line of the block requested first: pack_a's sixteen-row loads would
  // otherwise wait for memory sixteen lines at a time (a head's first touch of Q, K
  // or V). One process, old/new taking turns, 1 thread: (32, 12, 128, 32) and (16, 12,
  // 200, 64) forward 1.02-1.03x, forward+backward 1.02x; longer sequences 1.00-1.01x.
  prefetch_rows(src + j0 * ss, ss, n, dim);
  for (idx p0 = 0; p0 < n; p0 += nr)
    kt.pack_a(static_cast<int>(std::min<idx>(nr, n - p0)), dim, src + (j0 + p0) * ss, ss, dst + (p0 / nr) * dim * nr, nr);
}

// c(m×n) (+)= alpha · a(m×k) · b(k×n) over micro-tiles, for the small products
// inside an attention block. a(i, p) = a[i*rs_a + p*cs_a]; b is either packed
// panels (b_packed: panel stride k*nr, row stride nr) or plain rows (row stride rs_b);
// stream_b as in GemmTile.
// Note [ragged key limits]: lim (or null) gives the keys of the block each query sees
// (lim[q] <= 0: none), the queries being c's columns (lim_cols: Sᵀ, rows are keys) or
// c's rows (P·V, k runs over keys). Keys past the limit of every query of a column
// tile (one or two panels, Note [wide tiles]; of a row tile) are then left out of it:
// the softmax masks those cells of Sᵀ whatever they hold, and their P is 0. A causal block on the diagonal computes about
// half its triangle less. col_max (n,) or null: GemmTile::col_max over all m rows.
inline void block_gemm(const KernelTable& kt, idx m, idx n, idx k, float alpha, const float* a, idx rs_a,
                       idx cs_a, const float* b, bool b_packed, idx rs_b, float beta, float* c, idx ldc,
                       bool stream_b = false, const int* lim = nullptr, bool lim_cols = false,
                       float* col_max = nullptr, const float* beta_rows = nullptr) {
  const int nr = kt.nr;
  // the most keys any of the queries [q0, q1) sees, within [0, bound]
  auto reach = [&](idx q0, idx q1, idx bound) {
    int most = 0;
    for (idx q = q0; q < q1; ++q) most = std::max(most, lim[q]);
    return std::min<idx>(most, bound);
  };
  float* rows[64];
  for (idx j0 = 0, nj = 0; j0 < n; j0 += nj) {
    // two panels in one tile where two remain (Note [wide tiles]), else one
    nj = std::min<idx>(n - j0 > nr ? tile_cols(kt) : nr, n - j0);
    const bool wide = nj > nr;
    const float* bj = b_packed ? b + (j0 / nr) * k * nr : b + j0;
    const idx mj = lim && lim_cols ? reach(j0, j0 + nj, m) : m;
    // A read along its rows takes tiles of up to mr_rows where mr would leave ragged ones
    const idx tiles = wide ? row_tiles(mj, kt.wide_mr)
                           : row_tiles(mj, rs_a != 1 && mj % kt.mr != 0 ? kt.mr_rows : kt.mr);
    for (idx tile = 0; tile < tiles; ++tile) {
      const idx i0 = row_tile_begin(tile, tiles, mj);
      const int mt = static_cast<int>(row_tile_begin(tile + 1, tiles, mj) - i0);
      for (int i = 0; i < mt; ++i) rows[i] = c + (i0 + i) * ldc + j0;
      GemmTile t;
      t.k = lim && !lim_cols ? reach(i0, i0 + mt, k) : k;
      t.m = mt;
      t.n = static_cast<int>(nj);
      t.a = a + i0 * rs_a;
      t.rs_a = rs_a;
      t.cs_a = cs_a;
      t.b = bj;
      t.rs_b = b_packed ? nr : rs_b;
      t.b_panel = wide ? (b_packed ? k * nr : nr) : 0;
      t.c_rows = rows;
      t.alpha = alpha;
      t.beta = beta;
      t.bias = nullptr;
      t.stream_b = stream_b;
      t.col_max = col_max ? col_max + j0 : nullptr;
      t.beta_rows = beta_rows ? beta_rows + i0 : nullptr;
      kt.gemm_tile(t);
    }
  }
}

// The masking of one tile (query rows [q0, q0+queries) × keys [k0, k0+keys)), Note
// [attention masking]: query i of the tile may attend key j of the tile iff j < lim[i]
// and bias(i, j) != -inf.
struct TileMask {
  const int* lim;  // (queries,) lim(b, q0 + i) − k0, clamped to [-1, keys]
  BiasView bias;   // rows are the tile's queries
  idx queries, keys;
  bool sees(idx i, idx j) const {
    return j < lim[i] && !(bias.ptr && bias.ptr[i * bias.rs + j * bias.cs] == -std::numeric_limits<float>::infinity());
  }
  // Whether some pair of the tile may be hidden (a bias may hold -inf anywhere).
  bool any_hidden() const {
    if (bias.ptr) return true;
    for (idx i = 0; i < queries; ++i)
      if (lim[i] < keys) return true;
    return false;
  }
};

// Note [non-finite rows]
// The block products C += A·B of attention (O += P·V; dV += Pᵀ·dO, dK += dSᵀ·Q,
// dQ += dS·K) sum over a tile's keys (or queries) the terms A(i, p)·B(p, :), where
// A(i, p) is exactly 0 for every pair that Note [attention masking] hides. A row p
// of B holding a NaN or Inf would still reach every row i of C, since 0·NaN = NaN.
// So in a tile where some pair is hidden (TileMask::any_hidden), B is scanned
// (kt.all_finite: O(rows·cols), against the product's O(m·n·k)), and if some of
// its rows are not finite the product runs as
//   C += A·B'                        B' = B with those rows zeroed (the fast kernel)
//   C(i, :) += A(i, p)·B(p, :)       for each such row p and each row i that sees p
// A row i that sees none of them gets the bits of a run with any finite values in
// those rows: its terms there are 0·B'(p, :) = 0·finite, which leave the sum as it
// is (a zero's sign aside). "Sees" is TileMask::sees, not A(i, p) != 0, so a row that
// sees a NaN shows it even where its weight underflowed to 0. (softmax_bwd_ds sets
// dS = 0 wherever P == 0, underflow included: that is where dP's NaN stops.) With
// finite inputs (the usual case) the scan is all the extra work, and tiles that
// hide no pair skip even that.
class FiniteRows {
 public:
  FiniteRows(idx max_rows, idx max_cols) : copy_(std::max<idx>(max_rows * max_cols, 1)), max_rows_(max_rows) {
    bad_.reserve(static_cast<size_t>(max_rows));  // no allocation inside the parallel regions
  }
  // b (k × n, row stride rs_b): when `hidden` and some rows are not finite, a copy of b
  // (row stride n, owned by this object) with those rows zeroed; else b itself. *rs:
  // the result's row stride.
  const float* finite(const KernelTable& kt, bool hidden, const float* b, idx rs_b, idx k, idx n, idx* rs) {
    bad_.clear();
    *rs = rs_b;
    if (!hidden || kt.all_finite(k, n, b, rs_b)) return b;
    assert(k <= max_rows_ && k * n <= copy_.size());
    float* out = copy_.data();
    for (idx p = 0; p < k; ++p) {
      const float* row = b + p * rs_b;
      if (kt.all_finite(1, n, row, rs_b)) {
        std::copy(row, row + n, out + p * n);
      } else {
        bad_.push_back(p);
        std::fill(out + p * n, out + (p + 1) * n, 0.0f);
      }
    }
    *rs = n;
    return out;
  }
  // After c (m × n) += alpha · a (m × k) · finite(b): c(i, :) += alpha · a(i, p) · b(p, :)
  // for each row p that finite() zeroed and each row i of c that sees it. The rows of
  // c are the tile's queries (mask.sees(i, p)) or, with c_rows_are_keys, its keys
  // (mask.sees(p, i)). a(i, p) = a[i*rs_a + p*cs_a].
  void add_back(idx m, idx n, float alpha, const float* a, idx rs_a, idx cs_a, const float* b, idx rs_b, float* c,
                idx ldc, const TileMask& mask, bool c_rows_are_keys) const {
    for (const idx p : bad_) {
      const float* brow = b + p * rs_b;
      for (idx i = 0; i < m; ++i) {
        if (!(c_rows_are_keys ? mask.sees(p, i) : mask.sees(i, p))) continue;
        const float w = alpha * a[i * rs_a + p * cs_a];
        float* crow = c + i * ldc;
        for (idx d = 0; d < n; ++d) crow[d] += w * brow[d];
      }
    }
  }

 private:
  AlignedBuffer copy_;
  std::vector<idx> bad_;
  idx max_rows_;
};

// c (m × n) += alpha · a (m × k) · b (k × n), b plain rows (row stride rs_b), under
// Note [non-finite rows] for the tile `mask`; c_rows_are_keys as in FiniteRows::add_back.
inline void block_gemm_masked(const KernelTable& kt, idx m, idx n, idx k, float alpha, const float* a, idx rs_a,
                              idx cs_a, const float* b, idx rs_b, float* c, idx ldc, const TileMask& mask,
                              bool c_rows_are_keys, FiniteRows& fr) {
  idx rs = 0;
  const float* bf = fr.finite(kt, mask.any_hidden(), b, rs_b, k, n, &rs);
  block_gemm(kt, m, n, k, alpha, a, rs_a, cs_a, bf, false, rs, 1.0f, c, ldc);
  fr.add_back(m, n, alpha, a, rs_a, cs_a, b, rs_b, c, ldc, mask, c_rows_are_keys);
}

}  // namespace detail
}  // namespace qkv
