// MoEUT, MoEUTLM and SwitchHead over MPI ranks: the σ-MoE FFN experts and the SwitchHead value /
// output experts placed over the ranks, q, k, the routers and everything dense on every rank,
// each rank bringing an uneven share of the sequences. Outputs, input gradients, the losses and
// every parameter gradient equal a one-rank layer on the whole batch, in training (dropout,
// keyed by the global batch) and in eval.
#include "kmoe/dist/communicator.hpp"
#include "kmoe/model/builder.hpp"
#include "dist/layer_matches_one_rank.hpp"

#include <gtest/gtest.h>

#include <cmath>

using namespace kmoe;
using namespace kmoe::test;

namespace {

void matches_one_rank(const std::string& kind, bool training, bool idle_rank = false) {
  DistCase c;
  c.kind = kind;
  c.config = kind == "moeut"
                 ? R"({"d_model": 16, "n_layers": 2, "n_heads": 2, "ff_n_experts": 5, "att_n_experts": 2, "ff_k": 2,
                       "att_k": 1, "ff_expert_size": 8, "dropout": 0.1})"
                 : R"({"n_tokens": 20, "d_model": 16, "n_layers": 2, "n_heads": 2, "ff_n_experts": 5,
                       "att_n_experts": 2, "ff_k": 2, "att_k": 1, "ff_expert_size": 8, "dropout": 0.1})";
  c.sequence = kind == "moeut" ? std::vector<index_t>{4, 16} : std::vector<index_t>{4};
  c.vocabulary = kind == "moeut" ? 0 : 20;
  c.out_width = kind == "moeut" ? 0 : 20;
  c.training = training;
  c.idle_rank = idle_rank;
  expect_layer_matches_one_rank<float>(c, 1e-5);
}

}  // namespace

// SwitchHead alone: its H·Ea value and output experts placed (W > 6: shards of the head channels).
TEST(SwitchHeadDist, MatchesOneRank) {
  DistCase c;
  c.kind = "switchhead";
  c.config = R"({"state_size": 16, "n_heads": 2, "n_experts": 3, "moe_k": 2, "expert_dropout": 0.2})";
  c.sequence = {5, 16};
  for (const bool training : {false, true}) {
    c.training = training;
    expect_layer_matches_one_rank<double>(c, 1e-12);
  }
  c.idle_rank = true;
  expect_layer_matches_one_rank<double>(c, 1e-12);
}

TEST(MoEUTDist, MatchesOneRank) {
  for (const bool training : {false, true}) matches_one_rank("moeut", training);
  matches_one_rank("moeut", true, true);
}

TEST(MoEUTDist, LanguageModelMatchesOneRank) {
  for (const bool training : {false, true}) matches_one_rank("moeut_lm", training);
  matches_one_rank("moeut_lm", true, true);
}

// A config that differs between ranks in a part no FFN sees (the attention heads) is refused on
// every rank.
TEST(MoEUTDist, ConfigThatDiffersBetweenRanksIsAnErrorOnEveryRank) {
  if (world().size() == 1) GTEST_SKIP() << "needs two ranks";
  const std::string heads = world().rank() == 1 ? "4" : "2";
  const std::string config = R"({"d_model": 16, "n_layers": 2, "n_heads": )" + heads +
                             R"(, "ff_n_experts": 4, "att_n_experts": 2, "ff_k": 2, "att_k": 1, "ff_expert_size": 8})";
  try {
    (void)model::build_layer<float>("moeut", config, 3, ParameterInit::drawn, world());
    ADD_FAILURE() << "rank " << world().rank() << ": configs differing between ranks were accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::invalid_argument) << e.what();
    EXPECT_NE(std::string(e.what()).find("the MoEUT config or seed differs between the ranks"), std::string::npos)
        << e.what();
  }
}

