// The one dense GEMM entry point of kmoe: KokkosBlas::gemm on LayoutRight Views, which Kokkos
// Kernels hands to the BLAS (OpenMP flavour) or cuBLAS (CUDA flavour) TPL, and its bfloat16 form
// (cuBLAS tensor cores directly: Kokkos Kernels 3.4 has no bf16 GEMM).
#pragma once

#include "kmoe/core/bfloat16.hpp"
#include "kmoe/core/config.hpp"

namespace kmoe::ops {

// C = alpha · op(A) · op(B) + beta · C, op(M) = Mᵀ when the flag is set. Views must be
// contiguous LayoutRight (row ranges of a matrix are; column ranges are not). Extents are
// checked (Status::shape_mismatch); empty products only scale C.
template <class T>
void gemm(bool transpose_a, bool transpose_b, T alpha, const View2<const T>& a, const View2<const T>& b, T beta,
          const View2<T>& c);

// The same product on bfloat16 operands with float accumulation and float alpha/beta, rounded to
// bfloat16 once at the end (cuBLAS: CUBLAS_COMPUTE_32F on tensor cores). On the host it is
// emulated: the operands are widened to float, the float BLAS accumulates and C is rounded, so
// host and device agree up to the summation order (no speed gain on the host).
void gemm_bf16(bool transpose_a, bool transpose_b, float alpha, const View2<const bfloat16>& a,
               const View2<const bfloat16>& b, float beta, const View2<bfloat16>& c);
// The same into a float C, not rounded: a weight gradient summed straight into its float32 master
// gradient (beta = 1), with no bfloat16 product in between.
void gemm_bf16(bool transpose_a, bool transpose_b, float alpha, const View2<const bfloat16>& a,
               const View2<const bfloat16>& b, float beta, const View2<float>& c);

namespace impl {
// While alive, the host BLAS runs every call on the calling thread (OpenBLAS: one thread), so
// that several host threads can each run their own GEMMs. active() is false where kmoe cannot
// control the BLAS threads (another BLAS, or a device build); then nothing changes.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas();
  ~SingleThreadedBlas();
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;
  bool active() const { return previous_threads_ > 0; }

 private:
  int previous_threads_ = 0;
};

// While a GroupedGemms lives, ops::gemm on a device records its GEMMs instead of launching them,
// and run() issues them together (one grouped cuBLAS call, or a few uniform batched ones: see
// KMOE_GROUPED_GEMM in gemm.cpp): a MoE layer's per-expert GEMMs are many and small, and one
// launch each leaves a GPU mostly idle. The recorded GEMMs must not read each other's outputs. On
// the host, or without cuBLAS, it records nothing.
class GroupedGemms {
 public:
  GroupedGemms();
  ~GroupedGemms();  // drops what was not run (only after an exception)
  GroupedGemms(const GroupedGemms&) = delete;
  GroupedGemms& operator=(const GroupedGemms&) = delete;
  void run();
};
}  // namespace impl

// Calls body(i) for every i in [0, n); each body issues its own ops::gemm calls on outputs no
// other body touches (e.g. one expert's block). On the host with OpenBLAS the bodies run in
// parallel, each GEMM on one thread: many mid-sized GEMMs then keep all cores busy, which one
// threaded GEMM after another does not, and a single-threaded GEMM's bits do not depend on the
// thread count. On a GPU the bodies' GEMMs go out together (GroupedGemms), so
// a body must not read what its own GEMMs write. Elsewhere (other BLAS) the bodies run in order.
template <class Body>
void for_each_independent_gemm(int n, const Body& body) {
  if constexpr (Kokkos::SpaceAccessibility<HostSpace, MemSpace>::accessible) {
    const impl::SingleThreadedBlas single;
    if (single.active()) {
      Kokkos::parallel_for(
          "kmoe::for_each_independent_gemm",
          Kokkos::RangePolicy<Kokkos::DefaultHostExecutionSpace, Kokkos::Schedule<Kokkos::Dynamic>>(0, n),
          [&](const int i) { body(i); });
      Kokkos::DefaultHostExecutionSpace().fence();
      return;
    }
  }
  impl::GroupedGemms group;
  for (int i = 0; i < n; ++i) body(i);
  group.run();
}

}  // namespace kmoe::ops
