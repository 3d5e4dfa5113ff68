// The sparse-MoE seam: router → DispatchPlan → grouped expert compute → combine.
//
// A plan records, for every (token, slot) pair chosen by a router, which expert it goes to, and
// lists the pairs grouped by expert so each expert's rows are contiguous. Every sparse layer
// builds one from its top-k indices; expert compute (CVMM, GEGLU experts) runs per expert group,
// and the combine step maps results back to pairs. Pair ids are p = token · k + slot.
//
// Capacity-limited routers (ST-MoE) also have dropped pairs: choices that were not routed or did
// not fit an expert's capacity. build_with_drops marks them with expert −1; they belong to no
// expert and sort after every expert's group, at positions [n_routed_pairs(), n_pairs()), so
// per-expert work never sees them. CVMM leaves them out of its sums and gives them zero rows and
// zero gate gradients.
#pragma once

#include "kmoe/core/config.hpp"
#include "kmoe/core/tensor.hpp"

#include <vector>

namespace kmoe::moe {

class DispatchPlan {
 public:
  // expert_index [tokens, k], values in [0, n_experts); otherwise Status::invalid_argument.
  static DispatchPlan build(const View2<const int>& expert_index, int n_experts);
  // As build, but expert_index may also hold −1 (a dropped pair); any other value outside
  // [−1, n_experts) throws Status::invalid_argument naming the element.
  static DispatchPlan build_with_drops(const View2<const int>& expert_index, int n_experts);

  int n_tokens() const { return n_tokens_; }
  int k() const { return k_; }
  int n_experts() const { return n_experts_; }
  index_t n_pairs() const { return static_cast<index_t>(n_tokens_) * k_; }

  // Pairs that some expert computes (all pairs unless built with drops): sorted positions
  // [0, n_routed_pairs()) = [expert_offsets[0], expert_offsets[n_experts]).
  index_t n_routed_pairs() const { return expert_offsets_host_.empty() ? 0 : expert_offsets_host_.back(); }

  // The arrays are memory-pool tensors (no cudaMalloc/cudaFree per plan); the Views alias them
  // and stay valid while the plan lives.
  // [pairs] expert of pair p (the flattened expert_index; −1 for a dropped pair).
  View1<int> expert_of_pair() const { return expert_of_pair_.flat(); }
  // [pairs] pair ids grouped by expert, ascending pair id within an expert (stable); dropped
  // pairs last, also in ascending pair id.
  View1<int> sorted_pair() const { return sorted_pair_.flat(); }
  // [pairs] position of pair p in sorted_pair (the inverse permutation).
  View1<int> pair_position() const { return pair_position_.flat(); }
  // [experts + 1] expert e owns sorted positions [offsets[e], offsets[e + 1]).
  View1<int> expert_offsets() const { return expert_offsets_.flat(); }
  // The same offsets on the host, for sizing per-expert GEMMs.
  const std::vector<int>& expert_offsets_host() const { return expert_offsets_host_; }
  int expert_rows(int expert) const { return expert_offsets_host_[expert + 1] - expert_offsets_host_[expert]; }

 private:
  static DispatchPlan build_impl(const View2<const int>& expert_index, int n_experts, bool allow_drops);

  int n_tokens_ = 0;
  int k_ = 0;
  int n_experts_ = 0;
  Tensor<int> expert_of_pair_;
  Tensor<int> sorted_pair_;
  Tensor<int> pair_position_;
  Tensor<int> expert_offsets_;
  std::vector<int> expert_offsets_host_;
};

}  // namespace kmoe::moe
