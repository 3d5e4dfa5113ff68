// How a GroupedGemms' recorded GEMMs go to the GPU as few uniform batched calls.
//
// A MoE layer's per-expert GEMMs differ in one extent only: the expert's row count (the rows of
// C in the forward and dx products, the inner dimension of dW). cuBLAS's grouped GEMM takes them
// as one group each and ran the σ-MoE expert MLP at 30–50 TFLOP/s on an H200, slower in bfloat16
// than in float32; a batched call of one shape runs near the dense rate. So each GEMM is cut
// along its varying extent into pieces whose sizes are powers of two (677 rows: 512 + 128 + 32 +
// 4 + 1), and pieces of one size become one batched call: a handful of calls whatever the expert
// count. Cuts along the inner dimension add each piece into C in order (the first with the GEMM's
// beta, the rest with 1), one round per piece, so every C is summed in a fixed order (bitwise
// repeatable) and an expert without rows is never touched. Pure host code, so it is tested on
// every build; gemm.cpp issues the batches.
#pragma once

#include <cstdint>
#include <vector>

namespace kmoe::ops::impl {

enum class GemmType { f32, f64, bf16 };

std::int64_t bytes_of(GemmType type);

// One GEMM as recorded, in cuBLAS's column-major terms: C (m × n) = alpha · op(first) · op(second)
// + beta · C, op(first) m × k, op(second) k × n. Row-major C = op(A)·op(B) is column-major
// Cᵀ = op(B)ᵀ·op(A)ᵀ, so first is the row-major B. `type` is the operands' type, `c_type` C's
// (float C with bfloat16 operands: a weight gradient summed straight into its float master).
struct RecordedGemm {
  bool transpose_first, transpose_second;
  std::int64_t m, n, k;
  double alpha, beta;
  const void* first;
  const void* second;
  void* c;
  std::int64_t ld_first, ld_second, ld_c;
  GemmType type, c_type;
};

// Products of one shape, issued as one batched call.
struct GemmBatch {
  bool transpose_first, transpose_second;
  std::int64_t m, n, k;
  double alpha, beta;
  std::int64_t ld_first, ld_second, ld_c;
  GemmType type, c_type;
  std::vector<const void*> first, second;
  std::vector<void*> c;
};

// The batches for `gemms`, in the order they must run, and in `rest` the GEMMs left whole (those
// sharing their operands' types, transpositions, leading dimensions, alpha and m with no other
// GEMM, or differing in both n and k from the others that do, or that would sum pieces into a
// bfloat16 C, whose rounding each piece would repeat).
std::vector<GemmBatch> uniform_batches(const std::vector<RecordedGemm>& gemms, std::vector<RecordedGemm>& rest);

}  // namespace kmoe::ops::impl
