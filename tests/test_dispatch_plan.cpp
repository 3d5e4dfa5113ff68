#include "kmoe/moe/dispatch_plan.hpp"
#include "test_util.hpp"

#include <algorithm>
#include <numeric>
#include <tuple>

using namespace kmoe;
using namespace kmoe::test;

namespace {

std::vector<int> random_experts(index_t tokens, int k, int lo, int hi, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::vector<int> index(tokens * k);
  for (auto& e : index) e = random_int(gen, lo, hi);
  return index;
}

moe::DispatchPlan build(const std::vector<int>& index, index_t tokens, int k, int n_experts) {
  auto t = Tensor<int>::from_host("expert_index", {tokens, k}, index);
  return moe::DispatchPlan::build(t.as_matrix(), n_experts);
}

void expect_valid_plan(const std::vector<int>& index, index_t tokens, int k, int n_experts) {
  const auto plan = build(index, tokens, k, n_experts);
  const auto label = ::testing::Message() << "tokens " << tokens << " k " << k << " experts " << n_experts;
  EXPECT_EQ(plan.n_tokens(), tokens) << label;
  EXPECT_EQ(plan.k(), k) << label;
  EXPECT_EQ(plan.n_experts(), n_experts) << label;
  EXPECT_EQ(plan.n_pairs(), tokens * k) << label;
  EXPECT_EQ(host_ints(plan.expert_of_pair()), index) << label;

  std::vector<int> sorted(index.size());
  std::iota(sorted.begin(), sorted.end(), 0);
  std::stable_sort(sorted.begin(), sorted.end(), [&](int a, int b) { return index[a] < index[b]; });
  EXPECT_EQ(host_ints(plan.sorted_pair()), sorted) << label;

  std::vector<int> position(index.size());
  for (std::size_t s = 0; s < sorted.size(); ++s) position[sorted[s]] = static_cast<int>(s);
  EXPECT_EQ(host_ints(plan.pair_position()), position) << label;

  std::vector<int> offsets(n_experts + 1, 0);
  for (int e : index) ++offsets[e + 1];
  std::partial_sum(offsets.begin(), offsets.end(), offsets.begin());
  EXPECT_EQ(host_ints(plan.expert_offsets()), offsets) << label;
  EXPECT_EQ(plan.expert_offsets_host(), offsets) << label;
  for (int e = 0; e < n_experts; ++e) EXPECT_EQ(plan.expert_rows(e), offsets[e + 1] - offsets[e]) << label;
}

}  // namespace

TEST(DispatchPlan, GroupsPairsByExpertStably) {
  expect_valid_plan(random_experts(37, 4, 0, 15, 1), 37, 4, 16);
  expect_valid_plan(random_experts(1000, 2, 0, 6, 2), 1000, 2, 7);  // many sort chunks
  expect_valid_plan({0}, 1, 1, 1);
  expect_valid_plan(random_experts(9, 1, 0, 4, 3), 9, 1, 5);
}

TEST(DispatchPlan, ExpertsWithoutRowsHaveEmptyRanges) {
  // Experts 0, 1 and 6..9 receive nothing.
  expect_valid_plan(random_experts(41, 3, 2, 5, 4), 41, 3, 10);
}

TEST(DispatchPlan, EveryTokenChoosingEveryExpert) {
  const index_t tokens = 13;
  const int k = 6;
  std::vector<int> index(tokens * k);
  std::mt19937_64 gen(5);
  for (index_t t = 0; t < tokens; ++t) {
    std::iota(index.begin() + t * k, index.begin() + (t + 1) * k, 0);
    std::shuffle(index.begin() + t * k, index.begin() + (t + 1) * k, gen);
  }
  expect_valid_plan(index, tokens, k, k);
}

TEST(DispatchPlan, NoTokens) { expect_valid_plan({}, 0, 3, 4); }

TEST(DispatchPlan, BadIndicesAreErrors) {
  auto index = random_experts(20, 4, 0, 7, 6);
  index[4 * 11 + 2] = 8;
  const std::string op = "DispatchPlan::build: expert_index (pair = token · k + slot): ";
  expect_status([&] { build(index, 20, 4, 8); }, Status::invalid_argument, op + "value 8 at element 46");
  index[46] = -1;
  expect_status([&] { build(index, 20, 4, 8); }, Status::invalid_argument, op + "value -1 at element 46");
  expect_status([&] { build({0, 0}, 2, 1, 0); }, Status::invalid_argument, "n_experts");
  expect_status([&] { build({}, 2, 0, 3); }, Status::invalid_argument, "k must be at least 1");
}

