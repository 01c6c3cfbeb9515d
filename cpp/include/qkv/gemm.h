// The packed SGEMM driver (BLIS scheme; the micro-tile is the ISA kernel).
#pragma once
#include <limits>

#include "qkv/common.h"
#include "qkv/kernels.h"

namespace qkv {

// A 2-D matrix laid out in memory as batches of rows and segments of columns, so
// that the projection reads and writes head-major (batch, heads, seq, d_head)
// tensors as if they were one (batch·seq) × (heads·d_head) matrix, with no copy:
//   b = i / rows_per_batch, r = i % rows_per_batch, s = j / seg_cols, c = j % seg_cols
//   M(i, j) = segs[s].ptr[b*segs[s].bs + r*segs[s].rs + c*cs]
// With trans, the view is of the transpose: M(i, j) = (the above)(j, i).
// A plain row-major matrix is one segment with rows_per_batch and seg_cols = ∞.
struct Segment {
  float* ptr;
  idx bs, rs;
};

struct MatMap {
  const Segment* segs;
  idx cs = 1;
  idx seg_cols = std::numeric_limits<idx>::max();
  idx rows_per_batch = std::numeric_limits<idx>::max();
  bool trans = false;

  // The largest rectangle from (i, j) on with uniform steps: element (i+a, j+c) is
  // at ptr + a*rstep + c*cstep for a < *rows, c < *cols (up to the next batch or
  // segment boundary).
  float* block(idx i, idx j, idx* rstep, idx* cstep, idx* rows, idx* cols) const {
    const idx r0 = trans ? j : i, c0 = trans ? i : j;  // coordinates in the stored matrix
    const idx b = r0 / rows_per_batch, r = r0 - b * rows_per_batch;
    const idx s = c0 / seg_cols, c = c0 - s * seg_cols;
    const Segment& g = segs[s];
    if (trans) {
      *rstep = cs;
      *cstep = g.rs;
      *rows = seg_cols - c;
      *cols = rows_per_batch - r;
    } else {
      *rstep = g.rs;
      *cstep = cs;
      *rows = rows_per_batch - r;
      *cols = seg_cols - c;
    }
    return g.ptr + b * g.bs + r * g.rs + c * cs;
  }

  // Pointer to element (i, j), the step to (i, j+1), and how many elements from j
  // on share that step (up to the next segment or batch boundary).
  float* run(idx i, idx j, idx* step, idx* len) const {
    idx rstep, rows;
    return block(i, j, &rstep, step, &rows, len);
  }

  // Row i's offset within every segment (C maps only: not transposed): the
  // divisions of run() done once per row instead of once per element.
  void row_offset(idx i, idx* b, idx* r) const {
    *b = i / rows_per_batch;
    *r = i - *b * rows_per_batch;
  }

  // The step from (i, j) to (i+1, j) inside one batch of rows.
  idx row_step(idx j) const { return trans ? cs : segs[(j / seg_cols)].rs; }

  // The same storage viewed as the transpose.
  MatMap transposed() const {
    MatMap t = *this;
    t.trans = !trans;
    return t;
  }
};

// A plain matrix: element (i, j) at ptr[i*rs + j*cs]. Holds its one segment.
struct PlainMat {
  Segment seg;
  MatMap map;
  PlainMat(const float* ptr, idx rs, idx cs, bool trans = false)
      : seg{const_cast<float*>(ptr), 0, rs} {
    map.segs = &seg;
    map.cs = cs;
    map.trans = trans;
  }
  PlainMat(const PlainMat&) = delete;
  PlainMat& operator=(const PlainMat&) = delete;
};

// Note [packed weights]
// A right operand B (K×N) packed once and used by many products (a layer's weight
// at inference): column panels of kPackedPanel columns, panel p holding
// B[0:K, 32p : 32p+32] row-major, K × 32 contiguous, columns past N zero. Every
// micro-tile width (8, 16, 32) divides 32, so each ISA reads the panels in place
// (rs_b = 32) and a packed weight stays valid across set_isa. Products against it
// skip the per-call packing of B and stream each panel sequentially from memory,
// which is what small M (a few tokens: latency-bound inference) is limited by.
constexpr idx kPackedPanel = 32;

struct PackedB {
  const float* data;  // ceil(N / 32) panels of K × 32 floats
  idx K, N;
  // Element (p, j) is at at(p, j); columns j..(j | 31) follow it contiguously.
  const float* at(idx p, idx j) const { return data + (j / kPackedPanel) * K * kPackedPanel + p * kPackedPanel + j % kPackedPanel; }
};

// Floats that pack_b writes for a K × N operand.
inline idx packed_b_size(idx K, idx N) { return ceil_div(N, kPackedPanel) * kPackedPanel * K; }

// Packs B (K×N, any map) into dst (packed_b_size(K, N) floats), threads over panels.
void pack_b(const MatMap& B, idx K, idx N, float* dst);

// C(M×N) = act(alpha·A(M×K)·B(K×N) + beta·C + bias) (bias: (N,) or null; act: the
// GemmTile epilogue, 0 none, 1 GELU). beta == 0 never reads C. C must not be
// transposed and must have cs == 1. Threads split the M and N loops, never K.
void gemm(const KernelTable& kt, idx M, idx N, idx K, float alpha, const MatMap& A, const MatMap& B,
          float beta, const MatMap& C, const float* bias, int act = 0);
// The same with B packed beforehand (B.K == K, B.N == N).
void gemm(const KernelTable& kt, idx M, const MatMap& A, const PackedB& B, float alpha, float beta,
          const MatMap& C, const float* bias, int act = 0);

}  // namespace qkv
