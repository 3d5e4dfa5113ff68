#include "kmoe/core/memory_pool.hpp"

#include "kmoe/core/error.hpp"

#include <algorithm>
#include <cstdlib>
#include <list>
#include <mutex>
#include <type_traits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kmoe {

namespace {

using Bytes = Kokkos::View<unsigned char*, MemSpace>;

// A block of memory; `memory` frees it when the last holder lets go.
struct Block {
  void* data = nullptr;
  std::size_t size = 0;
  std::shared_ptr<void> memory;
};

// 512-byte granules: enough for any kernel's alignment, and shapes that differ by a few elements
// share blocks.
constexpr std::size_t granule = 512;

// Host blocks from this size on come straight from mmap: fresh anonymous pages are zero, so a
// zero-initialised tensor skips its fill, and pages nobody touches (the gradients of a layer built
// only to be inspected) are never faulted in.
constexpr std::size_t mapped_from = std::size_t(1) << 20;

// A fresh block of `bytes`; zeroed tells whether its contents are known to be zero.
Block fresh_block(std::size_t bytes, const std::string& label, bool& zeroed) {
#if defined(__linux__)
  if (std::is_same_v<MemSpace, Kokkos::HostSpace> && bytes >= mapped_from) {
    void* data = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (data != MAP_FAILED) {
      // Reported to Kokkos' tools like a View allocation (kmoe-bench's memory column counts them).
      const std::string name = "kmoe::pool::" + label;
      if (Kokkos::Profiling::profileLibraryLoaded())
        Kokkos::Profiling::allocateData(Kokkos::Profiling::make_space_handle(Kokkos::HostSpace::name()), name, data,
                                        bytes);
      zeroed = true;
      return {data, bytes, std::shared_ptr<void>(data, [bytes, name](void* p) {
                if (Kokkos::Profiling::profileLibraryLoaded())
                  Kokkos::Profiling::deallocateData(Kokkos::Profiling::make_space_handle(Kokkos::HostSpace::name()),
                                                    name, p, bytes);
                ::munmap(p, bytes);
              })};
    }
  }
#endif
  zeroed = false;
  try {
    Bytes view(Kokkos::view_alloc(Kokkos::WithoutInitializing, "kmoe::pool::" + label), bytes);
    return {view.data(), bytes, std::make_shared<Bytes>(view)};
  } catch (const std::exception& e) {
    // Kokkos reports a failed allocation (host or device) as a runtime_error.
    fail(Status::out_of_memory, "cannot allocate ", bytes, " bytes for ", label, " (out of memory): ", e.what());
  }
}

struct Cache {
  std::mutex mutex;
  std::list<Block> free_blocks;  // most recently freed first
  std::size_t cached_bytes = 0;
  std::size_t limit = 0;

  Cache() {
    const char* limit_mb = std::getenv("KMOE_POOL_LIMIT_MB");
    limit = limit_mb != nullptr ? std::strtoull(limit_mb, nullptr, 10) << 20 : std::size_t(4) << 30;
  }

  // Drops the longest-freed blocks until the cache is within its limit. Caller holds the mutex.
  void trim() {
    while (cached_bytes > limit && !free_blocks.empty()) {
      cached_bytes -= free_blocks.back().size;
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

void return_block(Block block) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  if (!Kokkos::is_initialized()) return;  // freed after Kokkos::finalize: nothing to cache for
  c.cached_bytes += block.size;
  c.free_blocks.push_front(std::move(block));
  c.trim();
}

}  // namespace

std::shared_ptr<void> pool_allocate(std::size_t bytes, const std::string& label, void** data, bool* zeroed) {
  const std::size_t rounded = (std::max<std::size_t>(bytes, 1) + granule - 1) / granule * granule;
  Cache& c = cache();
  Block block;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    // The smallest cached block that fits and wastes at most an eighth of itself.
    auto best = c.free_blocks.end();
    for (auto it = c.free_blocks.begin(); it != c.free_blocks.end(); ++it) {
      const std::size_t size = it->size;
      if (size >= rounded && size - rounded <= size / 8 && (best == c.free_blocks.end() || size < best->size))
        best = it;
    }
    if (best != c.free_blocks.end()) {
      block = std::move(*best);
      c.cached_bytes -= block.size;
      c.free_blocks.erase(best);
    }
  }
  bool fresh_zero = false;
  if (block.data == nullptr) block = fresh_block(rounded, label, fresh_zero);
  if (zeroed != nullptr) *zeroed = fresh_zero;
  *data = block.data;
  return std::shared_ptr<void>(block.data, [block](void*) mutable { return_block(std::move(block)); });
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
