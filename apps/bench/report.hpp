// What every kmoe-bench section reports: a table of timed cases, each with its FLOPs (the rate)
// and, where measured, its peak device memory, against a baseline measured in the same run.
#pragma once

#include "timing.hpp"

#include "kmoe/core/precision.hpp"
#include "kmoe/core/tensor.hpp"

#include <Kokkos_Core.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace kmoe::apps {

struct BenchRow {
  std::string name;
  double seconds = 0;
  double flops = 0;                          // the FLOPs the rate counts (0: no rate column)
  std::optional<std::int64_t> peak_bytes;    // peak memory above the section's start, when tracked
};

struct BenchTable {
  std::string title;    // section heading, e.g. the layer and its shape
  BenchRow baseline;    // ratios are rates relative to this row
  std::vector<BenchRow> rows;
  std::vector<std::string> notes;  // printed under the table

  void print() const;
};

// Peak bytes held in Kokkos allocations (every memory space) while a tracker lives, through
// Kokkos' tools allocation callbacks; scratch buffers count too, since they are real memory.
// One tracker at a time.
class PeakMemory {
 public:
  PeakMemory();
  ~PeakMemory();
  PeakMemory(const PeakMemory&) = delete;
  PeakMemory& operator=(const PeakMemory&) = delete;

  // Empties kmoe's caching allocator (so that blocks cached by earlier cases cannot hide what the
  // next one needs) and starts a new peak at the bytes held then; peak_bytes() is measured above
  // that level.
  void reset();
  std::int64_t peak_bytes() const;
};

// Runs fn `repeats` times under a fresh peak and returns the row: median time and peak memory.
template <class Fn>
BenchRow timed_row(std::string name, double flops, int repeats, PeakMemory& memory, Fn&& fn) {
  memory.reset();
  BenchRow row{std::move(name), median_seconds(repeats, fn), flops, std::nullopt};
  row.peak_bytes = memory.peak_bytes();
  return row;
}

// The baseline of most sections: one unblocked GEMM [m, k] · [k, n] of the machine's fastest dense
// GEMM on random operands (the threaded host BLAS or cuBLAS in float32; cuBLAS on tensor cores in
// bfloat16 where the precision asks for it and the build has it), median of `repeats`, with
// 2·m·k·n FLOPs. The row's name is prefixed with what ran ("dense fp32 …", "dense bf16 …").
BenchRow dense_gemm_row(const std::string& name, index_t m, index_t k, index_t n, int repeats,
                        Precision precision = Precision::native);

// The dense counterpart of a two-projection expert MLP on m rows: [m, d]·[d, h] then ·[h, d]
// (forward) and the four GEMMs of its backward (dH, dW2, dX, dW1), each one unblocked call of the
// machine's fastest dense GEMM: the threaded host BLAS or cuBLAS in float32; cuBLAS on tensor
// cores (float accumulation) in bfloat16. A host has no bfloat16 BLAS, so there bfloat16 falls
// back to float32 (said in the row's name).
struct DenseChainRows {
  BenchRow forward, forward_backward;
};
DenseChainRows dense_chain_rows(index_t m, index_t d, index_t h, Precision precision, int repeats);

// One n × n × n GEMM in the same precision: the machine's peak reference, printed beside a
// baseline so that a reader can see how close to peak the baseline itself runs.
BenchRow square_gemm_row(index_t n, Precision precision, int repeats);

// True where bfloat16 GEMMs run natively (a CUDA build); else bfloat16 is emulated in float.
bool native_bfloat16_gemm();

// "float32" or "bfloat16 mixed precision", for section titles.
inline const char* precision_title(Precision precision) {
  return precision == Precision::bfloat16 ? "bfloat16 mixed precision" : "float32";
}

}  // namespace kmoe::apps
