// The per-ISA inner loops: GEMM micro-tile, online softmax steps, exp.
// Compiled once per ISA (Note [per-ISA kernels] in CMakeLists.txt); everything
// below lives in qkv::<isa> with internal linkage except kernel_table().
#include "kernels/vec.h"
#include "qkv/dispatch.h"
#include "qkv/kernels.h"

#include <cstddef>
#include <type_traits>
#include <utility>

namespace qkv {
namespace QKV_NS {
namespace {

using V = Vec;
constexpr int W = V::W;

// MR_ROWS: the tallest tile when A is read along its rows (in place, KernelTable::mr_rows)
#if defined(QKV_ISA_AVX512)
constexpr int MR = 12, NV = 2;            // 12 x 32 tile: 24 of 32 zmm are accumulators
constexpr int MR_ROWS = 14;               // 14 x 32: 28 accumulators, 2 for B (A broadcast from memory)
constexpr int WIDE_MR = 6;                // 6 x 64 (Note [wide tiles]): 24 accumulators, 4 for B
// KC 1152 (K up to 1536 is one block, gemm_driver): one process, old/new taking turns,
// Zen 5, against 576 x 144 (KC x MC): (8192, 1024, 3072) +9% on 1 thread, +11% on 2;
// dY·Wᵀ of it +3-4%, (4096, 1024, 256) +5-8%; other shapes within 2%, Xᵀ·dY (2048, 768,
// 2304) -1 to -4%. Then against KC 768 (one block up to 1024): the encoder's second
// feed-forward GEMM (M, 1536, 384) +2-5% on 1 and 2 threads (one pass over C, not two),
// dY·Wᵀ (4096, 1152, 384) +6% on 1 thread, Xᵀ·dY within noise; encoder +1.5% on 1 thread
// Note [kc on Intel]: the table's kc is at most 384 on Intel (kc_for_cpu). With 12 x 32
// tiles it was 256, the micro-panel of B (kc × 32 floats, 32 KiB) in L1 beside A's panel:
// one process, KC 1152 / 256 taking turns with NumPy and torch, Xeon Ice Lake (2.8 GHz,
// 48 KiB L1d, 1.25 MiB L2), GFLOP/s on 1 thread: (2048, 768, 2304) 110-118 -> 125-131,
// (8192, 1024, 3072) 112-121 -> 129-134, (800, 1536, 384) 114 -> 121, (800, 384, 1536)
// 112 -> 119, (4096, 384, 1152) 126-129 -> 120-127; 2 threads (8192, 1024, 3072) 205-238 ->
// 237-250, (2048, 768, 2304) 213-217 -> 194-226 (noisy). The wide tiles (Note [wide
// tiles]) read two panels per k step and prefer longer K blocks: same machine, one
// process, wide tiles at kc 128 / 192 / 256 / 384 / 512 / 768 / 1152 taking turns,
// medians of 5, 1 thread: (2048, 768, 2304) 129 / 137 / 136 / 135-141 / 137 / 130 / 130,
// (4096, 1152, 384) 135 / 141 / 146 / 148 / 137 / 136 / 134, (8192, 1024, 3072) 126 /
// 134 / 132 / 136-145 / 138 / 136 / 137, (4096, 384, 1152) (one block from 288) 133 /
// 141 / 140 / 133-144 / 140 / 141 / 141.
constexpr int KC = 1152, MC = 96, NC = 2048;
#elif defined(QKV_ISA_AVX2)
constexpr int MR = 6, NV = 2;             // 6 x 16 tile: 12 of 16 ymm are accumulators
constexpr int MR_ROWS = MR;
constexpr int WIDE_MR = 0;                // no wide tiles (16 ymm / plain floats)
constexpr int KC = 256, MC = 96, NC = 1024;
#else
constexpr int MR = 4, NV = 8;             // 4 x 8 tile of plain floats
constexpr int MR_ROWS = MR;
constexpr int WIDE_MR = 0;                // no wide tiles (16 ymm / plain floats)
constexpr int KC = 256, MC = 64, NC = 512;
#endif
constexpr int NR = NV * W;

inline int imin(int a, int b) { return a < b ? a : b; }

// Note [wide tiles]
// A 12 x 32 tile does 24 FMAs per k step for 2 loads of B and 12 broadcasts of A: 14
// loads, where the core does 2 loads and 2 FMAs per cycle. A 6 x 64 tile (two panels of
// B side by side, GemmTile::b_panel) does the same 24 FMAs for 4 loads and 6 broadcasts.
// On Ice Lake that is the difference: a standalone harness of the tile alone (operands
// in L1, k = 256, best of 7, 1 thread) ran 12 x 32 at 150 GFLOP/s (85% of the 176 of the
// FMA probe), 8 x 48 at 161, 6 x 64 at 166 (94%); in a macro-kernel walking a large C,
// 125-129, 127-136 and 132-135. So the packed GEMM (gemm_driver), attention's block
// products (block_gemm) and the few-row GEMM from three row tiles on (gemm_small_m)
// take wide tiles where the kernel has them (AVX-512; AVX2 has 16 registers, no room
// for 24 + 4) and two panels remain. Each C element sums its k terms in the same order
// in any tile: the same bits. One process, old and new taking turns, Ice Lake, GFLOP/s,
// medians of 5 (best):
// - GEMM (12 x 32 at kc 256 against 6 x 64 at kc 384), 1 thread: (2048, 768, 2304) 131
//   -> 135-141, (4096, 384, 1152) 126 -> 133-144, (8192, 1024, 3072) 128-136 -> 136-145,
//   (4096, 1152, 384) 127-130 -> 148; 2 threads, best of 5 (noisy medians): 187 -> 215,
//   173 -> 201, 178 -> 200, 183 -> 203, (512, 768, 768) 166 -> 188.
// - attention forward, 1 thread: (4, 16, 1024, 64) 88 -> 103 (109 -> 122), (1, 8, 4096,
//   128, causal) 110 -> 121 (113 -> 126), (8, 12, 512, 64) 108 -> 118, (32, 12, 128, 32)
//   72 -> 77; 2 threads (1, 8, 4096, 128, causal) 173 -> 209. Backward, 1 thread: (4, 16,
//   1024, 64) 86 -> 104, (8, 12, 512, 64) 76 -> 99, (2, 8, 1024, 96) 100 -> 113, d = 128
//   unchanged (91 -> 91, 91 -> 95).
// Not measured on AMD.

// Note [streaming prefetch]
// Kernels that read an operand once, straight from memory (decode: K and V; one-row
// products: the weight), are bound by how many cache misses are in flight. The hardware
// prefetcher restarts at each new stream (a K block, then a V block, ...) and leaves
// much of the DRAM bandwidth unused, so these loops also prefetch (into L2; the
// decode's K and V rows into L1) every line of the row kStreamAhead rows on (gemv:
// each line as it reads it, kGemvAhead rows on, which suits its four long rows at
// once). Past the operand's end that is the next block the caller will pass (the
// next K/V block of a decode, the next head): a prefetch is only a hint, it never
// faults, so no bound is checked. The address is computed as an integer (no
// out-of-bounds pointer is formed).
// How much this helps depends on the core. gemv: on Zen 4, 1 thread, weights from
// memory, ~14 -> ~21 GB/s; on Zen 5 it costs 12 points of the plain read's rate on
// 1 thread (69% -> 81% without), 3 on 2; on a 16-core Xeon (Sapphire Rapids class)
// it is even on 1-4 threads and costs 9 points on 16. So gemv prefetches only on
// AMD family 19h (gemv_prefetch() in dispatch.cpp) for one row. With several rows
// (P·V of a GQA decode: four rows, four times the FLOPs per byte) it prefetches
// everywhere, into L1, as the micro-tiles it replaced there did: on Zen 5, GQA
// decode 56 -> 62% of the read on 1 thread, 68 -> 72% on 2 (into L2: 57-59%, 67%).
// The decode's dot products (dot_rows) keep theirs everywhere: without, the Xeon
// loses 4-11 points on 1 thread, and Zen 5 gains 8-11 with one query per kv head but
// loses 2-6 with four, or with d = 64.
constexpr idx kStreamAhead = 48;
constexpr idx kGemvAhead = 16;  // gemv's prefetch distance in rows of B
// the line holding p[ahead], into L2 (Locality 1) or, with Locality 3, into L1 as well
template <int Locality = 1>
inline void prefetch_ahead(const float* p, idx ahead) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<std::uintptr_t>(p) +
                                                   static_cast<std::uintptr_t>(ahead) * sizeof(float)),
                     0, Locality);
}
template <int Locality = 1>
inline void prefetch_row(const float* row, idx rows_ahead, idx stride, idx n) {
  for (idx i = 0; i < n; i += kLineFloats) prefetch_ahead<Locality>(row + i, rows_ahead * stride);
}
// Prefetches for writing every cache line that x[0..n) touches (n >= 1).
inline void prefetch_lines(const float* x, idx n) {
  const std::uintptr_t first = reinterpret_cast<std::uintptr_t>(x) & ~std::uintptr_t{63};
  const std::uintptr_t last = reinterpret_cast<std::uintptr_t>(x + (n - 1));
  for (std::uintptr_t line = first; line <= last; line += 64) __builtin_prefetch(reinterpret_cast<const void*>(line), 1, 3);
}
inline float fmaxf_(float a, float b) { return a > b ? a : b; }
constexpr float kNegInf = -__builtin_inff();

// ---------------------------------------------------------------------------
// GEMM micro-tile (see GemmTile in qkv/kernels.h).
// A is read either column-contiguous (rs_a == 1: packed panels, transposed
// operands) or row-contiguous (cs_a == 1: Q or P rows in attention).

inline V::reg gelu_v(V::reg x);  // the GELU epilogue, defined with the other elementwise ops

