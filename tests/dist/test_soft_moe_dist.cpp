// Soft MoE over MPI ranks (lite and lucidrains, FeedForward, GEGLU and LayerNorm experts): every
// rank's slots of expert e go to e's owners (hidden-unit shards when W > E, the lite experts'
// hidden LayerNorm then summed over the shards), every rank bringing an uneven share of the
// sequences (one none). Everything equals a one-rank layer on the whole batch, in training
// (expert dropout keyed by the global slot row) and eval.
#include "kmoe/model/builder.hpp"
#include "dist/layer_matches_one_rank.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <string>

using namespace kmoe;
using namespace kmoe::test;

namespace {

DistCase soft_moe_case(const std::string& kind, const std::string& config, bool training, bool idle_rank = false) {
  DistCase c;
  c.kind = kind;
  c.config = config;
  c.sequence = {6, 8};
  c.training = training;
  c.idle_rank = idle_rank;
  return c;
}

std::string lucidrains(int experts, const char* extra) {
  return R"({"dim": 8, "num_experts": )" + std::to_string(experts) + R"(, "num_slots": 2, "expert_mult": 2)" + extra +
         "}";
}

}  // namespace

TEST(SoftMoEDist, LucidrainsMatchesOneRankForEveryExpertCount) {
  for (const int experts : {1, 3, 4, 6, 8, 16})
    for (const bool training : {false, true})
      expect_layer_matches_one_rank<double>(
          soft_moe_case("soft_moe_lucidrains", lucidrains(experts, R"(, "dropout": 0.25)"), training), 1e-12);
}

TEST(SoftMoEDist, GegluAndLayerNormMatchOneRank) {
  const std::string config = lucidrains(3, R"(, "geglu": true, "use_layernorm": true, "dropout": 0.25)");
  for (const bool training : {false, true})
    expect_layer_matches_one_rank<double>(soft_moe_case("soft_moe_lucidrains", config, training), 1e-12);
  expect_layer_matches_one_rank<double>(soft_moe_case("soft_moe_lucidrains", config, true, true), 1e-12);
}

TEST(SoftMoEDist, LiteMatchesOneRank) {
  for (const int experts : {1, 3, 4})
    for (const bool training : {false, true})
      expect_layer_matches_one_rank<double>(
          soft_moe_case("soft_moe_lite",
                        R"({"d_model": 8, "num_experts": )" + std::to_string(experts) + R"(, "num_slots": 2})", training),
          1e-12);
  expect_layer_matches_one_rank<float>(
      soft_moe_case("soft_moe_lite", R"({"d_model": 8, "num_experts": 3, "num_slots": 2})", true, true), 1e-6);
}

TEST(SoftMoEDist, NonFiniteInputOnOneRankIsAnErrorOnEveryRank) {
  expect_nan_on_one_rank_fails_everywhere("soft_moe_lucidrains", lucidrains(3, ""), {2, 6, 8});
}
