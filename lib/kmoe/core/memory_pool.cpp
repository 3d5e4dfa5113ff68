#include "kmoe/core/memory_pool.hpp"

#include <algorithm>
#include <cstdlib>
#include <list>
#include <mutex>

namespace kmoe {

namespace {

using Bytes = Kokkos::View<unsigned char*, MemSpace>;

// 512-byte granules: enough for any kernel's alignment, and shapes that differ by a few elements
// share blocks.
constexpr std::size_t granule = 512;

struct Cache {
  std::mutex mutex;
  std::list<Bytes> free_blocks;  // most recently freed first
  std::size_t cached_bytes = 0;
  std::size_t limit = 0;

  Cache() {
    const char* limit_mb = std::getenv("KMOE_POOL_LIMIT_MB");
    limit = limit_mb != nullptr ? std::strtoull(limit_mb, nullptr, 10) << 20 : std::size_t(4) << 30;
  }

  // Drops the longest-freed blocks until the cache is within its limit. Caller holds the mutex.
  void trim() {
    while (cached_bytes > limit && !free_blocks.empty()) {
      cached_bytes -= free_blocks.back().extent(0);
      free_blocks.pop_back();
    }
  }
};

Cache& cache() {
  static Cache* instance = [] {
    // Cached blocks must go before Kokkos does.
    Kokkos::push_finalize_hook(release_memory_pool);
    return new Cache;
  }();
  return *instance;
}

void return_block(Bytes block) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  if (!Kokkos::is_initialized()) return;  // freed after Kokkos::finalize: nothing to cache for
  c.cached_bytes += block.extent(0);
  c.free_blocks.push_front(std::move(block));
  c.trim();
}

}  // namespace

std::shared_ptr<void> pool_allocate(std::size_t bytes, const std::string& label, void** data) {
  const std::size_t rounded = (std::max<std::size_t>(bytes, 1) + granule - 1) / granule * granule;
  Cache& c = cache();
  Bytes block;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    // The smallest cached block that fits and wastes at most an eighth of itself.
    auto best = c.free_blocks.end();
    for (auto it = c.free_blocks.begin(); it != c.free_blocks.end(); ++it) {
      const std::size_t size = it->extent(0);
      if (size >= rounded && size - rounded <= size / 8 && (best == c.free_blocks.end() || size < best->extent(0)))
        best = it;
    }
    if (best != c.free_blocks.end()) {
      block = std::move(*best);
      c.cached_bytes -= block.extent(0);
      c.free_blocks.erase(best);
    }
  }
  if (block.data() == nullptr) {
    block = Bytes(Kokkos::view_alloc(Kokkos::WithoutInitializing, "kmoe::pool::" + label), rounded);
  }
  *data = block.data();
  return std::shared_ptr<void>(block.data(), [block](void*) mutable { return_block(std::move(block)); });
}

std::size_t pool_cached_bytes() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return c.cached_bytes;
}

void set_pool_cache_limit(std::size_t bytes) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  c.limit = bytes;
  c.trim();
}

void release_memory_pool() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  c.free_blocks.clear();
  c.cached_bytes = 0;
}

}  // namespace kmoe