// Note [GCC 12 epilogue unroll]
// A GCC 12.2 miscompile, not UB of ours: with -fsanitize=address plus -fsanitize=object-size
// (part of -fsanitize=undefined) at -O2, AVX2 variant, gemm_tile_m<1, *, false, 2> kept
// the epilogue's v loop rolled (biasv lives on the stack under ASan). ivopts turned the
// load of biasv[v] into MEM[base: offset_iv, index: &biasv] with offset_iv in {0, 32}, and
// VRP2 (the ranger) then folded the pointer-typed offset_iv to the constant 32B
// (-fdump-tree-vrp2-details: "_117 = (void *) ivtmp" folds to 32B with ivtmp in
// [0,0][32,32]). So every vector of the row got biasv[1]: a 15-column tile came out as
// [b8..b14, 0, b8..b14]. ASan's own check of the same load used the right address, so it
// reported nothing. -fno-tree-vrp, -fno-ivopts or -O1 each avoid it;
// -fno-delete-null-pointer-checks does not. The pragma unrolls the loop in cunrolli,
// before ivopts, so biasv[v] is a constant offset. Release (-O3) code: the NV = 2 tiles
// are unchanged by it, the NV = 1 edge tiles get the same instructions in another order;
// the scalar variant (NV = 8, not affected) goes without it. Regression tests in
// tests/test_projection.py: test_bias_only_when_d_model_is_zero (K = 0, A read down its
// columns) and test_one_token_against_packed_weight (K > 0, A read along its row).

// NV: vectors per row of the tile; a narrow edge tile (n <= W) runs with NV = 1.
// Stream: prefetch B's rows ahead (GemmTile::stream_b), a separate instantiation so
// that the common loop carries no prefetch pointer.
template <int M, bool ColA, bool FullN, int NV, bool Stream = false>
void gemm_tile_m(const GemmTile& t) {
  if (!Stream && t.stream_b) return gemm_tile_m<M, ColA, FullN, NV, true>(t);
  // (unrolled: a zeroing loop that GCC turns into a memset keeps acc in memory)
  V::reg acc[M][NV];
#pragma GCC unroll 16
  for (int i = 0; i < M; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = V::zero();

  // Lanes of vector v that lie inside the tile (n may be < NR).
  V::tail tails[NV];
  int lanes[NV];
  for (int v = 0; v < NV; ++v) {
    int l = t.n - v * W;
    lanes[v] = l < 0 ? 0 : (l > W ? W : l);
    tails[v] = V::tail_mask(lanes[v]);
  }

  const float* __restrict b = t.b;
  const idx rs_a = t.rs_a, rs_a2 = 2 * t.rs_a, cs_a = t.cs_a, rs_b = t.rs_b, b_panel = t.b_panel;
  // the C rows are written at the end: start their lines on the way now (every line
  // of the tile's row, not only its first: out-projection (4259, 384, 384) with the
  // residual read, 1 thread, +3.5-6.5%; plain GEMMs +0.4-2.4%). Not for attention's
  // tiles, whose C (a score block, an O block) is in L1: there the prefetches cost 2-3%
  // of a d = 64-128 forward (one process, taking turns, Zen 5). Every line the row
  // touches: a NumPy array starts 16 bytes into a line, and so do its rows of 32k
  // floats, which then span a line more than n / 16 (Note [misaligned operands]).
  if (t.prefetch_c)
    for (int i = 0; i < M; ++i) prefetch_lines(t.c_rows[i], t.n);
  // Row-contiguous A (row i at a + i·rs_a) is reached from one pointer per three rows,
  // row 3g + r at ag[g] + r·rs_a (base + index·scale addressing): the loop needs
  // M/3 + 2 registers for A instead of M (12 row pointers beside the loop's others
  // would spill).
  constexpr int G = ColA ? 1 : (M + 2) / 3;
  const float* ag[G];
  for (int g = 0; g < G; ++g) ag[g] = t.a + (ColA ? 0 : 3 * g * rs_a);
  for (idx p = 0; p < t.k; ++p) {
    if (ColA) __builtin_prefetch(ag[0] + (p + 16) * cs_a, 0, 3);
    V::reg bv[NV];
    const float* bp = b + p * rs_b;
    // Note [streaming prefetch]; a tile that reads A down its columns (a decode's P·V, a
    // transposed small-M product) into L1: one process, old/new and a plain read taking
    // turns, Zen 5, GQA decode 47 -> 50% of the read's rate on 1 thread, 74 -> 77% on 2
    if (Stream)
      for (int q = 0; q * NR < NV * W; ++q) prefetch_row<ColA ? 3 : 1>(bp + q * b_panel, kStreamAhead, rs_b, NR);
    // (a ragged tile loads every vector masked: a branch here would keep acc in memory;
    // a wide tile's second panel at b_panel)
    for (int v = 0; v < NV; ++v) {
      const float* src = v * W < NR ? bp + v * W : bp + b_panel + (v * W - NR);
      bv[v] = FullN ? V::load(src) : V::load(src, tails[v]);
    }
    if (Stream && t.b_copy)
      for (int v = 0; v < NV; ++v) V::store(t.b_copy + p * t.b_copy_rs + v * W, bv[v]);
#pragma GCC unroll 16
    for (int i = 0; i < M; ++i) {
      const float* r = ag[ColA ? 0 : i / 3] + p;
      const float ai = ColA ? ag[0][p * cs_a + i] : i % 3 == 0 ? r[0] : i % 3 == 1 ? r[rs_a] : r[rs_a2];
      const V::reg av = V::set1(ai);
      for (int v = 0; v < NV; ++v) acc[i][v] = V::fmadd(av, bv[v], acc[i][v]);
    }
  }

  // The epilogue: C = alpha·acc + bias (+ beta·C) (then GELU), the column maxima, the
  // stores. The tile's flags are read once into locals (C's stores could alias t).
  const V::reg alpha = V::set1(t.alpha);
  const float* const beta_rows = t.beta_rows;
  const float* const bias = t.bias;
  float* const col_max = t.col_max;
  // A full tile takes one pass over the rows for each combination of the flags (with_*:
  // constants), in straight-line code: one pass for all, branching per element, kept the
  // maxima on the stack (a tenth of an attention Sᵀ tile's time, k = d). One process, old
  // and new taking turns, Zen 5, 1 thread, GFLOP/s: attention forward (8, 12, 512, 64)
  // 208 -> 217, (1, 16, 2048, 64, causal) 209 -> 216, (1, 8, 4096, 128, causal) 223 ->
  // 227, (32, 12, 128, 32) 164 -> 177 (-2.5% of that again with edge tiles left out, see
  // below); matmul (2048, 768, 2304) 246 -> 249. The module: 2.3 -> 3.0 MB. GELU, a long
  // sequence, walks the rows in a loop over a copy of acc (a loop over acc itself would
  // index it by a variable, and keep it in memory in the k loop); the others are
  // unrolled: acc indexed by constants stays in registers.
  auto epilogue = [&](auto gelu, auto with_bias, auto with_beta, auto with_max) {
    V::reg biasv[NV], cmax[NV];
    for (int v = 0; v < NV; ++v) {
      if (with_bias) biasv[v] = lanes[v] == W ? V::load(bias + v * W) : V::load(bias + v * W, tails[v]);
      if (with_max) cmax[v] = V::set1(kNegInf);
    }
    auto row = [&](int i, const V::reg (&a)[NV]) {
      float* c = t.c_rows[i];
      const V::reg beta = V::set1(with_beta ? (beta_rows ? beta_rows[i] : t.beta) : 0.0f);
#if !defined(QKV_ISA_SCALAR)  // Note [GCC 12 epilogue unroll]: keeps biasv[v] right under ASan
#pragma GCC unroll 16
#endif
      for (int v = 0; v < NV; ++v) {
        if (!FullN && lanes[v] == 0) continue;
        const bool full = FullN || lanes[v] == W;
        V::reg x = with_bias ? V::fmadd(a[v], alpha, biasv[v]) : V::mul(a[v], alpha);
        if (with_beta) x = V::fmadd(full ? V::load(c + v * W) : V::load(c + v * W, tails[v]), beta, x);
        if (gelu) x = gelu_v(x);
        if (with_max) cmax[v] = V::max(cmax[v], x);
        if (full) V::store(c + v * W, x);
        else V::store(c + v * W, x, tails[v]);
      }
    };
    if (gelu) {
      V::reg out[M][NV];
#pragma GCC unroll 16
      for (int i = 0; i < M; ++i)
        for (int v = 0; v < NV; ++v) out[i][v] = acc[i][v];
      for (int i = 0; i < M; ++i) row(i, out[i]);
    } else {
#pragma GCC unroll 16
      for (int i = 0; i < M; ++i) row(i, acc[i]);
    }
    if (with_max)
      for (int v = 0; v < NV; ++v) {
        if (!FullN && lanes[v] == 0) continue;
        float* cm = col_max + v * W;
        if (FullN || lanes[v] == W) V::store(cm, V::max(cmax[v], V::load(cm)));
        else V::store(cm, V::max(cmax[v], V::load(cm, tails[v])), tails[v]);
      }
  };
  using T = std::true_type;
  using F = std::false_type;
  const bool has_beta = beta_rows || t.beta != 0.0f;
  // Full tiles without GELU take the pass for their flags; edge tiles, GELU and the
  // column maxima of a biased product (no caller's) one pass with the flags as read
  // (a pass per combination for every tile took the AVX-512 kernels' compile under the
  // sanitizers past 10 minutes)
  if constexpr (FullN) {
    if (t.act == 0 && !(bias && col_max)) {
      if (col_max) return has_beta ? epilogue(F{}, F{}, T{}, T{}) : epilogue(F{}, F{}, F{}, T{});
      if (bias) return has_beta ? epilogue(F{}, T{}, T{}, F{}) : epilogue(F{}, T{}, F{}, F{});
      return has_beta ? epilogue(F{}, F{}, T{}, F{}) : epilogue(F{}, F{}, F{}, F{});
    }
  }
  epilogue(t.act != 0, bias != nullptr, has_beta, col_max != nullptr);
}

template <bool ColA, bool FullN, int NVT, int... Ms>
struct TileTable {
  static constexpr void (*fns[])(const GemmTile&) = {gemm_tile_m<Ms + 1, ColA, FullN, NVT>...};
};

template <bool ColA, bool FullN, int NVT, int... Ms>
constexpr void (*TileTable<ColA, FullN, NVT, Ms...>::fns[])(const GemmTile&);

template <bool ColA, bool FullN, int NVT = NV, int... Ms>
void run_tile(const GemmTile& t, std::integer_sequence<int, Ms...>) {
  TileTable<ColA, FullN, NVT, Ms...>::fns[t.m - 1](t);
}

void gemm_tile(const GemmTile& t) {
  if (t.m <= 0 || t.n <= 0) return;
  using Seq = std::make_integer_sequence<int, MR>;
  using RowSeq = std::make_integer_sequence<int, MR_ROWS>;
  // A down its columns only where its rows are not contiguous: with rs_a = cs_a = 1 (a
  // K = 1 product, or one row) both readings agree, and the rows' tiles take up to
  // mr_rows rows, which the column tiles (up to mr) do not
  const bool col_a = t.rs_a == 1 && t.cs_a != 1;
  const bool full_n = t.n == NR;
  const bool narrow = NV > 1 && t.n <= W;  // one vector per row: no FMAs on all-masked lanes
#if defined(QKV_ISA_AVX512)
  if (t.n > NR) {  // a wide tile: two panels, Note [wide tiles]
    using WideSeq = std::make_integer_sequence<int, WIDE_MR>;
    const bool full = t.n == 2 * NR;
    if (col_a) full ? run_tile<true, true, 2 * NV>(t, WideSeq{}) : run_tile<true, false, 2 * NV>(t, WideSeq{});
    else full ? run_tile<false, true, 2 * NV>(t, WideSeq{}) : run_tile<false, false, 2 * NV>(t, WideSeq{});
    return;
  }
#endif
  if (col_a) {
    if (full_n) run_tile<true, true>(t, Seq{});
    else if (narrow) run_tile<true, false, 1>(t, Seq{});
    else run_tile<true, false>(t, Seq{});
  } else {
    if (full_n) run_tile<false, true>(t, RowSeq{});
    else if (narrow) run_tile<false, false, 1>(t, RowSeq{});
    else run_tile<false, false>(t, RowSeq{});
  }
}

#if defined(QKV_ISA_AVX512)
// r[j] (j < 16) := column j of the 16 x 16 matrix whose row i was r[i].
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {  // pairs of rows interleaved: 2 x 2 blocks
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // 4 x 4 blocks inside each 128-bit lane
    const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
    const __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int i = 0; i < 4; ++i) {  // then the 4 x 4 matrix of 128-bit lanes
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xdd);
  }
}
#endif

