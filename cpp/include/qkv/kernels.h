// The kernel table: the inner loops that are compiled once per ISA.
// See Note [per-ISA kernels] in CMakeLists.txt. This header holds no ISA code.
#pragma once
#include <cstdint>

namespace qkv {

using idx = std::int64_t;

constexpr idx kLineFloats = 16;  // floats per 64-byte cache line

// Note [misaligned operands]
// NumPy allocates a large array 16 bytes into a cache line, so the rows of a user's
// matrix with 16k columns all start 16 bytes in: each 64-byte vector load from them
// touches two lines (a split load, two of the core's load slots), and a row of n floats
// spans one line more than n / 16. The micro-tiles stream their vector operand (B) from
// it k times per tile, so the drivers give them whole lines: the few-row GEMM starts
// its column strips on B's lines, or, where four or more row tiles read a strip, has
// the first of them leave a copy on lines as it streams the strip (GemmTile::b_copy,
// gemm_small_m); attention forward copies each V block into lines once
// for all the row blocks of its task (stream_keys); the tiles prefetch every line C's
// rows touch. Packed operands (AlignedBuffer) start on lines.
// One process, old and new taking turns, NumPy arrays, Ice Lake, GFLOP/s on 1 thread:
// matmul (128, 384, 1152) 83 -> 120, (64, 1024, 4096) 37 -> 51; attention forward (4, 16,
// 1024, 64) 85 -> 98, (8, 12, 512, 64) 80 -> 83, (1, 16, 2048, 64, causal) 71 -> 76,
// (1, 8, 4096, 128, causal) 91 -> 97; large GEMMs with C's last lines prefetched too
// (2048, 768, 2304) 93-109 -> 98-116, (4096, 384, 1152) 67-76 -> 74-87.

// Whether rows at x, row step rs (floats), all start on cache lines.
inline bool on_lines(const float* x, idx rs) {
  return reinterpret_cast<std::uintptr_t>(x) % (kLineFloats * sizeof(float)) == 0 && rs % kLineFloats == 0;
}

// Rows of a row-major B that the GEMM driver packs at a time, across all its panels;
// copy_rows prefetches this many rows ahead (the same columns of the next row block)
constexpr idx kPackRows = 16;
constexpr double kLn2 = 0.693147180559945309, kLog2e = 1.44269504088896341;  // ln 2, log2(e)

// One micro-tile of a GEMM (XNNPACK-style: raw pointers, sizes, strides):
//   c_rows[i][j] = alpha * sum_p a[i*rs_a + p*cs_a] * B(p, j) (+ bias[j]) (+ beta * c_rows[i][j])
// for i < m, j < n, p < k, with B(p, j) = b[p*rs_b + j] for j < nr (a packed panel
// has rs_b = nr) and, in a wide tile (nr < n <= 2·nr, Note [wide tiles]), B(p, j) =
// b[b_panel + p*rs_b + j - nr] for j >= nr: two panels side by side. A is read along
// its rows where cs_a = 1 (then m <= mr_rows), else down its columns (rs_a = 1, m <=
// mr); m <= wide_mr in a wide tile. beta == 0 never reads C; bias may be null.
struct GemmTile {
  idx k;
  int m, n;
  const float* a;
  idx rs_a, cs_a;
  const float* b;
  idx rs_b;
  idx b_panel = 0;       // a wide tile's columns nr.. start at b + b_panel
  float* const* c_rows;  // m row pointers, each to column 0 of the tile
  float alpha, beta;
  const float* bias;     // (n,) or null
  int act = 0;           // epilogue applied last: 0 none, 1 GELU (exact, erf form)
  bool stream_b = false; // b is read once from memory: prefetch its rows ahead (Note [streaming prefetch])
  float* b_copy = nullptr; // with stream_b, or null: the tile also stores B's rows as it reads them,
  idx b_copy_rs = 0;       // row p at b_copy + p·b_copy_rs (its columns past n unspecified)
  bool prefetch_c = false; // C's rows may lie outside L1: start their lines before the k loop
  float* col_max = nullptr; // (n,) or null: col_max[j] = max(col_max[j], C(i, j) for the tile's rows i)
  const float* beta_rows = nullptr; // (m,) or null: row i's beta is beta_rows[i] (in place of beta)
};

// Additive bias rows for attention: bias(i, j) = ptr[i*rs + j*cs]; ptr null = none.
struct BiasView {
  const float* ptr = nullptr;
  idx rs = 0, cs = 0;
};

// Constants of one Adam/AdamW step t (float32, computed in double by the caller):
//   w *= decay_mul                      (AdamW: 1 - lr·wd; only if decoupled)
//   g' = g + l2·w                       (Adam: wd; only if coupled)
//   m = beta1·m + one_minus_beta1·g'; v = beta2·v + one_minus_beta2·g'²
//   w -= step_size · m / (sqrt(v) / bias2_sqrt + eps)
// with bias2_sqrt = sqrt(1 - beta2^t), step_size = lr / (1 - beta1^t).
struct AdamStep {
  float decay_mul, l2, beta1, one_minus_beta1, beta2, one_minus_beta2, bias2_sqrt, eps, step_size;
  bool decoupled, coupled;
};

// Constants of one SGD step (torch.optim.SGD):
//   d = g + wd·w (if wd); buf = d on the first step, else momentum·buf + one_minus_dampening·d;
//   d = d + momentum·buf (nesterov) or buf; w -= lr·d. has_buf false: no momentum (buf unused).
struct SgdStep {
  float wd, momentum, one_minus_dampening, lr;
  bool has_wd, has_buf, first, nesterov;
};

struct KernelTable {
  const char* isa;
  int mr;              // GEMM micro-tile rows (at most; A read down its columns: packed panels)
  int mr_rows;         // rows at most when A is read along its rows (cs_a = 1): >= mr
  int nr;              // micro-tile columns (a panel of B)
  int wide_mr;         // rows at most of a wide tile (two panels; 0: none), Note [wide tiles]
  int kc, mc, nc;      // GEMM cache blocking (multiples of nr / mr; kc for this CPU)
  void (*gemm_tile)(const GemmTile& t);
  // A panel of m <= width rows of a row-major matrix (row step lda), transposed:
  // dst[p*width + i] = a[i*lda + p] for p < k, rows m..width-1 zero (AVX-512: 16 x 16
  // in registers). GEMM's A micro-panels (width mr) and attention's K/Q panels (nr).
  void (*pack_a)(int m, idx k, const float* a, idx lda, float* dst, int width);
  // Rows of a strided matrix copied into rows of `width` floats, zero past `cols`
  // (<= width): dst[r*ds + c] = src[r*ss + c]. GEMM packing of operands whose
  // packed rows are contiguous in memory (untransposed B, transposed A).
  void (*copy_rows)(idx rows, int cols, const float* src, idx ss, float* dst, idx ds, int width);
  // A few rows (M = m <= 4: a decode step; P·V for the heads of a kv group):
  // y(m×n) = act(alpha · x(m×k) · B(k×n) + bias + beta·y), x(i, p) = x[i*ldx + p],
  // y(i, j) = y[i*ldy + j], B(p, j) = b[p*rs_b + j]. Memory-bound: y stays in L1 while
  // four rows of B at a time stream past it, each B element read once for all m rows.
  void (*gemv)(int m, idx k, idx n, const float* x, idx ldx, const float* b, idx rs_b, float* y, idx ldy,
               float alpha, float beta, const float* bias, int act);
  // Dot products of rows, for scores against a few queries (decode): S = alpha·Q·Kᵀ,
  // c[i*ldc + j] = alpha · Σ_p a[j*lda + p] · b[i*ldb + p], j < m (keys), i < n <= 4.
  void (*dot_rows)(idx m, int n, idx k, const float* a, idx lda, const float* b, idx ldb, float* c, idx ldc,
                   float alpha);

