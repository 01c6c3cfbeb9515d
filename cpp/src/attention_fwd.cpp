// Attention forward, flash style. Tasks are (batch, head, up to g query blocks,
// Note [query blocks per task]); each packs its Q blocks transposed once, then
// streams key/value blocks, each serving every query block of the task:
//   Sᵀ = K·Qᵀ·scale·log2(e) (keys × queries: micro-tiles read K rows in place)
//   online softmax in base 2 down the key axis (vertical: lanes are queries; the
//   log2(e) in the product's alpha makes its range reduction one subtraction), O rescaled
//   where a query's running max moves, Sᵀ := Pᵀ
//   O += P·V (P read column-wise from Pᵀ, V rows in place; Note [non-finite rows]
//   where the tile hides some keys)
// and finally O /= l, lse = m·ln 2 + log(l). Extra memory: per thread one score block
// and the task's packed Q blocks; the (seq_q, seq_k) score matrix never exists.
// Blocks of at most four queries keep S as rows instead, Note [few-row scores].
// One-query steps (decode) take their own tasks, Note [decode tasks].
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention_common.h"

namespace qkv {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Row blocks of at most this many queries take the few-row path, Note [few-row scores]
// (the most rows dot_rows and gemv take at once)
constexpr idx kFewRows = 4;

// Query rows of a task that share one K and V: a query block of one head (rows are
// queries: steps q.ss, o.ss) or, in a decode step, the query of each head of a kv
// group (rows are heads: steps q.hs, o.hs).
struct Rows {
  const float* q;
  idx q_rs;
  float* o;  // O rows, or a decode chunk's partial rows
  idx o_rs;
  BiasView bias;  // at key 0, its rows these rows
  idx n;          // rows
  idx kmax;       // keys [0, kmax) are seen by some row
  bool few;       // n <= kFewRows: dot products with K rows, Q read in place
  float *m, *l;   // running max and sum (bq_pad slots)
  float* qt;      // packed Qᵀ (unless few)
  idx* lim;       // key limit per row (bq_pad slots; padding rows 0)
};

// Note [few-row scores]
// A row block of at most four queries (a decode step: the heads of one kv group; the
// last rows of a short sequence) takes its scores as dot products of K rows with each
// query, Q read in place (dot_rows), and keeps them as rows, S (nq × nk), whose
// softmax runs along the keys (softmax_fwd_rows: lanes are keys). As Sᵀ, with lanes
// for queries, each vector of the softmax would carry one to four useful lanes, and
// a decode key block of 768 would spread its scores over 96 KB at 128-byte steps,
// twice L1, between the K and the V pass. P·V is then one pass over V for all the
// rows (gemv), where micro-tiles of 32 columns would walk V's rows four times.

// Per-thread buffers, allocated before the parallel region so that a failed
// allocation raises in the caller (MemoryError) instead of terminating inside it.
// m, l, lim and the packed Qᵀ hold one slot per row block of a task.
struct TaskScratch {
  AlignedBuffer st_buf, q_buf, m_buf, l_buf, bmax_buf, corr_buf, v_buf;
  std::vector<int> lim_rel;
  std::vector<idx> lim;
  detail::FiniteRows finite_v;
  std::vector<Rows> rows;  // the task's row blocks
  idx bq_pad, qpanel;
  TaskScratch(const KernelTable& kt, const detail::Blocks& blk, idx blocks, idx d, idx dv)
      : finite_v(blk.bk, dv), rows(static_cast<size_t>(blocks)), bq_pad(ceil_div(blk.bq, kt.nr) * kt.nr), qpanel(bq_pad * std::max<idx>(d, 1)) {
    st_buf.resize(std::max(blk.bk * bq_pad, kFewRows * few_ld(blk.bk)));
    if (blk.bq > kFewRows) {  // the few-rows path reads Q and V in place
      q_buf.resize(blocks * qpanel);
      v_buf.resize(blk.bk * v_ld(dv));
    }
    m_buf.resize(blocks * bq_pad);
    bmax_buf.resize(bq_pad);
    corr_buf.resize(bq_pad);
    l_buf.resize(blocks * bq_pad);
    lim_rel.resize(static_cast<size_t>(bq_pad));
    lim.resize(static_cast<size_t>(blocks * bq_pad));
  }
  // Row stride of a few rows' scores S over nk keys (softmax_fwd_rows: whole vectors)
  static idx few_ld(idx nk) { return ceil_div(nk, kLineFloats) * kLineFloats; }
  // Row stride of v_buf, V's block copied into whole lines
  static idx v_ld(idx dv) { return ceil_div(dv, kLineFloats) * kLineFloats; }
  // The row slots the kernels read for n rows (softmax_fwd: whole vectors of queries,
  // n rounded up to at most nr): a short sequence in a packed batch (bq 96) sets up
  // and masks 32 slots, not 96.
  idx slots(const KernelTable& kt, idx n) const { return std::min<idx>(bq_pad, ceil_div(n, kt.nr) * kt.nr); }
  // Row block s of a task: n rows, key limit `limit(i)` for row i; m = -inf, l = 0,
  // Qᵀ packed.
  template <class Limit>
  void start(const KernelTable& kt, idx s, Rows* u, idx n, idx d, Limit limit) {
    u->n = n;
    u->few = n <= kFewRows;
    u->m = m_buf.data() + s * bq_pad;
    u->l = l_buf.data() + s * bq_pad;
    u->qt = u->few ? nullptr : q_buf.data() + s * qpanel;
    u->lim = lim.data() + s * bq_pad;
    u->kmax = 0;
    for (idx i = 0, n_slots = slots(kt, n); i < n_slots; ++i) {
      u->lim[i] = i < n ? limit(i) : 0;  // padding lanes: fully masked
      u->kmax = std::max(u->kmax, u->lim[i]);
      u->m[i] = kNegInf;
      u->l[i] = 0.0f;
    }
    if (!u->few) detail::pack_transposed(kt, u->q, u->q_rs, 0, n, d, u->qt);
  }
};

// One scratch per thread, for tasks of up to `blocks` row blocks.
std::vector<TaskScratch> per_thread(int nt, const KernelTable& kt, const detail::Blocks& blk, idx blocks, idx d,
                                    idx dv) {
  std::vector<TaskScratch> v;
  for (int t = 0; t < nt; ++t) v.emplace_back(kt, blk, blocks, d, dv);
  return v;
}

// Streams the key blocks [k_begin, kmax) of one K/V (row steps ks, vs) through every
// row block of a task: key blocks outermost, so that each K/V block is read from
// memory once and serves all row blocks from cache (Note [query blocks per task]).
// O holds the unnormalised sums afterwards (finish() divides). stream_v: V is read
// once, from memory (a decode task): its rows are prefetched (Note [streaming prefetch]).
void stream_keys(const KernelTable& kt, const detail::Blocks& blk, const float* krow, idx ks, const float* vrow,
                 idx vs, idx d, idx dv, float scale, idx k_begin, Rows* rows, idx n_rows, TaskScratch& sc,
                 bool stream_v = false) {
  const idx bq_pad = sc.bq_pad;
  const float scale2 = scale * static_cast<float>(kLog2e);
  float* st = sc.st_buf.data();
  idx kmax = 0;
  for (idx s = 0; s < n_rows; ++s) kmax = std::max(kmax, rows[s].kmax);
  // Note [misaligned operands]: V's blocks are copied into whole lines (v_buf) when its
  // rows do not start on lines, once per key block for every row block that takes the
  // P·V micro-tiles (the few-row path streams V once: a copy would read it twice)
  bool tiles = false;
  for (idx s = 0; s < n_rows; ++s) tiles = tiles || !rows[s].few;
  const bool copy_v = tiles && sc.v_buf.size() > 0 && !on_lines(vrow, vs);
  for (idx k0 = k_begin; k0 < kmax; k0 += blk.bk) {
    const float* v_blk = vrow + k0 * vs;
    idx v_rs = vs;
    if (copy_v) {
      const idx nk = std::min<idx>(blk.bk, kmax - k0);
      v_rs = TaskScratch::v_ld(dv);
      kt.copy_rows(nk, static_cast<int>(dv), v_blk, vs, sc.v_buf.data(), v_rs, static_cast<int>(v_rs));
      v_blk = sc.v_buf.data();
    }
    for (idx s = 0; s < n_rows; ++s) {
      const Rows& u = rows[s];
      if (k0 >= u.kmax) continue;
      const idx nk = std::min<idx>(blk.bk, u.kmax - k0), nq = u.n;
      // the first key block writes O (beta 0: its old contents are never read),
      // the later ones rescale and accumulate
      const bool first = k0 == k_begin;
      const float beta = first ? 0.0f : 1.0f;
      float* corr = first ? nullptr : sc.corr_buf.data();  // O's factors (Sᵀ path)
      int lim_min = static_cast<int>(nk);
      for (idx i = 0, n_slots = sc.slots(kt, nq); i < n_slots; ++i) {
        sc.lim_rel[i] = static_cast<int>(std::max<idx>(-1, std::min<idx>(u.lim[i] - k0, nk)));
        if (i < nq) lim_min = std::min(lim_min, sc.lim_rel[i]);
      }
      // some query's keys end inside the block (causal: the diagonal): Note [ragged key limits]
      const int* ragged = lim_min < nk ? sc.lim_rel.data() : nullptr;
      BiasView bias = u.bias;
      if (bias.ptr) bias.ptr += k0 * bias.cs;
      // the scores in log2 units (softmax_fwd), P in their place: P(i, j) = st[i*p_rs + j*p_cs]
      idx p_rs = 1, p_cs = bq_pad;
      if (u.few) {  // S (nq × nk) = scale·log2(e) · Q · Kᵀ, rows of ld: Note [few-row scores]
        p_rs = sc.few_ld(nk);
        p_cs = 1;
        kt.dot_rows(nk, static_cast<int>(nq), d, krow + k0 * ks, ks, u.q, u.q_rs, st, p_rs, scale2);
        kt.softmax_fwd_rows(st, p_rs, static_cast<int>(nk), static_cast<int>(nq), bias, sc.lim_rel.data(), u.m,
                            u.l, first ? nullptr : u.o, u.o_rs, static_cast<int>(dv));
      } else {  // Sᵀ (nk × nq) = scale·log2(e) · K (nk × d) · Qᵀ (d × nq)
        // with neither mask nor bias, the product's stores also take each query's max
        // over the block's keys, and the softmax skips its max pass
        float* bmax = ragged || bias.ptr ? nullptr : sc.bmax_buf.data();
        if (bmax) std::fill(bmax, bmax + bq_pad, kNegInf);
        detail::block_gemm(kt, nk, nq, d, scale2, krow + k0 * ks, ks, 1, u.qt, true, 0, 0.0f, st, bq_pad, false,
                           ragged, true, bmax);
        kt.softmax_fwd(st, bq_pad, static_cast<int>(nk), static_cast<int>(nq), bias, sc.lim_rel.data(), u.m, u.l,
                       corr, bmax);
      }
      // O (nq × dv) = corr·O + P (nq × nk) · V (nk × dv) (the rescale where a query's max
      // moved joins the product's stores, Sᵀ's path); V with its non-finite rows zeroed
      // where the tile hides keys, Note [non-finite rows]
      const detail::TileMask mask{sc.lim_rel.data(), bias, nq, nk};
      idx rs_v = 0;
      const float* v_use = sc.finite_v.finite(kt, mask.any_hidden(), v_blk, v_rs, nk, dv, &rs_v);
      if (u.few)  // one streaming pass over V for all the rows (Note [streaming prefetch])
        kt.gemv(static_cast<int>(nq), nk, dv, st, p_rs, v_use, rs_v, u.o, u.o_rs, 1.0f, beta, nullptr, 0);
      else
        detail::block_gemm(kt, nq, dv, nk, 1.0f, st, p_rs, p_cs, v_use, false, rs_v, beta, u.o, u.o_rs, stream_v,
                           ragged, false, nullptr, corr);
      sc.finite_v.add_back(nq, dv, 1.0f, st, p_rs, p_cs, v_blk, v_rs, u.o, u.o_rs, mask, false);
    }
  }
}

// O /= l and lse = m·ln 2 + log(l) (row i's at lse[i*lse_rs], when lse); a row that sees no
// key gets O = 0 (from the products, or written here where its block saw no key) and
// lse = -inf.
void finish(const KernelTable& kt, const Rows& u, idx dv, float* lse, idx lse_rs) {
  for (idx i = 0; i < u.n; ++i) {
    const bool empty = u.l[i] == 0.0f;
    if (lse) lse[i * lse_rs] = empty ? kNegInf : u.m[i] * static_cast<float>(kLn2) + std::log(u.l[i]);
    u.l[i] = empty ? 0.0f : 1.0f / u.l[i];
  }
  if (u.kmax > 0)
    kt.scale_rows(u.o, u.o_rs, u.n, dv, u.l);
  else
    for (idx i = 0; i < u.n; ++i) std::fill(u.o + i * u.o_rs, u.o + i * u.o_rs + dv, 0.0f);
}

// Note [decode tasks]
// A step with one query per head (seq_q == 1, dense form) has one row per head: as
// query blocks of one row, a task would read its head's whole K and V to do 4·seq_k·d
// FLOPs, and with grouped-query attention every head of a group would read the same
// K and V again. So a decode task takes the query of every head of one kv group as
// its rows (steps q.hs, o.hs: K and V are read once per group). When the (batch, kv
// head) pairs are fewer than kDecodeTasks, a sequence's keys are cut into chunks of
// at least kDecodeChunk keys that run in parallel (flash-decoding), each leaving
// unnormalised partial rows (O_c, m_c, l_c), merged exactly afterwards:
//   M = max_c m_c,  L = Σ_c l_c·exp(m_c − M),  O = Σ_c O_c·exp(m_c − M) / L,
//   lse = M + log L,
// the chunks summed in order. The chunks depend on the shape only, never on the
// thread count: results are bit-identical whatever the thread count. (Chunks for
// pairs that already keep the threads busy cost 2-4%: each restarts the streams.)
// One process, old and new builds taking turns, Zen 5: GQA 32/8 heads × 4096 keys,
// d 128: 1.96x on 1 thread, 2.5x on 2; batch 8 of 1024 keys 1.6x and 2.2x; one
// query per kv head unchanged (1.00x, 1.08x).
constexpr idx kDecodeChunk = 512;
constexpr idx kDecodeTasks = 64;

void attention_decode(const KernelTable& kt, const AttentionArgs& a) {
  const idx B = a.q.batch, H = a.q.heads, Hk = a.k.heads, D = a.q.dim, Dv = a.v.dim;
  const idx G = H / Hk;  // rows of a task: the heads of one kv group
  // rows blocked as queries are; G > 1.5 blocks (MQA with many heads) takes several
  detail::Blocks blk = detail::choose_blocks(kt, G, a.k.seq, D, Dv);
  // key blocks of 8 usual ones: fewer, longer runs through K and V (Sᵀ: 96 KB per
  // thread); 1 and 2 threads, Zen 5: 3-8% more bandwidth than 96 keys
  blk.bk = std::min<idx>(8 * blk.bk, std::max<idx>(a.k.seq, 1));
  const idx n_blocks = ceil_div(G, blk.bq);
  // sequence b's keys [0, key_limit) in chunks of chunk[b] keys (a multiple of the key
  // block), at most ceil(kDecodeTasks / (B·Hk)) of them; one chunk (for the zeros) when
  // it has no key
  const idx max_chunks = ceil_div(kDecodeTasks, B * Hk);
  std::vector<idx> chunk(static_cast<size_t>(B));
  std::vector<idx> first(static_cast<size_t>(B) + 1, 0);       // tasks of b: [first[b], first[b+1])
  std::vector<idx> part_first(static_cast<size_t>(B) + 1, 0);  // b's partial slots
  for (idx b = 0; b < B; ++b) {
    const idx lim = detail::key_limit(a, b, 0);
    const idx n = std::max<idx>(1, std::min(max_chunks, lim / kDecodeChunk));
    chunk[b] = std::max<idx>(1, ceil_div(ceil_div(lim, n), blk.bk) * blk.bk);
    const idx c = std::max<idx>(1, ceil_div(lim, chunk[b]));
    first[b + 1] = first[b] + Hk * c;
    part_first[b + 1] = part_first[b] + (c > 1 ? Hk * c : 0);
  }
  const idx n_tasks = first[B], n_parts = part_first[B];
  const double flops = 2.0 * static_cast<double>(B) * H * std::max<idx>(a.k.seq, 1) * std::max<idx>(D + Dv, 1);
  const int nt = team_size(static_cast<int>(std::min<idx>(threads_for(flops, 2.0e6), n_tasks)));

  // partial rows of chunked sequences: slot (b, hk, c) holds G rows of O_c (Dv), m_c, l_c
  AlignedBuffer part_o(n_parts * G * Dv), part_m(n_parts * G), part_l(n_parts * G);
  std::vector<TaskScratch> scratch = per_thread(nt, kt, blk, n_blocks, D, Dv);

#pragma omp parallel num_threads(nt)
  {
    TaskScratch& sc = scratch[static_cast<size_t>(omp_get_thread_num())];
    Rows* rows = sc.rows.data();
#pragma omp for schedule(dynamic, 1)
    for (idx task = 0; task < n_tasks; ++task) {
      const idx b = std::upper_bound(first.begin(), first.end(), task) - first.begin() - 1;
      const idx n_chunks = (first[b + 1] - first[b]) / Hk;
      const idx hk = (task - first[b]) / n_chunks, c = (task - first[b]) % n_chunks;
      const idx lim = detail::key_limit(a, b, 0);
      const idx k_begin = c * chunk[b], k_end = std::min(lim, k_begin + chunk[b]);
      const idx part = part_first[b] + (task - first[b]);  // used when n_chunks > 1
      for (idx s = 0; s < n_blocks; ++s) {
        Rows& u = rows[s];
        const idx h0 = hk * G + s * blk.bq;
        u.q = a.q.row(b, h0, 0);
        u.q_rs = a.q.hs;
        if (n_chunks > 1) {
          u.o = part_o.data() + (part * G + s * blk.bq) * Dv;
          u.o_rs = Dv;
        } else {
          u.o = a.o.row(b, h0, 0);
          u.o_rs = a.o.hs;
        }
        u.bias = detail::bias_block(a, b, h0, 0, 0);
        u.bias.rs = a.bias_hs;  // rows are heads
        sc.start(kt, s, &u, std::min<idx>(blk.bq, G - s * blk.bq), D, [&](idx) { return k_end; });
      }
      stream_keys(kt, blk, a.k.row(b, hk, 0), a.k.ss, a.v.row(b, hk, 0), a.v.ss, D, Dv, a.scale, k_begin,
                  rows, n_blocks, sc, true);
      for (idx s = 0; s < n_blocks; ++s) {
        const Rows& u = rows[s];
        if (n_chunks == 1) {
          finish(kt, u, Dv, a.lse ? a.lse + detail::lse_offset(a, b, hk * G + s * blk.bq) : nullptr,
                 a.q.seq);
        } else {  // the chunk's partial rows: O_c as summed, m_c, l_c
          const idx r0 = part * G + s * blk.bq;
          std::copy(u.m, u.m + u.n, part_m.data() + r0);
          std::copy(u.l, u.l + u.n, part_l.data() + r0);
        }
      }
    }
    // merge the chunks of each (b, hk) with more than one, in chunk order
#pragma omp for schedule(static)
    for (idx bh = 0; bh < B * Hk; ++bh) {
      const idx b = bh / Hk, hk = bh % Hk;
      const idx n_chunks = (first[b + 1] - first[b]) / Hk;
      if (n_chunks == 1) continue;
      const idx p0 = part_first[b] + hk * n_chunks;
      const float *pm = part_m.data(), *pl = part_l.data();
      for (idx i = 0; i < G; ++i) {
        float mx = kNegInf;
        for (idx c = 0; c < n_chunks; ++c) mx = std::max(mx, pm[(p0 + c) * G + i]);
        float* orow = a.o.row(b, hk * G + i, 0);
        float* lse = a.lse ? a.lse + detail::lse_offset(a, b, hk * G + i) : nullptr;
        std::fill(orow, orow + Dv, 0.0f);
        if (mx == kNegInf) {  // no key seen by this row
          if (lse) *lse = kNegInf;
          continue;
        }
        float sum = 0.0f;
        for (idx c = 0; c < n_chunks; ++c) {
          const float mc = pm[(p0 + c) * G + i];
          if (mc == kNegInf) continue;  // the chunk's keys are all hidden from this row
          const float w = std::exp2(mc - mx);  // m in log2 units (softmax_fwd)
          sum += w * pl[(p0 + c) * G + i];
          const float* oc = part_o.data() + ((p0 + c) * G + i) * Dv;
          for (idx j = 0; j < Dv; ++j) orow[j] += w * oc[j];
        }
        const float inv = 1.0f / sum;
        for (idx j = 0; j < Dv; ++j) orow[j] *= inv;
        if (lse) *lse = mx * static_cast<float>(kLn2) + std::log(sum);
      }
    }
  }
}

}  // namespace

