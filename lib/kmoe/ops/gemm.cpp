#include "kmoe/ops/gemm.hpp"

#include "kmoe/core/error.hpp"

#include <KokkosBlas3_gemm.hpp>

#include <algorithm>

namespace kmoe::ops {

namespace impl {

// A host BLAS may block a long inner dimension differently in its single- and multi-threaded
// drivers (OpenBLAS 0.3.21 does from about 400 on), so the rounding would change with the thread
// count. Handing it inner blocks no longer than this keeps every call one block in either driver:
// results are bit-identical for any thread count. cuBLAS gives the same bits at any size.
constexpr index_t host_blas_inner_block = 128;
constexpr bool blas_runs_on_host = Kokkos::SpaceAccessibility<HostSpace, MemSpace>::accessible;

// The slice [range) of op(m)'s inner dimension: rows of m (a contiguous subview) or columns of m
// (copied, since BLAS views must be contiguous LayoutRight).
template <class T>
View2<const T> inner_block(const View2<const T>& m, bool inner_is_rows, Kokkos::pair<index_t, index_t> range) {
  if (inner_is_rows) return Kokkos::subview(m, range, Kokkos::ALL);
  View2<T> copy(Kokkos::view_alloc(Kokkos::WithoutInitializing, "kmoe::gemm::inner_block"), m.extent(0),
                range.second - range.first);
  Kokkos::deep_copy(copy, Kokkos::subview(m, Kokkos::ALL, range));
  return copy;
}

}  // namespace impl

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
  const char* op_a = transpose_a ? "T" : "N";
  const char* op_b = transpose_b ? "T" : "N";
  if constexpr (impl::blas_runs_on_host) {
    if (k > impl::host_blas_inner_block) {
      for (index_t k0 = 0; k0 < k; k0 += impl::host_blas_inner_block) {
        const Kokkos::pair<index_t, index_t> range(k0, std::min(k0 + impl::host_blas_inner_block, k));
        KokkosBlas::gemm(op_a, op_b, alpha, impl::inner_block(a, transpose_a, range),
                         impl::inner_block(b, !transpose_b, range), k0 == 0 ? beta : T(1), c);
      }
      return;
    }
  }
  KokkosBlas::gemm(op_a, op_b, alpha, a, b, beta, c);
}

template void gemm<float>(bool, bool, float, const View2<const float>&, const View2<const float>&, float,
                          const View2<float>&);
template void gemm<double>(bool, bool, double, const View2<const double>&, const View2<const double>&, double,
                           const View2<double>&);

}  // namespace kmoe::ops