// dst[p*width + i] = a[i*lda + p] for i < m, 0 for m <= i < width, p < k: a panel of
// m (<= width) rows of a row-major A, column by column (see KernelTable::pack_a).
void pack_a(int m, idx k, const float* a, idx lda, float* dst, int width) {
  idx p0 = 0;
#if defined(QKV_ISA_AVX512)
  static_assert(WIDE_MR == 6, "the permutes below pack 6-row panels");
  if (width == WIDE_MR) {
    // The wide tiles' panels: 16 columns of the 6 rows are 96 floats of the
    // panel, six whole vectors. Pairs of rows interleaved (pair g, columns 0-7 in lo[g],
    // 8-15 in hi[g]: row 2g+t of column c at 2c+t), then each output vector gathered
    // from the three pairs by two two-source permutes; 18 permutes in all where the
    // 16 x 16 transpose below spends 64 shuffles and 16 masked stores on 6 rows.
    static const auto index = [] {
      struct {
        alignas(64) int32_t pair[2][16];     // lo, hi: (row 2g, row 2g+1) interleaved
        alignas(64) int32_t first[3][16];    // output vector j of a half from pairs 0 and 1
        alignas(64) int32_t second[3][16];   // ... then pair 2 over the first's result
      } x{};
      for (int l = 0; l < 16; ++l) {
        x.pair[0][l] = (l / 2) + (l % 2) * 16;
        x.pair[1][l] = 8 + (l / 2) + (l % 2) * 16;
      }
      for (int j = 0; j < 3; ++j)
        for (int l = 0; l < 16; ++l) {
          const int e = 16 * j + l, c = e / 6, g = e % 6 / 2, at = 2 * c + e % 2;  // c < 8
          x.first[j][l] = g == 1 ? 16 + at : at;
          x.second[j][l] = g == 2 ? 16 + at : l;
        }
      return x;
    }();
    const __m512i lo = _mm512_load_si512(index.pair[0]), hi = _mm512_load_si512(index.pair[1]);
    for (; p0 + 16 <= k; p0 += 16) {
      __m512 r[6];
      for (int i = 0; i < 6; ++i) {
        if (i < m) _mm_prefetch(reinterpret_cast<const char*>(a + i * lda + p0 + 64), _MM_HINT_T0);
        r[i] = i < m ? _mm512_loadu_ps(a + i * lda + p0) : _mm512_setzero_ps();
      }
      for (int half = 0; half < 2; ++half) {
        const __m512i sel = half ? hi : lo;
        __m512 pr[3];
        for (int g = 0; g < 3; ++g) pr[g] = _mm512_permutex2var_ps(r[2 * g], sel, r[2 * g + 1]);
        for (int j = 0; j < 3; ++j) {
          const __m512 t = _mm512_permutex2var_ps(pr[0], _mm512_load_si512(index.first[j]), pr[1]);
          _mm512_storeu_ps(dst + (p0 + 8 * half) * 6 + 16 * j,
                           _mm512_permutex2var_ps(t, _mm512_load_si512(index.second[j]), pr[2]));
        }
      }
    }
  }
  // 16 columns at a time: 16 rows in registers, transposed, each column stored as the
  // (up to) 16 floats of the panel row it packs to
  for (; p0 + 16 <= k; p0 += 16) {
    for (int r0 = 0; r0 < width; r0 += 16) {
      const __mmask16 keep = static_cast<__mmask16>((1u << imin(16, width - r0)) - 1);
      __m512 r[16];
      for (int i = 0; i < 16; ++i) {
        // 256 bytes ahead in each row: twelve-odd rows at once are more streams than
        // the hardware prefetcher follows (the A block is read once, from L3 or memory)
        if (r0 + i < m) _mm_prefetch(reinterpret_cast<const char*>(a + (r0 + i) * lda + p0 + 64), _MM_HINT_T0);
        r[i] = r0 + i < m ? _mm512_loadu_ps(a + (r0 + i) * lda + p0) : _mm512_setzero_ps();
      }
      transpose16(r);
      for (int j = 0; j < 16; ++j) _mm512_mask_storeu_ps(dst + (p0 + j) * width + r0, keep, r[j]);
    }
  }
#endif
  for (idx p = p0; p < k; ++p)
    for (int i = 0; i < width; ++i) dst[p * width + i] = i < m ? a[i * lda + p] : 0.0f;
}

// dst[r*ds + c] = src[r*ss + c] for c < cols, 0 for cols <= c < width; r < rows
// (see KernelTable::copy_rows).
void copy_rows(idx rows, int cols, const float* src, idx ss, float* dst, idx ds, int width) {
  for (idx r = 0; r < rows; ++r) {
    prefetch_row<3>(src + r * ss, kPackRows, ss, cols);  // the next row block (kPackRows)
    for (int c = 0; c < width; c += W) {
      const V::tail in = V::tail_mask(cols - c < 0 ? 0 : imin(W, cols - c)), out = V::tail_mask(imin(W, width - c));
      V::store(dst + r * ds + c, V::load(src + r * ss + c, in), out);
    }
  }
}

