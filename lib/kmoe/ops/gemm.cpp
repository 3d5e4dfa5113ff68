#include "kmoe/ops/gemm.hpp"

#include "kmoe/core/error.hpp"

#include <KokkosBlas3_gemm.hpp>

namespace kmoe::ops {

template <class T>
void gemm(bool transpose_a, bool transpose_b, T alpha, const View2<const T>& a, const View2<const T>& b, T beta,
          const View2<T>& c) {
  const index_t m = transpose_a ? a.extent(1) : a.extent(0);
  const index_t k = transpose_a ? a.extent(0) : a.extent(1);
  const index_t kb = transpose_b ? b.extent(1) : b.extent(0);
  const index_t n = transpose_b ? b.extent(0) : b.extent(1);
  require(k == kb && static_cast<index_t>(c.extent(0)) == m && static_cast<index_t>(c.extent(1)) == n,
          Status::shape_mismatch, "gemm: op(A) is ", m, "x", k, ", op(B) is ", kb, "x", n, ", C is ", c.extent(0),
          "x", c.extent(1));
  if (m == 0 || n == 0) return;
  if (k == 0) {  // BLAS leaves C untouched for k = 0 only when beta = 1; make it explicit
    if (beta == T(0)) {
      Kokkos::deep_copy(c, T(0));
    } else if (beta != T(1)) {
      Kokkos::parallel_for(
          "kmoe::gemm_scale", Kokkos::MDRangePolicy<ExecSpace, Kokkos::Rank<2>>({0, 0}, {m, n}),
          KOKKOS_LAMBDA(const index_t i, const index_t j) { c(i, j) *= beta; });
    }
    return;
  }
  KokkosBlas::gemm(transpose_a ? "T" : "N", transpose_b ? "T" : "N", alpha, a, b, beta, c);
}

template void gemm<float>(bool, bool, float, const View2<const float>&, const View2<const float>&, float,
                          const View2<float>&);
template void gemm<double>(bool, bool, double, const View2<const double>&, const View2<const double>&, double,
                           const View2<double>&);

}  // namespace kmoe::ops
