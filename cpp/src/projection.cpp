// The fused Q/K/V projection: forward and backward as GEMMs over segmented maps.
#include "qkv/projection.h"

#include <omp.h>

#include <algorithm>
#include <vector>

namespace qkv {

void project_backward(const KernelTable& kt, idx M, idx d_model, idx N, const MatMap& x, const MatMap& w,
                      const MatMap& dout, const MatMap* dx, const MatMap* dw, float* db) {
  // dx (M×d_model) = dout (M×N) · wᵀ (N×d_model)
  if (dx) gemm(kt, M, d_model, N, 1.0f, dout, w.transposed(), 0.0f, *dx, nullptr);
  // dw (d_model×N) = xᵀ (d_model×M) · dout (M×N)
  if (dw) gemm(kt, d_model, N, M, 1.0f, x.transposed(), dout, 0.0f, *dw, nullptr);
  if (db) {
    // db[j] = Σ_i dout(i, j): threads own column chunks (deterministic order of rows).
    constexpr idx kChunk = 64;
    const idx n_chunks = ceil_div(N, kChunk);
    const int nt = std::min<int>(threads_for(static_cast<double>(M) * N, 2.0e5), static_cast<int>(n_chunks));
#pragma omp parallel for num_threads(team_size(nt)) schedule(static)
    for (idx ch = 0; ch < n_chunks; ++ch) {
      const idx j0 = ch * kChunk, j1 = std::min<idx>(N, j0 + kChunk);
      for (idx j = j0; j < j1; ++j) db[j] = 0.0f;
      for (idx i = 0; i < M; ++i) {
        idx j = j0;
        while (j < j1) {
          idx step, len;
          const float* src = dout.run(i, j, &step, &len);
          len = std::min<idx>(len, j1 - j);
          for (idx q = 0; q < len; ++q) db[j + q] += src[q * step];
          j += len;
        }
      }
    }
  }
}

}  // namespace qkv
