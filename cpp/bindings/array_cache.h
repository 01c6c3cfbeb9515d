// The memory of the large arrays the native ops return: Note [array cache].
#pragma once
#include <cstddef>
#include <cstdlib>
#include <list>
#include <mutex>

#include "qkv/common.h"

namespace qkv {

// Note [array cache]
// An op called without out= returns a new array. When it is large (>= kMinBytes) its
// memory comes from here, and the array's base is a capsule that gives the block back
// when NumPy frees the array; the next array of the same (page-rounded) size takes it
// again. Without the cache, every call of an op in a loop writes its result into fresh
// pages that the OS maps and zeroes on first touch: on the development machine (a Zen 5
// VM) ~1.2 µs per 4 KiB page, or the kernel clearing 2 MiB huge pages. One thread,
// attention_backward at (32, 12, 128, 32): 45 µs per head with fresh outputs against
// 40 with out=; at batch 1 (196 KB per output) 45 against 30.
// Freed blocks are kept up to `limit` bytes and kMaxBlocks blocks; past either the
// oldest go back to the OS (set_limit(0), qkv_native.set_cache_limit(0): none are
// kept). Blocks are page-aligned and allocated as AlignedBuffer's are (Note [huge
// pages] in qkv/common.h). Thread-safe.
class ArrayCache {
 public:
  static constexpr std::size_t kMinBytes = std::size_t{64} << 10;
  static constexpr std::size_t kPage = 4096;
  static constexpr std::size_t kMaxBlocks = 64;

  // One instance for the process, never destroyed: arrays freed during interpreter
  // shutdown may still give blocks back after static destructors would have run.
  static ArrayCache& instance() {
    static ArrayCache* cache = new ArrayCache;
    return *cache;
  }

  // A page-aligned block of round_up(bytes); throws std::bad_alloc.
  void* take(std::size_t bytes) {
    const std::size_t size = rounded(bytes);
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = free_.rbegin(); it != free_.rend(); ++it)  // the most recently freed first
        if (it->size == size) {
          void* p = it->ptr;
          cached_ -= size;
          free_.erase(std::next(it).base());
          return p;
        }
    }
    return alloc_block(size, kPage);
  }

  // Gives back a block from take(bytes).
  void give(void* p, std::size_t bytes) {
    const std::size_t size = rounded(bytes);
    std::list<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      free_.push_back({p, size});
      cached_ += size;
      trim(&evicted);
    }
    for (const Block& b : evicted) std::free(b.ptr);
  }

  // Keeps at most `limit` bytes of freed blocks from now on; returns the old limit.
  std::size_t set_limit(std::size_t limit) {
    std::list<Block> evicted;
    std::size_t old;
    {
      std::lock_guard<std::mutex> lock(mu_);
      old = limit_;
      limit_ = limit;
      trim(&evicted);
    }
    for (const Block& b : evicted) std::free(b.ptr);
    return old;
  }

  struct Stats {
    std::size_t bytes, blocks, limit;  // kept now, and the byte limit
  };
  Stats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {cached_, free_.size(), limit_};
  }

 private:
  static std::size_t rounded(std::size_t bytes) { return (bytes + kPage - 1) / kPage * kPage; }
  struct Block {
    void* ptr;
    std::size_t size;
  };
  ArrayCache() = default;
  // Moves the oldest blocks into *out while over a bound (mu_ held).
  void trim(std::list<Block>* out) {
    while (!free_.empty() && (cached_ > limit_ || free_.size() > kMaxBlocks)) {
      cached_ -= free_.front().size;
      out->splice(out->end(), free_, free_.begin());
    }
  }

  std::mutex mu_;
  std::list<Block> free_;  // oldest first
  std::size_t cached_ = 0;
  std::size_t limit_ = std::size_t{256} << 20;
};

}  // namespace qkv