template <int M, bool Prefetch>
void gemv_impl(idx k, idx n, const float* x, idx ldx, const float* b, idx rs_b, float* y, idx ldy, float alpha,
               float beta, const float* bias, int act) {
  // Streams B row by row, four rows per pass over the M rows of y, which stay in L1:
  // y_i += x_i[p..p+3]·B[p..p+3, :] (each line of B read once for all M rows). Where
  // the core wants it (Note [streaming prefetch]), each line of B read is prefetched
  // kGemvAhead rows on as it is read: spread over the loop, these keep more misses in
  // flight than the hardware prefetcher's four interleaved streams or a burst of
  // prefetches per row (Zen 4, 1 thread, weights from memory: ~14 -> ~21 GB/s, the
  // plain read's rate).
  const idx nv = n / W;
  const int rem = static_cast<int>(n - nv * W);
  const V::tail tail = V::tail_mask(rem);
  auto load_y = [&](int i, idx v, bool fresh) {
    if (fresh) return V::zero();
    return v < nv ? V::load(y + i * ldy + v * W) : V::load(y + i * ldy + v * W, tail);
  };
  auto store_y = [&](int i, idx v, V::reg r) {
    if (v < nv) V::store(y + i * ldy + v * W, r);
    else V::store(y + i * ldy + v * W, r, tail);
  };
  auto load_b = [&](const float* row, idx v) { return v < nv ? V::load(row + v * W) : V::load(row + v * W, tail); };
  const idx nvec = nv + (rem > 0);
  bool fresh = true;
  if (beta != 0.0f) {  // y = (beta/alpha)·y, then y += x·B, then y *= alpha below
    const V::reg s = V::set1(beta / alpha);
    for (int i = 0; i < M; ++i)
      for (idx v = 0; v < nvec; ++v) store_y(i, v, V::mul(load_y(i, v, false), s));
    fresh = false;
  }
  // The loop prefetches kGemvAhead rows on; the rows before that are asked for here,
  // all at once (64 weights of 384 x 1152 from memory, one after the other: 1 thread
  // 2-3% faster, 2 threads 4-7%)
  for (idx r = 0; Prefetch && r < k && r < kGemvAhead; ++r) prefetch_row(b, r, rs_b, n);
  idx p = 0;
  for (; p + 4 <= k; p += 4) {
    const float* r0 = b + p * rs_b;
    V::reg xs[M][4];
    for (int i = 0; i < M; ++i)
      for (int r = 0; r < 4; ++r) xs[i][r] = V::set1(x[i * ldx + p + r]);
    for (idx v = 0; v < nvec; ++v) {
      if (Prefetch && (v * W) % kLineFloats == 0)
        for (idx r = 0; r < 4; ++r) prefetch_ahead<M == 1 ? 1 : 3>(r0 + r * rs_b + v * W, kGemvAhead * rs_b);
      // One row: B's loads fold into the FMAs. Several: B's four vectors are loaded
      // once for all the rows (reloaded per row, GQA decode 1 thread 59 -> 51% of a
      // plain read; the one-row form loaded first, MHA decode 76 -> 72%).
      if constexpr (M == 1) {
        V::reg acc = V::fmadd(xs[0][0], load_b(r0, v), load_y(0, v, fresh));
        acc = V::fmadd(xs[0][1], load_b(r0 + rs_b, v), acc);
        acc = V::fmadd(xs[0][2], load_b(r0 + 2 * rs_b, v), acc);
        acc = V::fmadd(xs[0][3], load_b(r0 + 3 * rs_b, v), acc);
        store_y(0, v, acc);
      } else {
        const V::reg b0 = load_b(r0, v), b1 = load_b(r0 + rs_b, v), b2 = load_b(r0 + 2 * rs_b, v),
                     b3 = load_b(r0 + 3 * rs_b, v);
        for (int i = 0; i < M; ++i) {
          V::reg acc = V::fmadd(xs[i][0], b0, load_y(i, v, fresh));
          acc = V::fmadd(xs[i][1], b1, acc);
          acc = V::fmadd(xs[i][2], b2, acc);
          acc = V::fmadd(xs[i][3], b3, acc);
          store_y(i, v, acc);
        }
      }
    }
    fresh = false;
  }
  for (; p < k; ++p) {
    for (idx v = 0; v < nvec; ++v) {
      const V::reg bv = load_b(b + p * rs_b, v);
      for (int i = 0; i < M; ++i) store_y(i, v, V::fmadd(V::set1(x[i * ldx + p]), bv, load_y(i, v, fresh)));
    }
    fresh = false;
  }
  if (alpha == 1.0f && !bias && act == 0 && !fresh) return;  // y is the result already
  const V::reg av = V::set1(alpha);
  for (int i = 0; i < M; ++i)
    for (idx v = 0; v < nvec; ++v) {
      V::reg r = V::mul(load_y(i, v, fresh), av);
      if (bias) r = V::add(r, v < nv ? V::load(bias + v * W) : V::load(bias + v * W, tail));
      if (act == 1) r = gelu_v(r);
      store_y(i, v, r);
    }
}

// One row of at most 8 vectors (a decode's P·V, d_v <= 128 on AVX-512) with y in
// registers: the loop over B's rows then carries no loads and stores of y, only B's.
// The FMAs in gemv_impl's order (row by row): the same bits. One process, taking turns
// with a plain read, Zen 5: decode (1, 32, 1/4096, 128) 74-75% -> 81-82% of the read on
// 1 thread, 73 -> 80% on 2; d = 64: 69-71% -> 80-81%, 68 -> 80%.
template <int NVEC, bool Prefetch>
void gemv_short(idx k, idx n, const float* x, const float* b, idx rs_b, float* y, float alpha, float beta,
                const float* bias, int act) {
  const int rem = static_cast<int>(n - (NVEC - 1) * W);  // lanes of the last vector, 1..W
  const V::tail last = V::tail_mask(rem);
  auto load = [&](const float* row, int v) {
    return v < NVEC - 1 || rem == W ? V::load(row + v * W) : V::load(row + v * W, last);
  };
  V::reg acc[NVEC];
  const V::reg s = V::set1(beta / alpha);  // y = (beta/alpha)·y + x·B, then times alpha
  for (int v = 0; v < NVEC; ++v) acc[v] = beta != 0.0f ? V::mul(load(y, v), s) : V::zero();
  for (idx r = 0; Prefetch && r < k && r < kGemvAhead; ++r) prefetch_row(b, r, rs_b, n);
  for (idx p = 0; p < k; ++p) {
    const float* row = b + p * rs_b;
    if (Prefetch) prefetch_row(row, kGemvAhead, rs_b, n);
    const V::reg xp = V::set1(x[p]);
    for (int v = 0; v < NVEC; ++v) acc[v] = V::fmadd(xp, load(row, v), acc[v]);
  }
  for (int v = 0; v < NVEC; ++v) {
    V::reg r = V::mul(acc[v], V::set1(alpha));
    if (bias) r = V::add(r, load(bias, v));
    if (act == 1) r = gelu_v(r);
    if (v < NVEC - 1 || rem == W) V::store(y + v * W, r);
    else V::store(y + v * W, r, last);
  }
}

template <bool Prefetch>
void gemv_one(idx k, idx n, const float* x, const float* b, idx rs_b, float* y, float alpha, float beta,
              const float* bias, int act) {
  switch (n <= 0 ? 0 : (n + W - 1) / W) {
    case 1: return gemv_short<1, Prefetch>(k, n, x, b, rs_b, y, alpha, beta, bias, act);
    case 2: return gemv_short<2, Prefetch>(k, n, x, b, rs_b, y, alpha, beta, bias, act);
    case 3: return gemv_short<3, Prefetch>(k, n, x, b, rs_b, y, alpha, beta, bias, act);
    case 4: return gemv_short<4, Prefetch>(k, n, x, b, rs_b, y, alpha, beta, bias, act);
    case 5: return gemv_short<5, Prefetch>(k, n, x, b, rs_b, y, alpha, beta, bias, act);
    case 6: return gemv_short<6, Prefetch>(k, n, x, b, rs_b, y, alpha, beta, bias, act);
    case 7: return gemv_short<7, Prefetch>(k, n, x, b, rs_b, y, alpha, beta, bias, act);
    case 8: return gemv_short<8, Prefetch>(k, n, x, b, rs_b, y, alpha, beta, bias, act);
    default: return gemv_impl<1, Prefetch>(k, n, x, 0, b, rs_b, y, 0, alpha, beta, bias, act);
  }
}

template <int M>
void gemv_m(idx k, idx n, const float* x, idx ldx, const float* b, idx rs_b, float* y, idx ldy, float alpha,
            float beta, const float* bias, int act) {
  if constexpr (M == 1) {
    if (gemv_prefetch())  // Note [streaming prefetch]
      gemv_one<true>(k, n, x, b, rs_b, y, alpha, beta, bias, act);
    else
      gemv_one<false>(k, n, x, b, rs_b, y, alpha, beta, bias, act);
  } else {
    gemv_impl<M, true>(k, n, x, ldx, b, rs_b, y, ldy, alpha, beta, bias, act);
  }
}

void gemv(int m, idx k, idx n, const float* x, idx ldx, const float* b, idx rs_b, float* y, idx ldy, float alpha,
          float beta, const float* bias, int act) {
  switch (m) {
    case 1: return gemv_m<1>(k, n, x, ldx, b, rs_b, y, ldy, alpha, beta, bias, act);
    case 2: return gemv_m<2>(k, n, x, ldx, b, rs_b, y, ldy, alpha, beta, bias, act);
    case 3: return gemv_m<3>(k, n, x, ldx, b, rs_b, y, ldy, alpha, beta, bias, act);
    default: return gemv_m<4>(k, n, x, ldx, b, rs_b, y, ldy, alpha, beta, bias, act);
  }
}

#if defined(QKV_ISA_AVX512)
// Lane m of the result = the sum of the 16 lanes of v[m]: a tree of 15 shuffle-pair
// adds (halves, then 128-bit lanes, then within them) instead of 16 reductions of
// ~9 instructions each. The tree leaves lane 4j + t holding the sum of its input
// 4t + j, so the inputs go in transposed (in[4t + j] = v[4j + t]).
inline __m512 reduce16(const __m512 v[16]) {
  __m512 a[8], b[4], c[2];
  auto in = [&](int m) { return v[(m % 4) * 4 + m / 4]; };
  for (int i = 0; i < 8; ++i)  // lanes 0-7: 8 partial sums of in(2i), lanes 8-15: of in(2i+1)
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(in(2 * i), in(2 * i + 1), 0x44),
                         _mm512_shuffle_f32x4(in(2 * i), in(2 * i + 1), 0xEE));
  for (int i = 0; i < 4; ++i)  // 128-bit lane j: 4 partial sums of in(4i + j)
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // lane j: 2 partials of in(8i + j), then 2 of in(8i + 4 + j)
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44), _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
  // lane j holds the sums of in(j), in(4 + j), in(8 + j), in(12 + j)
  return _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
}
#endif