// ---------------------------------------------------------------------------------------------
// Plans with dropped pairs (expert −1: ST-MoE's choices that were not routed or found no slot).

TEST(DispatchPlan, DroppedPairsSortLastAndBelongToNoExpert) {
  for (const auto& [tokens, k, experts, seed] : {std::tuple<index_t, int, int, std::uint64_t>{37, 3, 5, 7},
                                                 {1000, 2, 16, 8}, {9, 1, 4, 9}, {13, 4, 1, 10}}) {
    auto index = random_experts(tokens, k, -1, experts - 1, seed);  // about 1 in experts + 1 dropped
    const auto t = Tensor<int>::from_host("expert_index", {tokens, k}, index);
    const auto plan = moe::DispatchPlan::build_with_drops(t.as_matrix(), experts);
    const auto label = ::testing::Message() << "tokens " << tokens << " k " << k << " experts " << experts;
    EXPECT_EQ(plan.n_pairs(), tokens * k) << label;
    EXPECT_EQ(host_ints(plan.expert_of_pair()), index) << label;
    // Stable by expert, dropped pairs (−1) last.
    const int n_experts = experts;  // a lambda may not capture a structured binding before C++20
    const auto key = [&](int p) { return index[p] < 0 ? n_experts : index[p]; };
    std::vector<int> sorted(index.size());
    std::iota(sorted.begin(), sorted.end(), 0);
    std::stable_sort(sorted.begin(), sorted.end(), [&](int a, int b) { return key(a) < key(b); });
    EXPECT_EQ(host_ints(plan.sorted_pair()), sorted) << label;
    std::vector<int> position(index.size());
    for (std::size_t s = 0; s < sorted.size(); ++s) position[sorted[s]] = static_cast<int>(s);
    EXPECT_EQ(host_ints(plan.pair_position()), position) << label;
    std::vector<int> offsets(experts + 1, 0);
    for (int e : index)
      if (e >= 0) ++offsets[e + 1];
    std::partial_sum(offsets.begin(), offsets.end(), offsets.begin());
    EXPECT_EQ(plan.expert_offsets_host(), offsets) << label;
    EXPECT_EQ(host_ints(plan.expert_offsets()), offsets) << label;
    EXPECT_EQ(plan.n_routed_pairs(), offsets.back()) << label;
    EXPECT_LT(plan.n_routed_pairs(), plan.n_pairs()) << label;
  }
}

TEST(DispatchPlan, WithoutDropsBuildWithDropsEqualsBuild) {
  const auto index = random_experts(41, 3, 0, 6, 11);
  const auto t = Tensor<int>::from_host("expert_index", {41, 3}, index);
  const auto a = moe::DispatchPlan::build(t.as_matrix(), 7), b = moe::DispatchPlan::build_with_drops(t.as_matrix(), 7);
  EXPECT_EQ(host_ints(a.sorted_pair()), host_ints(b.sorted_pair()));
  EXPECT_EQ(a.expert_offsets_host(), b.expert_offsets_host());
  EXPECT_EQ(a.n_routed_pairs(), a.n_pairs());
  // Everything dropped: no expert has rows.
  const auto none = Tensor<int>::from_host("expert_index", {5, 2}, std::vector<int>(10, -1));
  const auto empty = moe::DispatchPlan::build_with_drops(none.as_matrix(), 3);
  EXPECT_EQ(empty.n_routed_pairs(), 0);
  EXPECT_EQ(empty.expert_offsets_host(), (std::vector<int>{0, 0, 0, 0}));
}

TEST(DispatchPlan, BadIndicesWithDropsAreErrors) {
  auto index = random_experts(20, 4, -1, 7, 12);
  index[4 * 11 + 2] = 8;
  const auto build_drops = [&] {
    const auto t = Tensor<int>::from_host("expert_index", {20, 4}, index);
    moe::DispatchPlan::build_with_drops(t.as_matrix(), 8);
  };
  expect_status(build_drops, Status::invalid_argument, "value 8 at element 46 is outside [-1, 8)");
  index[46] = -2;
  expect_status(build_drops, Status::invalid_argument, "value -2 at element 46");
}
