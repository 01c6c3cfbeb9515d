// Scaled-dot-product attention, flash style: forward and backward drivers.
#pragma once
#include "qkv/common.h"
#include "qkv/kernels.h"

namespace qkv {

// A (batch, heads, seq, dim) tensor; element strides bs, hs, ss; the last axis is
// contiguous. Strided views (Q/K/V sliced out of one packed buffer) need no copy.
// Packed variable-length form: with cu (batch+1 offsets), sequence b is rows
// [cu[b], cu[b+1]) of one (total, heads, dim) tensor and bs is unused.
struct Tensor4 {
  float* ptr = nullptr;
  idx batch = 0, heads = 0, seq = 0, dim = 0;
  idx bs = 0, hs = 0, ss = 0;
  const idx* cu = nullptr;
  float* row(idx b, idx h, idx s) const { return ptr + (cu ? cu[b] * ss : b * bs) + h * hs + s * ss; }
  idx seq_of(idx b) const { return cu ? cu[b + 1] - cu[b] : seq; }
};

// Note [attention masking]
// Query row i of batch b may attend key j iff j < lim(b, i), where
//   lim(b, i) = min(seq_k, key_lengths[b], causal ? i + (seq_k - seq_q) + 1 : seq_k)
// with seq_q, seq_k the lengths of sequence b (they differ per b in the packed form)
// (causal is aligned bottom-right: the last query sees every key; for seq_q == seq_k
// this is the usual top-left mask). The additive bias may add -inf anywhere. A row
// with no key left outputs 0 with lse = -inf, and gets zero gradients.
// A hidden pair (i, j) is exact: nothing of k, v or bias at key j reaches row i of o,
// lse or dq, and nothing of q or do at row i reaches row j of dk or dv, even when they
// are NaN or Inf (a hidden score is -inf whatever q·k is; the block products follow
// Note [non-finite rows] in attention_common.h). Keys past key_lengths are never read.
struct AttentionArgs {
  Tensor4 q;   // (batch, num_heads, seq_q, d_head)
  Tensor4 k;   // (batch, num_kv_heads, seq_k, d_head)
  Tensor4 v;   // (batch, num_kv_heads, seq_k, d_v)
  Tensor4 o;   // (batch, num_heads, seq_q, d_v)
  float* lse = nullptr;               // (batch, num_heads, seq_q) contiguous, or (num_heads, total_q)
                                      // in the packed form; forward: may be null
  float scale = 1.0f;
  bool causal = false;
  const idx* key_lengths = nullptr;   // (batch,) or null
  const float* bias = nullptr;        // element (b, h, i, j) at bias[b*bias_bs + h*bias_hs + i*bias_qs + j*bias_ks]
  idx bias_bs = 0, bias_hs = 0, bias_qs = 0, bias_ks = 0;
};

// o, lse = attention(q, k, v). Extra memory: O(threads · block²).
void attention_forward(const KernelTable& kt, const AttentionArgs& a);

// The gradient of the additive bias (dense form only): dS = P∘(dP − D) summed over
// the batches (batch == 1) and heads (heads == 1) that the bias broadcasts over.
// (batch, heads, seq_q, seq_k) contiguous; batch is 1 or a.q.batch, heads 1 or a.q.heads.
struct BiasGrad {
  float* ptr = nullptr;
  idx batch = 0, heads = 0;
};

// dq, dk, dv (and dbias when dbias.ptr) from do, with a.o and a.lse from the forward.
// Outputs are written (not accumulated); results are identical whatever the thread count.
void attention_backward(const KernelTable& kt, const AttentionArgs& a, const Tensor4& d_o, const Tensor4& dq,
                        const Tensor4& dk, const Tensor4& dv, const BiasGrad& dbias = {});

}  // namespace qkv