// c[i*ldc + j+r] = alpha · a_row(j+r) · b_row(i) for r < R rows, i < N: R·N
// accumulators, all in registers (R and N are compile-time: no spill).
template <int R, int N>
inline void dot_rows_block(idx j, idx k, const float* a, idx lda, const float* b, idx ldb, float* c, idx ldc,
                           float alpha) {
  const idx kv = k / W;
  const int rem = static_cast<int>(k - kv * W);
  // Note [streaming prefetch], into L1: one process, the two taking turns with a plain
  // read, Zen 5: decode 2-5 points of the read's rate more than into L2 (1 and 2 threads)
  for (int r = 0; r < R; ++r) prefetch_row<3>(a + (j + r) * lda, kStreamAhead, lda, k);
  V::reg acc[R][N];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < N; ++i) acc[r][i] = V::zero();
  auto step = [&](idx off, auto load) {
    V::reg bv[N];
    for (int i = 0; i < N; ++i) bv[i] = load(b + i * ldb + off);
    for (int r = 0; r < R; ++r) {
      const V::reg av = load(a + (j + r) * lda + off);
      for (int i = 0; i < N; ++i) acc[r][i] = V::fmadd(av, bv[i], acc[r][i]);
    }
  };
  for (idx v = 0; v < kv; ++v) step(v * W, [](const float* p) { return V::load(p); });
  if (rem) {
    const V::tail tail = V::tail_mask(rem);
    step(kv * W, [&](const float* p) { return V::load(p, tail); });
  }
#if defined(QKV_ISA_AVX512)
  if constexpr (R * N >= 8) {  // all the sums at once (R·N <= 16)
    static_assert(R * N <= 16, "reduce16 takes 16 vectors");
    __m512 v[16];
    for (int m = 0; m < 16; ++m) v[m] = m < R * N ? acc[m / N][m % N] : V::zero();
    const V::reg sums = V::mul(reduce16(v), V::set1(alpha));
    if constexpr (N == 1) {  // one query: the 16 scores are one row segment
      V::store(c + j, sums);
    } else {
      alignas(64) float lanes[16];
      V::store(lanes, sums);
      for (int r = 0; r < R; ++r)
        for (int i = 0; i < N; ++i) c[i * ldc + j + r] = lanes[r * N + i];
    }
    return;
  }
#endif
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < N; ++i) c[i * ldc + j + r] = alpha * V::reduce_add(acc[r][i]);
}

template <int N>
void dot_rows_n(idx m, idx k, const float* a, idx lda, const float* b, idx ldb, float* c, idx ldc, float alpha) {
#if defined(QKV_ISA_AVX512)
  constexpr int R = 16 / N;  // rows of a at a time: R·N sums, reduced together (reduce16)
#else
  constexpr int R = 4;  // rows of a at a time
#endif
  idx j = 0;
  for (; j + R <= m; j += R) dot_rows_block<R, N>(j, k, a, lda, b, ldb, c, ldc, alpha);
  for (; j < m; ++j) dot_rows_block<1, N>(j, k, a, lda, b, ldb, c, ldc, alpha);
}

void dot_rows(idx m, int n, idx k, const float* a, idx lda, const float* b, idx ldb, float* c, idx ldc, float alpha) {
  switch (n) {
    case 1: return dot_rows_n<1>(m, k, a, lda, b, ldb, c, ldc, alpha);
    case 2: return dot_rows_n<2>(m, k, a, lda, b, ldb, c, ldc, alpha);
    case 3: return dot_rows_n<3>(m, k, a, lda, b, ldb, c, ldc, alpha);
    default: return dot_rows_n<4>(m, k, a, lda, b, ldb, c, ldc, alpha);
  }
}

// ---------------------------------------------------------------------------
// Note [no denormal results]
// On Intel cores a vscalefps (or multiply, FMA) whose result is under the normal range
// (|x| < 2^-126, rounding to a denormal or to 0) takes a microcode assist: a
// standalone loop on the Ice Lake Xeon, 1 thread, ran p·2^-151 and p·2^-130 at 65-67 ns
// per vector against 1.3 ns with those lanes masked off (not measured on AMD). The
// softmax met one per masked score (-inf clamps to n = -151: every cell above a causal
// diagonal, past a key length, under a -inf bias) and per query at a block's first
// rescale (2^(-inf - m)). So the exponentials whose tiny results do not matter
// (exp2_nonpos_v, exp_v<false>: softmax, P in the backward, cross-entropy, GELU's
// tails) flush them: 0 instead of a value below 2^-125.5 (~1.7e-38), next to a row sum
// of at least 1 or an output that is 0 to within 1e-37. exp_v<true> (the elementwise
// exp) keeps its denormal results. One process, old and new taking turns, Ice Lake, 1
// thread, medians of 9-15 (best): forward (1, 16, 2048, 64, causal) 80-83 -> 87-94
// GFLOP/s (106 -> 109-120), (4, 16, 1024, 64) 98 -> 103 (first rescales), (1, 8, 4096,
// 128, causal) 103 -> 107; backward unchanged.

// p·2^n for integral-valued n over the whole float range (denormal results, 0, +inf):
// vscalefps, or 2^n as two exponent-field powers 2^n1 · 2^(n-n1) (|n| <= 252).
// Flush (vscalefps, p in [0.7, 1.5)): results with n <= -126 (under 2^-125.5) are 0
// (Note [no denormal results]; the other ISAs' narrow forms take 2^n as one exponent
// field, 0 from n = -127).
#if defined(QKV_ISA_AVX512)
constexpr bool kScalef = true;  // vscalefps: p·2^n in one instruction, over the whole range
#else
constexpr bool kScalef = false;
#endif
template <bool Flush = false>
inline V::reg scale_pow2(V::reg p, V::reg n) {
#if defined(QKV_ISA_AVX512)
  if (Flush)  // (NLE_UQ: a NaN n keeps its lane, and propagates)
    return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(n, _mm512_set1_ps(-126.0f), _CMP_NLE_UQ), p, n);
  return _mm512_scalef_ps(p, n);
#else
  const V::reg n1 = V::round(V::mul(n, V::set1(0.5f)));
  return V::mul(V::mul(p, V::pow2i(n1)), V::pow2i(V::sub(n, n1)));
#endif
}

// exp(x) for fp32: x = n·ln2 + r with |r| <= ln2/2 (Cody-Waite split of ln2),
// exp(r) by a polynomial, times 2^n. FullRange: the degree-7 Taylor polynomial
// (truncation < 1e-8 relative). Otherwise (softmax, GELU, cross-entropy): degree 5,
// 1 + r·q(r) with q fitted to the relative error (weighted least squares iterated
// to minimax; 9.2e-8 in exact arithmetic, 1.5e-7 = 2.5·2^-24 with float32 Horner
// steps; exp(0) = 1 exactly): two FMAs fewer, 2% of a d = 32-64 forward.
// x is clamped to [-104, 88.8]: denormal results (FullRange; the others flush them to
// 0, Note [no denormal results]) and overflow to +inf come out right, and from -104
// down (and at -inf) p·2^-150 rounds to exactly 0. NaN propagates.
// !FullRange without vscalefps (softmax, where x <= 0 and results below 2^-126 do
// not matter): x is clamped to [-88, 0] and 2^n is one exponent field; from
// x = -87.68 down, n = -127 makes that field 0, so the result is exactly 0 with no
// compare (-inf gives 0) — 7 instructions fewer on AVX2.
// c[0]·r^(N-1) + ... + c[N-1], by Horner's rule
template <std::size_t N>
inline V::reg horner(V::reg r, const float (&c)[N]) {
  V::reg p = V::set1(c[0]);
  for (std::size_t i = 1; i < N; ++i) p = V::fmadd(p, r, V::set1(c[i]));
  return p;
}
constexpr float kExpTaylor7[] = {1.0f / 5040.0f, 1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f,
                                 1.0f / 6.0f,    0.5f,           1.0f,           1.0f};
constexpr float kExpFit5[] = {0.008290272206068039f, 0.04189816117286682f, 0.1666763871908188f,
                              0.4999914765357971f,   0.9999997019767761f,  1.0f};

template <bool FullRange>
inline V::reg exp_v(V::reg x) {
  constexpr bool kNarrow = !kScalef && !FullRange;  // (with vscalefps nothing to save)
  // min(hi, max(lo, x)) keeps NaN: x86 min/max return their second operand on NaN
  const V::reg xs = V::min(V::set1(kNarrow ? 0.0f : 88.8f), V::max(V::set1(kNarrow ? -88.0f : -104.0f), x));
  const V::reg n = V::round(V::mul(xs, V::set1(static_cast<float>(kLog2e))));
  V::reg r = V::fmadd(n, V::set1(-0.693359375f), xs);
  r = V::fmadd(n, V::set1(2.12194440e-4f), r);
  const V::reg p = FullRange ? horner(r, kExpTaylor7) : horner(r, kExpFit5);
  return kNarrow ? V::mul(p, V::pow2i(n)) : scale_pow2<!FullRange>(p, n);
}

// 2^x for x <= 0 (or -inf, or NaN, which propagates): the softmax of the attention
// forward, whose scores arrive scaled by log2(e) (folded into the score product's
// alpha) so that its range reduction is one exact subtraction, r = x - round(x) in
// [-1/2, 1/2], where exp's is a multiply and two FMAs; and x <= 0 needs no upper
// clamp. 2^r = exp(r·ln2) by exp's fitted polynomial with its coefficients times
// powers of ln 2 (the same function of r·ln2: 2^0 = 1 exactly, ~1.5e-7 relative).
// -inf (and anything under -126.5) gives an exact 0: flushed (vscalefps), or, clamped
// to -127, a zero exponent field.
constexpr float kExp2Fit5[] = {static_cast<float>(kExpFit5[0] * kLn2 * kLn2 * kLn2 * kLn2 * kLn2),
                               static_cast<float>(kExpFit5[1] * kLn2 * kLn2 * kLn2 * kLn2),
                               static_cast<float>(kExpFit5[2] * kLn2 * kLn2 * kLn2),
                               static_cast<float>(kExpFit5[3] * kLn2 * kLn2), static_cast<float>(kExpFit5[4] * kLn2),
                               1.0f};