  // Online-softmax step of the flash forward on a transposed score block, in base 2:
  // st: (keys, queries) with row stride ld, already scaled to log2 units
  // (Sᵀ = K·Qᵀ·scale·log2(e)), so every step is vertical (lanes = queries, no
  // horizontal reductions). For query i and key j: s += bias(i, j)·log2(e); keys
  // j >= lim[i] are masked (-inf), and so are keys with bias -inf, even where s is NaN
  // or +inf. m, l: running max (log2 units) and sum per query (in/out); corr (or null:
  // the first key block, nothing accumulated yet): per query 2^(m_old - m_new), the
  // factor of the output accumulated so far (the P·V product's beta_rows).
  // On return st holds Pᵀ = 2^(s - m_new) (0 where masked). lse = m·ln 2 + log(l).
  // lim, m and l have room for `queries` rounded up to the vector width.
  // block_max (or null): the per-query max over the block's keys, already known (the
  // score product's col_max, no bias and no mask): the max pass is skipped.
  void (*softmax_fwd)(float* st, idx ld, int keys, int queries, BiasView bias, const int* lim, float* m,
                      float* l, float* corr, const float* block_max);
  // The same step on a block of a few queries' scores as rows (dot_rows' S, not Sᵀ):
  // s (queries, keys) with row stride ld >= keys rounded up to 16; lanes are keys (a
  // vertical step would use one lane of each vector). On return s holds P.
  void (*softmax_fwd_rows)(float* s, idx ld, int keys, int queries, BiasView bias, const int* lim, float* m,
                           float* l, float* o, idx ldo, int dv);

