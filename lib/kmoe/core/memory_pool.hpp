// A caching allocator for tensor storage. Training repeats the same shapes every step, and a
// fresh allocation costs page faults on first touch on a CPU (about 0.15 ms per MB) and a device
// synchronisation in cudaFree on a GPU; so freed blocks are kept and handed to the next request
// of a similar size, as deep-learning frameworks' caching allocators do. Blocks are reused in
// stream order, which is safe because kmoe runs every kernel on the default execution space
// instance.
#pragma once

#include "kmoe/core/config.hpp"

#include <cstddef>
#include <memory>
#include <string>

namespace kmoe {

// At least `bytes` bytes of uninitialised memory in the default memory space, kept alive by the
// returned owner; when the last copy of the owner goes, the block returns to the cache. *zeroed
// (when given) tells whether the memory is known to hold zeros (fresh pages from the system).
std::shared_ptr<void> pool_allocate(std::size_t bytes, const std::string& label, void** data, bool* zeroed = nullptr);

// Bytes held by cached (free) blocks, and the most the cache keeps: past it the blocks freed
// longest ago are released. The limit defaults to 4 GiB, or KMOE_POOL_LIMIT_MB when set.
std::size_t pool_cached_bytes();
void set_pool_cache_limit(std::size_t bytes);

// Releases every cached block (live tensors are unaffected); done automatically at Kokkos::finalize.
void release_memory_pool();

}  // namespace kmoe
