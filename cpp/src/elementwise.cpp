// Drivers of the layer ops (LayerNorm, GELU, softmax cross-entropy) and of the
// optimizer updates: rows or element chunks split across threads, the kernels per ISA.
#include "qkv/elementwise.h"

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace qkv {

void layer_norm_forward(const KernelTable& kt, idx rows, idx n, const float* x, idx ldx, const float* gamma,
                        const float* beta, float eps, float* y, idx ldy, float* mean, float* rstd) {
  const int nt = threads_for(static_cast<double>(rows) * n, 6.0e4);
#pragma omp parallel for num_threads(team_size(nt)) schedule(static)
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
#pragma omp parallel for num_threads(team_size(nt)) schedule(static)
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
  if (n <= 0) return;  // (not a loop over rows of nothing: 2**40 of them took hours)
  const int nt = threads_for(static_cast<double>(rows) * n, 3.0e4);
#pragma omp parallel for num_threads(team_size(nt)) schedule(static)
  for (idx r = 0; r < rows; ++r) kt.gelu_fwd(x + r * ldx, y + r * ldy, n);
}

void gelu_backward(const KernelTable& kt, idx rows, idx n, const float* x, idx ldx, const float* dy, idx lddy,
                   float* dx, idx lddx) {
  if (n <= 0) return;
  const int nt = threads_for(static_cast<double>(rows) * n, 3.0e4);
#pragma omp parallel for num_threads(team_size(nt)) schedule(static)
  for (idx r = 0; r < rows; ++r) kt.gelu_bwd(x + r * ldx, dy + r * lddy, dx + r * lddx, n);
}

double softmax_cross_entropy(const KernelTable& kt, idx rows, idx c, const float* logits, idx ldx,
                             const std::int64_t* targets, std::int64_t ignore_index, float label_smoothing,
                             float* dlogits, idx lddx) {
  idx n_valid = 0;
  for (idx r = 0; r < rows; ++r) n_valid += targets[r] != ignore_index;
  const float grad_scale = 1.0f / static_cast<float>(std::max<idx>(n_valid, 1));
  std::vector<float> row_loss(static_cast<size_t>(rows), 0.0f);
  const int nt = threads_for(static_cast<double>(rows) * c, 3.0e4);
#pragma omp parallel for num_threads(team_size(nt)) schedule(static)
  for (idx r = 0; r < rows; ++r) {
    if (targets[r] == ignore_index) {
      std::fill(dlogits + r * lddx, dlogits + r * lddx + c, 0.0f);
      continue;
    }
    row_loss[r] = kt.xent_row(logits + r * ldx, c, targets[r], label_smoothing, grad_scale, dlogits + r * lddx);
  }
  double total = 0.0;
  for (float l : row_loss) total += l;
  return total / static_cast<double>(std::max<idx>(n_valid, 1));
}

void dropout_forward(const KernelTable& kt, idx n, const float* x, float* y, float* mask, std::uint64_t seed,
                     std::uint32_t threshold, float scale) {
  // Chunks of 2^15 elements aligned to 2^15 never cross a 2^32 boundary of the index.
  constexpr idx kChunk = idx(1) << 15;
  const idx n_chunks = ceil_div(n, kChunk);
  const int nt = threads_for(static_cast<double>(n), 6.0e4);
#pragma omp parallel for num_threads(team_size(nt)) schedule(static)
  for (idx c = 0; c < n_chunks; ++c) {
    const idx b = c * kChunk;
    kt.dropout_fwd(x + b, y + b, mask + b, std::min(kChunk, n - b), seed, static_cast<std::uint32_t>(b),
                   static_cast<std::uint32_t>(static_cast<std::uint64_t>(b) >> 32), threshold, scale);
  }
}

namespace {

// Runs update(p, begin, end) over chunks of parameters' element ranges: parameters are
// cut into pieces of at most kChunk elements, the pieces split across threads. Each
// element is updated once, independently of the others, so the split does not matter.
template <class F>
void for_param_chunks(idx n_params, const idx* offsets, F&& update) {
  constexpr idx kChunk = 1 << 15;
  std::vector<idx> piece_param, piece_begin;  // the pieces, in order
  for (idx p = 0; p < n_params; ++p)
    for (idx b = offsets[p]; b < offsets[p + 1]; b += kChunk) {
      piece_param.push_back(p);
      piece_begin.push_back(b);
    }
  const idx n_pieces = static_cast<idx>(piece_param.size());
  const int nt = threads_for(static_cast<double>(offsets[n_params] - offsets[0]), 1.0e5);
#pragma omp parallel for num_threads(team_size(nt)) schedule(dynamic, 1)
  for (idx i = 0; i < n_pieces; ++i) {
    const idx p = piece_param[i], b = piece_begin[i];
    update(p, b, std::min(b + kChunk, offsets[p + 1]));
  }
}

}  // namespace

void adam_update(const KernelTable& kt, idx n_params, const idx* offsets, const std::uint8_t* decay, float* w,
                 const float* g, float* m, float* v, const AdamStep& with_decay, const AdamStep& without_decay) {
  for_param_chunks(n_params, offsets, [&](idx p, idx b, idx e) {
    kt.adam_update(w + b, g + b, m + b, v + b, e - b, decay[p] ? with_decay : without_decay);
  });
}

void sgd_update(const KernelTable& kt, idx n_params, const idx* offsets, const std::uint8_t* decay, float* w,
                const float* g, float* buf, const SgdStep& with_decay, const SgdStep& without_decay) {
  for_param_chunks(n_params, offsets, [&](idx p, idx b, idx e) {
    kt.sgd_update(w + b, g + b, buf ? buf + b : nullptr, e - b, decay[p] ? with_decay : without_decay);
  });
}

}  // namespace qkv
