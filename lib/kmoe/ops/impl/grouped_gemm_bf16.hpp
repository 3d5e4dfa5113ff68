// kmoe's own grouped bfloat16 GEMM on tensor cores (CUDA builds): many independent row-major
// products C_p = alpha_p · op(A_p) · op(B_p) + beta_p · C_p of different shapes in one launch,
// bfloat16 operands, float accumulation, bfloat16 C.
//
// Why not cuBLAS: cublasGemmGroupedBatchedEx with one group per expert (387 of them at the σ-MoE
// bench shape) ran the σ-MoE expert MLP at 30 TFLOP/s on an H200, slower than float32, and ST-MoE's
// 16 large bf16 experts slower still. Here every output tile of every problem is one thread block
// of a single grid (a prefix sum over the problems' tile counts maps blocks to problems), tiles
// 128 × 128 × 32 with 8 warps of WMMA 16 × 16 × 16 bf16 fragments, shared tiles in the operands'
// own layouts filled by 16-byte cp.async copies, two stages so that the next K slice copies while
// the current one multiplies. Each output element is summed in a fixed order
// (K slices in order), so results repeat bitwise; a problem with k = 0 writes beta · C, so an
// expert without rows gets exactly zero.
//
// Opt-in (KMOE_GROUPED_GEMM=kmoe): its first version (scalar loads through registers) passed every
// GEMM, CVMM and layer test on an H100 but ran the σ-MoE expert MLP forward at 4.87 ms against
// cuBLAS's 2.81; this version (126-128 registers, 0-8 bytes of spills at two blocks per SM) is
// compiled but has not run on a GPU yet (apps/bench/gpu-notes.md). cuBLAS's batched calls
// (impl/gemm_batches.hpp) stay the default until it is measured faster.
#pragma once

#include "kmoe/core/bfloat16.hpp"
#include "kmoe/core/config.hpp"
#include "kmoe/core/tensor.hpp"

#include <cstdint>
#include <vector>

namespace kmoe::ops::impl {

struct GroupedProblem {
  bool transpose_a, transpose_b;
  std::int64_t m, n, k;  // C is m × n, the inner dimension k
  float alpha, beta;
  const bfloat16* a;
  const bfloat16* b;
  bfloat16* c;
  std::int64_t lda, ldb, ldc;  // row strides
};

#if defined(KOKKOS_ENABLE_CUDA)
// Launches the problems as one grid per transposition on kmoe's stream (no fence).
void grouped_gemm_bf16(const std::vector<GroupedProblem>& problems);

// words copied to the device without a fence (pinned staging, cudaMemcpyAsync on kmoe's stream),
// for the launch that follows in stream order: grouped launches' pointer arrays and problem tables.
Tensor<std::int64_t> upload_words(const std::vector<std::int64_t>& words);
#endif

}  // namespace kmoe::ops::impl
