// Per-row top-k (k ≤ 64) of a [rows, cols] matrix, as torch.topk(largest=True): ties go to the
// lower column index; NaN ranks above every number.
#pragma once

#include "kmoe/core/config.hpp"

namespace kmoe::ops {

constexpr int topk_max_k = 64;

enum class TopkOrder {
  descending,  // sorted: largest first (torch.topk(sorted=True))
  by_index,    // unsorted: the same k entries in ascending column order
};

// values, indices: [rows, k]. Throws Status::invalid_argument unless 1 ≤ k ≤ min(cols, 64).
template <class T>
void topk_forward(const View2<const T>& x, int k, TopkOrder order, const View2<T>& values,
                  const View2<int>& indices);

// dx = 0 except dx[r, indices[r, j]] = dvalues[r, j]; dx overwritten.
template <class T>
void topk_backward(const View2<const int>& indices, const View2<const T>& dvalues, const View2<T>& dx);

}  // namespace kmoe::ops
