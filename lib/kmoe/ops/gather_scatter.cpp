#include "kmoe/ops/gather_scatter.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/ops/counting_sort.hpp"

#include <limits>

namespace kmoe::ops {

namespace impl {
// The row count of the indexed matrix as the int bound that indices are checked against.
int indexed_rows(const char* op, const char* matrix, std::size_t rows) {
  require(rows <= static_cast<std::size_t>(std::numeric_limits<int>::max()), Status::invalid_argument, op, ": ",
          matrix, " has ", rows, " rows, beyond int indices");
  return static_cast<int>(rows);
}
}  // namespace impl

template <class T>
void gather_rows(const View2<const T>& src, const View1<const int>& index, const View2<T>& out,
                 const std::string& index_name) {
  require(index.extent(0) == out.extent(0) && src.extent(1) == out.extent(1), Status::shape_mismatch,
          "gather_rows: src [", src.extent(0), ", ", src.extent(1), "], index [", index.extent(0), "], out [",
          out.extent(0), ", ", out.extent(1), "]: out must be [index, src columns]");
  require_keys_in_range(index, impl::indexed_rows("gather_rows", "src", src.extent(0)), index_name);
  const index_t rows = out.extent(0), cols = out.extent(1);
  Kokkos::parallel_for(
      "kmoe::gather_rows", md_range<2>({0, 0}, {rows, cols}),
      KOKKOS_LAMBDA(const index_t i, const index_t c) { out(i, c) = src(index(i), c); });
}

template <class T>
void scatter_add_rows(const View2<const T>& src, const View1<const int>& index, const View2<T>& out,
                      const std::string& index_name) {
  require(index.extent(0) == src.extent(0) && src.extent(1) == out.extent(1), Status::shape_mismatch,
          "scatter_add_rows: src [", src.extent(0), ", ", src.extent(1), "], index [", index.extent(0), "], out [",
          out.extent(0), ", ", out.extent(1), "]: index must have src's rows and out src's columns");
  const int out_rows = impl::indexed_rows("scatter_add_rows", "out", out.extent(0));
  // One thread per (destination row, column) adds its sources in ascending source order.
  const KeyGroups groups = counting_sort(index, out_rows, index_name);
  const View1<int> order = groups.order.flat(), offsets = groups.offsets.flat();
  const index_t rows = out.extent(0), cols = out.extent(1);
  Kokkos::parallel_for(
      "kmoe::scatter_add_rows", md_range<2>({0, 0}, {rows, cols}),
      KOKKOS_LAMBDA(const index_t row, const index_t c) {
        const int begin = offsets(row), end = offsets(row + 1);
        if (begin == end) return;
        T sum = out(row, c);
        for (int j = begin; j < end; ++j) sum += src(order(j), c);
        out(row, c) = sum;
      });
}

#define KMOE_INSTANTIATE(T)                                                                               \
  template void gather_rows<T>(const View2<const T>&, const View1<const int>&, const View2<T>&,  \
                               const std::string&);                                            \
  template void scatter_add_rows<T>(const View2<const T>&, const View1<const int>&, const View2<T>&, \
                                    const std::string&);
KMOE_INSTANTIATE(float)
KMOE_INSTANTIATE(double)
#undef KMOE_INSTANTIATE

}  // namespace kmoe::ops
