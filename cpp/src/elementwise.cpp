// LayerNorm and GELU drivers: rows split across threads, the row kernels per ISA.
#include "qkv/elementwise.h"

#include <omp.h>

#include <algorithm>
#include <vector>

namespace qkv {

void layer_norm_forward(const KernelTable& kt, idx rows, idx n, const float* x, idx ldx, const float* gamma,
                        const float* beta, float eps, float* y, idx ldy, float* mean, float* rstd) {
  const int nt = threads_for(static_cast<double>(rows) * n, 6.0e4);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (idx r = 0; r < rows; ++r) kt.layernorm_fwd(x + r * ldx, y + r * ldy, n, gamma, beta, eps, mean + r, rstd + r);
}

void layer_norm_backward(const KernelTable& kt, idx rows, idx n, const float* dy, idx lddy, const float* x,
                         idx ldx, const float* gamma, const float* mean, const float* rstd, float* dx, idx lddx,
                         float* dgamma, float* dbeta) {
  // Fixed chunks of rows, each with its own dgamma/dbeta partial, reduced in order.
  constexpr idx kChunks = 32;
  const idx chunk = std::max<idx>(1, ceil_div(rows, kChunks));
  const idx n_chunks = rows > 0 ? ceil_div(rows, chunk) : 0;
  std::vector<float> part(static_cast<size_t>(2 * n_chunks * n), 0.0f);
  const int nt = std::min<int>(threads_for(static_cast<double>(rows) * n, 6.0e4), static_cast<int>(std::max<idx>(n_chunks, 1)));
#pragma omp parallel for num_threads(nt) schedule(static)
  for (idx c = 0; c < n_chunks; ++c) {
    float* pg = part.data() + 2 * c * n;
    float* pb = pg + n;
    for (idx r = c * chunk; r < std::min(rows, (c + 1) * chunk); ++r)
      kt.layernorm_bwd(dy + r * lddy, x + r * ldx, n, gamma, mean[r], rstd[r], dx + r * lddx, pg, pb);
  }
  std::fill(dgamma, dgamma + n, 0.0f);
  std::fill(dbeta, dbeta + n, 0.0f);
  for (idx c = 0; c < n_chunks; ++c) {
    const float* pg = part.data() + 2 * c * n;
    for (idx j = 0; j < n; ++j) {
      dgamma[j] += pg[j];
      dbeta[j] += pg[n + j];
    }
  }
}

void gelu_forward(const KernelTable& kt, idx rows, idx n, const float* x, idx ldx, float* y, idx ldy) {
  const int nt = threads_for(static_cast<double>(rows) * n, 3.0e4);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (idx r = 0; r < rows; ++r) kt.gelu_fwd(x + r * ldx, y + r * ldy, n);
}

void gelu_backward(const KernelTable& kt, idx rows, idx n, const float* x, idx ldx, const float* dy, idx lddy,
                   float* dx, idx lddx) {
  const int nt = threads_for(static_cast<double>(rows) * n, 3.0e4);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (idx r = 0; r < rows; ++r) kt.gelu_bwd(x + r * ldx, dy + r * lddy, dx + r * lddx, n);
}

}  // namespace qkv
