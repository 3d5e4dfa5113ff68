#include "kmoe/ops/linear.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/ops/gemm.hpp"
#include "kmoe/ops/impl/column_reduce.hpp"

namespace kmoe::ops {

template <class T>
void linear_forward(const View2<const T>& x, const View2<const T>& weight, const View1<const T>& bias,
                    const View2<T>& y) {
  const std::size_t n = x.extent(0), in = x.extent(1), out = weight.extent(0);
  require(weight.extent(1) == in, Status::shape_mismatch, "linear_forward: x is [", n, ", ", in, "] but weight is [",
          out, ", ", weight.extent(1), "] (expected [out, ", in, "])");
  require(y.extent(0) == n && y.extent(1) == out, Status::shape_mismatch, "linear_forward: y is [", y.extent(0), ", ",
          y.extent(1), "], expected [", n, ", ", out, "]");
  const bool has_bias = bias.data() != nullptr;
  require(!has_bias || bias.extent(0) == out, Status::shape_mismatch, "linear_forward: bias has ", bias.extent(0),
          " elements, expected ", out);
  if (has_bias) {  // y = bias broadcast over rows, then the GEMM accumulates x · Wᵀ onto it
    Kokkos::parallel_for(
        "kmoe::linear_bias",
        md_range<2>({0, 0}, {static_cast<index_t>(n), static_cast<index_t>(out)}),
        KOKKOS_LAMBDA(const index_t i, const index_t j) { y(i, j) = bias(j); });
  }
  gemm<T>(false, true, T(1), x, weight, has_bias ? T(1) : T(0), y);
}

template <class T>
void linear_backward(const View2<const T>& x, const View2<const T>& weight, const View2<const T>& dy,
                     const View2<T>& dx, const View2<T>& dweight, const View1<T>& dbias) {
  const std::size_t n = x.extent(0), in = x.extent(1), out = weight.extent(0);
  require(weight.extent(1) == in, Status::shape_mismatch, "linear_backward: x is [", n, ", ", in, "] but weight is [",
          out, ", ", weight.extent(1), "] (expected [out, ", in, "])");
  require(dy.extent(0) == n && dy.extent(1) == out, Status::shape_mismatch, "linear_backward: dy is [", dy.extent(0),
          ", ", dy.extent(1), "], expected [", n, ", ", out, "]");
  const bool has_dx = dx.data() != nullptr;
  require(!has_dx || (dx.extent(0) == n && dx.extent(1) == in), Status::shape_mismatch, "linear_backward: dx is [",
          dx.extent(0), ", ", dx.extent(1), "], expected [", n, ", ", in, "]");
  require(dweight.extent(0) == out && dweight.extent(1) == in, Status::shape_mismatch, "linear_backward: dweight is [",
          dweight.extent(0), ", ", dweight.extent(1), "], expected [", out, ", ", in, "]");
  const bool has_dbias = dbias.data() != nullptr;
  require(!has_dbias || dbias.extent(0) == out, Status::shape_mismatch, "linear_backward: dbias has ", dbias.extent(0),
          " elements, expected ", out);

  if (has_dx) gemm<T>(false, false, T(1), dy, weight, T(0), dx);
  gemm<T>(true, false, T(1), dy, x, T(1), dweight);
  if (has_dbias) {  // a deterministic column reduction: reproducible, no atomics
    impl::column_reduce<T, 1>(
        "kmoe::linear_dbias", n, out, KOKKOS_LAMBDA(const index_t i, const index_t j) { return Kokkos::Array<T, 1>{dy(i, j)}; },
        KOKKOS_LAMBDA(const index_t j, const Kokkos::Array<T, 1>& sum) { dbias(j) += sum[0]; });
  }
}

#define KMOE_INSTANTIATE(T)                                                                             \
  template void linear_forward<T>(const View2<const T>&, const View2<const T>&, const View1<const T>&,  \
                                  const View2<T>&);                                                     \
  template void linear_backward<T>(const View2<const T>&, const View2<const T>&, const View2<const T>&, \
                                   const View2<T>&, const View2<T>&, const View1<T>&);
KMOE_INSTANTIATE(float)
KMOE_INSTANTIATE(double)
#undef KMOE_INSTANTIATE

}  // namespace kmoe::ops
