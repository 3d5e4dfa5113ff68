#include "kmoe/ops/topk.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/ops/counting_sort.hpp"

#include <algorithm>
#include <limits>

namespace kmoe::ops {

namespace impl {
// torch.topk's order: NaN above every number, then larger values, then the lower column.
template <class T>
KOKKOS_INLINE_FUNCTION bool ranks_above(T a, int a_col, T b, int b_col) {
  const bool a_nan = Kokkos::Experimental::isnan(a), b_nan = Kokkos::Experimental::isnan(b);
  if (a_nan != b_nan) return a_nan;
  if (!a_nan && a != b) return a > b;
  return a_col < b_col;
}
}  // namespace impl

template <class T>
void topk_forward(const View2<const T>& x, int k, TopkOrder order, const View2<T>& values,
                  const View2<int>& indices) {
  const index_t rows = x.extent(0), cols = x.extent(1);
  require(k >= 1 && k <= std::min<index_t>(cols, topk_max_k), Status::invalid_argument, "topk_forward: k = ", k,
          " must lie in [1, min(cols = ", cols, ", ", topk_max_k, ")]");
  require(values.extent(0) == x.extent(0) && values.extent(1) == static_cast<std::size_t>(k) &&
              indices.extent(0) == x.extent(0) && indices.extent(1) == static_cast<std::size_t>(k),
          Status::shape_mismatch, "topk_forward: x [", rows, ", ", cols, "] with k = ", k,
          " needs values and indices [", rows, ", ", k, "], got values [", values.extent(0), ", ", values.extent(1),
          "], indices [", indices.extent(0), ", ", indices.extent(1), "]");
  const bool by_index = order == TopkOrder::by_index;
  Kokkos::parallel_for(
      "kmoe::topk_forward", Kokkos::RangePolicy<ExecSpace>(0, rows), KOKKOS_LAMBDA(const index_t r) {
        // The best `kept` entries so far, best first; columns arrive in ascending order.
        T best[topk_max_k];
        int best_col[topk_max_k];
        int kept = 0;
        for (int c = 0; c < static_cast<int>(cols); ++c) {
          const T v = x(r, c);
          // Later columns lose ties, so once k are kept only a larger value or a NaN gets in.
          if (kept == k && !(v > best[k - 1]) && !Kokkos::Experimental::isnan(v)) continue;
          if (kept == k && !impl::ranks_above(v, c, best[k - 1], best_col[k - 1])) continue;
          int pos = kept < k ? kept++ : k - 1;
          for (; pos > 0 && impl::ranks_above(v, c, best[pos - 1], best_col[pos - 1]); --pos) {
            best[pos] = best[pos - 1];
            best_col[pos] = best_col[pos - 1];
          }
          best[pos] = v;
          best_col[pos] = c;
        }
        if (by_index) {  // insertion sort of the k winners by column
          for (int i = 1; i < k; ++i) {
            const T v = best[i];
            const int col = best_col[i];
            int pos = i;
            for (; pos > 0 && best_col[pos - 1] > col; --pos) {
              best[pos] = best[pos - 1];
              best_col[pos] = best_col[pos - 1];
            }
            best[pos] = v;
            best_col[pos] = col;
          }
        }
        for (int j = 0; j < k; ++j) {
          values(r, j) = best[j];
          indices(r, j) = best_col[j];
        }
      });
}

template <class T>
void topk_backward(const View2<const int>& indices, const View2<const T>& dvalues, const View2<T>& dx) {
  const index_t rows = dx.extent(0), cols = dx.extent(1), k = indices.extent(1);
  require(indices.extent(0) == dx.extent(0) && dvalues.extent(0) == dx.extent(0) &&
              dvalues.extent(1) == indices.extent(1),
          Status::shape_mismatch, "topk_backward: indices [", indices.extent(0), ", ", k, "] and dvalues [",
          dvalues.extent(0), ", ", dvalues.extent(1), "] must both be [rows of dx = ", rows, ", k]");
  require(indices.span_is_contiguous(), Status::invalid_argument, "topk_backward: indices must be contiguous");
  require(cols <= std::numeric_limits<int>::max(), Status::invalid_argument, "topk_backward: dx has ", cols,
          " columns, beyond int indices");
  require_keys_in_range(View1<const int>(indices.data(), indices.size()), static_cast<int>(cols),
                        "topk_backward: indices (flattened)");
  Kokkos::deep_copy(dx, T(0));
  // Serial over a row's slots: a repeated index sums its gradients (the adjoint of the gather).
  Kokkos::parallel_for(
      "kmoe::topk_backward", Kokkos::RangePolicy<ExecSpace>(0, rows), KOKKOS_LAMBDA(const index_t r) {
        for (index_t j = 0; j < k; ++j) dx(r, indices(r, j)) += dvalues(r, j);
      });
}

#define KMOE_INSTANTIATE(T)                                                                               \
  template void topk_forward<T>(const View2<const T>&, int, TopkOrder, const View2<T>&, const View2<int>&); \
  template void topk_backward<T>(const View2<const int>&, const View2<const T>&, const View2<T>&);
KMOE_INSTANTIATE(float)
KMOE_INSTANTIATE(double)
#undef KMOE_INSTANTIATE

}  // namespace kmoe::ops
