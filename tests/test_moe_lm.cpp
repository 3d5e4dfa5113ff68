// moe_lm (model/moe_lm.hpp): every parameter gradient against central finite differences in
// double for both MoE kinds (loss Σ logits ⊙ R + aux_weight · aux_loss; ST-MoE without its
// straight-through dispatch), causality (a later token never changes an earlier position's
// logits), and its bad inputs.
#include "kmoe/model/builder.hpp"
#include "test_util.hpp"

#include <gtest/gtest.h>

using namespace kmoe;
using namespace kmoe::test;

namespace {

std::string lm_config(const std::string& kind, const std::string& moe) {
  return R"({"n_tokens": 11, "d_model": 8, "n_layers": 2, "n_heads": 2, "max_seq_len": 6, "moe_kind": ")" + kind +
         R"(", "moe": )" + moe + "}";
}

constexpr index_t B = 2, T_len = 5;
constexpr double aux_weight = 0.3;

Tensor<int> tokens_of(const std::vector<int>& ids) { return Tensor<int>::from_host("tokens", {B, T_len}, ids); }

double loss_of(model::Layer<double>& layer, const std::vector<int>& ids, const std::vector<double>& r) {
  model::LayerInputs<double> in;
  in.tokens = tokens_of(ids);
  Generator rng(2);
  const auto f = layer.forward(in, false, rng);
  return dot(to_double(f.out), r) + aux_weight * f.aux_loss;
}

}  // namespace

TEST(MoELM, GradientsMatchFiniteDifferencesForBothMoEKinds) {
  const std::pair<const char*, const char*> kinds[] = {
      {"sigma_moe", R"({"n_experts": 4, "expert_size": 5, "k": 2})"},
      {"st_moe", R"({"num_experts": 3, "expert_hidden_mult": 2, "straight_through_dispatch_tensor": false})"},
  };
  const std::vector<int> ids = random_index(B * T_len, 11, 3);
  const std::vector<double> r = random_values(B * T_len * 11, 4);
  for (const auto& [kind, moe] : kinds) {
    auto layer = model::build_layer<double>("moe_lm", lm_config(kind, moe), 6);
    model::LayerInputs<double> in;
    in.tokens = tokens_of(ids);
    Generator rng(2);
    const auto f = layer->forward(in, false, rng);
    ASSERT_EQ(f.out.shape(), (Shape{B, T_len, 11})) << kind;
    layer->zero_grad();
    EXPECT_TRUE(layer->backward(f, make_tensor<double>({B, T_len, 11}, r), aux_weight).empty());
    expect_parameter_gradients(*layer, [&] { return loss_of(*layer, ids, r); }, 1e-6, kind);
  }
}

TEST(MoELM, IsCausal) {
  auto layer = model::build_layer<double>("moe_lm", lm_config("sigma_moe", R"({"n_experts": 4, "expert_size": 5, "k": 2})"), 6);
  std::vector<int> ids = random_index(B * T_len, 11, 3);
  model::LayerInputs<double> in;
  in.tokens = tokens_of(ids);
  Generator rng(0);
  const std::vector<double> before = to_double(layer->forward(in, false, rng).out);
  ids[T_len - 1] = (ids[T_len - 1] + 1) % 11;  // the last token of sequence 0
  in.tokens = tokens_of(ids);
  const std::vector<double> after = to_double(layer->forward(in, false, rng).out);
  for (index_t t = 0; t + 1 < T_len; ++t)
    for (index_t v = 0; v < 11; ++v) EXPECT_EQ(before[t * 11 + v], after[t * 11 + v]) << "position " << t;
  bool last_changed = false;
  for (index_t v = 0; v < 11; ++v) last_changed |= before[(T_len - 1) * 11 + v] != after[(T_len - 1) * 11 + v];
  EXPECT_TRUE(last_changed);
}

TEST(MoELM, BadInputsNameTheProblem) {
  expect_status([] { (void)model::build_layer<float>("moe_lm", lm_config("soft_moe_lite", "{}"), 1); },
                Status::invalid_argument, "moe_kind");
  auto layer = model::build_layer<float>("moe_lm", lm_config("sigma_moe", R"({"n_experts": 4, "expert_size": 5, "k": 2})"), 1);
  model::LayerInputs<float> in;
  in.tokens = Tensor<int>::from_host("tokens", {1, 7}, std::vector<int>(7, 1));
  Generator rng(0);
  expect_status([&] { (void)layer->forward(in, false, rng); }, Status::shape_mismatch, "max_seq_len = 6");
  in.tokens = Tensor<int>::from_host("tokens", {1, 2}, {1, 11});
  expect_status([&] { (void)layer->forward(in, false, rng); }, Status::invalid_argument, "token id 11");
}
