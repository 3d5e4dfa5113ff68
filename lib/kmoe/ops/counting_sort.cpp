#include "kmoe/ops/counting_sort.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/core/tensor.hpp"

#if defined(KOKKOS_ENABLE_CUDA)
#include <cub/device/device_scan.cuh>
#endif

#include <algorithm>
#include <limits>
#include <type_traits>

namespace kmoe::ops {

namespace impl {
// Elements per chunk: each chunk is counted and placed serially by one thread, so the placement
// order never depends on how chunks are spread over threads. A GPU needs many short chunks (tens
// of thousands of threads, each with few dependent memory accesses); a CPU few long ones.
constexpr index_t sort_chunk = std::is_same_v<ExecSpace, Kokkos::DefaultHostExecutionSpace> ? 256 : 32;
// Bound on the (key, chunk) table beyond max(n, this): with many keys (a vocabulary) the chunks
// grow instead. Any chunking gives the same result, the unique stable order.
constexpr index_t max_extra_cursor_slots = index_t(1) << 22;

KOKKOS_INLINE_FUNCTION index_t chunk_end(index_t chunk, index_t chunk_size, index_t n) {
  return (chunk + 1) * chunk_size < n ? (chunk + 1) * chunk_size : n;
}
// values ← their exclusive prefix sum, in place. CUDA: CUB's device scan (Kokkos 3.4's
// parallel_scan took over a millisecond for 400k ints on an H200); elsewhere Kokkos' scan.
void exclusive_scan_in_place(const View1<int>& values) {
  const index_t n = values.extent(0);
#if defined(KOKKOS_ENABLE_CUDA)
  if constexpr (std::is_same_v<ExecSpace, Kokkos::Cuda>) {
    const cudaStream_t stream = ExecSpace().cuda_stream();
    std::size_t bytes = 0;
    cudaError_t status = cub::DeviceScan::ExclusiveSum(nullptr, bytes, values.data(), values.data(), n, stream);
    const auto temp = Tensor<std::int64_t>::uninitialized(
        "kmoe::counting_sort::scan_temp", {static_cast<index_t>((bytes + sizeof(std::int64_t) - 1) / sizeof(std::int64_t))});
    if (status == cudaSuccess)
      status = cub::DeviceScan::ExclusiveSum(temp.data(), bytes, values.data(), values.data(), n, stream);
    require(status == cudaSuccess, Status::internal, "counting_sort: CUB scan failed: ", cudaGetErrorString(status));
    return;
  }
#endif
  Kokkos::parallel_scan(
      "kmoe::counting_sort::scan", Kokkos::RangePolicy<ExecSpace>(0, n),
      KOKKOS_LAMBDA(const index_t slot, int& running, const bool final) {
        const int count = values(slot);  // read before the write: in place
        if (final) values(slot) = running;
        running += count;
      });
}
}  // namespace impl

void require_keys_in_range(const View1<const int>& keys, int n_keys, const std::string& what) {
  const index_t n = keys.extent(0);
  index_t first_bad = n;
  Kokkos::parallel_reduce(
      "kmoe::require_keys_in_range", Kokkos::RangePolicy<ExecSpace>(0, n),
      KOKKOS_LAMBDA(const index_t i, index_t& first) {
        const int key = keys(i);
        if ((key < 0 || key >= n_keys) && i < first) first = i;
      },
      Kokkos::Min<index_t>(first_bad));
  if (first_bad >= n) return;
  int value = 0;
  Kokkos::deep_copy(value, Kokkos::subview(keys, first_bad));
  fail(Status::invalid_argument, what, ": value ", value, " at element ", first_bad, " of ", n,
       " is outside [0, ", n_keys, ")");
}

KeyGroups counting_sort(const View1<const int>& keys, int n_keys, const std::string& what) {
  const index_t n = keys.extent(0);
  require(n_keys >= 0, Status::invalid_argument, "counting_sort: n_keys is ", n_keys);
  require(n <= std::numeric_limits<int>::max(), Status::invalid_argument, "counting_sort: ", n,
          " keys exceed the int range of the order");
  require_keys_in_range(keys, n_keys, what);

  KeyGroups groups{Tensor<int>::uninitialized("kmoe::counting_sort::order", {n}),
                   Tensor<int>("kmoe::counting_sort::offsets", {static_cast<index_t>(n_keys) + 1})};
  if (n == 0) return groups;

  const index_t max_chunks = std::max<index_t>(1, std::max(n, impl::max_extra_cursor_slots) / std::max(n_keys, 1));
  const index_t chunk_size = std::max(impl::sort_chunk, (n + max_chunks - 1) / max_chunks);
  const index_t chunks = (n + chunk_size - 1) / chunk_size;
  // slot(key, chunk) = key · chunks + chunk: key-major, so the exclusive scan lays out every key's
  // group as its chunks in order, i.e. the elements in ascending index (stability).
  const Tensor<int> cursor_storage("kmoe::counting_sort::cursor", {static_cast<index_t>(n_keys) * chunks});
  const View1<int> cursor = cursor_storage.flat();
  Kokkos::parallel_for(
      "kmoe::counting_sort::histogram", Kokkos::RangePolicy<ExecSpace>(0, chunks),
      KOKKOS_LAMBDA(const index_t chunk) {
        for (index_t i = chunk * chunk_size; i < impl::chunk_end(chunk, chunk_size, n); ++i) {
          ++cursor(keys(i) * chunks + chunk);
        }
      });
  impl::exclusive_scan_in_place(cursor);
  const View1<int> offsets = groups.offsets.flat();
  Kokkos::parallel_for(
      "kmoe::counting_sort::offsets", Kokkos::RangePolicy<ExecSpace>(0, n_keys + 1),
      KOKKOS_LAMBDA(const index_t key) { offsets(key) = key < n_keys ? cursor(key * chunks) : static_cast<int>(n); });
  const View1<int> order = groups.order.flat();
  Kokkos::parallel_for(
      "kmoe::counting_sort::place", Kokkos::RangePolicy<ExecSpace>(0, chunks),
      KOKKOS_LAMBDA(const index_t chunk) {
        for (index_t i = chunk * chunk_size; i < impl::chunk_end(chunk, chunk_size, n); ++i) {
          order(cursor(keys(i) * chunks + chunk)++) = static_cast<int>(i);
        }
      });
  return groups;
}

}  // namespace kmoe::ops