void attention_forward(const KernelTable& kt, const AttentionArgs& a) {
  // Sq, Sk: the longest sequences (packed form: the totals; only for the thread count)
  const idx B = a.q.batch, H = a.q.heads, Sq = a.q.seq, Sk = a.k.seq, D = a.q.dim, Dv = a.v.dim;
  if (B == 0 || H == 0 || Sq == 0) return;
  if (Sq == 1 && !a.q.cu && !a.k.cu) return attention_decode(kt, a);
  const idx group = H / a.k.heads;
  const detail::Blocks blk = detail::choose_blocks(kt, a.q.cu ? 0 : Sq, a.k.cu ? 0 : Sk, D, Dv, 2);
  const double flops = 4.0 * static_cast<double>(B) * H * Sq * std::max<idx>(Sk, 1) * std::max<idx>(D + Dv, 1) / 2;
  // Note [query blocks per task] (packed sequences keep one block per task)
  const idx g = a.q.cu ? 1
                       : detail::blocks_per_task(ceil_div(Sq, blk.bq), blk.bq * (D + Dv) * idx{4}, B * H,
                                                 4 * static_cast<idx>(omp_get_max_threads()));
  const detail::BlockTasks tasks(a.q, H, g * blk.bq);  // a task: up to g query blocks of one head
  const idx n_tasks = tasks.count();
  const int nt = team_size(static_cast<int>(std::min<idx>(threads_for(flops, 2.0e6), n_tasks)));
  std::vector<TaskScratch> scratch = per_thread(nt, kt, blk, g, D, Dv);
  // Note [task chunks], from each sequence's own work (the thread count above keeps
  // its estimate from the longest sequences or, packed, the totals)
  const idx chunk = detail::task_chunk(detail::attention_flops(a), n_tasks, nt);

#pragma omp parallel num_threads(nt)
  {
    TaskScratch& sc = scratch[static_cast<size_t>(omp_get_thread_num())];
    Rows* rows = sc.rows.data();
#pragma omp for schedule(dynamic, chunk)
    for (idx task = 0; task < n_tasks; ++task) {
      idx b, h, q_first;
      // causal: the last query blocks see the most keys; taken first (largest task
      // first), the dynamic schedule ends with small tasks and the threads finish together
      tasks.decode(a.causal ? n_tasks - 1 - task : task, &b, &h, &q_first);
      const idx hk = h / group, seq_q = a.q.seq_of(b);
      const idx n_blocks = ceil_div(std::min<idx>(g * blk.bq, seq_q - q_first), blk.bq);
      assert(n_blocks <= g);
      for (idx s = 0; s < n_blocks; ++s) {  // query block s: rows [q0, q0 + n)
        Rows& u = rows[s];
        const idx q0 = q_first + s * blk.bq;
        u.q = a.q.row(b, h, q0);
        u.q_rs = a.q.ss;
        u.o = a.o.row(b, h, q0);
        u.o_rs = a.o.ss;
        u.bias = detail::bias_block(a, b, h, q0, 0);
        sc.start(kt, s, &u, std::min<idx>(blk.bq, seq_q - q0), D,
                 [&](idx i) { return detail::key_limit(a, b, q0 + i); });
      }
      stream_keys(kt, blk, a.k.row(b, hk, 0), a.k.ss, a.v.row(b, hk, 0), a.v.ss, D, Dv, a.scale, 0, rows, n_blocks,
                  sc);
      for (idx s = 0; s < n_blocks; ++s) {
        const idx q0 = q_first + s * blk.bq;
        finish(kt, rows[s], Dv, a.lse ? a.lse + detail::lse_offset(a, b, h) + q0 : nullptr, 1);
      }
    }
  }
}

}  // namespace qkv
