// Row-wise and elementwise ops of the layers: LayerNorm and GELU, on the ISA kernels.
#pragma once
#include "qkv/common.h"
#include "qkv/kernels.h"

namespace qkv {

// x, y: (rows, n) with row strides ldx, ldy; gamma, beta: (n,); mean, rstd: (rows,).
void layer_norm_forward(const KernelTable& kt, idx rows, idx n, const float* x, idx ldx, const float* gamma,
                        const float* beta, float eps, float* y, idx ldy, float* mean, float* rstd);

// dy, x, dx: (rows, n) with row strides; writes dx, dgamma (n,), dbeta (n,). dgamma
// and dbeta are summed over fixed row chunks in a fixed order: the result does not
// depend on the thread count.
void layer_norm_backward(const KernelTable& kt, idx rows, idx n, const float* dy, idx lddy, const float* x,
                         idx ldx, const float* gamma, const float* mean, const float* rstd, float* dx, idx lddx,
                         float* dgamma, float* dbeta);

// y = GELU(x), dx = dy·GELU'(x) over rows × n (row strides as given).
void gelu_forward(const KernelTable& kt, idx rows, idx n, const float* x, idx ldx, float* y, idx ldy);
void gelu_backward(const KernelTable& kt, idx rows, idx n, const float* x, idx ldx, const float* dy, idx lddy,
                   float* dx, idx lddx);

}  // namespace qkv
