// The packed SGEMM driver: the five BLIS loops around the ISA micro-tile.
//
//   for jc in N step nc:                 B panel (kc × nc) packed once, shared (L3)
//     for pc in K step kc:
//       for ic in M step mc (threads):   A block (mc × kc) packed per thread (L2)
//         for jr in nc step nr:          B micro-panel (kc × nr) (L1)
//           for ir in mc step mr:        micro-tile mr × nr, kc rank-1 updates
//
// Threads split ic (M) and, when M has fewer blocks than threads, jr (N); never K.
// A B packed beforehand (Note [packed weights]) skips the packing of B.
#include "qkv/gemm.h"

#include "qkv/dispatch.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <numeric>
#include <vector>

namespace qkv {

AlignedBuffer& scratch(Scratch slot, idx n) {
  thread_local AlignedBuffer buffers[static_cast<int>(Scratch::kCount)];
  AlignedBuffer& b = buffers[static_cast<int>(slot)];
  b.resize(n);
  return b;
}

int threads_for(double work, double min_work) {
  const int max_t = omp_get_max_threads();
  const double t = work / min_work;
  if (t < 2.0) return 1;
  return t >= max_t ? max_t : static_cast<int>(t);
}

namespace {
std::atomic<bool> g_teams_started{false};
}  // namespace

int team_size(int nt) {
  if (nt <= 1) return 1;
  const int n = omp_get_max_threads();
  if (n > 1 && !g_teams_started.load(std::memory_order_relaxed)) g_teams_started.store(true);
  return n;
}

bool teams_started() { return g_teams_started.load(); }

namespace {

// Note [workspace]: one buffer of at least n floats for each of the first `team` workers
// of a parallel region (worker t's at [t]), sized by the calling thread before the
// region, so that a failed allocation raises in the caller. The workers reach it through
// the returned reference (inside the region the thread_local would be each worker's own).
// One set per calling thread, shared by the GEMM paths, which are never alive at once.
std::vector<AlignedBuffer>& worker_buffers(int team, idx n) {
  thread_local std::vector<AlignedBuffer> of_caller;
  if (of_caller.size() < static_cast<size_t>(team)) of_caller.resize(static_cast<size_t>(team));
  for (int t = 0; t < team; ++t) of_caller[static_cast<size_t>(t)].resize(n);
  return of_caller;
}

// Copies the (rows × cols) window of M at (i0, j0) to dst, element (a, c) to
// dst[a*d_rs + c*d_cs], one uniform-stride rectangle at a time.
void copy_window(const MatMap& M, idx i0, idx j0, idx rows, idx cols, float* dst, idx d_rs, idx d_cs) {
  for (idx a = 0; a < rows;) {
    idx rn = rows - a;
    for (idx c = 0; c < cols;) {
      idx rstep, cstep, rr, cc;
      const float* src = M.block(i0 + a, j0 + c, &rstep, &cstep, &rr, &cc);
      rr = std::min(rr, rows - a);
      cc = std::min(cc, cols - c);
      rn = std::min(rn, rr);
      if (cstep != 1 && rstep == 1) {
        // contiguous down the rows (a transposed operand): walk the source that way
        for (idx y = 0; y < cc; ++y) {
          const float* s = src + y * cstep;
          float* d = dst + a * d_rs + (c + y) * d_cs;
          if (d_rs == 1)
            for (idx x = 0; x < rr; ++x) d[x] = s[x];
          else
            for (idx x = 0; x < rr; ++x) d[x * d_rs] = s[x];
        }
      } else {
        for (idx x = 0; x < rr; ++x) {
          const float* s = src + x * rstep;
          float* d = dst + (a + x) * d_rs + c * d_cs;
          if (cstep == 1 && d_cs == 1)
            for (idx y = 0; y < cc; ++y) d[y] = s[y];
          else
            for (idx y = 0; y < cc; ++y) d[y * d_cs] = s[y * cstep];
        }
      }
      c += cc;
    }
    a += rn;
  }
}

// Packs the window rows [p0, p0+k) × columns [j0, j0+n) of M into dst[p][j], rows
// `width` floats apart, columns n..width zero-filled: B's panels, and A's micro-panels
// as windows of Aᵀ. One run of p at a time over which the window is one rectangle of M
// (all of k; or one head of [dQ | dK | dV], A of dX = [dQ | dK | dV]·Wᵀ; or the rows
// of W_Q, W_K, W_V in turn, its B = Wᵀ), with the ISA's copy or transpose.
void pack_panel(const KernelTable& kt, const MatMap& M, idx p0, idx k, idx j0, int n, int width, float* dst) {
  for (idx p = 0; p < k;) {
    idx rstep, cstep, rows, cols;
    const float* src = M.block(p0 + p, j0, &rstep, &cstep, &rows, &cols);
    const idx len = std::min<idx>(rows, k - p);
    float* d = dst + p * width;
    if (cols >= n && cstep == 1) {
      kt.copy_rows(len, n, src, rstep, d, width, width);  // rows of M
    } else if (cols >= n && rstep == 1) {
      kt.pack_a(n, len, src, cstep, d, width);  // columns of M, transposed
    } else {  // columns in several segments (or rows of A in several batches)
      copy_window(M, p0 + p, j0, len, n, d, width, 1);
      for (idx q = 0; q < len; ++q)
        for (int j = n; j < width; ++j) d[q * width + j] = 0.0f;
    }
    p += len;
  }
}

// Packs A[ic:ic+mc, pc:pc+kc] into ceil(mc/mr) micro-panels of mr rows:
// ap[panel][p][i], rows past mc zero-filled.
void pack_a(const KernelTable& kt, const MatMap& A, idx ic, idx mc, idx pc, idx kc, int mr, float* ap) {
  idx rstep, cstep, rows, cols;
  const float* block = A.block(ic, pc, &rstep, &cstep, &rows, &cols);
  if (rstep == 1 && rows >= mc && cols >= kc) {
    // A transposed (Xᵀ of dW = Xᵀ·dY): row p of the block is mc floats of one row of X.
    // A few rows of X at a time go to every micro-panel while their lines are in L1;
    // panel by panel instead, a row step of 4 KiB (X with 1024 columns) puts all kc
    // lines of a panel in one L1 set, and each next panel fetched them again from L2.
    // (1024, 4096, 256), dW of the training encoder's second feed-forward layer, was at
    // 0.82-0.91x NumPy; one process, old and new builds taking turns: 1.10x on 2
    // threads, 1.13x on 1; row steps without the aliasing unchanged (+-1%).
    constexpr idx kRowsAtOnce = 8;
    for (idx p0 = 0; p0 < kc; p0 += kRowsAtOnce) {
      const idx np = std::min<idx>(kRowsAtOnce, kc - p0);
      for (idx i0 = 0; i0 < mc; i0 += mr)
        kt.copy_rows(np, static_cast<int>(std::min<idx>(mr, mc - i0)), block + p0 * cstep + i0, cstep,
                     ap + i0 * kc + p0 * mr, mr, mr);
    }
    return;
  }
  const MatMap At = A.transposed();
  for (idx i0 = 0; i0 < mc; i0 += mr)
    pack_panel(kt, At, pc, kc, ic + i0, static_cast<int>(std::min<idx>(mr, mc - i0)), mr, ap + i0 * kc);
}

// One row block of A as the micro-tiles read it: row ir of the block's tile starts at
// ptr + ir·tile_step; element (i, p) of a tile at a[i·rs + p·cs].
struct ABlock {
  const float* ptr;
  idx tile_step, rs, cs;
};

// How many distinct 4 KiB page offsets (L1 set groups) rows `step` floats apart fall on.
idx spread(idx step) { return 4096 / std::gcd(step * static_cast<idx>(sizeof(float)), idx{4096}); }

// Note [A in place]
// The micro-tiles can read A where it lies instead of a packed copy, which saves the
// packing pass: ~10% when the product per element of A is short (N = 256, K = 256:
// the training encoder's layers).
// - Rows of A (row-contiguous tiles): while the tile's mr rows of kc floats stay in
//   L1 beside the B panel, kc up to 384, and rows that do not alias in L1's sets (a
//   row step of 4 KiB puts all 12 in one set: ~12% slower at K = 1024 on Zen 4).
// - Columns of A, i.e. a transposed operand such as Xᵀ in dW = Xᵀ·dY (column-contiguous
//   tiles, each k step one short run of a row of X): any kc, while X's rows fall on at
//   least 8 page offsets. Measured against packing on Zen 4, same process,
//   alternating: dW shapes (64..384, 512..4096, 64..2304) 6-23% faster on 1 thread,
//   2-22% on 2. Once the packing prefetched its source (copy_rows), 4 offsets lost on
//   Zen 5 (one process, taking turns, GFLOP/s in place -> packed): (2048, 768, 2304)
//   196 -> 228 on 1 thread, 422 -> 448 on 2; (4096, 256, 1024) 214 -> 216, 355 -> 385;
//   (4096, 256, 256) 223 -> 213, 330 -> 356.
// Fills *a and returns true, or returns false: pack.
bool a_in_place(const MatMap& A, idx ic, idx mc, idx pc, idx kc, ABlock* a) {
  idx rstep, cstep, rows, cols;
  const float* src = A.block(ic, pc, &rstep, &cstep, &rows, &cols);
  if (rows < mc || cols < kc) return false;
  // rows on at least 4 page offsets, so that at most mr / 4 rows of a tile share a set
  if (cstep == 1 && rstep > 0 && kc <= 384 && spread(rstep) >= 4) {
    *a = {src, rstep, rstep, 1};  // tile row i at src + i·rstep
    return true;
  }
  if (rstep == 1 && cstep > 0 && spread(cstep) >= 8) {
    *a = {src, 1, 1, cstep};  // tile element (i, p) at src + i + p·cstep
    return true;
  }
  return false;
}

// Where the driver reads B: a map (packed per call by the big path, read in place
// by the small-M path) or panels packed beforehand.
struct BOperand {
  const MatMap* map;
  const PackedB* packed;
  // B(0, j): the pointer, the step to B(1, j), and how many columns from j on are
  // contiguous (unit column step) with that row step. Untransposed maps only.
  const float* run(idx j, idx* rs, idx* len) const {
    if (packed) {
      *rs = kPackedPanel;
      *len = kPackedPanel - j % kPackedPanel;
      return packed->at(0, j);
    }
    idx step;
    *rs = map->row_step(j);
    return map->run(0, j, &step, len);
  }
};

// The B micro-panels of one K block that the macro-kernel reads: columns [j, j+nr)
// (j a multiple of nr) at at(j), row step `width` (a multiple of nr).
struct Panels {
  const float* base;
  idx width, panel_stride;
  const float* at(idx j) const { return base + (j / width) * panel_stride + j % width; }
};

// Runs the micro-tiles of one (ic, jr-range) work item against packed panels,
// splitting each tile at segment boundaries of the output map. rb/rr: the batch
// and row-in-batch of C's rows ic..ic+mc (precomputed, no division per tile).
// Tiles of mr × tw (tw = nr, or 2·nr: wide tiles, Note [wide tiles]).
void macro_kernel(const KernelTable& kt, const ABlock& ab, const Panels& bp, const idx* rb, const idx* rr, idx mc,
                  idx jc, idx j_begin, idx j_end, idx kc, float alpha, float beta, const MatMap& C,
                  const float* bias, int act, int mr, idx tw) {
  const int nr = kt.nr;
  float* rows[64];
  auto tile = [&](idx ir, idx jr) {
    const idx n_tile = std::min<idx>(tw, j_end - jr);
    const int m = static_cast<int>(std::min<idx>(mr, mc - ir));
    idx j = 0;
    while (j < n_tile) {  // split [jc+jr, jc+jr+n_tile) at segment boundaries
      const idx gj = jc + jr + j;
      const idx s = gj / C.seg_cols, c = gj - s * C.seg_cols;
      const Segment& g = C.segs[s];
      idx n = std::min<idx>(n_tile - j, C.seg_cols - c);
      // two panels in one tile only from the first one's start (the pieces of a tile
      // that C's segments split elsewhere keep to one panel each)
      const bool wide = j == 0 && n > nr;
      if (!wide) n = std::min<idx>(n, nr - j % nr);
      float* col = g.ptr + c * C.cs;
      for (int i = 0; i < m; ++i) rows[i] = col + rb[ir + i] * g.bs + rr[ir + i] * g.rs;
      GemmTile t;
      t.k = kc;
      t.m = m;
      t.n = static_cast<int>(n);
      t.a = ab.ptr + ir * ab.tile_step;
      t.rs_a = ab.rs;
      t.cs_a = ab.cs;
      t.b = bp.at(jr + j);
      t.rs_b = bp.width;
      t.b_panel = wide ? bp.at(jr + nr) - t.b : 0;
      t.c_rows = rows;
      t.alpha = alpha;
      t.beta = beta;
      t.bias = bias ? bias + gj : nullptr;
      t.act = act;
      t.prefetch_c = true;
      kt.gemm_tile(t);
      j += n;
    }
  };
  // jr outer: one B micro-panel is reused by every A micro-panel of the block
  for (idx jr = j_begin; jr < j_end; jr += tw)
    for (idx ir = 0; ir < mc; ir += mr) tile(ir, jr);
}

// Small M (up to a few hundred rows): packing B would cost as much as the product,
// so the micro-tiles read A and B in place and threads split N into strips; a
// strip of B is read from memory once and from L2 for the further row tiles.
void gemm_small_m(const KernelTable& kt, idx M, idx N, idx K, float alpha, const MatMap& A, const BOperand& B,
                  float beta, const MatMap& C, const float* bias, int act) {
  const int nr = kt.nr;
  // The gemv forms alpha·((beta/alpha)·C + x·B): with beta != 0 and alpha != 1 the
  // quotient overflows or underflows (alpha = 1e-40, beta = 1: C became inf), so such
  // a row takes the micro-tiles below, whose store is alpha·acc + beta·C
  if (M == 1 && !B.packed && (beta == 0.0f || alpha == 1.0f)) {
    // One row: the gemv kernel over column strips, one per thread (long contiguous
    // runs of every row of B), split further where B's rows break. (Packed panels
    // are contiguous already: the 1-row micro-tile below streams them.) Threads: one
    // below 1 MB of B (on 2 cores a second one cost as much as it saved there), then
    // one per 64 KiB and 64 columns. (16-core Xeon, a 384 × 1152 weight: 8 threads
    // 25 us, 16 threads 29 us, against 32 and 42 us with the 3 that one thread per
    // 500 KB allowed; 1 to 4 threads unchanged.)
    const double bytes = 4.0 * static_cast<double>(N) * K;
    const int nt = bytes < 1.0e6 ? 1 : static_cast<int>(std::min<idx>(threads_for(bytes, 64.0 * 1024), ceil_div(N, 64)));
    const idx kStrip = ceil_div(ceil_div(N, nt), 16) * 16;
    idx astep, alen;
    const float* x = A.run(0, 0, &astep, &alen);
#pragma omp parallel for num_threads(team_size(nt)) schedule(static)
    for (idx strip = 0; strip < ceil_div(N, kStrip); ++strip) {
      const idx j_end = std::min<idx>(N, (strip + 1) * kStrip);
      for (idx j = strip * kStrip; j < j_end;) {
        idx rs, len;
        const float* bp = B.run(j, &rs, &len);
        idx n = std::min<idx>(j_end - j, len);
        // B's segments that continue its rows in memory (the head blocks of one
        // [W_Q | W_K | W_V]) join the run: one pass over whole rows of B, not one per
        // head (fused projection (1, 384, 1152), 1 thread: 33 -> 22 us). C's pieces of
        // the run (heads, q/k/v) are written in place when one run of C holds them
        // all, else through y.
        while (j + n < j_end) {
          idx rs2, len2;
          if (B.run(j + n, &rs2, &len2) != bp + n || rs2 != rs) break;
          n += std::min<idx>(j_end - j - n, len2);
        }
        idx cstep, clen;
        float* c0 = C.run(0, j, &cstep, &clen);
        float* y = clen >= n ? c0 : scratch(Scratch::kGemvY, n).data();
        auto pieces = [&](auto&& f) {  // f(C's piece, its offset in the run, its length)
          for (idx q = 0; q < n;) {
            idx cs2, cl2;
            float* c = C.run(0, j + q, &cs2, &cl2);
            cl2 = std::min<idx>(cl2, n - q);
            f(c, q, cl2);
            q += cl2;
          }
        };
        if (y != c0 && beta != 0.0f) pieces([&](const float* c, idx q, idx l) { std::copy(c, c + l, y + q); });
        kt.gemv(1, K, n, x, 0, bp, rs, y, 0, alpha, beta, bias ? bias + j : nullptr, act);
        if (y != c0) pieces([&](float* c, idx q, idx l) { std::copy(y + q, y + q + l, c); });
        j += n;
      }
    }
    return;
  }
  // Note [misaligned operands]: strip s is the columns [s·tw - shift, (s+1)·tw - shift)
  // (clipped to [0, N)), so that every strip but the first starts on a cache line of B
  // where B's rows start on lines alike (a row step of whole lines). Only where B and C
  // are one run of columns each: strips that straddled the heads of a projection (64
  // columns each) would take two tiles (fused projection (128, 384, 1152), 1 thread:
  // 0.83-0.88x NumPy with the shift, against 1.04-1.27x without)
  idx shift = 0;
  if (!B.packed && C.seg_cols >= N) {
    idx rs, len;
    const auto at = reinterpret_cast<std::uintptr_t>(B.run(0, &rs, &len));
    if (len >= N && rs % kLineFloats == 0) shift = static_cast<idx>(at / sizeof(float) % kLineFloats);
  }
  // (row-contiguous tiles as tall as the kernel allows: 13 rows, a short query's
  // tokens, stream B once; column-contiguous ones up to mr)
  const idx n_row_tiles = row_tiles(M, A.trans ? kt.mr : kt.mr_rows);
  // Strips of one tile's width: two panels where the kernel has wide tiles (Note [wide
  // tiles]) and M takes three or more tiles of one panel; with fewer, the 6-row wide
  // tiles would read each strip of B twice as often. One process, old and new taking
  // turns, Ice Lake, 1 thread, GFLOP/s, medians of 5 (plain / packed B): (100, 1024, 1000)
  // 49 -> 65 / 85 -> 88, (128, 384, 1152) 78 -> 86 / 91 -> 96, (192, 768, 768) 74 -> 79 /
  // 91 -> 97, (32, 384, 1536) 65 -> 67 / 86 -> 88, but (13, 384, 1152) 66 -> 61 / 81 -> 70,
  // (24, 1536, 384) 73 -> 69 / 90 -> 90.
  const idx tw = n_row_tiles >= 3 ? tile_cols(kt) : nr;
  const idx n_strips = ceil_div(N + shift, tw);
  // Few rows are bound by streaming B, and a second thread adds bandwidth: count
  // B's bytes as work too (a 384 × 1536 weight gets both threads even for one row).
  const double work = std::max(2.0 * M * N * K, 8.0 * static_cast<double>(N) * K);
  const int nt = static_cast<int>(std::min<idx>(threads_for(work, 1.0e6), n_strips));
  // A in place (small_m_ok): element (i, p) at a0 + i·a_rs + p·astep, with rows
  // contiguous along K (astep 1) or, transposed, columns contiguous along M (a_rs 1)
  idx astep, alen;
  const float* a0 = A.run(0, 0, &astep, &alen);
  const idx a_rs = A.row_step(0);
  std::vector<idx> rb(static_cast<size_t>(M)), rr(static_cast<size_t>(M));
  for (idx i = 0; i < M; ++i) C.row_offset(i, &rb[i], &rr[i]);
  // Note [misaligned operands]: where at least four row tiles read a piece of a strip,
  // the first of them leaves a copy of it on lines as it streams it (GemmTile::b_copy)
  // for the others, if B's rows
  // - fall on fewer than 4 page offsets (L1 sets; a row step of 3072 floats puts them
  //   all in one), or
  // - do not start on lines (B or C in pieces, a row step of no whole number of lines,
  //   the first strip), except where misaligned_b_in_place() (Zen 5).
  // Copied by a pass of its own before the tiles (until 2026-11), on Ice Lake, 1 thread,
  // one process, old and new taking turns, GFLOP/s: fused projection (128, 384, 1152)
  // 90 -> 110 (NumPy 88), (192, 1024, 3072) 49 -> 102, (128, 768, 2304) 104 -> 106;
  // matmul (100, 1024, 1000) 74 -> 82, (80, 384, 1000) 104 -> 108; with two or three
  // tiles the copy cost 8-20% (M = 20-40). On Zen 5 (same method; that pass -> the
  // first tile's copy where rows alias, in place otherwise), NumPy-allocated operands
  // (16 bytes into a line), 1 thread: q/k/v projection (128, 384, 1152) 221 -> 233,
  // (128, 768, 2304) 223 -> 240, (192, 1024, 3072) 223 -> 238 (its weight on lines:
  // 202 -> 242); matmul (100, 1024, 1000) 219 -> 241, (80, 384, 1000) 205 -> 227, (64,
  // 1024, 4096) 176 -> 205, (128, 1024, 4096) 195 -> 226, (128, 384, 1152) even; 2
  // threads: projection (192, 1024, 3072) 434 -> 469, matmul (100, 1024, 1000) 424 ->
  // 465, (128, 1024, 4096) 370 -> 439. Buffers of K × tw per worker, kept by the calling
  // thread (Note [workspace]).
  const bool copy_b = !B.packed && n_row_tiles >= 4;
  const int team = team_size(nt);
  std::vector<AlignedBuffer>& strip_buf = worker_buffers(copy_b ? team : 0, K * tw);
  // Each thread takes a run of strips of about equal work (their vectors of columns):
  // whole strips split evenly would leave the shifted ends (a strip of 60 columns and
  // one of 4, say) on different threads unevenly, (128, 384, 1152) as 636 and 516
  // columns on two threads. One process, old and new taking turns, Ice Lake, 2 threads,
  // medians of 11-15, GFLOP/s: (128, 384, 1152) 162-163 -> 175-179, (192, 768, 768)
  // 144-157 -> 168-174, (48, 384, 1152) 150-151 -> 163-168; (100, 1024, 1000), whose
  // strips split evenly already, within noise.
  auto strip_begin = [&](idx strip) { return std::max<idx>(0, strip * tw - shift); };
  std::vector<idx> first(static_cast<size_t>(team) + 1, n_strips);
  {
    std::vector<idx> done(static_cast<size_t>(n_strips) + 1, 0);  // vectors of strips [0, s)
    for (idx s = 0; s < n_strips; ++s)
      done[s + 1] = done[s] + ceil_div(std::min<idx>(N, strip_begin(s + 1)) - strip_begin(s), kLineFloats);
    first[0] = 0;
    for (int t = 1; t < team; ++t) {  // the strip boundary nearest to t/team of the work
      const idx target = done[n_strips] * t;
      idx s = first[t - 1];
      auto off = [&](idx b) { return done[b] * team > target ? done[b] * team - target : target - done[b] * team; };
      while (s < n_strips && off(s + 1) <= off(s)) ++s;
      first[t] = s;
    }
  }
#pragma omp parallel num_threads(team)
  for (idx strip = first[omp_get_thread_num()]; strip < first[omp_get_thread_num() + 1]; ++strip) {
    float* rows[64];
    const idx j_end = std::min<idx>(N, strip_begin(strip + 1));
    idx j = strip_begin(strip);
    while (j < j_end) {  // pieces of the strip within one segment of B and of C
      idx rs_b, len;
      const float* bp = B.run(j, &rs_b, &len);
      const idx s = j / C.seg_cols, c = j - s * C.seg_cols;
      const Segment& g = C.segs[s];
      idx n = std::min<idx>(j_end - j, C.seg_cols - c), b_panel = nr;
      // packed panels: a wide tile reads the next panel where it is
      if (B.packed && len == nr && n > nr) b_panel = B.packed->at(0, j + nr) - bp;
      else n = std::min(n, len);
      // (the first row tile's copy: n columns in rows tw apart; the tiles mask their lanes past n)
      const bool copy = copy_b && (spread(rs_b) < 4 || (!on_lines(bp, rs_b) && !misaligned_b_in_place()));
      float* const lines = copy ? strip_buf[static_cast<size_t>(omp_get_thread_num())].data() : nullptr;
      const bool wide = n > nr;
      const idx row_tiles_n = wide ? row_tiles(M, kt.wide_mr) : n_row_tiles;
      for (idx tile = 0; tile < row_tiles_n; ++tile) {  // rows split evenly (row_tiles)
        const idx i0 = row_tile_begin(tile, row_tiles_n, M);
        const int m = static_cast<int>(row_tile_begin(tile + 1, row_tiles_n, M) - i0);
        for (int i = 0; i < m; ++i) rows[i] = g.ptr + rb[i0 + i] * g.bs + rr[i0 + i] * g.rs + c * C.cs;
        GemmTile t;
        t.k = K;
        t.m = m;
        t.n = static_cast<int>(n);
        t.a = a0 + i0 * a_rs;
        t.rs_a = a_rs;
        t.cs_a = astep;
        t.b = tile > 0 && lines ? lines : bp;
        t.rs_b = tile > 0 && lines ? tw : rs_b;
        t.b_panel = wide ? b_panel : 0;
        t.stream_b = tile == 0;  // the first row tile reads the strip from memory (and copies it)
        if (tile == 0 && lines) {
          t.b_copy = lines;
          t.b_copy_rs = tw;
        }
        t.c_rows = rows;
        t.alpha = alpha;
        t.beta = beta;
        t.bias = bias ? bias + j : nullptr;
        t.act = act;
        t.prefetch_c = true;
        kt.gemm_tile(t);
      }
      j += n;
    }
  }
}

// True when the no-pack path can read the operands in place: A row-major with
// whole rows in one batch, or a transposed A (M > 1) whose stored rows, one per k,
// are all in one batch; B packed beforehand or with unit column steps.
bool small_m_ok(const KernelTable& kt, idx M, idx K, const MatMap& A, const BOperand& B) {
  // Measured on Zen 4 (K = 384, N = 1536): reading B in place beats packing it up to
  // about 16 micro-tile rows (the B strip of each thread stays in L2 across them).
  if (M > 16 * kt.mr || A.cs != 1) return false;
  if (B.map && (B.map->trans || B.map->cs != 1)) return false;
  if (A.seg_cols != MatMap().seg_cols) return false;
  if (A.trans) return M > 1 && K <= A.rows_per_batch;
  return M <= A.rows_per_batch;  // rows i0..i0+m-1 in one batch with a uniform row step
}

// How many chunks to cut the jr loop (n_tiles column tiles) into so that the n_ic ×
// chunks work items spread evenly over nt threads (a static split: the busiest thread
// has ceil(items / nt)); the fewest chunks within 2% of the best balance.
idx split_n(idx n_ic, idx n_tiles, int nt) {
  if (nt <= 1) return 1;
  auto balance = [&](idx chunks) {
    const idx items = n_ic * chunks;
    return static_cast<double>(items) / (static_cast<double>(nt) * ceil_div(items, nt));
  };
  const idx max_chunks = std::min<idx>(n_tiles, std::max<idx>(4, ceil_div(nt, n_ic)));
  double best = 0.0;
  for (idx c = 1; c <= max_chunks; ++c) best = std::max(best, balance(c));
  for (idx c = 1; c <= max_chunks; ++c)
    if (balance(c) >= best - 0.02) return c;
  return 1;
}

void gemm_driver(const KernelTable& kt, idx M, idx N, idx K, float alpha, const MatMap& A, const BOperand& B,
                 float beta, const MatMap& C, const float* bias, int act) {
  if (M <= 0 || N <= 0) return;
  const int nr = kt.nr;
  if (K > 0 && alpha != 0.0f && small_m_ok(kt, M, K, A, B)) {
    gemm_small_m(kt, M, N, K, alpha, A, B, beta, C, bias, act);
    return;
  }
  if (K <= 0 || alpha == 0.0f) {
    // C = beta·C + bias, no product to form. Uses a zero-length micro-tile pass.
    K = 0;
  }
  // micro-tiles of mr × tw: wide ones where the kernel has them (Note [wide tiles])
  const idx tw = tile_cols(kt);
  const int mr = tw > nr ? kt.wide_mr : kt.mr;
  // K in one block up to 4/3 of the kernel's kc (one pass over C), else in equal
  // blocks of at most that; N in equal blocks of at most nc, whole packed panels (2304
  // columns as 2048 + 256 packed each A block once more for a narrow sliver of B: one
  // process, old and new taking turns, Zen 5, 1 thread, GFLOP/s, dW = Xᵀ·dY (768, 2048,
  // 2304) 231 -> 235, (2048, 768, 2304) 243 -> 244, (8192, 1024, 3072) 247 -> 248).
  const idx n_kb = ceil_div(std::max<idx>(K, 1), kt.kc * 4 / 3);
  const idx kc_max = std::max<idx>(1, ceil_div(K, n_kb));
  const idx n_jc = ceil_div(N, kt.nc), nc_max = ceil_div(ceil_div(N, n_jc), kPackedPanel) * kPackedPanel;
  const double flops = 2.0 * static_cast<double>(M) * N * std::max<idx>(K, 1);
  const int nt = team_size(threads_for(flops, 4.0e6));  // Note [whole teams]: blocks for the whole team
  // M blocks of equal size in micro-tiles (at most kt.mc rows; one per thread when
  // that gives fewer than two per thread), so that threads taking equal numbers of
  // blocks get equal work: 736 rows as 144 × 5 + 16 left one of two threads 42% more.
  const idx m_tiles = ceil_div(M, mr);
  idx n_ic = ceil_div(m_tiles, std::max<idx>(1, kt.mc / mr));
  if (n_ic < 2 * nt) n_ic = std::min<idx>(m_tiles, nt);
  auto ic_begin = [&](idx b) { return std::min<idx>(M, b * m_tiles / n_ic * mr); };
  const idx mc_max = ceil_div(m_tiles, n_ic) * mr;

  // Note [workspace]; sized here, in the calling thread, so that a failed
  // allocation raises in the caller instead of terminating a parallel region
  float* const bpack = B.packed ? nullptr : scratch(Scratch::kGemmB, kc_max * nc_max).data();
  std::vector<AlignedBuffer>& apack = worker_buffers(nt, mc_max * kc_max);  // one A block per worker
  std::vector<std::vector<idx>> rowoff(static_cast<size_t>(nt), std::vector<idx>(static_cast<size_t>(2 * mc_max)));

#pragma omp parallel num_threads(nt)
  {
    float* const ap = apack[static_cast<size_t>(omp_get_thread_num())].data();
    idx* const rb = rowoff[static_cast<size_t>(omp_get_thread_num())].data();
    idx* const rr = rb + mc_max;
    for (idx jc = 0; jc < N; jc += nc_max) {
      const idx nc = std::min<idx>(nc_max, N - jc);
      const idx n_panels = ceil_div(nc, nr), n_tiles = ceil_div(nc, tw);
      // Split the jr loop too when the M blocks cannot keep every thread busy.
      const idx n_jchunks = split_n(n_ic, n_tiles, nt);
      for (idx pc = 0; pc < std::max<idx>(K, 1); pc += kc_max) {
        const idx kc = K == 0 ? 0 : std::min<idx>(kc_max, K - pc);
        const bool first = pc == 0, last = pc + kc_max >= K;
        Panels panels{bpack, nr, kc * nr};
        if (B.packed) {  // jc is a multiple of nc_max, itself of kPackedPanel when N > nc_max
          panels = {B.packed->at(pc, jc), kPackedPanel, K * kPackedPanel};
        } else {
          // A row-major B is packed kPackRows rows at a time across all the panels, so that its
          // rows stream in order (a panel at a time would walk kc rows N floats apart
          // for each 32 columns: page-crossing strides that defeat the prefetchers),
          // and copy_rows prefetches the next block's lines as it goes (without, the
          // packing waited on memory: 15% of dW = Xᵀ·dY (4096, 384, 1152) on 1 thread,
          // 4% with; one process, taking turns, Zen 5: dW 185-195 -> 209-238 GFLOP/s on
          // 1 thread, 300-332 -> 425-453 on 2); a transposed B (contiguous down the
          // columns) a panel at a time.
          const idx rblk = B.map->trans ? std::max<idx>(kc, 1) : kPackRows, n_rblk = ceil_div(kc, rblk);
#pragma omp for schedule(static)
          for (idx item = 0; item < n_rblk * n_panels; ++item) {
            const idx r0 = item / n_panels * rblk, jp = item % n_panels;
            pack_panel(kt, *B.map, pc + r0, std::min<idx>(rblk, kc - r0), jc + jp * nr,
                       static_cast<int>(std::min<idx>(nr, nc - jp * nr)), nr, bpack + jp * kc * nr + r0 * nr);
          }
          // (implicit barrier: the B panel is complete)
        }
        idx packed_ic = -1;
        ABlock ab{};
#pragma omp for schedule(static)
        for (idx item = 0; item < n_ic * n_jchunks; ++item) {
          const idx icb = item / n_jchunks, jcb = item % n_jchunks;
          const idx ic = ic_begin(icb), mc = ic_begin(icb + 1) - ic;
          if (packed_ic != ic) {
            if (!a_in_place(A, ic, mc, pc, kc, &ab)) {
              pack_a(kt, A, ic, mc, pc, kc, mr, ap);
              ab = {ap, kc, 1, mr};  // panels ap[panel][p][i]
            }
            for (idx i = 0; i < mc; ++i) C.row_offset(ic + i, rb + i, rr + i);
            packed_ic = ic;
          }
          const idx per = ceil_div(n_tiles, n_jchunks);
          const idx j_begin = std::min<idx>(jcb * per, n_tiles) * tw;
          const idx j_end = std::min<idx>(std::min<idx>((jcb + 1) * per, n_tiles) * tw, nc);
          if (j_begin >= j_end) continue;
          macro_kernel(kt, ab, panels, rb, rr, mc, jc, j_begin, j_end, kc, alpha,
                       first ? beta : 1.0f, C, first ? bias : nullptr, last ? act : 0, mr, tw);
        }
        // (implicit barrier: nobody still reads the B panel when it is repacked)
      }
    }
  }
}

}  // namespace

void gemm(const KernelTable& kt, idx M, idx N, idx K, float alpha, const MatMap& A, const MatMap& B,
          float beta, const MatMap& C, const float* bias, int act) {
  gemm_driver(kt, M, N, K, alpha, A, BOperand{&B, nullptr}, beta, C, bias, act);
}

void gemm(const KernelTable& kt, idx M, const MatMap& A, const PackedB& B, float alpha, float beta,
          const MatMap& C, const float* bias, int act) {
  gemm_driver(kt, M, B.N, B.K, alpha, A, BOperand{nullptr, &B}, beta, C, bias, act);
}

void pack_b(const MatMap& B, idx K, idx N, float* dst) {
  const idx n_panels = ceil_div(N, kPackedPanel);
  const int nt = static_cast<int>(std::min<idx>(threads_for(static_cast<double>(K) * N, 1.0e6), n_panels));
#pragma omp parallel for num_threads(team_size(nt)) schedule(static)
  for (idx p = 0; p < n_panels; ++p) {
    float* panel = dst + p * K * kPackedPanel;
    const idx j0 = p * kPackedPanel, n = std::min<idx>(kPackedPanel, N - j0);
    if (K > 0) copy_window(B, 0, j0, K, n, panel, kPackedPanel, 1);
    for (idx r = 0; r < K; ++r)
      for (idx j = n; j < kPackedPanel; ++j) panel[r * kPackedPanel + j] = 0.0f;
  }
}

}  // namespace qkv
