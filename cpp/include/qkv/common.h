// Small shared pieces of the drivers: index type, aligned buffers, thread count.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace qkv {

using idx = std::int64_t;

inline idx ceil_div(idx a, idx b) { return (a + b - 1) / b; }

// m rows split evenly over the fewest micro-tiles of at most mr rows (13 = 7 + 6, not
// 12 + 1: a tile of one or two rows is FMA-latency bound and costs a third of a full
// one). Tile t of row_tiles(m, mr) holds rows [row_tile_begin(t), row_tile_begin(t + 1)).
inline idx row_tiles(idx m, idx mr) { return ceil_div(m, mr); }
inline idx row_tile_begin(idx t, idx tiles, idx m) { return t * m / tiles; }

// Note [huge pages]
// A buffer of 1.5 MiB or more (a packed weight, a large workspace) starts on a 2 MiB
// boundary and is advised to the kernel as huge-page memory (Linux, THP in "madvise"
// mode, as NumPy does for its large arrays); its size is rounded up to whole huge
// pages when that adds at most a quarter, else its tail stays in small pages.
// Kernels that stream it (one-token products against packed weights) then walk a
// few TLB entries instead of one per 4 KiB: the sentence encoder's one-query latency
// dropped from 3.4-5.1 ms to 2.9-3.3 ms, and varies less from run to run.
// A block of at least `bytes`, aligned to `align` (a power of two from 64), or huge as
// above; release with std::free. Throws std::bad_alloc.
inline void* alloc_block(std::size_t bytes, std::size_t align = 64) {
  constexpr std::size_t kHuge = std::size_t(2) << 20;
  bytes = (bytes + 63) / 64 * 64;
  const bool huge = bytes >= kHuge / 4 * 3;
  if (huge) {
    align = kHuge;
    const std::size_t whole = (bytes + kHuge - 1) / kHuge * kHuge;
    if (whole - bytes <= bytes / 4) bytes = whole;  // all of it in huge pages
  }
  void* p = std::aligned_alloc(align, (bytes + align - 1) / align * align);
  if (!p) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (huge) madvise(p, bytes, MADV_HUGEPAGE);  // a hint: failure changes nothing
#endif
  return p;
}

// An uninitialised, 64-byte aligned float buffer (workspace, packed panels).
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(idx n) { resize(n); }
  void resize(idx n) {
    if (n <= size_) return;
    ptr_.reset(static_cast<float*>(alloc_block(static_cast<std::size_t>(n) * sizeof(float))));
    size_ = n;
  }
  float* data() const { return ptr_.get(); }
  idx size() const { return size_; }

 private:
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> ptr_;
  idx size_ = 0;
};

// Note [workspace]
// Scratch buffers that live on between calls, one set per thread (the calling
// thread and each OpenMP worker), grown on demand and never shrunk: a fresh
// allocation of a few MB per call costs page faults comparable to a small GEMM.
// `slot` names the use, so that buffers alive at the same time differ.
enum class Scratch { kGemmB, kGemvY, kCount };
AlignedBuffer& scratch(Scratch slot, idx n);

// Threads a driver may use: the OpenMP setting, capped so that each thread gets at
// least `min_work` units of `work` (small problems do not pay for idle threads).
int threads_for(double work, double min_work);

// Note [whole teams]
// A parallel region runs on one thread or on every thread the op may use, never on a
// team in between: work that warrants nt threads (threads_for, fewer tasks than
// threads) runs with team_size(nt) threads, and those past the work find none and
// wait at the closing barrier. GCC's libgomp ends the pool threads that a smaller
// team leaves out, and the next larger team creates them again (one clone per thread),
// so ops of alternating sizes paid thread creations each time: a one-text encoder
// forward runs regions of 11, 1, 3 and 15 threads. 16-core Xeon (device), a
// 13 x 384 x 1152 product and a 13 x 384 x 384 one alternating: 327 us per pair
// against 28 and 26 us each alone (35 us with whole teams); that forward took 4.6 ms on
// 16 threads and 2.0 on 4 (1.25 and 1.8 with whole teams). A thread with nothing to do
// costs a wake-up and a barrier instead (~microseconds).
// Per-thread scratch is sized by the team.
int team_size(int nt);

// True once team_size has sized a team of more than one thread in this process (the
// OpenMP runtime may then hold worker threads that fork() does not copy: Note [fork]
// in cpp/bindings/module.cpp).
bool teams_started();

}  // namespace qkv
