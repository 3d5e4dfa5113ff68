// Stable counting sort of small integer keys: the deterministic replacement for atomics wherever
// values are grouped by a key (tokens by expert, gradient rows by embedding id).
#pragma once

#include "kmoe/core/config.hpp"
#include "kmoe/core/tensor.hpp"

#include <string>

namespace kmoe::ops {

// Memory-pool tensors: a sort every MoE call would otherwise cost a cudaMalloc, an init kernel and
// a synchronising cudaFree per array.
struct KeyGroups {
  Tensor<int> order;    // [n] element indices grouped by key, ascending index within a key
  Tensor<int> offsets;  // [n_keys + 1] group k is order[offsets[k] .. offsets[k + 1])
};

// Keys must lie in [0, n_keys); otherwise Status::invalid_argument, its message starting with
// `what` (callers name their input, so they need no check of their own). Parallel over chunks of
// elements, exclusive scan over (key, chunk): the result does not depend on the thread count.
KeyGroups counting_sort(const View1<const int>& keys, int n_keys, const std::string& what = "counting_sort: key");

// Throws Status::invalid_argument unless every key lies in [0, n_keys); the message starts with
// `what` and names the first offending element and its value. Used by every op that indexes with
// caller-supplied integers (gather, scatter-add, dispatch plans).
void require_keys_in_range(const View1<const int>& keys, int n_keys, const std::string& what);

}  // namespace kmoe::ops
