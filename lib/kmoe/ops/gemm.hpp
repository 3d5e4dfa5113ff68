// The one dense GEMM entry point of kmoe: KokkosBlas::gemm on LayoutRight Views, which Kokkos
// Kernels hands to the BLAS (OpenMP flavour) or cuBLAS (CUDA flavour) TPL.
#pragma once

#include "kmoe/core/config.hpp"

namespace kmoe::ops {

// C = alpha · op(A) · op(B) + beta · C, op(M) = Mᵀ when the flag is set. Views must be
// contiguous LayoutRight (row ranges of a matrix are; column ranges are not). Extents are
// checked (Status::shape_mismatch); empty products only scale C.
template <class T>
void gemm(bool transpose_a, bool transpose_b, T alpha, const View2<const T>& a, const View2<const T>& b, T beta,
          const View2<T>& c);

}  // namespace kmoe::ops
