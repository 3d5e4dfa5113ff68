// What every kmoe-bench section reports: a table of timed cases, each with its FLOPs (the rate)
// and, where measured, its peak device memory, against a baseline measured in the same run.
#pragma once

#include "timing.hpp"

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

// The baseline of most sections: one straight KokkosBlas::gemm [m, k] · [k, n] in float (no
// thread-count-independent blocking: the library's best rate), median of `repeats`, with 2·m·k·n FLOPs.
BenchRow dense_gemm_row(const std::string& name, index_t m, index_t k, index_t n, int repeats);

}  // namespace kmoe::apps
