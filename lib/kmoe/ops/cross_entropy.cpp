#include "kmoe/ops/cross_entropy.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/ops/softmax.hpp"

namespace kmoe::ops {
namespace impl {

template <class T>
void require_cross_entropy_shapes(const char* op, const View2<const T>& logits, const View1<const int>& targets,
                                  const View1<const T>& row_logsumexp) {
  require(targets.extent(0) == logits.extent(0), Status::shape_mismatch, op, ": targets has ", targets.extent(0),
          " rows, logits is [", logits.extent(0), ", ", logits.extent(1), "]");
  require(row_logsumexp.extent(0) == logits.extent(0), Status::shape_mismatch, op, ": row_logsumexp has ",
          row_logsumexp.extent(0), " rows, logits is [", logits.extent(0), ", ", logits.extent(1), "]");
}

// Throws Status::invalid_argument naming the first row whose target is neither ignore_index nor a
// class in [0, classes).
inline void require_valid_targets(const char* op, const View1<const int>& targets, index_t classes, int ignore_index) {
  index_t first_bad_row = 0;
  Kokkos::parallel_reduce(
      "kmoe::cross_entropy(check targets)", Kokkos::RangePolicy<ExecSpace>(0, targets.extent(0)),
      KOKKOS_LAMBDA(const index_t row, index_t& first) {
        const int t = targets(row);
        if (t != ignore_index && (t < 0 || t >= classes) && row < first) first = row;
      },
      Kokkos::Min<index_t>(first_bad_row));
  if (first_bad_row >= static_cast<index_t>(targets.extent(0))) return;
  int target = 0;
  Kokkos::deep_copy(target, Kokkos::subview(targets, first_bad_row));
  fail(Status::invalid_argument, op, ": targets[", first_bad_row, "] = ", target, " is not a class in [0, ", classes,
       ") nor ignore_index ", ignore_index);
}

// Rows whose target is not ignore_index: the divisor of the mean.
inline index_t count_valid_targets(const View1<const int>& targets, int ignore_index) {
  index_t valid = 0;
  Kokkos::parallel_reduce(
      "kmoe::cross_entropy(count targets)", Kokkos::RangePolicy<ExecSpace>(0, targets.extent(0)),
      KOKKOS_LAMBDA(const index_t row, index_t& count) { count += targets(row) != ignore_index ? 1 : 0; }, valid);
  return valid;
}

}  // namespace impl

template <class T>
T cross_entropy_forward(const View2<const T>& logits, const View1<const int>& targets, int ignore_index,
                        const View1<T>& row_logsumexp) {
  const char* op = "kmoe::cross_entropy_forward";
  impl::require_cross_entropy_shapes<T>(op, logits, targets, row_logsumexp);
  // The logsumexp kernel takes logits as [rows, classes, 1] lines, which needs unpadded rows.
  require(logits.span_is_contiguous(), Status::invalid_argument, op, ": logits [", logits.extent(0), ", ",
          logits.extent(1), "] has padded rows (row stride ", logits.stride(0), ")");
  const index_t rows = logits.extent(0), classes = logits.extent(1);
  impl::require_valid_targets(op, targets, classes, ignore_index);

  logsumexp_forward<T>(View3<const T>(logits.data(), rows, classes, 1), View2<T>(row_logsumexp.data(), rows, 1));
  T loss_sum = 0;
  Kokkos::parallel_reduce(
      op, Kokkos::RangePolicy<ExecSpace>(0, rows),
      KOKKOS_LAMBDA(const index_t row, T& sum) {
        const int t = targets(row);
        if (t != ignore_index) sum += row_logsumexp(row) - logits(row, t);
      },
      loss_sum);
  // With no valid row this is 0/0 = NaN, as PyTorch.
  return loss_sum / static_cast<T>(impl::count_valid_targets(targets, ignore_index));
}

template <class T>
void cross_entropy_backward(const View2<const T>& logits, const View1<const int>& targets, int ignore_index,
                            const View1<const T>& row_logsumexp, T dloss, const View2<T>& dlogits) {
  const char* op = "kmoe::cross_entropy_backward";
  impl::require_cross_entropy_shapes<T>(op, logits, targets, row_logsumexp);
  require(dlogits.extent(0) == logits.extent(0) && dlogits.extent(1) == logits.extent(1), Status::shape_mismatch, op,
          ": dlogits is [", dlogits.extent(0), ", ", dlogits.extent(1), "], logits [", logits.extent(0), ", ",
          logits.extent(1), "]");
  const index_t rows = logits.extent(0), classes = logits.extent(1);
  impl::require_valid_targets(op, targets, classes, ignore_index);
  const index_t valid = impl::count_valid_targets(targets, ignore_index);
  const T row_weight = valid > 0 ? dloss / static_cast<T>(valid) : T(0);
  Kokkos::parallel_for(
      op, md_range<2>({0, 0}, {rows, classes}),
      KOKKOS_LAMBDA(const index_t row, const index_t c) {
        const int t = targets(row);
        const T probability = Kokkos::Experimental::exp(logits(row, c) - row_logsumexp(row));
        dlogits(row, c) = t == ignore_index ? T(0) : row_weight * (probability - (c == t ? T(1) : T(0)));
      });
}

#define KMOE_INSTANTIATE(T)                                                                                           \
  template T cross_entropy_forward<T>(const View2<const T>&, const View1<const int>&, int, const View1<T>&);          \
  template void cross_entropy_backward<T>(const View2<const T>&, const View1<const int>&, int, const View1<const T>&, \
                                          T, const View2<T>&);
KMOE_INSTANTIATE(float)
KMOE_INSTANTIATE(double)
#undef KMOE_INSTANTIATE

}  // namespace kmoe::ops
