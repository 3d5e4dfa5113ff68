#include "kmoe/ops/gemm.hpp"

#include "kmoe/core/error.hpp"

#include <KokkosBlas3_gemm.hpp>
#if defined(KOKKOSKERNELS_ENABLE_TPL_BLAS)
#include <KokkosBlas_Host_tpl.hpp>
#endif

#include <algorithm>
#include <climits>

#if defined(KOKKOSKERNELS_ENABLE_TPL_BLAS)
// OpenBLAS's thread control, looked up weakly: null when the BLAS in use is not OpenBLAS.
extern "C" {
void openblas_set_num_threads(int threads) __attribute__((weak));
int openblas_get_num_threads(void) __attribute__((weak));
}
#endif

namespace kmoe::ops {

namespace impl {

// Set while a SingleThreadedBlas is alive: the BLAS then always takes its single-threaded driver,
// whose blocking is fixed, so no inner-dimension split is needed for reproducibility.
bool blas_single_threaded = false;

SingleThreadedBlas::SingleThreadedBlas() {
#if defined(KOKKOSKERNELS_ENABLE_TPL_BLAS)
  if (Kokkos::SpaceAccessibility<HostSpace, MemSpace>::accessible && openblas_set_num_threads != nullptr &&
      openblas_get_num_threads != nullptr) {
    previous_threads_ = openblas_get_num_threads();
    openblas_set_num_threads(1);
    blas_single_threaded = true;
  }
#endif
}

SingleThreadedBlas::~SingleThreadedBlas() {
#if defined(KOKKOSKERNELS_ENABLE_TPL_BLAS)
  if (previous_threads_ > 0) {
    openblas_set_num_threads(previous_threads_);
    blas_single_threaded = false;
  }
#endif
}

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
  const index_t block = blas_single_threaded ? k : host_blas_inner_block;
  for (index_t k0 = 0; k0 < k; k0 += block) {
    const int kb = static_cast<int>(std::min(block, k - k0));
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
