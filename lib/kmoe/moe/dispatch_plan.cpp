#include "kmoe/moe/dispatch_plan.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/core/profile_region.hpp"
#include "kmoe/ops/counting_sort.hpp"

#include <limits>

namespace kmoe::moe {

namespace impl {

// Throws unless every expert index lies in [−1, n_experts), naming the first offending element.
inline void require_expert_or_dropped(const View1<int>& expert_of_pair, int n_experts) {
  index_t first_bad = std::numeric_limits<index_t>::max();
  Kokkos::parallel_reduce(
      "kmoe::plan::check_drops", Kokkos::RangePolicy<ExecSpace>(0, expert_of_pair.extent(0)),
      KOKKOS_LAMBDA(const index_t p, index_t& first) {
        const int e = expert_of_pair(p);
        if ((e < -1 || e >= n_experts) && p < first) first = p;
      },
      Kokkos::Min<index_t>(first_bad));
  if (first_bad == std::numeric_limits<index_t>::max()) return;
  int value = 0;
  Kokkos::deep_copy(value, Kokkos::subview(expert_of_pair, first_bad));
  fail(Status::invalid_argument, "DispatchPlan::build_with_drops: expert_index (pair = token · k + slot): value ",
       value, " at element ", first_bad, " is outside [-1, ", n_experts, ") (-1 marks a dropped pair)");
}

// Sort keys with dropped pairs (−1) as the extra key n_experts, so that they sort last.
inline Tensor<int> keys_with_drops_last(const View1<int>& expert_of_pair, int n_experts) {
  const auto keys_storage = Tensor<int>::uninitialized("kmoe::plan::sort_keys", {index_t(expert_of_pair.extent(0))});
  const View1<int> keys = keys_storage.flat();
  Kokkos::parallel_for(
      "kmoe::plan::drops_last", Kokkos::RangePolicy<ExecSpace>(0, expert_of_pair.extent(0)),
      KOKKOS_LAMBDA(const index_t p) { keys(p) = expert_of_pair(p) < 0 ? n_experts : expert_of_pair(p); });
  return keys_storage;
}

// [pairs] the flattened expert_index (pair p = token · k + slot).
inline Tensor<int> flatten(const View2<const int>& expert_index) {
  const index_t pairs = expert_index.extent(0) * expert_index.extent(1), k = expert_index.extent(1);
  const auto storage = Tensor<int>::uninitialized("kmoe::plan::expert_of_pair", {pairs});
  const View1<int> expert_of_pair = storage.flat();
  Kokkos::parallel_for(
      "kmoe::plan::flatten", Kokkos::RangePolicy<ExecSpace>(0, pairs),
      KOKKOS_LAMBDA(const index_t p) { expert_of_pair(p) = expert_index(p / k, p % k); });
  return storage;
}

// The inverse permutation of sorted_pair.
inline Tensor<int> invert(const View1<int>& sorted_pair) {
  const index_t pairs = sorted_pair.extent(0);
  const auto storage = Tensor<int>::uninitialized("kmoe::plan::pair_position", {pairs});
  const View1<int> pair_position = storage.flat();
  Kokkos::parallel_for(
      "kmoe::plan::invert", Kokkos::RangePolicy<ExecSpace>(0, pairs),
      KOKKOS_LAMBDA(const index_t position) { pair_position(sorted_pair(position)) = static_cast<int>(position); });
  return storage;
}

}  // namespace impl

DispatchPlan DispatchPlan::build(const View2<const int>& expert_index, int n_experts) {
  return build_impl(expert_index, n_experts, false);
}

DispatchPlan DispatchPlan::build_with_drops(const View2<const int>& expert_index, int n_experts) {
  return build_impl(expert_index, n_experts, true);
}

DispatchPlan DispatchPlan::build_impl(const View2<const int>& expert_index, int n_experts, bool allow_drops) {
  const ProfileRegion region("kmoe::dispatch_plan");
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
  // No lambdas here: nvcc refuses extended lambdas in private member functions.
  const Tensor<int> expert_of_pair = impl::flatten(expert_index);

  ops::KeyGroups groups;
  Tensor<int> offsets;
  if (allow_drops) {
    impl::require_expert_or_dropped(expert_of_pair.flat(), n_experts);
    const Tensor<int> keys = impl::keys_with_drops_last(expert_of_pair.flat(), n_experts);
    groups = ops::counting_sort(keys.flat(), n_experts + 1);
    // The extra group (dropped pairs) has no offset entry of its own: it ends at n_pairs.
    offsets = Tensor<int>::uninitialized("kmoe::plan::expert_offsets", {static_cast<index_t>(n_experts) + 1});
    Kokkos::deep_copy(ExecSpace(), offsets.flat(),
                      Kokkos::subview(groups.offsets.flat(), Kokkos::make_pair(0, n_experts + 1)));
  } else {
    groups = ops::counting_sort(expert_of_pair.flat(), n_experts,
                                "DispatchPlan::build: expert_index (pair = token · k + slot)");
    offsets = groups.offsets;
  }

  plan.expert_of_pair_ = expert_of_pair;
  plan.sorted_pair_ = groups.order;
  plan.pair_position_ = impl::invert(groups.order.flat());
  plan.expert_offsets_ = offsets;
  // The one read-back a plan needs: each expert's row count shapes its GEMM (and, across ranks,
  // the all-to-all's counts).
  const auto offsets_host = Kokkos::create_mirror_view_and_copy(HostSpace(), offsets.flat());
  plan.expert_offsets_host_.assign(offsets_host.data(), offsets_host.data() + offsets_host.extent(0));
  return plan;
}

}  // namespace kmoe::moe
