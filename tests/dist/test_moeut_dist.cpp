// MoEUT and MoEUTLM over MPI ranks: the σ-MoE FFN experts placed over the ranks, attention and
// everything dense on every rank, each rank bringing an uneven share of the sequences. Outputs,
// input gradients, the losses and every parameter gradient equal a one-rank layer on the whole
// batch, in training (dropout, keyed by the global batch) and in eval.
#include "kmoe/dist/communicator.hpp"
#include "kmoe/dist/gradients.hpp"
#include "kmoe/dist/parameter_blocks.hpp"
#include "kmoe/model/builder.hpp"
#include "dist/dist_util.hpp"
#include "test_util.hpp"

#include <gtest/gtest.h>

#include <cmath>

using namespace kmoe;
using namespace kmoe::test;

namespace {

void matches_one_rank(const std::string& kind, bool training, bool idle_rank = false) {
  const std::string config = kind == "moeut"
                                 ? R"({"d_model": 16, "n_layers": 2, "n_heads": 2, "ff_n_experts": 5, "att_n_experts": 2,
                                      "ff_k": 2, "att_k": 1, "ff_expert_size": 8, "dropout": 0.1})"
                                 : R"({"n_tokens": 20, "d_model": 16, "n_layers": 2, "n_heads": 2, "ff_n_experts": 5,
                                      "att_n_experts": 2, "ff_k": 2, "att_k": 1, "ff_expert_size": 8, "dropout": 0.1})";
  const bool lm = kind == "moeut_lm";
  // idle_rank: fewer sequences than ranks, so the last rank brings none.
  const index_t W = world().size(), rank = world().rank(), B = idle_rank && W > 1 ? W - 1 : W + 2, T = 4, D = 16;
  const index_t base = B / W, extra = B % W, first = rank * base + std::min(rank, extra), count = base + (rank < extra);
  const index_t row = lm ? T : T * D;
  const auto whole_input = [&](model::LayerInputs<float>& in, index_t from, index_t n) {
    if (lm) {
      const std::vector<int> all = random_index(static_cast<std::size_t>(B * T), 20, 5);
      in.tokens = Tensor<int>::from_host("tokens", {n, T}, std::vector<int>(all.begin() + from * row, all.begin() + (from + n) * row));
    } else {
      const std::vector<double> all = random_values(static_cast<std::size_t>(B * T * D), 5);
      in.x = make_tensor<float>({n, T, D}, std::vector<double>(all.begin() + from * row, all.begin() + (from + n) * row));
    }
  };
  const index_t out_row = lm ? T * 20 : T * D;
  const std::vector<double> dout_all = random_values(static_cast<std::size_t>(B * out_row), 6);
  const auto dout = [&](index_t from, index_t n) {
    std::vector<index_t> dims = {n, T, lm ? 20 : D};
    return make_tensor<float>(Shape(dims), std::vector<double>(dout_all.begin() + from * out_row,
                                                                dout_all.begin() + (from + n) * out_row));
  };

  const auto reference = model::build_layer<float>(kind, config, 3);
  model::LayerInputs<float> all_in;
  whole_input(all_in, 0, B);
  Generator ref_rng(8);
  const auto rf = reference->forward(all_in, training, ref_rng);
  const Tensor<float> ref_dx = reference->backward(rf, dout(0, B), 0.2f);

  const auto layer = model::build_layer<float>(kind, config, 3, ParameterInit::drawn, world());
  model::LayerInputs<float> in;
  whole_input(in, first, count);
  Generator rng(8);
  const auto f = layer->forward(in, training, rng);
  const Tensor<float> dx = layer->backward(f, dout(first, count), 0.2f);
  dist::all_reduce_dense_gradients(world(), layer->parameters());

  const std::string where = kind + (training ? " train" : " eval") + (idle_rank ? " idle rank" : "") + " W " +
                            std::to_string(W) + " rank " + std::to_string(rank);
  const std::vector<float> out_all = rf.out.to_host();
  EXPECT_LE(rel_l2(f.out.to_host(), std::vector<float>(out_all.begin() + first * out_row,
                                                        out_all.begin() + (first + count) * out_row)),
            1e-5)
      << where << ": out";
  if (!lm) {
    const std::vector<float> dx_all = ref_dx.to_host();
    EXPECT_LE(rel_l2(dx.to_host(), std::vector<float>(dx_all.begin() + first * row, dx_all.begin() + (first + count) * row)),
              1e-5)
        << where << ": dx";
  }
  for (const auto& [name, value] : rf.losses)
    EXPECT_NEAR(f.losses.at(name), value, 1e-5 * std::max(1.0, std::abs(value))) << where << ": " << name;
  const auto mine = layer->parameters(), want = reference->parameters();
  ASSERT_EQ(mine.size(), want.size());
  for (std::size_t i = 0; i < mine.size(); ++i) {
    if (mine[i].grad == nullptr) continue;
    Tensor<float> expected(mine[i].name, mine[i].grad->shape());
    dist::take_block(mine[i], *want[i].grad, expected);
    EXPECT_LE(rel_l2(mine[i].grad->to_host(), expected.to_host()), 1e-5) << where << ": gradient of " << mine[i].name;
  }
}

}  // namespace

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

