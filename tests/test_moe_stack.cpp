// moe_stack (model/moe_stack.hpp): the input gradient and every parameter gradient against central
// finite differences in double for each MoE kind it takes (loss Σ y ⊙ R + aux_weight · aux_loss;
// ST-MoE without its straight-through dispatch, whose gradient is by design not the forward's),
// a checkpoint round trip through the registry, and its config errors. Also the expert counts
// that layers report (LayerForward::expert_counts, counted on the device) against the routing.
#include "kmoe/io/checkpoint.hpp"
#include "kmoe/layers/moeut.hpp"
#include "kmoe/layers/sigma_moe.hpp"
#include "kmoe/layers/st_moe.hpp"
#include "kmoe/model/builder.hpp"
#include "test_util.hpp"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>

using namespace kmoe;
using namespace kmoe::test;

namespace {

std::string stack_config(const std::string& kind, const std::string& moe) {
  return R"({"d_in": 3, "d_out": 2, "d_model": 6, "n_blocks": 2, "moe_kind": ")" + kind + R"(", "moe": )" + moe + "}";
}

const std::vector<std::pair<std::string, std::string>>& kinds() {
  static const std::vector<std::pair<std::string, std::string>> all = {
      {"sigma_moe", R"({"n_experts": 4, "expert_size": 5, "k": 2})"},
      {"st_moe", R"({"num_experts": 3, "expert_hidden_mult": 2, "straight_through_dispatch_tensor": false})"},
      {"soft_moe_lite", R"({"num_experts": 3, "num_slots": 2})"},
  };
  return all;
}

constexpr index_t rows = 7;
constexpr double aux_weight = 0.3;

// L = Σ y ⊙ R + aux_weight · aux_loss of the layer on x (eval: deterministic routing).
double loss_of(model::Layer<double>& layer, const std::vector<double>& x, const std::vector<double>& r) {
  model::LayerInputs<double> in;
  in.x = make_tensor<double>({rows, 3}, x);
  Generator rng(2);
  const auto f = layer.forward(in, false, rng);
  return dot(to_double(f.out), r) + aux_weight * f.aux_loss;
}

}  // namespace

TEST(MoEStack, GradientsMatchFiniteDifferencesForEveryMoEKind) {
  for (const auto& [kind, moe] : kinds()) {
    // Seed 6: no finite-difference probe crosses a ReLU kink of Soft MoE lite's experts.
    auto layer = model::build_layer<double>("moe_stack", stack_config(kind, moe), 6);
    const std::vector<double> x = random_values(rows * 3, 11), r = random_values(rows * 2, 12);
    model::LayerInputs<double> in;
    in.x = make_tensor<double>({rows, 3}, x);
    Generator rng(2);
    const auto f = layer->forward(in, false, rng);
    ASSERT_EQ(f.out.shape(), (Shape{rows, 2})) << kind;
    layer->zero_grad();
    const Tensor<double> dx = layer->backward(f, make_tensor<double>({rows, 2}, r), aux_weight);
    EXPECT_LE(finite_difference_error(x, [&](const std::vector<double>& probe) { return loss_of(*layer, probe, r); },
                                      to_double(dx)),
              1e-6)
        << kind << ": dx";
    expect_parameter_gradients(*layer, [&] { return loss_of(*layer, x, r); }, 1e-6, kind);
  }
}

// infer (kmoe-infer's forward: no records kept) gives the eval forward's y, bitwise.
TEST(MoEStack, InferEqualsTheEvalForwardForEveryMoEKind) {
  for (const auto& [kind, moe] : kinds()) {
    auto layer = model::build_layer<float>("moe_stack", stack_config(kind, moe), 9);
    model::LayerInputs<float> in;
    in.x = make_tensor<float>({rows, 3}, random_values(rows * 3, 13));
    Generator rng(2);
    EXPECT_EQ(layer->infer(in, rng).to_host(), layer->forward(in, false, rng).out.to_host()) << kind;
  }
}

TEST(MoEStack, RoundTripsThroughACheckpoint) {
  const std::string path =
      (std::filesystem::temp_directory_path() / ("kmoe_moe_stack_" + std::to_string(::getpid()) + ".h5")).string();
  auto layer = model::build_layer<float>("moe_stack", stack_config("sigma_moe", kinds()[0].second), 8);
  io::save_checkpoint(path, *layer);
  const auto loaded = io::load_layer<float>(path);
  EXPECT_EQ(loaded->config(), layer->config());
  const auto a = model::trainable(layer->parameters()), b = model::trainable(loaded->parameters());
  ASSERT_EQ(a.size(), b.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].name, b[i].name);
    EXPECT_EQ(a[i].tensor->to_host(), b[i].tensor->to_host()) << a[i].name;
  }
  std::filesystem::remove(path);
}