inline V::reg exp2_nonpos_v(V::reg x) {
  // (max keeps NaN, as in exp_v; the flushing vscalefps needs no clamp: -inf gives
  // n = -inf and a NaN p in a lane it zeroes. Softmax harness, Ice Lake: -8.5% time.)
  const V::reg xs = kScalef ? x : V::max(V::set1(-127.0f), x);
  const V::reg n = V::round(xs);
  const V::reg p = horner(V::sub(xs, n), kExp2Fit5);
  return kScalef ? scale_pow2<true>(p, n) : V::mul(p, V::pow2i(n));
}

template <bool FullRange = false>
float exp_s(float x) {
  return V::reduce_max(exp_v<FullRange>(V::set1(x)));
}

void exp_array(const float* x, float* y, idx n) {
  idx i = 0;
  for (; i + W <= n; i += W) V::store(y + i, exp_v<true>(V::load(x + i)));
  for (; i < n; ++i) y[i] = exp_s<true>(x[i]);
}

// The polynomial of horner(r, c) by Estrin's scheme: neighbouring coefficients
// paired with r, the pairs paired with r², then r⁴, ...: a chain of about log2(N)
// FMAs where Horner's is N - 1 long, for a few multiplies more. Long chains in a
// loop over independent vectors fill the scheduler before the FMA units.
template <std::size_t N>
inline V::reg estrin(V::reg r, const float (&c)[N]) {
  V::reg a[N];  // a[i]: coefficient of r^i, lowest first
  for (std::size_t i = 0; i < N; ++i) a[i] = V::set1(c[N - 1 - i]);
  std::size_t n = N;
  for (V::reg rp = r; n > 1; rp = V::mul(rp, rp)) {
    for (std::size_t i = 0; 2 * i < n; ++i) a[i] = 2 * i + 1 < n ? V::fmadd(a[2 * i + 1], rp, a[2 * i]) : a[2 * i];
    n = (n + 1) / 2;
  }
  return a[0];
}

// Φ(x) = P(N(0,1) <= x) = erfc(-x/√2)/2, with erfc(z) for z >= 0 by the Chebyshev
// fit of Numerical Recipes (erfcc: fractional error < 1.2e-7), relative accuracy in
// both tails: erfc(z) = t·exp(P(t) - z²), t = 1/(1 + z/2), P of degree 9. Here in
// base 2 with the halving folded in: erfc(z)/2 = t·2^(Q(t) - u²), Q = log2(e)·P - 1,
// u² = log2(e)·x²/2 in one FMA from u = x·√(log2(e)/2); Q by Estrin's scheme. The
// exponent is <= -1 (erfc(z)·(1 + z/2) <= 1), so exp2_nonpos_v applies. Against the
// natural-base Horner form: 0.77x the time per vector on Zen 5, same accuracy.
// Also returns the density φ(x) = 2^(-u²)/√(2π) when asked.
constexpr double kErfcc[] = {0.17087277, -0.82215223, 1.48851587, -1.13520398, 0.27886807,
                             -0.18628806, 0.09678418, 0.37409196, 1.00002368, -1.26551223};
constexpr float kErfccLog2[] = {
    static_cast<float>(kErfcc[0] * kLog2e), static_cast<float>(kErfcc[1] * kLog2e),
    static_cast<float>(kErfcc[2] * kLog2e), static_cast<float>(kErfcc[3] * kLog2e),
    static_cast<float>(kErfcc[4] * kLog2e), static_cast<float>(kErfcc[5] * kLog2e),
    static_cast<float>(kErfcc[6] * kLog2e), static_cast<float>(kErfcc[7] * kLog2e),
    static_cast<float>(kErfcc[8] * kLog2e), static_cast<float>(kErfcc[9] * kLog2e - 1.0)};
inline V::reg normal_cdf(V::reg x, V::reg* pdf) {
  const V::reg z = V::abs(V::mul(x, V::set1(0.70710678118654752f)));
  const V::reg t = V::div(V::set1(1.0f), V::fmadd(V::set1(0.5f), z, V::set1(1.0f)));
  const V::reg u = V::mul(x, V::set1(0.84932180028801904f));  // u² = log2(e)·x²/2
  const V::reg half_erfc = V::mul(t, exp2_nonpos_v(V::fnmadd(u, u, estrin(t, kErfccLog2))));  // erfc(|z|)/2
  if (pdf) *pdf = V::mul(V::set1(0.39894228040143268f), exp2_nonpos_v(V::fnmadd(u, u, V::zero())));
  // x < 0: Φ = erfc(|z|)/2; x >= 0: Φ = 1 - erfc(|z|)/2
  return V::select_lt(x, 0.0f, half_erfc, V::sub(V::set1(1.0f), half_erfc));
}

// GELU(x) = x·Φ(x); its limits at ±inf (0 at -inf, not -inf·0 = NaN)
inline V::reg gelu_v(V::reg x) { return V::replace_below(x, -3.0e38f, V::mul(x, normal_cdf(x, nullptr)), 0.0f); }

void gelu_fwd(const float* x, float* y, idx n) {
  idx i = 0;
  for (; i + W <= n; i += W) V::store(y + i, gelu_v(V::load(x + i)));
  if (i < n) {
    const V::tail t = V::tail_mask(static_cast<int>(n - i));
    V::store(y + i, gelu_v(V::load(x + i, t)), t);
  }
}

// dx = dy·(Φ(x) + x·φ(x))
inline V::reg gelu_grad_v(V::reg x, V::reg dy) {
  V::reg pdf;
  const V::reg cdf = normal_cdf(x, &pdf);
  return V::mul(dy, V::fmadd(x, pdf, cdf));
}

void gelu_bwd(const float* x, const float* dy, float* dx, idx n) {
  idx i = 0;
  for (; i + W <= n; i += W) V::store(dx + i, gelu_grad_v(V::load(x + i), V::load(dy + i)));
  if (i < n) {
    const V::tail t = V::tail_mask(static_cast<int>(n - i));
    V::store(dx + i, gelu_grad_v(V::load(x + i, t), V::load(dy + i, t)), t);
  }
}

// Σ x over n, vector partial sums (one pass over the row).
inline float row_sum(const float* x, idx n) {
  V::reg acc = V::zero();
  idx i = 0;
  for (; i + W <= n; i += W) acc = V::add(acc, V::load(x + i));
  float tail = 0.0f;
  for (; i < n; ++i) tail += x[i];
  return V::reduce_add(acc) + tail;
}

void layernorm_fwd(const float* x, float* y, idx n, const float* gamma, const float* beta, float eps, float* mean,
                   float* rstd) {
  const float mu = n > 0 ? row_sum(x, n) / static_cast<float>(n) : 0.0f;
  const V::reg muv = V::set1(mu);
  V::reg acc = V::zero();
  idx i = 0;
  for (; i + W <= n; i += W) {
    const V::reg d = V::sub(V::load(x + i), muv);
    acc = V::fmadd(d, d, acc);
  }
  float tail = 0.0f;
  for (idx j = i; j < n; ++j) tail += (x[j] - mu) * (x[j] - mu);
  const float var = n > 0 ? (V::reduce_add(acc) + tail) / static_cast<float>(n) : 0.0f;
  const float rs = 1.0f / __builtin_sqrtf(var + eps);
  const V::reg rsv = V::set1(rs);
  for (i = 0; i + W <= n; i += W)
    V::store(y + i, V::fmadd(V::mul(V::sub(V::load(x + i), muv), rsv), V::load(gamma + i), V::load(beta + i)));
  for (; i < n; ++i) y[i] = (x[i] - mu) * rs * gamma[i] + beta[i];
  *mean = mu;
  *rstd = rs;
}

// forward: x̂ = (x - mean)·rstd; y = x̂·gamma + beta
// dx = rstd·(g - mean(g) - x̂·mean(g·x̂)) with g = dy·gamma
void layernorm_bwd(const float* dy, const float* x, idx n, const float* gamma, float mean, float rstd, float* dx,
                   float* dgamma, float* dbeta) {
  const V::reg muv = V::set1(mean), rsv = V::set1(rstd);
  V::reg sg = V::zero(), sgx = V::zero();
  idx i = 0;
  for (; i + W <= n; i += W) {
    const V::reg xh = V::mul(V::sub(V::load(x + i), muv), rsv);
    const V::reg d = V::load(dy + i);
    const V::reg g = V::mul(d, V::load(gamma + i));
    sg = V::add(sg, g);
    sgx = V::fmadd(g, xh, sgx);
    V::store(dgamma + i, V::fmadd(d, xh, V::load(dgamma + i)));
    V::store(dbeta + i, V::add(V::load(dbeta + i), d));
  }
  float tg = 0.0f, tgx = 0.0f;
  for (idx j = i; j < n; ++j) {
    const float xh = (x[j] - mean) * rstd, g = dy[j] * gamma[j];
    tg += g;
    tgx += g * xh;
    dgamma[j] += dy[j] * xh;
    dbeta[j] += dy[j];
  }
  const float inv_n = n > 0 ? 1.0f / static_cast<float>(n) : 0.0f;
  const float mg = (V::reduce_add(sg) + tg) * inv_n, mgx = (V::reduce_add(sgx) + tgx) * inv_n;
  const V::reg mgv = V::set1(mg), mgxv = V::set1(mgx);
  for (i = 0; i + W <= n; i += W) {
    const V::reg xh = V::mul(V::sub(V::load(x + i), muv), rsv);
    const V::reg g = V::mul(V::load(dy + i), V::load(gamma + i));
    V::store(dx + i, V::mul(rsv, V::sub(V::sub(g, mgv), V::mul(xh, mgxv))));
  }
  for (; i < n; ++i) {
    const float xh = (x[i] - mean) * rstd, g = dy[i] * gamma[i];
    dx[i] = rstd * (g - mg - xh * mgx);
  }
}

