// Attention backward (FA2 scheme):
//   D_i = rowsum(dO ∘ O)_i                                   (per query row)
//   per tile (query block × key block): P = exp(S − lse); dV += Pᵀ·dO; dP = dO·Vᵀ;
//   dS = P∘(dP − D); dK += dSᵀ·Q·scale; dQ += dS·K·scale
// (the three products that accumulate under Note [non-finite rows])
// scheduled in one pass or two, see Note [backward schedule]. Every output element
// is summed by one task in a fixed order, so results are identical whatever the
// thread count. Extra memory: D (batch·heads·seq_q) and per-thread blocks.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "attention_common.h"

namespace qkv {

namespace {

// A thread's block buffers: P and dP/dS of one tile, and the packed Kᵀ and Vᵀ of up
// to `slots` key blocks (a task's, Note [key blocks per task]).
struct BlockBufs {
  AlignedBuffer s, dp, kp, vp;
  idx k_size, v_size;  // one key block's packed K, V
  BlockBufs(const KernelTable& kt, const detail::Blocks& blk, idx D, idx Dv, idx slots)
      : s(blk.bq * blk.bk),
        dp(blk.bq * blk.bk),
        k_size(ceil_div(blk.bk, kt.nr) * kt.nr * std::max<idx>(D, 1)),
        v_size(ceil_div(blk.bk, kt.nr) * kt.nr * std::max<idx>(Dv, 1)) {
    kp.resize(slots * k_size);
    vp.resize(slots * v_size);
  }
  float* k_slot(idx i) { return kp.data() + i * k_size; }
  float* v_slot(idx i) { return vp.data() + i * v_size; }
};

// For query rows [q0, q0+nq) of head h against keys [k0, k0+nk) (K/V already packed
// transposed in bufs' slot `slot`): leaves P in bufs.s and dS (unscaled) in bufs.dp;
// returns the tile's mask (it points into lim_rel).
detail::TileMask p_and_ds(const KernelTable& kt, const AttentionArgs& a, const Tensor4& d_o, const float* dsum,
                          const detail::Blocks& blk, idx b, idx h, idx q0, idx nq, idx k0, idx nk, BlockBufs& bufs,
                          idx slot, std::vector<int>& lim_rel) {
  const idx D = a.q.dim, Dv = a.v.dim;
  // S (nq × nk) = scale · Q·Kᵀ, then P = exp(S + bias − lse) on allowed keys
  detail::block_gemm(kt, nq, nk, D, a.scale, a.q.row(b, h, q0), a.q.ss, 1, bufs.k_slot(slot), true, 0, 0.0f,
                     bufs.s.data(), blk.bk);
  for (idx i = 0; i < nq; ++i)
    lim_rel[i] = static_cast<int>(std::max<idx>(-1, std::min<idx>(detail::key_limit(a, b, q0 + i) - k0, nk)));
  const BiasView bias = detail::bias_block(a, b, h, q0, k0);
  const float* lse = a.lse + detail::lse_offset(a, b, h) + q0;
  kt.softmax_bwd_p(bufs.s.data(), blk.bk, static_cast<int>(nq), static_cast<int>(nk), bias, lim_rel.data(), lse);
  // dP (nq × nk) = dO (nq × Dv) · Vᵀ (Dv × nk); dS = P ∘ (dP − D)
  detail::block_gemm(kt, nq, nk, Dv, 1.0f, d_o.row(b, h, q0), d_o.ss, 1, bufs.v_slot(slot), true, 0, 0.0f,
                     bufs.dp.data(), blk.bk);
  kt.softmax_bwd_ds(bufs.s.data(), bufs.dp.data(), blk.bk, static_cast<int>(nq), static_cast<int>(nk),
                    dsum + detail::lse_offset(a, b, h) + q0);
  return {lim_rel.data(), bias, nq, nk};
}

// A thread's buffers for key blocks: the block products', and a copy of dO, Q or K
// rows for Note [non-finite rows].
struct KeyBlockScratch {
  BlockBufs bufs;
  std::vector<int> lim_rel;
  detail::FiniteRows finite;
  KeyBlockScratch(const KernelTable& kt, const detail::Blocks& blk, idx D, idx Dv, idx slots)
      : bufs(kt, blk, D, Dv, slots),
        lim_rel(static_cast<size_t>(blk.bq)),
        finite(std::max(blk.bq, blk.bk), std::max(D, Dv)) {}
};

// One scratch per thread, allocated in the calling thread: a failed allocation
// raises there instead of terminating inside the parallel region.
std::vector<KeyBlockScratch> per_thread(int nt, const KernelTable& kt, const detail::Blocks& blk, idx D, idx Dv,
                                        idx slots = 1) {
  std::vector<KeyBlockScratch> v;
  for (int t = 0; t < nt; ++t) v.emplace_back(kt, blk, D, Dv, slots);
  return v;
}

// dst (rows × cols, row stride ld_dst) += src (row stride ld_src)
void add_rows(idx rows, idx cols, const float* src, idx ld_src, float* dst, idx ld_dst) {
  for (idx i = 0; i < rows; ++i)
    for (idx j = 0; j < cols; ++j) dst[i * ld_dst + j] += src[i * ld_src + j];
}

// Note [bias gradient]
// dbias(b, h, i, j) = dS(b, h, i, j), the unscaled dS of p_and_ds, summed over b when
// the bias broadcasts over batches (g.batch == 1) and over h when it broadcasts over
// heads. Every element is a sum over b (then h) in ascending order of the same dS
// values, whichever way it is scheduled, so the result does not depend on the thread
// count or the schedule:
//  - fused: key_block adds dS into dbias as it makes it (the cost is dbias's memory
//    traffic: 5-40% of the backward in benchmarks/attention_bias_grad.py), where the task
//    owns those dbias elements: a full-shape bias (a task owns its (b, h) rows), or a
//    bias shared by the batch (g.batch == 1, g.heads == H) in the one-pass schedule
//    with tasks that take a kv head through every b in order (enough kv heads to keep
//    the threads busy);
//  - otherwise bias_gradient, a separate pass whose task owns one (bq × bk) tile of
//    dbias and sums its (b, h): P and dS are recomputed (the S and dP products, exp and
//    dS again), 50-75% of the rest of the backward.
void bias_gradient(const KernelTable& kt, const AttentionArgs& a, const Tensor4& d_o, const float* dsum,
                   const detail::Blocks& blk, int nt_max, const BiasGrad& g) {
  const idx B = a.q.batch, H = a.q.heads, Sq = a.q.seq, Sk = a.k.seq, group = H / std::max<idx>(a.k.heads, 1);
  const idx nqb = ceil_div(Sq, blk.bq), nkb = ceil_div(Sk, blk.bk);
  const idx n_tasks = g.batch * g.heads * nqb * nkb;
  const int nt = team_size(static_cast<int>(std::min<idx>(nt_max, n_tasks)));
  std::vector<KeyBlockScratch> scratch = per_thread(nt, kt, blk, a.q.dim, a.v.dim);
#pragma omp parallel num_threads(nt)
  {
    KeyBlockScratch& sc = scratch[static_cast<size_t>(omp_get_thread_num())];
#pragma omp for schedule(dynamic, 1)
    for (idx task = 0; task < n_tasks; ++task) {
      const idx kb = task % nkb, qb = (task / nkb) % nqb, gh = (task / (nkb * nqb)) % g.heads,
                gb = task / (nkb * nqb * g.heads);
      const idx q0 = qb * blk.bq, k0 = kb * blk.bk;
      const idx nq = std::min<idx>(blk.bq, Sq - q0), n_cols = std::min<idx>(blk.bk, Sk - k0);
      float* out = g.ptr + ((gb * g.heads + gh) * Sq + q0) * Sk + k0;  // (nq × n_cols), row stride Sk
      for (idx i = 0; i < nq; ++i) std::fill(out + i * Sk, out + i * Sk + n_cols, 0.0f);
      const idx b_end = g.batch == 1 ? B : gb + 1, h_end = g.heads == 1 ? H : gh + 1;
      for (idx b = g.batch == 1 ? 0 : gb; b < b_end; ++b) {
        // keys past key_lengths, and tiles that causality hides entirely, add nothing
        const idx k_end = a.key_lengths ? std::min<idx>(Sk, a.key_lengths[b]) : Sk;
        const idx nk = std::min<idx>(n_cols, k_end - k0);
        if (nk <= 0 || (a.causal && q0 + nq - 1 + (Sk - Sq) < k0)) continue;
        idx packed_hk = -1;
        for (idx h = g.heads == 1 ? 0 : gh; h < h_end; ++h) {
          const idx hk = h / group;
          if (hk != packed_hk) {
            detail::pack_transposed(kt, a.k.row(b, hk, 0), a.k.ss, k0, nk, a.q.dim, sc.bufs.k_slot(0));
            detail::pack_transposed(kt, a.v.row(b, hk, 0), a.v.ss, k0, nk, a.v.dim, sc.bufs.v_slot(0));
            packed_hk = hk;
          }
          p_and_ds(kt, a, d_o, dsum, blk, b, h, q0, nq, k0, nk, sc.bufs, 0, sc.lim_rel);
          add_rows(nq, nk, sc.bufs.dp.data(), blk.bk, out, Sk);
        }
      }
    }
  }
}

}  // namespace

void attention_backward(const KernelTable& kt, const AttentionArgs& a, const Tensor4& d_o, const Tensor4& dq,
                        const Tensor4& dk, const Tensor4& dv, const BiasGrad& dbias) {
  // Sq, Sk: the longest sequences (packed form: the totals)
  const idx B = a.q.batch, H = a.q.heads, Hkv = a.k.heads, Sq = a.q.seq, Sk = a.k.seq, D = a.q.dim,
            Dv = a.v.dim;
  const idx group = Hkv > 0 ? H / Hkv : 1;
  const detail::Blocks blk = detail::choose_blocks(kt, a.q.cu ? 0 : Sq, a.k.cu ? 0 : Sk, D, Dv);
  const double flops = 10.0 * static_cast<double>(B) * H * std::max<idx>(Sq, 1) * std::max<idx>(Sk, 1) *
                       std::max<idx>(D + Dv, 1) / 2;
  const int nt_max = threads_for(flops, 2.0e6);

  // D_i = Σ_d dO_id · O_id, laid out like lse: rows [q0, q0 + nq) of (b, h)
  std::vector<float> dsum(static_cast<size_t>(a.q.cu ? H * a.q.cu[B] : B * H * Sq));
  auto row_dsum = [&](idx b, idx h, idx q0, idx nq) {
    float* out = dsum.data() + detail::lse_offset(a, b, h) + q0;
    for (idx i = 0; i < nq; ++i) {
      const float* x = d_o.row(b, h, q0 + i);
      const float* y = a.o.row(b, h, q0 + i);
      float acc[8] = {};  // eight partial sums, in a fixed order: vectorisable
      idx d = 0;
      for (; d + 8 <= Dv; d += 8)
        for (int l = 0; l < 8; ++l) acc[l] += x[d + l] * y[d + l];
      for (; d < Dv; ++d) acc[d % 8] += x[d] * y[d];
      out[i] = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    }
  };
  assert(!dbias.ptr || (!a.q.cu && !a.k.cu));

  // The dbias element (b, h, q, k) (Note [bias gradient]).
  auto dbias_at = [&](idx b, idx h, idx q, idx k) {
    return dbias.ptr + (((dbias.batch == 1 ? 0 : b) * dbias.heads + (dbias.heads == 1 ? 0 : h)) * Sq + q) * Sk + k;
  };
  // Key blocks [k_first, k_first + n_blocks·bk) of one (batch, kv head): their dK, dV
  // rows, each summed over the query blocks of every query head in the group; with
  // fused_dq also dQ += scale · dS·K into those query rows (the caller owns them and
  // zeroed them); with fused_dbias also dbias += dS (the caller owns those elements and
  // zeroed them). The query blocks are the outer loop: each Q/dO block is read once for
  // all the key blocks (Note [key blocks per task]); a dK/dV row still sums over the
  // heads and then the query blocks in order, a dQ row over the key blocks in order.
  auto key_blocks = [&](idx b, idx hk, idx k_first, idx n_blocks, KeyBlockScratch& sc, bool fused_dq,
                        bool fused_dbias) {
    BlockBufs& bufs = sc.bufs;
    std::vector<int>& lim_rel = sc.lim_rel;
    const idx seq_q = a.q.seq_of(b), seq_k = a.k.seq_of(b);
    // keys past key_lengths are never read (their rows of dK/dV are 0)
    const idx k_end = a.key_lengths ? std::min<idx>(seq_k, a.key_lengths[b]) : seq_k;
    // Key block s: keys [k0, k0 + nk) are read, by the query blocks from q_from on (the
    // first with a row i that may see key k0, lim(b, i) > k0; seq_q: none, nk = 0).
    struct KeySlot {
      idx k0, nk, q_from;
    };
    KeySlot slots[detail::kMaxBlocksPerTask];
    assert(n_blocks <= detail::kMaxBlocksPerTask);
    idx q_begin = seq_q;  // the first query block that some key block here needs
    for (idx s = 0; s < n_blocks; ++s) {
      const idx k0 = k_first + s * blk.bk;
      const idx n_rows = std::min<idx>(blk.bk, seq_k - k0);  // dK/dV rows written
      const idx nk = std::max<idx>(0, std::min<idx>(n_rows, k_end - k0));
      // dK, dV rows [k0, k0 + n_rows) accumulate in place (this task owns them)
      for (idx j = 0; j < n_rows; ++j) {
        std::fill(dk.row(b, hk, k0 + j), dk.row(b, hk, k0 + j) + D, 0.0f);
        std::fill(dv.row(b, hk, k0 + j), dv.row(b, hk, k0 + j) + Dv, 0.0f);
      }
      detail::pack_transposed(kt, a.k.row(b, hk, 0), a.k.ss, k0, nk, D, bufs.k_slot(s));
      detail::pack_transposed(kt, a.v.row(b, hk, 0), a.v.ss, k0, nk, Dv, bufs.v_slot(s));
      const idx i_first = a.causal ? std::max<idx>(0, k0 - (seq_k - seq_q)) : 0;
      slots[s] = {k0, nk, nk > 0 ? i_first / blk.bq * blk.bq : seq_q};
      q_begin = std::min(q_begin, slots[s].q_from);
    }
    for (idx h = hk * group; h < (hk + 1) * group; ++h) {
      for (idx q0 = q_begin; q0 < seq_q; q0 += blk.bq) {
        const idx nq = std::min<idx>(blk.bq, seq_q - q0);
        // this block's Q rows, which the first S product reads in place (as for the
        // packed blocks, pack_transposed): one process, old/new taking turns, 1 thread,
        // (32, 12, 128, 32) forward+backward 1.03x, seq 200-1024 same
        detail::prefetch_rows(a.q.row(b, h, q0), a.q.ss, nq, D);
        for (idx s = 0; s < n_blocks; ++s) {
          const idx k0 = slots[s].k0, nk = slots[s].nk;
          if (q0 < slots[s].q_from) continue;
          const detail::TileMask mask =
              p_and_ds(kt, a, d_o, dsum.data(), blk, b, h, q0, nq, k0, nk, bufs, s, lim_rel);
          if (fused_dbias) add_rows(nq, nk, bufs.dp.data(), blk.bk, dbias_at(b, h, q0, k0), Sk);
          // dV (nk × Dv) += Pᵀ (nk × nq) · dO (nq × Dv)
          detail::block_gemm_masked(kt, nk, Dv, nq, 1.0f, bufs.s.data(), 1, blk.bk, d_o.row(b, h, q0), d_o.ss,
                                    dv.row(b, hk, k0), dv.ss, mask, true, sc.finite);
          // dK (nk × D) += scale · dSᵀ (nk × nq) · Q (nq × D)
          detail::block_gemm_masked(kt, nk, D, nq, a.scale, bufs.dp.data(), 1, blk.bk, a.q.row(b, h, q0), a.q.ss,
                                    dk.row(b, hk, k0), dk.ss, mask, true, sc.finite);
          // dQ (nq × D) += scale · dS (nq × nk) · K (nk × D)
          if (fused_dq)
            detail::block_gemm_masked(kt, nq, D, nk, a.scale, bufs.dp.data(), blk.bk, 1, a.k.row(b, hk, k0), a.k.ss,
                                      dq.row(b, h, q0), dq.ss, mask, false, sc.finite);
        }
      }
    }
  };

  // Note [backward schedule]
  // With at least 8 (batch, kv head) pairs, one pass: a task owns a pair (its dK, dV and
  // the dQ of its query heads) and walks the key blocks: 5 block products per tile.
  // With few pairs, a pass over (batch, kv head, key blocks) tasks for dK, dV and a
  // second over (batch, head, query block) tasks for dQ keep every thread busy at
  // the price of recomputing P and dS (7 products per tile). The choice depends on
  // the shape only, and each order of summation is fixed, so results never depend
  // on the thread count.
  const bool one_pass = B * Hkv >= 8;
  // Note [bias gradient]: fused where a task owns the dbias elements it makes
  const bool full_dbias = dbias.ptr && dbias.batch == B && dbias.heads == H;
  const bool head_major = one_pass && dbias.ptr && dbias.batch == 1 && dbias.heads == H && Hkv >= 2 * nt_max;
  const bool fuse_dbias = full_dbias || head_major;
  const bool separate_dbias = dbias.ptr && !fuse_dbias;
  // D: one-pass tasks make their own rows' as they start (no pass over dO and O of its
  // own); otherwise a pass first, for tasks that read the rows of every query block
  const detail::BlockTasks row_tasks(a.q, H, blk.bq);
  if (!one_pass || separate_dbias) {
#pragma omp parallel for num_threads(team_size(nt_max)) schedule(static)
    for (idx task = 0; task < row_tasks.count(); ++task) {
      idx b, h, q0;
      row_tasks.decode(task, &b, &h, &q0);
      row_dsum(b, h, q0, std::min<idx>(blk.bq, a.q.seq_of(b) - q0));
    }
  }
  if (separate_dbias) bias_gradient(kt, a, d_o, dsum.data(), blk, nt_max, dbias);
  // Note [key blocks per task]: packed Kᵀ, Vᵀ and dK, dV rows per key block
  const idx nkb = ceil_div(Sk, blk.bk), key_block_bytes = 2 * blk.bk * (D + Dv) * idx{4};
  if (one_pass) {
    // tasks: (b, kv head) pairs, or with head_major kv heads, each through every b in order
    const idx n_tasks = head_major ? Hkv : B * Hkv;
    const int nt = team_size(static_cast<int>(std::min<idx>(nt_max, n_tasks)));
    const idx g = a.k.cu ? 1 : detail::blocks_per_task(nkb, key_block_bytes, n_tasks, 0);
    std::vector<KeyBlockScratch> scratch = per_thread(nt, kt, blk, D, Dv, g);
    // five products (S, dP, dV, dK, dQ): 2.5 forwards; Note [task chunks]
    const idx chunk = detail::task_chunk(2.5 * detail::attention_flops(a), n_tasks, nt);
#pragma omp parallel num_threads(nt)
    {
      KeyBlockScratch& sc = scratch[static_cast<size_t>(omp_get_thread_num())];
#pragma omp for schedule(dynamic, chunk)
      for (idx task = 0; task < n_tasks; ++task) {
        const idx hk = task % Hkv, b_begin = head_major ? 0 : task / Hkv, b_end = head_major ? B : b_begin + 1;
        for (idx b = b_begin; b < b_end; ++b) {
          for (idx h = hk * group; h < (hk + 1) * group; ++h) {
            if (!separate_dbias) row_dsum(b, h, 0, a.q.seq_of(b));
            for (idx i = 0; i < a.q.seq_of(b); ++i) std::fill(dq.row(b, h, i), dq.row(b, h, i) + D, 0.0f);
            if (full_dbias || (head_major && b == 0)) std::fill(dbias_at(b, h, 0, 0), dbias_at(b, h, Sq, 0), 0.0f);
          }
          const idx seq_k = a.k.seq_of(b);
          for (idx k0 = 0; k0 < seq_k; k0 += g * blk.bk)
            key_blocks(b, hk, k0, std::min<idx>(g, ceil_div(seq_k - k0, blk.bk)), sc, true, fuse_dbias);
        }
      }
    }
    return;
  }

  // Pass 1: dK, dV. Task = (batch, kv head, up to g key blocks).
  const idx g1 = a.k.cu ? 1 : detail::blocks_per_task(nkb, key_block_bytes, B * Hkv, 4 * static_cast<idx>(nt_max));
  const detail::BlockTasks tasks1(a.k, Hkv, g1 * blk.bk);
  const idx n_tasks1 = tasks1.count();
  const int nt1 = team_size(static_cast<int>(std::min<idx>(nt_max, n_tasks1)));
  std::vector<KeyBlockScratch> scratch1 = per_thread(nt1, kt, blk, D, Dv, g1);
  const idx chunk1 = detail::task_chunk(2.0 * detail::attention_flops(a), n_tasks1, nt1);  // S, dP, dV, dK
#pragma omp parallel num_threads(nt1)
  {
    KeyBlockScratch& sc = scratch1[static_cast<size_t>(omp_get_thread_num())];
#pragma omp for schedule(dynamic, chunk1)
    for (idx task = 0; task < n_tasks1; ++task) {
      idx b, hk, k0;
      tasks1.decode(task, &b, &hk, &k0);
      const idx n_cols = std::min<idx>(g1 * blk.bk, a.k.seq_of(b) - k0);
      if (full_dbias) {  // this task's dbias columns [k0, k0 + n_cols) of its heads' rows
        for (idx h = hk * group; h < (hk + 1) * group; ++h)
          for (idx i = 0; i < Sq; ++i) std::fill(dbias_at(b, h, i, k0), dbias_at(b, h, i, k0) + n_cols, 0.0f);
      }
      key_blocks(b, hk, k0, ceil_div(n_cols, blk.bk), sc, false, full_dbias);
    }
  }

  // Pass 2: dQ. Task = (batch, head, query block).
  const idx n_tasks2 = row_tasks.count();
  const int nt2 = team_size(static_cast<int>(std::min<idx>(nt_max, n_tasks2)));
  std::vector<KeyBlockScratch> scratch2 = per_thread(nt2, kt, blk, D, Dv);  // pass 2 uses bufs, lim_rel, finite
  const idx chunk2 = detail::task_chunk(1.5 * detail::attention_flops(a), n_tasks2, nt2);  // S, dP, dQ
#pragma omp parallel num_threads(nt2)
  {
    KeyBlockScratch& sc = scratch2[static_cast<size_t>(omp_get_thread_num())];
    BlockBufs& bufs = sc.bufs;
    std::vector<int>& lim_rel = sc.lim_rel;
#pragma omp for schedule(dynamic, chunk2)
    for (idx task = 0; task < n_tasks2; ++task) {
      idx b, h, q0;
      row_tasks.decode(a.causal ? n_tasks2 - 1 - task : task, &b, &h, &q0);  // largest first, as in the forward
      const idx hk = h / group, nq = std::min<idx>(blk.bq, a.q.seq_of(b) - q0);
      float* dqrow = dq.row(b, h, q0);
      idx kmax = 0;
      for (idx i = 0; i < nq; ++i) {
        kmax = std::max(kmax, detail::key_limit(a, b, q0 + i));
        std::fill(dqrow + i * dq.ss, dqrow + i * dq.ss + D, 0.0f);
      }
      for (idx k0 = 0; k0 < kmax; k0 += blk.bk) {
        const idx nk = std::min<idx>(blk.bk, kmax - k0);
        detail::pack_transposed(kt, a.k.row(b, hk, 0), a.k.ss, k0, nk, D, bufs.k_slot(0));
        detail::pack_transposed(kt, a.v.row(b, hk, 0), a.v.ss, k0, nk, Dv, bufs.v_slot(0));
        const detail::TileMask mask =
            p_and_ds(kt, a, d_o, dsum.data(), blk, b, h, q0, nq, k0, nk, bufs, 0, lim_rel);
        // dQ (nq × D) += scale · dS (nq × nk) · K (nk × D)
        detail::block_gemm_masked(kt, nq, D, nk, a.scale, bufs.dp.data(), blk.bk, 1, a.k.row(b, hk, k0), a.k.ss,
                                  dqrow, dq.ss, mask, false, sc.finite);
      }
    }
  }
}

}  // namespace qkv
