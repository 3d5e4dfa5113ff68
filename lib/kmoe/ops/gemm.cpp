#include "kmoe/ops/gemm.hpp"

#include "kmoe/core/error.hpp"

#include <KokkosBlas3_gemm.hpp>
#if defined(KOKKOSKERNELS_ENABLE_TPL_BLAS)
#include <KokkosBlas_Host_tpl.hpp>
#endif

#include <algorithm>
#include <climits>

namespace kmoe::ops {

namespace impl {

#if defined(KOKKOSKERNELS_ENABLE_TPL_BLAS)
// A host BLAS may block a long inner dimension differently in its single- and multi-threaded
// drivers (OpenBLAS 0.3.21 does from about 400 on), so the rounding would change with the thread
// count. Handing it inner blocks no longer than this keeps every call one block in either driver:
// results are bit-identical for any thread count. cuBLAS gives the same bits at any size.
constexpr index_t host_blas_inner_block = 128;

// Host path: the BLAS that Kokkos Kernels' TPL links, called with leading dimensions so that an
// inner block of a row-major matrix is a pointer offset, not a copy. Row-major C = op(A)·op(B) is
// column-major Cᵀ = op(B)ᵀ·op(A)ᵀ, hence B before A.
template <class T>
void host_blas_gemm(bool transpose_a, bool transpose_b, index_t m, index_t n, index_t k, T alpha,
                    const View2<const T>& a, const View2<const T>& b, T beta, const View2<T>& c) {
  const int lda = static_cast<int>(a.stride(0)), ldb = static_cast<int>(b.stride(0));
  const int ldc = static_cast<int>(c.stride(0));
  for (index_t k0 = 0; k0 < k; k0 += host_blas_inner_block) {
    const int kb = static_cast<int>(std::min(host_blas_inner_block, k - k0));
    const T* a_block = a.data() + (transpose_a ? k0 * lda : k0);
    const T* b_block = b.data() + (transpose_b ? k0 : k0 * ldb);
    KokkosBlas::Impl::HostBlas<T>::gemm(transpose_b ? 'T' : 'N', transpose_a ? 'T' : 'N', static_cast<int>(n),
                                        static_cast<int>(m), kb, alpha, b_block, ldb, a_block, lda,
                                        k0 == 0 ? beta : T(1), c.data(), ldc);
  }
}
#endif

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
#if defined(KOKKOSKERNELS_ENABLE_TPL_BLAS)
  if constexpr (Kokkos::SpaceAccessibility<HostSpace, MemSpace>::accessible) {
    require(m <= INT_MAX && n <= INT_MAX && a.stride(0) <= INT_MAX && b.stride(0) <= INT_MAX &&
                c.stride(0) <= INT_MAX,
            Status::invalid_argument, "gemm: extents beyond the BLAS integer range");
    impl::host_blas_gemm(transpose_a, transpose_b, m, n, k, alpha, a, b, beta, c);
    return;
  }
#endif
  // cuBLAS (or Kokkos Kernels' own kernels where no BLAS TPL is enabled).
  KokkosBlas::gemm(transpose_a ? "T" : "N", transpose_b ? "T" : "N", alpha, a, b, beta, c);
}

template void gemm<float>(bool, bool, float, const View2<const float>&, const View2<const float>&, float,
                          const View2<float>&);
template void gemm<double>(bool, bool, double, const View2<const double>&, const View2<const double>&, double,
                           const View2<double>&);

}  // namespace kmoe::ops