  // Backward recompute: s (rows, cols) := exp(s + bias - lse_i) for j < lim[i], else 0;
  // rows with lse_i = -inf (fully masked) give 0. Hidden keys (j >= lim[i], bias -inf)
  // give exactly 0 whatever s and lse are (NaN included).
  void (*softmax_bwd_p)(float* s, idx lds, int rows, int cols, BiasView bias, const int* lim,
                        const float* lse);
  // dS = P ∘ (dP − D_i), in place in dp (rows, cols), row strides ld.
  void (*softmax_bwd_ds)(const float* p, float* dp, idx ld, int rows, int cols, const float* d);
  // x(i, j) *= f[i] for i < rows, j < cols (row stride ld): attention's final O /= l.
  void (*scale_rows)(float* x, idx ld, idx rows, idx cols, const float* f);
  // Whether x (rows, cols), row stride ld, holds no NaN and no ±inf: a scan for
  // Note [non-finite rows] (cpp/src/attention_common.h).
  bool (*all_finite)(idx rows, idx cols, const float* x, idx ld);

  // LayerNorm of one row of n: y = (x - mean)·rstd·gamma + beta, rstd = 1/sqrt(var + eps)
  // (biased variance); writes *mean and *rstd for the backward.
  void (*layernorm_fwd)(const float* x, float* y, idx n, const float* gamma, const float* beta, float eps,
                        float* mean, float* rstd);
  // Its backward for one row: writes dx; accumulates dgamma += dy·x̂ and dbeta += dy.
  void (*layernorm_bwd)(const float* dy, const float* x, idx n, const float* gamma, float mean, float rstd,
                        float* dx, float* dgamma, float* dbeta);
  // GELU(x) = x·Φ(x) (exact, erf form) and dx = dy·GELU'(x), elementwise over n.
  void (*gelu_fwd)(const float* x, float* y, idx n);
  void (*gelu_bwd)(const float* x, const float* dy, float* dx, idx n);

  // Softmax cross-entropy of one row of logits x (c,) against class t in [0, c), with
  // label smoothing eps (target distribution (1 - eps)·onehot(t) + eps/c). Writes
  // dx (c,) = (softmax(x) - target distribution)·grad_scale; returns the row loss
  // (1 - eps)·(lse - x_t) + eps·(lse - mean(x)), lse = log Σ exp(x).
  float (*xent_row)(const float* x, idx c, idx t, float eps, float grad_scale, float* dx);

  // Dropout of n elements (inverted): element j is dropped iff dropout_bits(seed, index) <
  // threshold (P = threshold / 2^32), index = (hi << 32) | (lo + j) (the caller keeps
  // lo + j below 2^32). y = x·scale where kept, 0 where dropped; mask (n) = scale or 0.
  void (*dropout_fwd)(const float* x, float* y, float* mask, idx n, std::uint64_t seed, std::uint32_t lo,
                      std::uint32_t hi, std::uint32_t threshold, float scale);

  // Optimizer updates over n elements of w, g and the state (see OptimStep); every
  // product and sum is rounded as written there (no FMA), as optim.py's NumPy code was.
  void (*adam_update)(float* w, const float* g, float* m, float* v, idx n, const AdamStep& s);
  void (*sgd_update)(float* w, const float* g, float* buf, idx n, const SgdStep& s);

  // y[i] = exp(x[i]) for the whole range (exposed for tests of the exp polynomial).
  void (*exp)(const float* x, float* y, idx n);
  // Runs a dependent-free FMA loop for `iters` iterations; returns the FLOPs done.
  double (*fma_probe)(idx iters);
  // Sums x[0..n) (a streaming read, for the bandwidth probe); returns the sum.
  float (*read_probe)(const float* x, idx n);
};

// Columns of the widest micro-tile: two panels of B where the kernel has wide tiles
// (wide_mr rows, Note [wide tiles]), else one.
inline int tile_cols(const KernelTable& kt) { return kt.wide_mr > 0 ? 2 * kt.nr : kt.nr; }

namespace scalar { const KernelTable& kernel_table(); }
namespace avx2 { const KernelTable& kernel_table(); }
namespace avx512 { const KernelTable& kernel_table(); }

}  // namespace qkv