// Loads W lanes of bias row `b` starting at column j (cs = column stride; 0 broadcasts).
inline V::reg load_bias(const float* b, idx cs, int j, int lanes) {
  if (cs == 1) return lanes == W ? V::load(b + j) : V::load(b + j, V::tail_mask(lanes));
  if (cs == 0) return V::set1(b[0]);
  alignas(64) float tmp[W];
  for (int q = 0; q < W; ++q) tmp[q] = q < lanes ? b[(j + q) * cs] : 0.0f;
  return V::load(tmp);
}

// s + b·unit (unit 1, or log2(e) for softmax_fwd's scores in log2 units), where a bias
// of -inf hides the key whatever s is (a NaN or +inf score from a non-finite q or k row
// must not reach a query that does not see that key).
inline V::reg add_bias(V::reg s, V::reg b, V::reg unit) {
  return V::select_lt(b, -3.4028235e38f, V::set1(kNegInf), V::fmadd(b, unit, s));
}

// Keys [j, j + W) of a row of scores (keys in all), s + bias·unit (bias row brow, column
// step bias_cs, or none), -inf from key `lim` on (<= keys: the lanes past the row too).
inline V::reg row_scores(const float* row, const float* brow, idx bias_cs, int j, int keys, int lim, V::reg unit) {
  const int lanes = imin(W, keys - j);
  V::reg x = lanes == W ? V::load(row + j) : V::load(row + j, V::tail_mask(lanes));
  if (brow) x = add_bias(x, load_bias(brow, bias_cs, j, lanes), unit);
  return j + W > lim ? V::mask_from(x, j, lim) : x;
}

inline void scale_row(float* o, idx n, float c) {
  const V::reg cv = V::set1(c);
  idx j = 0;
  for (; j + W <= n; j += W) V::store(o + j, V::mul(V::load(o + j), cv));
  if (j < n) {
    const V::tail t = V::tail_mask(static_cast<int>(n - j));
    V::store(o + j, V::mul(V::load(o + j, t), cv), t);
  }
}

void softmax_fwd(float* st, idx ld, int keys, int queries, BiasView bias, const int* lim, float* m, float* l,
                 float* corr, const float* block_max) {
  constexpr int kMaxVecs = 256 / W + 1;  // queries per block <= 256
  const int nv = (queries + W - 1) / W;
  int lim_min = keys;
  for (int i = 0; i < queries; ++i) lim_min = imin(lim_min, lim[i]);
  const bool masked = lim_min < keys;
  const V::reg log2e = V::set1(static_cast<float>(kLog2e));  // the bias joins scores in log2 units
  alignas(64) float mx[kMaxVecs * W], lsum[kMaxVecs * W], corr_first[kMaxVecs * W];
  float* cf = corr ? corr : corr_first;  // (the first block's factors rescale nothing)
  // pass 1 (unless block_max): bias, mask, per-query max over the keys of this block
  // (one vector of queries at a time, walking down the keys: the running max stays in
  // a register)
  for (int v = 0; v < nv && !block_max; ++v) {
    V::reg mxv = V::set1(kNegInf);
    const int lanes = imin(W, queries - v * W);
    for (int j = 0; j < keys; ++j) {
      float* cell = st + j * ld + v * W;
      V::reg x = V::load(cell);
      if (bias.ptr) {
        const float* bj = bias.ptr + j * bias.cs + v * W * bias.rs;
        if (bias.rs == 0) {
          x = add_bias(x, V::set1(bj[0]), log2e);
        } else {
          alignas(64) float tmp[W];
          for (int q = 0; q < W; ++q) tmp[q] = q < lanes ? bj[q * bias.rs] : 0.0f;
          x = add_bias(x, V::load(tmp), log2e);
        }
      }
      if (masked) x = V::mask_keys(x, lim + v * W, j);
      if (bias.ptr || masked) V::store(cell, x);
      mxv = V::max(mxv, x);
    }
    V::store(mx + v * W, mxv);
  }
  // new max; m_safe replaces a -inf max by 0 so that exp(-inf - m_safe) = 0, not NaN
  alignas(64) float msafe[kMaxVecs * W];
  const float* bmax = block_max ? block_max : mx;
  for (int v = 0; v < nv; ++v) {
    const V::reg m_old = V::load(m + v * W);
    const V::reg m_new = V::max(m_old, V::load(bmax + v * W));
    const V::reg m_s = V::replace_below(m_new, -3.0e38f, m_new, 0.0f);
    V::store(m + v * W, m_new);
    V::store(msafe + v * W, m_s);
    V::store(cf + v * W, exp2_nonpos_v(V::sub(m_old, m_s)));
  }
  // pass 2: P = 2^(s - m), column sums (again a vector of queries at a time)
  for (int v = 0; v < nv; ++v) {
    const V::reg ms = V::load(msafe + v * W);
    V::reg ls = V::zero();
    for (int j = 0; j < keys; ++j) {
      float* cell = st + j * ld + v * W;
      const V::reg p = exp2_nonpos_v(V::sub(V::load(cell), ms));
      V::store(cell, p);
      ls = V::add(ls, p);
    }
    V::store(lsum + v * W, ls);
  }
  for (int v = 0; v < nv; ++v)
    V::store(l + v * W, V::fmadd(V::load(l + v * W), V::load(cf + v * W), V::load(lsum + v * W)));
}

void softmax_fwd_rows(float* s, idx ld, int keys, int queries, BiasView bias, const int* lim, float* m, float* l,
                      float* o, idx ldo, int dv) {
  const V::reg log2e = V::set1(static_cast<float>(kLog2e));
  for (int i = 0; i < queries; ++i) {
    float* row = s + i * ld;
    const float* brow = bias.ptr ? bias.ptr + i * bias.rs : nullptr;
    const int lim_c = imin(lim[i], keys);  // keys [lim_c, keys) and the tail lanes: -inf
    // pass 1: the row's max over the block (one vector of keys: it stays in a register)
    V::reg x0 = row_scores(row, brow, bias.cs, 0, keys, lim_c, log2e), mxv = x0;
    for (int j = W; j < keys; j += W) {
      const V::reg x = row_scores(row, brow, bias.cs, j, keys, lim_c, log2e);
      if (brow || j + W > lim_c) V::store(row + j, x);  // a whole vector: ld covers it
      mxv = V::max(mxv, x);
    }
    // new max; m_safe replaces a -inf max by 0 so that exp(-inf - m_safe) = 0, not NaN
    const float m_new = fmaxf_(m[i], V::reduce_max(mxv));
    const float m_safe = m_new < -3.0e38f ? 0.0f : m_new;
    // the first block (o null) has l = 0 and nothing to rescale
    const float corr = o ? V::reduce_max(exp2_nonpos_v(V::set1(m[i] - m_safe))) : 0.0f;
    m[i] = m_new;
    // pass 2: P = 2^(s - m), the row sum
    const V::reg ms = V::set1(m_safe);
    V::reg p = exp2_nonpos_v(V::sub(x0, ms)), ls = p;  // tail lanes: -inf, p = 0
    V::store(row, p);
    for (int j = W; j < keys; j += W) {
      p = exp2_nonpos_v(V::sub(V::load(row + j), ms));
      V::store(row + j, p);
      ls = V::add(ls, p);
    }
    l[i] = l[i] * corr + V::reduce_add(ls);
    if (o && corr != 1.0f) scale_row(o + i * ldo, dv, corr);
  }
}

void scale_rows(float* x, idx ld, idx rows, idx cols, const float* f) {
  for (idx i = 0; i < rows; ++i) scale_row(x + i * ld, cols, f[i]);
}

void softmax_bwd_p(float* s, idx lds, int rows, int cols, BiasView bias, const int* lim,
                   const float* lse) {
  for (int i = 0; i < rows; ++i) {
    float* srow = s + i * lds;
    const float* brow = bias.ptr ? bias.ptr + i * bias.rs : nullptr;
    const int lim_c = imin(lim[i], cols);
    // lse = -inf: a fully masked row, P = 0. lse NaN (a row made non-finite by its
    // inputs): P is NaN, but 0 on hidden keys.
    const bool empty = lse[i] == kNegInf, nan = lse[i] != lse[i];
    const V::reg lv = V::set1(lse[i]);
    for (int j = 0; j < cols; j += W) {
      const int lanes = imin(W, cols - j);
      const V::tail t = V::tail_mask(lanes);
      const V::reg x = row_scores(srow, brow, bias.cs, j, cols, lim_c, V::set1(1.0f));  // hidden keys: -inf, exp 0
      const V::reg p = empty ? V::zero() : nan ? V::select_lt(x, -3.4028235e38f, V::zero(), lv)
                                               : exp_v<false>(V::sub(x, lv));
      if (lanes == W) V::store(srow + j, p);
      else V::store(srow + j, p, t);
    }
  }
}

void softmax_bwd_ds(const float* p, float* dp, idx ld, int rows, int cols, const float* d) {
  // Where P = 0 (masked, or underflowed) dS is exactly 0, even when dP is inf/NaN
  // because of values in a masked-out V row.
  for (int i = 0; i < rows; ++i) {
    const float* prow = p + i * ld;
    float* drow = dp + i * ld;
    const V::reg dv = V::set1(d[i]);
    int j = 0;
    for (; j + W <= cols; j += W) {
      const V::reg pv = V::load(prow + j);
      const V::reg ds = V::mul(pv, V::sub(V::load(drow + j), dv));
      V::store(drow + j, V::replace_below(pv, 1e-45f, ds, 0.0f));
    }
    for (; j < cols; ++j) drow[j] = prow[j] == 0.0f ? 0.0f : prow[j] * (drow[j] - d[i]);
  }
}

