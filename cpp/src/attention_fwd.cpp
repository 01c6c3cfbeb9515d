// Attention forward, flash style. Tasks are (batch, head, query block); each
// streams key/value blocks:
//   S = Q·Kᵀ·scale (micro-tiles against K packed transposed)
//   online softmax: running row max m and sum l, O rescaled when m moves, S := P
//   O += P·V
// and finally O /= l, lse = m + log(l). Extra memory: per thread, one S block and
// one packed K block; the (seq_q, seq_k) score matrix never exists.
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
  const detail::Blocks blk = detail::choose_blocks(kt, D, Dv);
  const detail::BlockTasks tasks(a.q, H, blk.bq);
  const idx n_tasks = tasks.count();
  const double flops = 4.0 * static_cast<double>(B) * H * Sq * std::max<idx>(Sk, 1) * std::max<idx>(D + Dv, 1) / 2;
  const int nt = static_cast<int>(std::min<idx>(threads_for(flops, 2.0e6), n_tasks));
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const idx kpanel = ceil_div(blk.bk, kt.nr) * kt.nr * std::max<idx>(D, 1);

#pragma omp parallel num_threads(nt)
  {
    AlignedBuffer s_buf(blk.bq * blk.bk), k_buf(kpanel), stats(3 * blk.bq);
    std::vector<int> lim_rel(blk.bq);
    std::vector<idx> lim(blk.bq);
#pragma omp for schedule(dynamic, 1)
    for (idx task = 0; task < n_tasks; ++task) {
      idx b, h, q0;
      tasks.decode(task, &b, &h, &q0);
      const idx hk = h / group, nq = std::min<idx>(blk.bq, a.q.seq_of(b) - q0);
      float* m = stats.data();
      float* l = m + blk.bq;
      const float* qrow = a.q.row(b, h, q0);
      const float* krow = a.k.row(b, hk, 0);
      const float* vrow = a.v.row(b, hk, 0);
      float* orow = a.o.row(b, h, q0);
      idx kmax = 0;
      for (idx i = 0; i < nq; ++i) {
        lim[i] = detail::key_limit(a, b, q0 + i);
        kmax = std::max(kmax, lim[i]);
        m[i] = neg_inf;
        l[i] = 0.0f;
        float* o = orow + i * a.o.ss;
        for (idx d = 0; d < Dv; ++d) o[d] = 0.0f;
      }
      for (idx k0 = 0; k0 < kmax; k0 += blk.bk) {
        const idx nk = std::min<idx>(blk.bk, kmax - k0);
        detail::pack_transposed(krow, a.k.ss, k0, nk, D, kt.nr, k_buf.data());
        // S (nq × nk) = scale · Q (nq × D) · Kᵀ (D × nk)
        detail::block_gemm(kt, nq, nk, D, a.scale, qrow, a.q.ss, 1, k_buf.data(), true, 0, 0.0f, s_buf.data(),
                           blk.bk);
        for (idx i = 0; i < nq; ++i) lim_rel[i] = static_cast<int>(std::max<idx>(-1, std::min<idx>(lim[i] - k0, nk)));
        BiasView bias;
        if (a.bias) {
          bias.ptr = a.bias + b * a.bias_bs + h * a.bias_hs + q0 * a.bias_qs + k0 * a.bias_ks;
          bias.rs = a.bias_qs;
          bias.cs = a.bias_ks;
        }
        kt.softmax_fwd(s_buf.data(), blk.bk, static_cast<int>(nq), static_cast<int>(nk), bias, lim_rel.data(), m, l,
                       orow, a.o.ss, static_cast<int>(Dv));
        // O (nq × Dv) += P (nq × nk) · V (nk × Dv)
        detail::block_gemm(kt, nq, Dv, nk, 1.0f, s_buf.data(), blk.bk, 1, vrow + k0 * a.v.ss, false, a.v.ss, 1.0f,
                           orow, a.o.ss);
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
