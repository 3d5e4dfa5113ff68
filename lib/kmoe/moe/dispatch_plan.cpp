#include "kmoe/moe/dispatch_plan.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/ops/counting_sort.hpp"

#include <limits>

namespace kmoe::moe {

DispatchPlan DispatchPlan::build(const View2<const int>& expert_index, int n_experts) {
  const index_t tokens = expert_index.extent(0), k = expert_index.extent(1);
  require(n_experts >= 1, Status::invalid_argument, "DispatchPlan::build: n_experts is ", n_experts);
  require(k >= 1, Status::invalid_argument, "DispatchPlan::build: expert_index [", tokens, ", ", k,
          "] selects no expert per token (k must be at least 1)");
  require(tokens * k <= std::numeric_limits<int>::max(), Status::invalid_argument,
          "DispatchPlan::build: expert_index [", tokens, ", ", k, "] has more pairs than int pair ids hold");

  DispatchPlan plan;
  plan.n_tokens_ = static_cast<int>(tokens);
  plan.k_ = static_cast<int>(k);
  plan.n_experts_ = n_experts;
  const index_t pairs = plan.n_pairs();

  const View1<int> expert_of_pair(Kokkos::view_alloc(Kokkos::WithoutInitializing, "kmoe::plan::expert_of_pair"),
                                  pairs);
  Kokkos::parallel_for(
      "kmoe::plan::flatten", Kokkos::RangePolicy<ExecSpace>(0, pairs),
      KOKKOS_LAMBDA(const index_t p) { expert_of_pair(p) = expert_index(p / k, p % k); });
  ops::require_keys_in_range(expert_of_pair, n_experts, "DispatchPlan::build: expert_index (pair = token · k + slot)");

  const ops::KeyGroups groups = ops::counting_sort(expert_of_pair, n_experts);
  const View1<int> sorted_pair = groups.order;
  const View1<int> pair_position(Kokkos::view_alloc(Kokkos::WithoutInitializing, "kmoe::plan::pair_position"),
                                 pairs);
  Kokkos::parallel_for(
      "kmoe::plan::invert", Kokkos::RangePolicy<ExecSpace>(0, pairs),
      KOKKOS_LAMBDA(const index_t position) { pair_position(sorted_pair(position)) = static_cast<int>(position); });

  plan.expert_of_pair_ = expert_of_pair;
  plan.sorted_pair_ = sorted_pair;
  plan.pair_position_ = pair_position;
  plan.expert_offsets_ = groups.offsets;
  const auto offsets_host = Kokkos::create_mirror_view_and_copy(HostSpace(), groups.offsets);
  plan.expert_offsets_host_.assign(offsets_host.data(), offsets_host.data() + offsets_host.extent(0));
  return plan;
}

}  // namespace kmoe::moe
