// The fused Q/K/V projection and its gradients, on the GEMM driver.
// M = batch·seq rows, d_model inputs, N = (num_heads + 2·num_kv_heads)·d_head outputs.
#pragma once
#include "qkv/gemm.h"

namespace qkv {

// The forward, out(M×N) = x(M×d_model) · w(d_model×N) + bias(N), is one gemm whose
// output map's segments are the heads of Q, K and V (head-major, no transpose copy).

// Given dout (M×N): dx = dout·wᵀ (M×d_model), dw = xᵀ·dout (d_model×N),
// db = column sums of dout (N). Any output may be null (not computed).
// Column sums are deterministic (each column summed by one thread, rows in order).
void project_backward(const KernelTable& kt, idx M, idx d_model, idx N, const MatMap& x, const MatMap& w,
                      const MatMap& dout, const MatMap* dx, const MatMap* dw, float* db);

}  // namespace qkv
