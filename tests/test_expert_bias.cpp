#include "kmoe/moe/expert_bias.hpp"
#include "test_util.hpp"

using namespace kmoe;
using namespace kmoe::test;

namespace {

// expert_index with about a quarter of the pairs dropped (−1).
std::vector<int> experts_with_drops(index_t pairs, int experts, std::uint64_t seed) {
  std::vector<int> index = random_index(pairs, experts + experts / 3 + 1, seed);
  for (int& e : index)
    if (e >= experts) e = -1;
  return index;
}

}  // namespace

// Rows in pair order and in sorted order get the same per-expert bias; dropped pairs get none, and
// the gradient sums each expert's rows (onto what dbias held).
TEST(ExpertBias, AddAndGradientMatchNaiveLoopsInBothRowOrders) {
  const index_t tokens = 23, M = 5;
  const int k = 3, experts = 6;
  const auto index = experts_with_drops(tokens * k, experts, 3);
  const auto index_t_ = Tensor<int>::from_host("index", {tokens, k}, index);
  const auto plan = moe::DispatchPlan::build_with_drops(index_t_.as_matrix(), experts);
  const std::vector<int> sorted_pair = host_ints(plan.sorted_pair());
  const index_t pairs = tokens * k;
  const auto rows = random_values(pairs * M, 4), bias = random_values(experts * M, 5), start = random_values(experts * M, 6);
  const auto b = make_tensor<double>({experts, M}, bias);
  for (const auto order : {moe::PairRows::pair_order, moe::PairRows::sorted}) {
    const bool sorted = order == moe::PairRows::sorted;
    std::vector<double> expected = rows, expected_grad = start;
    for (index_t r = 0; r < pairs; ++r) {
      const int e = index[sorted ? sorted_pair[r] : r];
      if (e < 0) continue;
      for (index_t c = 0; c < M; ++c) {
        expected[r * M + c] += bias[e * M + c];
        expected_grad[e * M + c] += rows[r * M + c];
      }
    }
    auto t = make_tensor<double>({pairs, M}, rows);
    moe::add_expert_bias<double>(plan, order, t.as_matrix(), b.as_matrix());
    EXPECT_LT(max_rel_error(to_double(t), expected), 1e-15) << sorted;
    auto grad = make_tensor<double>({experts, M}, start);
    moe::accumulate_expert_bias_gradient<double>(plan, order, make_tensor<double>({pairs, M}, rows).as_matrix(),
                                                 grad.as_matrix());
    EXPECT_LT(max_rel_error(to_double(grad), expected_grad), 1e-14) << sorted;
  }
}

TEST(ExpertBias, BadShapesAreErrors) {
  const auto index = Tensor<int>::from_host("index", {4, 2}, {0, 1, 1, 2, 2, 0, 0, 1});
  const auto plan = moe::DispatchPlan::build(index.as_matrix(), 3);
  Tensor<float> rows("rows", {8, 5}), bias("bias", {2, 5}), too_many("too_many", {9, 5});
  expect_status([&] { moe::add_expert_bias<float>(plan, moe::PairRows::pair_order, rows.as_matrix(), bias.as_matrix()); },
                Status::shape_mismatch, "expected [3, 5]");
  Tensor<float> good_bias("bias", {3, 5});
  expect_status([&] { moe::add_expert_bias<float>(plan, moe::PairRows::pair_order, too_many.as_matrix(), good_bias.as_matrix()); },
                Status::shape_mismatch, "9 rows");
}
