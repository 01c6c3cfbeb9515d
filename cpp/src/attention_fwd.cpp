// Attention forward, flash style. Tasks are (batch, head, up to g query blocks,
// Note [query blocks per task]); each packs its Q blocks transposed once, then
// streams key/value blocks, each serving every query block of the task:
//   Sᵀ = K·Qᵀ·scale (keys × queries: micro-tiles read K rows in place)
//   online softmax down the key axis (vertical: lanes are queries), O rescaled
//   where a query's running max moves, Sᵀ := Pᵀ
//   O += P·V (P read column-wise from Pᵀ, V rows in place; Note [non-finite rows]
//   where the tile hides some keys)
// and finally O /= l, lse = m + log(l). Extra memory: per thread one score block
// and the task's packed Q blocks; the (seq_q, seq_k) score matrix never exists.
#include <omp.h>

#include <cmath>
#include <limits>
#include <vector>

#include "attention_common.h"

namespace qkv {

void attention_forward(const KernelTable& kt, const AttentionArgs& a) {
  // Sq, Sk: the longest sequences (packed form: the totals; only for the thread count)
  const idx B = a.q.batch, H = a.q.heads, Sq = a.q.seq, Sk = a.k.seq, D = a.q.dim, Dv = a.v.dim;
  if (B == 0 || H == 0 || Sq == 0) return;
  const idx group = H / a.k.heads;
  const detail::Blocks blk = detail::choose_blocks(kt, a.q.cu ? 0 : Sq, a.k.cu ? 0 : Sk, D, Dv);
  const double flops = 4.0 * static_cast<double>(B) * H * Sq * std::max<idx>(Sk, 1) * std::max<idx>(D + Dv, 1) / 2;
  // Note [query blocks per task] (packed sequences keep one block per task)
  const idx g = a.q.cu ? 1
                       : detail::blocks_per_task(ceil_div(Sq, blk.bq), blk.bq * (D + Dv) * idx{4}, B * H,
                                                 4 * static_cast<idx>(omp_get_max_threads()));
  const detail::BlockTasks tasks(a.q, H, g * blk.bq);  // a task: up to g query blocks of one head
  const idx n_tasks = tasks.count();
  const int nt = static_cast<int>(std::min<idx>(threads_for(flops, 2.0e6), n_tasks));
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const idx bq_pad = ceil_div(blk.bq, kt.nr) * kt.nr;  // Qᵀ panels and Sᵀ rows
  const idx qpanel = bq_pad * std::max<idx>(D, 1);

  // Per-thread buffers, allocated here so that a failed allocation raises in the
  // caller (MemoryError) instead of terminating inside the parallel region. m, l, lim
  // and the packed Qᵀ hold one slot per query block of a task.
  struct Scratch {
    AlignedBuffer st_buf, q_buf, m_buf, l_buf;
    std::vector<int> lim_rel;
    std::vector<float> p_row;
    std::vector<idx> lim;
    detail::FiniteRows finite_v;
    Scratch(idx bk, idx dv) : finite_v(bk, dv) {}
  };
  std::vector<Scratch> scratch;
  for (int t = 0; t < nt; ++t) scratch.emplace_back(blk.bk, Dv);
  for (Scratch& sc : scratch) {
    sc.st_buf.resize(blk.bk * bq_pad);
    if (blk.bq > 4) sc.q_buf.resize(g * qpanel);  // the few-queries path reads Q in place
    sc.m_buf.resize(g * bq_pad);
    sc.l_buf.resize(g * bq_pad);
    sc.lim_rel.resize(static_cast<size_t>(bq_pad));
    sc.p_row.resize(static_cast<size_t>(blk.bk));
    sc.lim.resize(static_cast<size_t>(g * bq_pad));
  }

#pragma omp parallel num_threads(nt)
  {
    Scratch& sc = scratch[static_cast<size_t>(omp_get_thread_num())];
    std::vector<int>& lim_rel = sc.lim_rel;
    std::vector<float>& p_row = sc.p_row;
    float* st = sc.st_buf.data();
#pragma omp for schedule(dynamic, 1)
    for (idx task = 0; task < n_tasks; ++task) {
      idx b, h, q_first;
      // causal: the last query blocks see the most keys; taken first (largest task
      // first), the dynamic schedule ends with small tasks and the threads finish together
      tasks.decode(a.causal ? n_tasks - 1 - task : task, &b, &h, &q_first);
      const idx hk = h / group, seq_q = a.q.seq_of(b);
      const idx n_sub = ceil_div(std::min<idx>(g * blk.bq, seq_q - q_first), blk.bq);
      const float* krow = a.k.row(b, hk, 0);
      const float* vrow = a.v.row(b, hk, 0);
      // Query block s (rows [q0, q0 + nq)): its m, l, lim and packed Qᵀ in slot s.
      struct Sub {
        idx q0, nq, kmax;
        bool few;  // a few queries (decode): dot products with K rows, Q read in place
        float *m, *l, *q;
        idx* lim;
      };
      Sub subs[detail::kMaxBlocksPerTask];
      assert(n_sub <= detail::kMaxBlocksPerTask);
      idx kmax = 0;
      for (idx s = 0; s < n_sub; ++s) {
        Sub& u = subs[s];
        u.q0 = q_first + s * blk.bq;
        u.nq = std::min<idx>(blk.bq, seq_q - u.q0);
        u.few = u.nq <= 4;
        u.m = sc.m_buf.data() + s * bq_pad;
        u.l = sc.l_buf.data() + s * bq_pad;
        u.q = sc.q_buf.data() + s * qpanel;
        u.lim = sc.lim.data() + s * bq_pad;
        u.kmax = 0;
        for (idx i = 0; i < bq_pad; ++i) {
          u.lim[i] = i < u.nq ? detail::key_limit(a, b, u.q0 + i) : 0;  // padding lanes: fully masked
          u.kmax = std::max(u.kmax, u.lim[i]);
          u.m[i] = neg_inf;
          u.l[i] = 0.0f;
        }
        kmax = std::max(kmax, u.kmax);
        if (!u.few) detail::pack_transposed(kt, a.q.row(b, h, u.q0), a.q.ss, 0, u.nq, D, u.q);
      }
      // Key blocks outermost: each K/V block is read from memory once per task and
      // serves all of its query blocks from cache (Note [query blocks per task]).
      for (idx k0 = 0; k0 < kmax; k0 += blk.bk) {
        for (idx s = 0; s < n_sub; ++s) {
          const Sub& u = subs[s];
          if (k0 >= u.kmax) continue;
          const idx nk = std::min<idx>(blk.bk, u.kmax - k0), nq = u.nq;
          float* orow = a.o.row(b, h, u.q0);
          // the first key block writes O (beta 0: its old contents are never read),
          // the later ones rescale and accumulate
          const bool first = k0 == 0;
          const float beta = first ? 0.0f : 1.0f;
          // Sᵀ (nk × nq) = scale · K (nk × D) · Qᵀ (D × nq)
          if (u.few)
            kt.dot_rows(nk, static_cast<int>(nq), D, krow + k0 * a.k.ss, a.k.ss, a.q.row(b, h, u.q0), a.q.ss, st,
                        bq_pad, a.scale);
          else
            detail::block_gemm(kt, nk, nq, D, a.scale, krow + k0 * a.k.ss, a.k.ss, 1, u.q, true, 0, 0.0f, st,
                               bq_pad);
          for (idx i = 0; i < bq_pad; ++i)
            lim_rel[i] = static_cast<int>(std::max<idx>(-1, std::min<idx>(u.lim[i] - k0, nk)));
          const BiasView bias = detail::bias_block(a, b, h, u.q0, k0);
          kt.softmax_fwd(st, bq_pad, static_cast<int>(nk), static_cast<int>(nq), bias, lim_rel.data(), u.m, u.l,
                         first ? nullptr : orow, a.o.ss, static_cast<int>(Dv));
          // O (nq × Dv) += P (nq × nk) · V (nk × Dv), P(i, j) = Pᵀ[j*bq_pad + i]; V with
          // its non-finite rows zeroed where the tile hides keys, Note [non-finite rows]
          const detail::TileMask mask{lim_rel.data(), bias, nq, nk};
          const float* v_blk = vrow + k0 * a.v.ss;
          idx rs_v = 0;
          const float* v_use = sc.finite_v.finite(kt, mask.any_hidden(), v_blk, a.v.ss, nk, Dv, &rs_v);
          if (u.few) {
            for (idx i = 0; i < nq; ++i) {  // one streaming pass over V per query row
              for (idx j = 0; j < nk; ++j) p_row[j] = st[j * bq_pad + i];
              kt.gemv(nk, Dv, p_row.data(), v_use, rs_v, orow + i * a.o.ss, 1.0f, beta, nullptr, 0);
            }
          } else {
            detail::block_gemm(kt, nq, Dv, nk, 1.0f, st, 1, bq_pad, v_use, false, rs_v, beta, orow, a.o.ss);
          }
          sc.finite_v.add_back(nq, Dv, 1.0f, st, 1, bq_pad, v_blk, a.v.ss, orow, a.o.ss, mask, false);
        }
      }
      // O /= l (a query that sees no key has O = 0 from the products, or no product at
      // all where its block saw no key: zeros written here)
      for (idx s = 0; s < n_sub; ++s) {
        const Sub& u = subs[s];
        float* orow = a.o.row(b, h, u.q0);
        for (idx i = 0; i < u.nq; ++i) {
          const bool empty = u.l[i] == 0.0f;
          if (a.lse) a.lse[detail::lse_offset(a, b, h) + u.q0 + i] = empty ? neg_inf : u.m[i] + std::log(u.l[i]);
          u.l[i] = empty ? 0.0f : 1.0f / u.l[i];
        }
        if (u.kmax > 0)
          kt.scale_rows(orow, a.o.ss, u.nq, Dv, u.l);
        else
          for (idx i = 0; i < u.nq; ++i) std::fill(orow + i * a.o.ss, orow + i * a.o.ss + Dv, 0.0f);
      }
    }
  }
}

}  // namespace qkv
