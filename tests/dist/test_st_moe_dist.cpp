// ST-MoE over MPI ranks (MoE v0.1.8 and v0.0.14, the hierarchical MoE, SparseMoEBlock): experts
// placed over the ranks for E = 1 … 16 (hidden-unit shards when W > E), every rank bringing an
// uneven share of the sequences (one none), routing uniforms drawn by global position. Everything
// equals a one-rank layer on the whole batch: outputs, input gradients, the balance and z-losses
// (means over every rank's sequences) and every parameter gradient, in training and eval.
#include "kmoe/model/builder.hpp"
#include "dist/layer_matches_one_rank.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>

using namespace kmoe;
using namespace kmoe::test;

namespace {

std::string st_moe_config(int experts) {
  return R"({"dim": 8, "num_experts": )" + std::to_string(experts) + R"(, "expert_hidden_mult": 2, "gating_top_n": )" +
         std::to_string(std::min(experts, 2)) + R"(, "capacity_factor_train": 1.0, "capacity_factor_eval": 1.5})";
}

DistCase st_moe_case(const std::string& kind, const std::string& config, bool training, bool idle_rank = false) {
  DistCase c;
  c.kind = kind;
  c.config = config;
  c.sequence = {12, 8};  // capacity max(min(12, ⌊12·cf/E⌋), 4): choices are dropped
  c.training = training;
  c.idle_rank = idle_rank;
  return c;
}

}  // namespace

TEST(StMoEDist, MatchesOneRankForEveryExpertCount) {
  for (const int experts : {1, 3, 4, 6, 8, 16})
    for (const bool training : {false, true})
      expect_layer_matches_one_rank<double>(st_moe_case("st_moe", st_moe_config(experts), training), 1e-12);
  expect_layer_matches_one_rank<double>(st_moe_case("st_moe", st_moe_config(4), true, true), 1e-12);
}

TEST(StMoEDist, MatchesOneRankInFloat) {
  expect_layer_matches_one_rank<float>(st_moe_case("st_moe", st_moe_config(6), true), 1e-6);
}

TEST(StMoEDist, V0014AndTheHierarchyMatchOneRank) {
  const std::string flat = R"({"dim": 8, "num_experts": 3, "expert_hidden_mult": 2})";
  const std::string hierarchy = R"({"dim": 8, "num_experts": [2, 3], "expert_hidden_mult": 2})";
  for (const bool training : {false, true}) {
    expect_layer_matches_one_rank<double>(st_moe_case("st_moe_v0014", flat, training), 1e-12);
    expect_layer_matches_one_rank<double>(st_moe_case("hier_moe_v0014", hierarchy, training), 1e-12);
  }
  expect_layer_matches_one_rank<double>(st_moe_case("hier_moe_v0014", hierarchy, true, true), 1e-12);
}

TEST(StMoEDist, SparseMoEBlockMatchesOneRank) {
  const std::string block = R"({"moe": )" + st_moe_config(3) + R"(, "add_ff_before": true, "add_ff_after": true})";
  for (const bool training : {false, true})
    expect_layer_matches_one_rank<double>(st_moe_case("st_moe_block", block, training), 1e-12);
  expect_layer_matches_one_rank<double>(st_moe_case("st_moe_block", block, true, true), 1e-12);
}

TEST(StMoEDist, NonFiniteInputOnOneRankIsAnErrorOnEveryRank) {
  expect_nan_on_one_rank_fails_everywhere("st_moe", st_moe_config(3), {2, 4, 8});
}

TEST(StMoEDist, ConfigThatDiffersBetweenRanksIsAnErrorOnEveryRank) {
  if (world().size() == 1) GTEST_SKIP() << "needs two ranks";
  const std::string config = world().rank() == 1 ? R"({"dim": 8, "num_experts": 4, "capacity_factor_eval": 3.0})"
                                                 : R"({"dim": 8, "num_experts": 4})";
  try {
    (void)model::build_layer<float>("st_moe", config, 3, ParameterInit::drawn, world());
    ADD_FAILURE() << "rank " << world().rank() << ": configs differing between ranks were accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::invalid_argument) << e.what();
    EXPECT_NE(std::string(e.what()).find("the StMoE config or seed differs between the ranks"), std::string::npos)
        << e.what();
  }
}

TEST(StMoEDist, SequencesOfDifferentLengthsAreAnErrorOnEveryRank) {
  if (world().size() == 1) GTEST_SKIP() << "needs two ranks";
  const auto layer = model::build_layer<float>("st_moe", st_moe_config(3), 1, ParameterInit::drawn, world());
  const index_t n = world().rank() == 1 ? 6 : 4;
  model::LayerInputs<float> in;
  in.x = make_tensor<float>({1, n, 8}, random_values(static_cast<std::size_t>(n * 8), 3));
  Generator rng(1);
  try {
    (void)layer->forward(in, false, rng);
    ADD_FAILURE() << "rank " << world().rank() << ": sequences of different lengths were accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::shape_mismatch) << e.what();
  }
}
