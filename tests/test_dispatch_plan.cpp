#include "kmoe/moe/dispatch_plan.hpp"
#include "test_util.hpp"

#include <numeric>

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
