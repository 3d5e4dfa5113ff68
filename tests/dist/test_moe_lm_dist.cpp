// moe_lm over the ranks (each block's σ-MoE or ST-MoE experts placed, the rest dense): equal to
// one rank on the whole batch, training and eval, with an idle rank.
#include "dist/layer_matches_one_rank.hpp"

#include <gtest/gtest.h>

using namespace kmoe;
using namespace kmoe::test;

namespace {

DistCase lm_case(const std::string& kind, const std::string& moe, bool training, bool idle_rank = false) {
  DistCase c;
  c.kind = "moe_lm";
  c.config = R"({"n_tokens": 13, "d_model": 8, "n_layers": 2, "n_heads": 2, "max_seq_len": 8, "moe_kind": ")" + kind +
             R"(", "moe": )" + moe + "}";
  c.sequence = {5};
  c.vocabulary = 13;
  c.out_width = 13;
  c.training = training;
  c.idle_rank = idle_rank;
  return c;
}

}  // namespace

TEST(MoELMDist, MatchesOneRankForBothMoEKinds) {
  const std::pair<const char*, const char*> kinds[] = {
      {"sigma_moe", R"({"n_experts": 6, "expert_size": 4, "k": 2, "dropout": 0.2})"},
      {"st_moe", R"({"num_experts": 3, "expert_hidden_mult": 2})"},
  };
  for (const auto& [kind, moe] : kinds)
    for (const bool training : {false, true}) expect_layer_matches_one_rank<double>(lm_case(kind, moe, training), 1e-12);
  // float: the dense gradients are sums over every rank's tokens taken in another order than one
  // rank's, through two attention + MoE blocks; up to 4e-6 at W = 5 (double above: 1e-12).
  expect_layer_matches_one_rank<float>(lm_case("sigma_moe", kinds[0].second, true, true), 1e-5);
}