// Whether every element of x (rows × cols, row stride ld) is finite: x·0 is 0 for a
// finite x and NaN for ±inf or NaN, so the sum of x·0 stays 0 exactly when all are.
bool all_finite(idx rows, idx cols, const float* x, idx ld) {
  const idx nv = cols / W;
  const int rem = static_cast<int>(cols - nv * W);
  const V::tail tail = V::tail_mask(rem);
  const V::reg zero = V::zero();
  V::reg acc = V::zero();
  for (idx r = 0; r < rows; ++r) {
    const float* row = x + r * ld;
    for (idx v = 0; v < nv; ++v) acc = V::fmadd(V::load(row + v * W), zero, acc);
    if (rem > 0) acc = V::fmadd(V::load(row + nv * W, tail), zero, acc);
  }
  return V::reduce_add(acc) == 0.0f;
}

// ---------------------------------------------------------------------------
// Softmax cross-entropy of one row (see KernelTable::xent_row), in shifted terms so that
// huge logits lose nothing: d = x - max; lse - x_j = log Σexp(d) - d_j.
// Pass 1: max; pass 2: e = exp(d) into dx, Σe and Σd; pass 3: dx = (e/Σe - eps/c)·scale,
// then dx[t] -= (1 - eps)·scale.
float xent_row(const float* x, idx c, idx t, float eps, float grad_scale, float* dx) {
  V::reg mx = V::set1(kNegInf);
  idx i = 0;
  for (; i + W <= c; i += W) mx = V::max(mx, V::load(x + i));
  float m = V::reduce_max(mx);
  for (; i < c; ++i) m = fmaxf_(m, x[i]);
  const V::reg mv = V::set1(m);
  V::reg se = V::zero(), sd = V::zero();
  for (i = 0; i + W <= c; i += W) {
    const V::reg d = V::sub(V::load(x + i), mv);
    const V::reg e = exp_v<false>(d);
    V::store(dx + i, e);
    se = V::add(se, e);
    sd = V::add(sd, d);
  }
  float sum_e = V::reduce_add(se), sum_d = V::reduce_add(sd);
  for (; i < c; ++i) {
    dx[i] = exp_s(x[i] - m);
    sum_e += dx[i];
    sum_d += x[i] - m;
  }
  const float log_sum = __builtin_logf(sum_e);
  const float off = eps / static_cast<float>(c);
  const V::reg inv = V::set1(1.0f / sum_e), offv = V::set1(off), sc = V::set1(grad_scale);
  for (i = 0; i + W <= c; i += W) V::store(dx + i, V::mul(V::sub(V::mul(V::load(dx + i), inv), offv), sc));
  for (; i < c; ++i) dx[i] = (dx[i] * (1.0f / sum_e) - off) * grad_scale;
  dx[t] -= (1.0f - eps) * grad_scale;
  // (without smoothing the mean term is left out, not multiplied by 0: it is -inf or NaN
  // where a logit is -inf or the shifted logits overflow their sum, and 0·inf = NaN)
  const float nll = log_sum - (x[t] - m);
  return eps == 0.0f ? nll : (1.0f - eps) * nll + eps * (log_sum - sum_d / static_cast<float>(c));
}

// ---------------------------------------------------------------------------
// Dropout (see KernelTable::dropout_fwd). Note [dropout bits]: the random 32 bits of
// element `index` under `seed` are mix(mix(lo32(index) ^ lo32(seed)) + (hi32(index) ^ hi32(seed))),
// mix = Wellons' lowbias32 (a bijection of uint32 with good avalanche). Counter-based:
// any element, chunk or thread order gives the same bits; reference.dropout_bits is
// the NumPy twin. Plain integer code, vectorised by the compiler for each ISA.
inline std::uint32_t mix32(std::uint32_t h) {
  h ^= h >> 16;
  h *= 0x7feb352du;
  h ^= h >> 15;
  h *= 0x846ca68bu;
  h ^= h >> 16;
  return h;
}

void dropout_fwd(const float* __restrict x, float* __restrict y, float* __restrict mask, idx n, std::uint64_t seed,
                 std::uint32_t lo, std::uint32_t hi, std::uint32_t threshold, float scale) {
  const std::uint32_t k0 = static_cast<std::uint32_t>(seed), k1 = hi ^ static_cast<std::uint32_t>(seed >> 32);
  for (idx j = 0; j < n; ++j) {
    const std::uint32_t bits = mix32(mix32((lo + static_cast<std::uint32_t>(j)) ^ k0) + k1);
    const float m = bits >= threshold ? scale : 0.0f;
    y[j] = x[j] * m;
    mask[j] = m;
  }
}

// ---------------------------------------------------------------------------
// Optimizer updates (see AdamStep / SgdStep in qkv/kernels.h). Every operation is
// one rounding, in the order of the formulas (the kernels are built with
// -ffp-contract=off), so the result is bit-identical to the NumPy float32 code.
template <class Step>
inline void for_each_lane(idx n, Step&& step) {
  idx i = 0;
  for (; i + W <= n; i += W) step(i, V::tail_mask(W), true);
  if (i < n) step(i, V::tail_mask(static_cast<int>(n - i)), false);
}

void adam_update(float* w, const float* g, float* m, float* v, idx n, const AdamStep& s) {
  const V::reg decay = V::set1(s.decay_mul), l2 = V::set1(s.l2), b1 = V::set1(s.beta1),
               c1 = V::set1(s.one_minus_beta1), b2 = V::set1(s.beta2), c2 = V::set1(s.one_minus_beta2),
               bc2 = V::set1(s.bias2_sqrt), eps = V::set1(s.eps), step = V::set1(s.step_size);
  for_each_lane(n, [&](idx i, V::tail t, bool full) {
    V::reg wv = full ? V::load(w + i) : V::load(w + i, t);
    V::reg gv = full ? V::load(g + i) : V::load(g + i, t);
    V::reg mv = full ? V::load(m + i) : V::load(m + i, t);
    V::reg vv = full ? V::load(v + i) : V::load(v + i, t);
    if (s.decoupled) wv = V::mul(wv, decay);
    if (s.coupled) gv = V::add(gv, V::mul(l2, wv));
    mv = V::add(V::mul(mv, b1), V::mul(c1, gv));
    vv = V::add(V::mul(vv, b2), V::mul(c2, V::mul(gv, gv)));
    const V::reg denom = V::add(V::div(V::sqrt(vv), bc2), eps);
    wv = V::sub(wv, V::mul(step, V::div(mv, denom)));
    if (full) {
      V::store(w + i, wv);
      V::store(m + i, mv);
      V::store(v + i, vv);
    } else {
      V::store(w + i, wv, t);
      V::store(m + i, mv, t);
      V::store(v + i, vv, t);
    }
  });
}

void sgd_update(float* w, const float* g, float* buf, idx n, const SgdStep& s) {
  const V::reg wd = V::set1(s.wd), mom = V::set1(s.momentum), damp = V::set1(s.one_minus_dampening),
               lr = V::set1(s.lr);
  for_each_lane(n, [&](idx i, V::tail t, bool full) {
    V::reg wv = full ? V::load(w + i) : V::load(w + i, t);
    V::reg d = full ? V::load(g + i) : V::load(g + i, t);
    if (s.has_wd) d = V::add(d, V::mul(wd, wv));
    if (s.has_buf) {
      V::reg b = d;
      if (!s.first) b = V::add(V::mul(full ? V::load(buf + i) : V::load(buf + i, t), mom), V::mul(damp, d));
      if (full) V::store(buf + i, b);
      else V::store(buf + i, b, t);
      d = s.nesterov ? V::add(d, V::mul(mom, b)) : b;
    }
    wv = V::sub(wv, V::mul(lr, d));
    if (full) V::store(w + i, wv);
    else V::store(w + i, wv, t);
  });
}

// 2*NACC independent FMA chains keep both FMA pipes busy; returns FLOPs done.
double fma_probe(idx iters) {
  constexpr int NACC = 12;
  V::reg acc[NACC];
  for (int i = 0; i < NACC; ++i) acc[i] = V::set1(1.0f + 1e-3f * static_cast<float>(i));
  const V::reg a = V::set1(0.999999f), b = V::set1(1e-7f);
  for (idx it = 0; it < iters; ++it)
    for (int i = 0; i < NACC; ++i) acc[i] = V::fmadd(acc[i], a, b);
  float sink = 0.0f;
  for (int i = 0; i < NACC; ++i) sink += V::reduce_add(acc[i]);
  volatile float keep = sink;
  (void)keep;
  return 2.0 * NACC * W * static_cast<double>(iters);
}

float read_probe(const float* x, idx n) {
  constexpr int NACC = 4;  // independent sums: the adds never wait on each other
  V::reg acc[NACC];
  for (int i = 0; i < NACC; ++i) acc[i] = V::zero();
  idx i = 0;
  for (; i + NACC * W <= n; i += NACC * W)
    for (int a = 0; a < NACC; ++a) acc[a] = V::add(acc[a], V::load(x + i + a * W));
  float sum = 0.0f;
  for (int a = 0; a < NACC; ++a) sum += V::reduce_add(acc[a]);
  for (; i < n; ++i) sum += x[i];
  return sum;
}

// KC, or less where the core needs it (Note [kc on Intel])
int kc_for_cpu() { return cpu_features().vendor == "GenuineIntel" ? imin(KC, 384) : KC; }

}  // namespace

const KernelTable& kernel_table() {
  static const KernelTable table = {
#if defined(QKV_ISA_AVX512)
      "avx512",
#elif defined(QKV_ISA_AVX2)
      "avx2",
#else
      "scalar",
#endif
      MR, MR_ROWS, NR, WIDE_MR, kc_for_cpu(), MC, NC, gemm_tile, pack_a, copy_rows, gemv, dot_rows, softmax_fwd, softmax_fwd_rows, softmax_bwd_p, softmax_bwd_ds,
      scale_rows, all_finite, layernorm_fwd, layernorm_bwd, gelu_fwd, gelu_bwd, xent_row, dropout_fwd, adam_update, sgd_update,
      exp_array, fma_probe, read_probe};
  return table;
}

}  // namespace QKV_NS
}  // namespace qkv
