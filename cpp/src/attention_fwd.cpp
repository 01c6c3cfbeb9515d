// Attention forward, flash style. Tasks are (batch, head, query block); each
// packs its Q block transposed once, then streams key/value blocks:
//   Sᵀ = K·Qᵀ·scale (keys × queries: micro-tiles read K rows in place)
//   online softmax down the key axis (vertical: lanes are queries), O rescaled
//   where a query's running max moves, Sᵀ := Pᵀ
//   O += P·V (P read column-wise from Pᵀ, V rows in place; Note [non-finite rows]
//   where the tile hides some keys)
// and finally O /= l, lse = m + log(l). Extra memory: per thread one score block
// and one packed Q block; the (seq_q, seq_k) score matrix never exists.
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
  const detail::BlockTasks tasks(a.q, H, blk.bq);
  const idx n_tasks = tasks.count();
  const double flops = 4.0 * static_cast<double>(B) * H * Sq * std::max<idx>(Sk, 1) * std::max<idx>(D + Dv, 1) / 2;
  const int nt = static_cast<int>(std::min<idx>(threads_for(flops, 2.0e6), n_tasks));
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const idx bq_pad = ceil_div(blk.bq, kt.nr) * kt.nr;  // Qᵀ panels and Sᵀ rows
  const idx qpanel = bq_pad * std::max<idx>(D, 1);

  // Per-thread buffers, allocated here so that a failed allocation raises in the
  // caller (MemoryError) instead of terminating inside the parallel region.
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
    if (blk.bq > 4) sc.q_buf.resize(qpanel);  // the few-queries path reads Q in place
    sc.m_buf.resize(bq_pad);
    sc.l_buf.resize(bq_pad);
    sc.lim_rel.resize(static_cast<size_t>(bq_pad));
    sc.p_row.resize(static_cast<size_t>(blk.bk));
    sc.lim.resize(static_cast<size_t>(bq_pad));
  }

#pragma omp parallel num_threads(nt)
  {
    Scratch& sc = scratch[static_cast<size_t>(omp_get_thread_num())];
    AlignedBuffer &st_buf = sc.st_buf, &q_buf = sc.q_buf, &m_buf = sc.m_buf, &l_buf = sc.l_buf;
    std::vector<int>& lim_rel = sc.lim_rel;
    std::vector<float>& p_row = sc.p_row;
    std::vector<idx>& lim = sc.lim;
#pragma omp for schedule(dynamic, 1)
    for (idx task = 0; task < n_tasks; ++task) {
      idx b, h, q0;
      // causal: the last query blocks see the most keys; taken first (largest task
      // first), the dynamic schedule ends with small tasks and the threads finish together
      tasks.decode(a.causal ? n_tasks - 1 - task : task, &b, &h, &q0);
      const idx hk = h / group, nq = std::min<idx>(blk.bq, a.q.seq_of(b) - q0);
      float* m = m_buf.data();
      float* l = l_buf.data();
      const float* krow = a.k.row(b, hk, 0);
      const float* vrow = a.v.row(b, hk, 0);
      float* orow = a.o.row(b, h, q0);
      idx kmax = 0;
      for (idx i = 0; i < bq_pad; ++i) {
        lim[i] = i < nq ? detail::key_limit(a, b, q0 + i) : 0;  // padding lanes: fully masked
        kmax = std::max(kmax, lim[i]);
        m[i] = neg_inf;
        l[i] = 0.0f;
      }
      for (idx i = 0; i < nq; ++i) std::fill(orow + i * a.o.ss, orow + i * a.o.ss + Dv, 0.0f);
      // A few queries (decode): dot products of K rows with them, no tile of mostly
      // padding columns; otherwise micro-tiles against Q packed transposed.
      const bool few = nq <= 4;
      if (!few) detail::pack_transposed(kt, a.q.row(b, h, q0), a.q.ss, 0, nq, D, q_buf.data());
      for (idx k0 = 0; k0 < kmax; k0 += blk.bk) {
        const idx nk = std::min<idx>(blk.bk, kmax - k0);
        // Sᵀ (nk × nq) = scale · K (nk × D) · Qᵀ (D × nq)
        if (few)
          kt.dot_rows(nk, static_cast<int>(nq), D, krow + k0 * a.k.ss, a.k.ss, a.q.row(b, h, q0), a.q.ss,
                      st_buf.data(), bq_pad, a.scale);
        else
          detail::block_gemm(kt, nk, nq, D, a.scale, krow + k0 * a.k.ss, a.k.ss, 1, q_buf.data(), true, 0, 0.0f,
                             st_buf.data(), bq_pad);
        for (idx i = 0; i < bq_pad; ++i)
          lim_rel[i] = static_cast<int>(std::max<idx>(-1, std::min<idx>(lim[i] - k0, nk)));
        const BiasView bias = detail::bias_block(a, b, h, q0, k0);
        kt.softmax_fwd(st_buf.data(), bq_pad, static_cast<int>(nk), static_cast<int>(nq), bias, lim_rel.data(), m, l,
                       orow, a.o.ss, static_cast<int>(Dv));
        // O (nq × Dv) += P (nq × nk) · V (nk × Dv), P(i, j) = Pᵀ[j*bq_pad + i]; V with
        // its non-finite rows zeroed where the tile hides keys, Note [non-finite rows]
        const detail::TileMask mask{lim_rel.data(), bias, nq, nk};
        const float* v_blk = vrow + k0 * a.v.ss;
        idx rs_v = 0;
        const float* v_use = sc.finite_v.finite(kt, mask.any_hidden(), v_blk, a.v.ss, nk, Dv, &rs_v);
        if (few) {
          for (idx i = 0; i < nq; ++i) {  // one streaming pass over V per query row
            for (idx j = 0; j < nk; ++j) p_row[j] = st_buf.data()[j * bq_pad + i];
            kt.gemv(nk, Dv, p_row.data(), v_use, rs_v, orow + i * a.o.ss, 1.0f, 1.0f, nullptr, 0);
          }
        } else {
          detail::block_gemm(kt, nq, Dv, nk, 1.0f, st_buf.data(), 1, bq_pad, v_use, false, rs_v, 1.0f, orow, a.o.ss);
        }
        sc.finite_v.add_back(nq, Dv, 1.0f, st_buf.data(), 1, bq_pad, v_blk, a.v.ss, orow, a.o.ss, mask, false);
      }
      for (idx i = 0; i < nq; ++i) {
        float* o = orow + i * a.o.ss;
        const bool empty = l[i] == 0.0f;
        const float inv = empty ? 0.0f : 1.0f / l[i];
        for (idx d = 0; d < Dv; ++d) o[d] *= inv;
        if (a.lse) a.lse[detail::lse_offset(a, b, h) + q0 + i] = empty ? neg_inf : m[i] + std::log(l[i]);
      }
    }
  }
}

}  // namespace qkv
