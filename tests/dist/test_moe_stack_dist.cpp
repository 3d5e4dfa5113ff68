// moe_stack over the ranks (each MoE block's experts placed, the projections and norms dense):
// equal to one rank on the whole batch for each MoE kind, training and eval, with an idle rank.
#include "dist/layer_matches_one_rank.hpp"

#include <gtest/gtest.h>

using namespace kmoe;
using namespace kmoe::test;

namespace {

DistCase stack_case(const std::string& kind, const std::string& moe, bool training, bool idle_rank = false) {
  DistCase c;
  c.kind = "moe_stack";
  c.config = R"({"d_in": 3, "d_out": 2, "d_model": 8, "n_blocks": 2, "moe_kind": ")" + kind + R"(", "moe": )" + moe + "}";
  c.sequence = {3};
  c.out_width = 2;
  c.training = training;
  c.idle_rank = idle_rank;
  return c;
}

}  // namespace

TEST(MoEStackDist, MatchesOneRankForEveryMoEKind) {
  const std::pair<const char*, const char*> kinds[] = {
      {"sigma_moe", R"({"n_experts": 6, "expert_size": 4, "k": 2, "dropout": 0.2})"},
      {"st_moe", R"({"num_experts": 3, "expert_hidden_mult": 2})"},
      {"soft_moe_lite", R"({"num_experts": 4, "num_slots": 2})"},
  };
  for (const auto& [kind, moe] : kinds)
    for (const bool training : {false, true}) expect_layer_matches_one_rank<double>(stack_case(kind, moe, training), 1e-12);
  expect_layer_matches_one_rank<float>(stack_case("sigma_moe", kinds[0].second, true, true), 1e-6);
}
