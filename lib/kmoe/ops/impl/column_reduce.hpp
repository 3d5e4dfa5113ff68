// Deterministic column reductions for parameter gradients (LayerNorm γ/β, a Linear's bias, GLU's
// mult_bias): sums[c] = Σ_r term(r, c) over many rows and few columns.
//
// One thread per column looping over every row leaves a GPU nearly idle (a d_model of 1024 is 32
// warps for the whole chip, each walking thousands of rows). Here the rows are cut into blocks of
// column_block_rows: one pass sums each (block, column) with rows in order, a second adds the
// blocks in order. The order is fixed by the shape alone, so results repeat bitwise and do not
// depend on the thread count or the backend's scheduling (no atomics).
#pragma once

#include "kmoe/core/config.hpp"
#include "kmoe/core/tensor.hpp"

#include <Kokkos_Core.hpp>

#include <algorithm>
#include <vector>

namespace kmoe::ops::impl {

constexpr index_t column_block_rows = 64;

// Σ term(r, c) over rows [first, end) in row order: the one summation order of every pass below.
template <class T, int N, class Term>
KOKKOS_INLINE_FUNCTION Kokkos::Array<T, N> sum_rows(const Term& term, index_t first, index_t end, index_t c) {
  Kokkos::Array<T, N> s;
  for (int n = 0; n < N; ++n) s[n] = T(0);
  for (index_t r = first; r < end; ++r) {
    const Kokkos::Array<T, N> t = term(r, c);
    for (int n = 0; n < N; ++n) s[n] += t[n];
  }
  return s;
}

// For every column c: apply(c, s) with s[n] = Σ_r term(r, c)[n] (term returns Kokkos::Array<T, N>:
// N sums from one pass over the rows).
template <class T, int N, class Term, class Apply>
void column_reduce(const char* op, index_t rows, index_t cols, const Term& term, const Apply& apply) {
  using Sums = Kokkos::Array<T, N>;
  const index_t blocks = (rows + column_block_rows - 1) / column_block_rows;
  if (blocks <= 1) {
    Kokkos::parallel_for(
        op, Kokkos::RangePolicy<ExecSpace>(0, cols),
        KOKKOS_LAMBDA(const index_t c) { apply(c, sum_rows<T, N>(term, 0, rows, c)); });
    return;
  }
  const Tensor<T> partial_storage = Tensor<T>::uninitialized("kmoe::column_reduce::partial", {blocks * N, cols});
  const View2<T> partial = partial_storage.as_matrix();
  Kokkos::parallel_for(
      op, md_range<2>({0, 0}, {blocks, cols}), KOKKOS_LAMBDA(const index_t b, const index_t c) {
        const index_t end = (b + 1) * column_block_rows < rows ? (b + 1) * column_block_rows : rows;
        const Sums s = sum_rows<T, N>(term, b * column_block_rows, end, c);
        for (int n = 0; n < N; ++n) partial(b * N + n, c) = s[n];
      });
  Kokkos::parallel_for(
      op, Kokkos::RangePolicy<ExecSpace>(0, cols), KOKKOS_LAMBDA(const index_t c) {
        Sums s;
        for (int n = 0; n < N; ++n) s[n] = T(0);
        for (index_t b = 0; b < blocks; ++b)
          for (int n = 0; n < N; ++n) s[n] += partial(b * N + n, c);
        apply(c, s);
      });
}

// The same per segment: rows [offsets[g], offsets[g + 1]) of `segments` contiguous row ranges
// (a dispatch plan's expert blocks; offsets on the device, offsets_host its copy), apply(g, c, s)
// with s = Σ_r term(r, c) over segment g. Blocks of column_block_rows start at each segment's
// first row, so a segment sums exactly as column_reduce over its rows alone; one launch per pass
// whatever the segment count.
template <class T, int N, class Term, class Apply>
void segmented_column_reduce(const char* op, const View1<const int>& offsets, const std::vector<int>& offsets_host,
                             index_t cols, const Term& term, const Apply& apply) {
  using Sums = Kokkos::Array<T, N>;
  const index_t segments = static_cast<index_t>(offsets_host.size()) - 1;
  index_t most = 0;
  for (index_t g = 0; g < segments; ++g) most = std::max<index_t>(most, offsets_host[g + 1] - offsets_host[g]);
  const index_t blocks = (most + column_block_rows - 1) / column_block_rows;  // per segment, the longest's
  if (segments <= 0 || blocks == 0) return;
  const Tensor<T> partial_storage =
      Tensor<T>::uninitialized("kmoe::segmented_column_reduce::partial", {segments * blocks * N, cols});
  const View2<T> partial = partial_storage.as_matrix();
  Kokkos::parallel_for(
      op, md_range<2>({0, 0}, {segments * blocks, cols}), KOKKOS_LAMBDA(const index_t i, const index_t c) {
        const index_t g = i / blocks, first = offsets(g) + (i % blocks) * column_block_rows;
        const index_t end = first + column_block_rows < offsets(g + 1) ? first + column_block_rows : offsets(g + 1);
        const Sums s = sum_rows<T, N>(term, first, end, c);
        for (int n = 0; n < N; ++n) partial(i * N + n, c) = s[n];
      });
  Kokkos::parallel_for(
      op, md_range<2>({0, 0}, {segments, cols}), KOKKOS_LAMBDA(const index_t g, const index_t c) {
        if (offsets(g + 1) == offsets(g)) return;  // an empty segment adds nothing, not even +0
        Sums s;
        for (int n = 0; n < N; ++n) s[n] = T(0);
        for (index_t b = 0; b < blocks; ++b)
          for (int n = 0; n < N; ++n) s[n] += partial((g * blocks + b) * N + n, c);
        apply(g, c, s);
      });
}

}  // namespace kmoe::ops::impl
