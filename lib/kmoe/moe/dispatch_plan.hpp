// The sparse-MoE seam: router → DispatchPlan → grouped expert compute → combine.
//
// A plan records, for every (token, slot) pair chosen by a router, which expert it goes to, and
// lists the pairs grouped by expert so each expert's rows are contiguous. Every sparse layer
// builds one from its top-k indices; expert compute (CVMM, GEGLU experts) runs per expert group,
// and the combine step maps results back to pairs. Pair ids are p = token · k + slot.
#pragma once

#include "kmoe/core/config.hpp"

#include <vector>

namespace kmoe::moe {

class DispatchPlan {
 public:
  // expert_index [tokens, k], values in [0, n_experts); otherwise Status::invalid_argument.
  static DispatchPlan build(const View2<const int>& expert_index, int n_experts);

  int n_tokens() const { return n_tokens_; }
  int k() const { return k_; }
  int n_experts() const { return n_experts_; }
  index_t n_pairs() const { return static_cast<index_t>(n_tokens_) * k_; }

  // [pairs] expert of pair p (the flattened expert_index).
  const View1<int>& expert_of_pair() const { return expert_of_pair_; }
  // [pairs] pair ids grouped by expert, ascending pair id within an expert (stable).
  const View1<int>& sorted_pair() const { return sorted_pair_; }
  // [pairs] position of pair p in sorted_pair (the inverse permutation).
  const View1<int>& pair_position() const { return pair_position_; }
  // [experts + 1] expert e owns sorted positions [offsets[e], offsets[e + 1]).
  const View1<int>& expert_offsets() const { return expert_offsets_; }
  // The same offsets on the host, for sizing per-expert GEMMs.
  const std::vector<int>& expert_offsets_host() const { return expert_offsets_host_; }
  int expert_rows(int expert) const { return expert_offsets_host_[expert + 1] - expert_offsets_host_[expert]; }

 private:
  int n_tokens_ = 0;
  int k_ = 0;
  int n_experts_ = 0;
  View1<int> expert_of_pair_;
  View1<int> sorted_pair_;
  View1<int> pair_position_;
  View1<int> expert_offsets_;
  std::vector<int> expert_offsets_host_;
};

}  // namespace kmoe::moe
