// Row-wise and elementwise ops of the layers (LayerNorm, GELU, softmax cross-entropy)
// and the optimizer updates, on the ISA kernels.
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

// Mean softmax cross-entropy over the rows whose target is not ignore_index, and its
// gradient. logits, dlogits: (rows, c) with row strides; targets: (rows,) in [0, c)
// or ignore_index (the caller checked). dlogits = d loss / d logits (0 on ignored
// rows). The row losses are summed in row order in double: the loss does not depend
// on the thread count. No row left: loss 0, gradient 0.
double softmax_cross_entropy(const KernelTable& kt, idx rows, idx c, const float* logits, idx ldx,
                             const std::int64_t* targets, std::int64_t ignore_index, float label_smoothing,
                             float* dlogits, idx lddx);

// Inverted dropout of n elements (Note [dropout bits] in kernels.cpp): x, y, mask: (n,)
// contiguous; drop probability threshold / 2^32; y = x·scale or 0, mask = scale or 0.
void dropout_forward(const KernelTable& kt, idx n, const float* x, float* y, float* mask, std::uint64_t seed,
                     std::uint32_t threshold, float scale);

// One optimizer step over parameters laid out back to back in flat buffers:
// parameter p is elements [offsets[p], offsets[p+1]); decay[p] says whether its
// step uses `with_decay` (weight decay on) or `without_decay`. w, g and the state
// buffers hold offsets[n_params] elements.
void adam_update(const KernelTable& kt, idx n_params, const idx* offsets, const std::uint8_t* decay, float* w,
                 const float* g, float* m, float* v, const AdamStep& with_decay, const AdamStep& without_decay);
void sgd_update(const KernelTable& kt, idx n_params, const idx* offsets, const std::uint8_t* decay, float* w,
                const float* g, float* buf, const SgdStep& with_decay, const SgdStep& without_decay);

}  // namespace qkv