TEST(MoEStack, BadConfigsAndInputsNameTheProblem) {
  expect_status([] { (void)model::build_layer<float>("moe_stack", stack_config("moeut", "{}"), 1); },
                Status::invalid_argument, "moe_kind");
  expect_status([] { (void)model::build_layer<float>("moe_stack", std::string(R"({"d_in": 3, "d_out": 2})"), 1); },
                Status::invalid_argument, "d_model");
  expect_status(
      [] {
        (void)model::build_layer<float>(
            "moe_stack", stack_config("sigma_moe", R"({"dmodel": 5, "n_experts": 4, "expert_size": 5, "k": 2})"), 1);
      },
      Status::invalid_argument, "d_model = 6");
  auto layer = model::build_layer<float>("moe_stack", stack_config("sigma_moe", kinds()[0].second), 1);
  model::LayerInputs<float> in;
  in.x = Tensor<float>("x", {4, 5});
  Generator rng(0);
  expect_status([&] { (void)layer->forward(in, false, rng); }, Status::shape_mismatch, "d_in = 3");
}

namespace {
// The histogram of expert ids (−1 ignored) over n experts, on the host.
std::vector<std::int64_t> histogram(const Tensor<int>& expert_index, index_t n) {
  std::vector<std::int64_t> counts(static_cast<std::size_t>(n), 0);
  for (const int e : expert_index.to_host())
    if (e >= 0) ++counts.at(static_cast<std::size_t>(e));
  return counts;
}
}  // namespace

TEST(ExpertCounts, AreTheRoutingsHistogramAndSumOverAStacksBlocks) {
  const index_t tokens = 200;
  model::LayerInputs<float> in;
  in.x = make_tensor<float>({tokens, 6}, random_values(tokens * 6, 21));
  Generator rng(3);
  const auto sigma = model::build_layer<float>("sigma_moe", std::string(R"({"dmodel": 6, "n_experts": 5, "expert_size": 4, "k": 2})"), 4);
  const auto fs = sigma->forward(in, true, rng);
  const auto& routed = fs.state_as<layers::SigmaMoEForward<float>>().expert_index;
  EXPECT_EQ(fs.expert_counts.to_host(), histogram(routed, 5)) << "sigma_moe";
  // ST-MoE with a capacity small enough to drop choices (−1 in expert_index, not counted).
  const auto st = model::build_layer<float>(
      "st_moe", std::string(R"({"dim": 6, "num_experts": 4, "expert_hidden_mult": 2, "capacity_factor_train": 0.5})"), 4);
  model::LayerInputs<float> sequences;  // ST-MoE takes [batch, n, dim]
  sequences.x = in.x.reshape({4, tokens / 4, 6});
  const auto ft = st->forward(sequences, true, rng);
  const auto& kept = ft.state_as<layers::StMoEForward<float>>().gate.routing.expert_index;
  const std::vector<std::int64_t> kept_counts = histogram(kept, 4);
  EXPECT_EQ(ft.expert_counts.to_host(), kept_counts) << "st_moe";
  std::int64_t kept_total = 0;
  for (const std::int64_t c : kept_counts) kept_total += c;
  EXPECT_LT(kept_total, 2 * tokens) << "the capacity drops no choice: the test does not cover dropped ones";
  // MoEUT's are its feed-forward calls' summed (one a layer).
  const auto moeut = model::build_layer<float>(
      "moeut", std::string(R"({"d_model": 32, "n_layers": 2, "n_heads": 2, "ff_n_experts": 8, "att_n_experts": 3,
                               "ff_k": 2, "att_k": 2, "ff_expert_size": 16})"),
      4);
  model::LayerInputs<float> states;
  states.x = make_tensor<float>({3, 12, 32}, random_values(3 * 12 * 32, 22));
  const auto fu = moeut->forward(states, true, rng);
  const auto& calls = fu.state_as<layers::MoEUTForward<float>>().calls;
  ASSERT_EQ(calls.size(), 2u);
  std::vector<std::int64_t> per_call_sum(8, 0);
  for (const auto& call : calls) {
    const std::vector<std::int64_t> one = histogram(call.ffn.expert_index, 8);
    for (std::size_t e = 0; e < one.size(); ++e) per_call_sum[e] += one[e];
  }
  EXPECT_EQ(fu.expert_counts.to_host(), per_call_sum) << "moeut";
  // A stack's counts are its blocks' summed: every token's k choices in each of 3 blocks.
  const auto stack = model::build_layer<float>(
      "moe_stack", std::string(R"({"d_in": 6, "d_out": 2, "d_model": 6, "n_blocks": 3, "moe_kind": "sigma_moe",
                                   "moe": {"n_experts": 5, "expert_size": 4, "k": 2}})"),
      4);
  const std::vector<std::int64_t> summed = stack->forward(in, false, rng).expert_counts.to_host();
  ASSERT_EQ(summed.size(), 5u);
  std::int64_t total = 0;
  for (const std::int64_t c : summed) total += c;
  EXPECT_EQ(total, 3 * 2 * tokens);
}
