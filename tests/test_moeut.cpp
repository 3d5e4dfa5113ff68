#include "kmoe/core/memory_pool.hpp"
#include "kmoe/layers/moeut.hpp"
#include "kmoe/model/builder.hpp"
#include "test_util.hpp"

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>

using namespace kmoe;
using namespace kmoe::test;
using layers::MoEUT;
using layers::MoEUTConfig;
using layers::MoEUTLM;

namespace {

// (state_dict name, tensor) pairs of the registry, parameters or gradients.
template <class Model>
auto named_parameters(Model& model) {
  std::vector<std::pair<std::string, Tensor<typename Model::value_type>*>> named;
  for (auto& p : model::collect_parameters(model)) named.emplace_back(p.name, p.tensor);
  return named;
}
template <class Model>
auto named_gradients(Model& model) {
  std::vector<std::pair<std::string, Tensor<typename Model::value_type>*>> named;
  for (auto& p : model::collect_parameters(model)) named.emplace_back(p.name, p.grad);
  return named;
}


MoEUTConfig tiny_config(int att_experts) {
  MoEUTConfig c;
  c.n_tokens = 11;
  c.d_model = 8;
  c.n_layers = 4;
  c.group_size = 2;
  c.n_heads = 2;
  c.d_head = 4;
  c.att_n_experts = att_experts;
  c.att_k = att_experts > 1 ? 2 : 1;
  c.ff_n_experts = 5;
  c.ff_k = 2;
  c.ff_expert_size = 3;
  return c;
}

// Parameters drawn wider than the init so that routers separate their choices clearly.
template <class T>
void randomise(std::vector<std::pair<std::string, Tensor<T>*>> named, std::uint64_t seed) {
  for (auto& [name, tensor] : named) {
    const bool norm_weight = name.find("ln") != std::string::npos || name.find("norm") != std::string::npos;
    auto v = random_values(tensor->size(), seed++, -0.6, 0.6);
    if (norm_weight && name.find("weight") != std::string::npos)
      for (auto& x : v) x += 1;
    tensor->copy_from_host(cast_vector<T>(v));
  }
}

// Entries of each tensor the whole-model finite-difference checks probe (keeps them fast).
constexpr std::size_t fd_probes = 4;

// Smaller still, for the finite-difference checks (every parameter is probed).
MoEUTConfig fd_config(int att_experts) {
  MoEUTConfig c = tiny_config(att_experts);
  c.d_model = 6;
  c.ff_n_experts = 4;
  c.ff_expert_size = 2;
  return c;
}

}  // namespace

TEST(MoEUTProfiles, ParameterCountsMatchThePublishedModels) {
  // Per shared layer (the profiles of RobertCsordas/moeut@87f04973d3db3ad7cb4ca67a0750241e40210d3c
  // profiles.py, counted from moeut/moeut.py's modules) and totals with an 8000-token vocabulary,
  // in millions.
  // Totals as published to 0.01M, or 0.1M where given so (581.9, 1040.3).
  const std::map<std::string, std::pair<index_t, double>> published = {
      {"MoEUT_44M", {18872484, 44.35}},     {"MoEUT_126M", {56686080, 125.67}},
      {"MoEUT_244M", {113466368, 243.33}},  {"MoEUT_318M", {100571136, 318.11}},
      {"MoEUT_727M", {141386752, 581.9}},   {"MoEUT_727M_paper", {0, 727.42}},
      {"MoEUT_1B", {253933056, 1040.3}}};
  const auto tolerance = [](double m) { return m == 581.9 || m == 1040.3 ? 0.05 : 0.005; };
  for (const std::string& name : layers::moeut_profile_names()) {
    const MoEUTConfig c = layers::moeut_profile(name, 8000);
    c.validate();
    const auto [per_layer, total_m] = published.at(name);
    if (per_layer > 0) EXPECT_EQ(layers::moeut_parameter_count(c, false), c.group_size * per_layer) << name;
    const double total = static_cast<double>(layers::moeut_parameter_count(c, true)) / 1e6;
    EXPECT_NEAR(total, total_m, tolerance(total_m)) << name;
  }
  EXPECT_EQ(layers::moeut_profile("MoEUT_44M", 8000).attention_config().rotary_dims(), 40);  // odd 41 → 40
  EXPECT_EQ(layers::moeut_profile("MoEUT_727M_paper", 8000).d_model, 1280);
  expect_status([] { layers::moeut_profile("MoEUT_2B", 8000); }, Status::invalid_argument, "MoEUT_44M");
}

TEST(MoEUTProfiles, SmallestProfileConstructsWithItsCount) {
  MoEUTLM<float> model(layers::moeut_profile("MoEUT_44M", 8000), 1);
  EXPECT_EQ(model.parameter_count(), layers::moeut_parameter_count(model.config(), true));
  EXPECT_EQ(model.parameter_count(), 44345792);
}

// Every profile built for real (parameters and gradients: up to 8.3 GB for MoEUT_1B, about 100 s
// on 2 cores in all): the tensors it allocates add up to the count the previous test checks
// against the published numbers.
TEST(MoEUTProfiles, EveryProfileConstructsWithItsCount) {
  for (const std::string& name : layers::moeut_profile_names()) {
    {
      MoEUTLM<float> model(layers::moeut_profile(name, 8000), 1);
      EXPECT_EQ(model.parameter_count(), layers::moeut_parameter_count(model.config(), true)) << name;
    }
    release_memory_pool();  // the next profile allocates afresh rather than beside a cache of this one
  }
}

TEST(MoEUT, ConfigErrorsAreNamed) {
  MoEUTConfig c = tiny_config(3);
  c.n_layers = 5;
  expect_status([&] { MoEUT<float> m(c, 1); }, Status::invalid_argument, "group_size");
  c = tiny_config(3);
  c.ff_k = 6;
  expect_status([&] { MoEUT<float> m(c, 1); }, Status::invalid_argument, "k = 6");
  c = tiny_config(3);
  c.n_tokens = 0;
  expect_status([&] { MoEUTLM<float> m(c, 1); }, Status::invalid_argument, "n_tokens");
  MoEUT<float> model(tiny_config(3), 1);
  Generator rng(1);
  expect_status([&] { model.forward(Tensor<float>("x", {2, 3, 7}), {}, false, rng); }, Status::shape_mismatch,
                "d_model");
}

TEST(MoEUT, NamesFollowTheStateDict) {
  MoEUTLM<float> lm(tiny_config(3), 1);
  std::vector<std::string> names;
  for (auto& item : named_parameters(lm)) names.push_back(item.first);
  EXPECT_EQ(names.front(), "embedding.weight");
  EXPECT_NE(std::find(names.begin(), names.end(), "transformer.layers.1.attention.sel_v"), names.end());
  EXPECT_NE(std::find(names.begin(), names.end(), "transformer.layers.0.ffn.expert_sel"), names.end());
  EXPECT_NE(std::find(names.begin(), names.end(), "lm_head.bias"), names.end());
  EXPECT_EQ(lm.parameter_count(), layers::moeut_parameter_count(lm.config(), true));
  MoEUTLM<float> plain(tiny_config(1), 1);
  EXPECT_EQ(plain.parameter_count(), layers::moeut_parameter_count(plain.config(), true));
}

// A two-distinct-layer MoEUT (group_size 2, repeated twice: shared weights) in double against
// central differences of L = Σ out·R + reg_loss, training mode (regulariser on).
TEST(MoEUT, BackwardMatchesFiniteDifferences) {
  for (int att_experts : {3, 1}) {
    const MoEUTConfig c = fd_config(att_experts);
    MoEUT<double> model(c, 3);
    randomise(named_parameters(model), 100);
    const index_t B = 2, T = 3;
    auto x = make_tensor<double>({B, T, c.d_model}, random_values(B * T * c.d_model, 5, -1, 1));
    ops::AttentionMask mask;
    mask.causal = true;
    Generator rng(1);
    const auto f0 = model.forward(x, mask, true, rng);
    EXPECT_NE(f0.reg_loss, 0.0);
    const auto r = random_values(f0.out.size(), 6);
    const auto loss = [&]() {
      const auto f = model.forward(x, mask, true, rng);
      return dot(to_double(f.out), r) + f.reg_loss;
    };
    model.zero_grad();
    const auto dx = to_double(model.backward(f0, make_tensor<double>(f0.out.shape(), r), 1.0));
    const auto check = [&](Tensor<double>& target, const std::vector<double>& analytic, const std::string& name) {
      const auto x0 = to_double(target);
      const auto fn = [&](const std::vector<double>& p) {
        target.copy_from_host(p);
        return loss();
      };
      EXPECT_LT(sampled_fd_error(x0, fn, analytic, fd_probes), fd_tolerance) << name << " att_experts " << att_experts;
      target.copy_from_host(x0);
    };
    check(x, dx, "x");
    auto params = named_parameters(model);
    auto grads = named_gradients(model);
    for (std::size_t i = 0; i < params.size(); ++i) {
      check(*params[i].second, to_double(*grads[i].second), params[i].first);
    }
  }
}

TEST(MoEUT, LanguageModelBackwardMatchesFiniteDifferences) {
  const MoEUTConfig c = tiny_config(3);
  MoEUTLM<double> model(c, 4);
  randomise(named_parameters(model), 200);
  const auto tokens = Tensor<int>::from_host("tokens", {2, 3}, {1, 5, 10, 0, 7, 3});
  Generator rng(1);
  const auto f0 = model.forward(tokens, std::nullopt, true, rng);
  const auto r = random_values(f0.logits.size(), 7);
  model.zero_grad();
  model.backward(f0, make_tensor<double>(f0.logits.shape(), r), 1.0);
  const auto loss = [&]() {
    const auto f = model.forward(tokens, std::nullopt, true, rng);
    return dot(to_double(f.logits), r) + f.reg_loss;
  };
  auto params = named_parameters(model);
  auto grads = named_gradients(model);
  for (std::size_t i = 0; i < params.size(); ++i) {
    const std::string& name = params[i].first;
    if (name.find("transformer.") == 0 && name.find("ln1") == std::string::npos) continue;  // covered above
    Tensor<double>& target = *params[i].second;
    const auto x0 = to_double(target);
    const auto fn = [&](const std::vector<double>& p) {
      target.copy_from_host(p);
      return loss();
    };
    EXPECT_LT(sampled_fd_error(x0, fn, to_double(*grads[i].second), fd_probes), fd_tolerance) << name;
    target.copy_from_host(x0);
  }
}

TEST(MoEUT, CachedDecodingEqualsFullSequence) {
  for (int att_experts : {3, 1}) {
    MoEUTLM<double> model(tiny_config(att_experts), 5);
    randomise(named_parameters(model), 300);
    const index_t B = 2, T = 9;
    std::vector<int> ids(B * T);
    for (index_t i = 0; i < B * T; ++i) ids[i] = static_cast<int>((i * 7 + 3) % 11);
    Generator rng(1);
    const auto full = to_double(model.forward(Tensor<int>::from_host("t", {B, T}, ids), std::nullopt, false, rng).logits);
    layers::MoEUTCache<double> cache;
    index_t start = 0;
    const index_t V = model.config().n_tokens;
    std::vector<double> chunked(full.size());
    for (index_t len : {4, 1, 3, 1}) {
      std::vector<int> chunk;
      for (index_t b = 0; b < B; ++b) chunk.insert(chunk.end(), ids.begin() + b * T + start, ids.begin() + b * T + start + len);
      const auto f = model.forward(Tensor<int>::from_host("c", {B, len}, chunk), std::nullopt, false, rng, &cache);
      const auto logits = to_double(f.logits);
      for (index_t b = 0; b < B; ++b)
        std::copy(logits.begin() + b * len * V, logits.begin() + (b + 1) * len * V, chunked.begin() + (b * T + start) * V);
      start += len;
      EXPECT_EQ(cache.length(), start);
      EXPECT_TRUE(f.body.calls.empty()) << "a decoding forward kept " << f.body.calls.size() << " layer records";
    }
    EXPECT_LT(max_rel_error(chunked, full), 1e-12) << att_experts;
  }
}

// An eval forward not kept for backward (an inference runner's, Layer::infer's) gives the same
// logits bitwise and keeps no layer records; backward refuses it.
TEST(MoEUT, InferenceForwardKeepsNoRecordsAndRefusesBackward) {
  MoEUTLM<double> model(tiny_config(3), 5);
  randomise(named_parameters(model), 310);
  const index_t B = 2, T = 6;
  std::vector<int> ids(B * T);
  for (index_t i = 0; i < B * T; ++i) ids[i] = static_cast<int>((i * 5 + 1) % 11);
  const auto tokens = Tensor<int>::from_host("t", {B, T}, ids);
  Generator rng(1);
  const auto kept = model.forward(tokens, std::nullopt, false, rng);
  const auto inferred = model.forward(tokens, std::nullopt, false, rng, nullptr, /*for_backward=*/false);
  EXPECT_EQ(to_double(inferred.logits), to_double(kept.logits));
  EXPECT_EQ(kept.body.calls.size(), 4u);
  EXPECT_TRUE(inferred.body.calls.empty()) << "an inference forward kept " << inferred.body.calls.size() << " records";
  expect_status([&] { model.backward(inferred, Tensor<double>("d", inferred.logits.shape()), 1.0); },
                Status::invalid_argument, "kept no records");
  // Training keeps them whatever is asked (the regulariser reads them).
  EXPECT_EQ(model.forward(tokens, std::nullopt, true, rng, nullptr, false).body.calls.size(), 4u);

  const auto layer = model::build_layer<double>("moeut_lm", nlohmann::json::parse(R"({"n_tokens": 11, "d_model": 8,
      "n_layers": 4, "group_size": 2, "n_heads": 2, "d_head": 4, "att_n_experts": 3, "att_k": 2, "ff_n_experts": 5,
      "ff_k": 2, "ff_expert_size": 3})"), 7);
  model::LayerInputs<double> in;
  in.tokens = tokens;
  EXPECT_EQ(to_double(layer->infer(in, rng)), to_double(layer->forward(in, false, rng).out));
}

TEST(MoEUT, GreedyGenerateMatchesFullSequenceArgmax) {
  MoEUTLM<double> model(tiny_config(3), 6);
  randomise(named_parameters(model), 400);
  const index_t B = 2, T0 = 3;
  const int n_new = 4;
  const auto generated = model.generate(Tensor<int>::from_host("p", {B, T0}, {1, 2, 3, 4, 5, 6}), n_new).to_host();
  ASSERT_EQ(generated.size(), static_cast<std::size_t>(B * (T0 + n_new)));
  // Re-run the full sequence without a cache: every generated token is the argmax at its position.
  Generator rng(1);
  const auto logits = to_double(
      model.forward(Tensor<int>::from_host("g", {B, T0 + n_new}, generated), std::nullopt, false, rng).logits);
  const index_t V = model.config().n_tokens, L = T0 + n_new;
  for (index_t b = 0; b < B; ++b)
    for (index_t t = T0; t < L; ++t) {
      const double* row = &logits[(b * L + t - 1) * V];
      EXPECT_EQ(std::max_element(row, row + V) - row, generated[b * L + t]) << b << " " << t;
    }
}

TEST(MoEUT, MaskAbsentAttendsEverywhereAndRegulariserOnlyInTraining) {
  MoEUT<double> model(tiny_config(3), 7);
  randomise(named_parameters(model), 500);
  const auto x = make_tensor<double>({2, 4, 8}, random_values(64, 8));
  Generator rng(1);
  ops::AttentionMask none, causal;
  causal.causal = true;
  const auto open = model.forward(x, none, false, rng);  // AttentionMask(None, None): no crash, no masking
  const auto masked = model.forward(x, causal, false, rng);
  EXPECT_GT(max_rel_error(to_double(open.out), to_double(masked.out)), 1e-6);
  EXPECT_EQ(masked.reg_loss, 0.0);
  EXPECT_LT(model.forward(x, causal, true, rng).reg_loss, 0.0);  // negative entropies
  // float agrees with double.
  MoEUT<float> model_f(tiny_config(3), 7);
  auto pf = named_parameters(model_f);
  auto pd = named_parameters(model);
  for (std::size_t i = 0; i < pf.size(); ++i) pf[i].second->copy_from_host(cast_vector<float>(to_double(*pd[i].second)));
  const auto xf = make_tensor<float>({2, 4, 8}, random_values(64, 8));
  EXPECT_LT(max_rel_error(to_double(model_f.forward(xf, causal, false, rng).out), to_double(masked.out)), 1e-5);
}

TEST(MoEUT, InitialisationScalesWithDepth) {
  MoEUTConfig c = tiny_config(3);
  c.d_model = 64;
  c.n_layers = 8;  // s = √(2/8) = 0.5
  c.ff_n_experts = 8;
  c.ff_expert_size = 32;
  c.d_head = 16;
  c.n_tokens = 500;
  MoEUTLM<double> model(c, 21);
  const auto stddev = [](const Tensor<double>& t) {
    const auto v = to_double(t);
    double mean = 0, s = 0;
    for (double x : v) mean += x / v.size();
    for (double x : v) s += (x - mean) * (x - mean);
    return std::sqrt(s / (v.size() - 1));
  };
  std::map<std::string, Tensor<double>*> p;
  for (auto& item : named_parameters(model)) p[item.first] = item.second;
  EXPECT_NEAR(stddev(*p["transformer.layers.0.ffn.keys"]), 0.5 / 8, 0.002);
  EXPECT_NEAR(stddev(*p["transformer.layers.1.ffn.values"]), 0.5 / 16, 0.001);  // s/√(E·es)
  EXPECT_NEAR(stddev(*p["transformer.layers.0.attention.q.weight"]), 0.5 / 8, 0.004);
  EXPECT_NEAR(stddev(*p["transformer.layers.1.attention.o"]), 0.5 / std::sqrt(32.0), 0.004);  // s/√(H·P)
  EXPECT_NEAR(stddev(*p["embedding.weight"]), 1 / 8.0, 0.003);
  EXPECT_NEAR(stddev(*p["lm_head.weight"]), 1 / 8.0 / std::sqrt(3.0), 0.003);  // U(±1/√D)
  EXPECT_EQ(to_double(*p["out_norm.weight"]), std::vector<double>(64, 1.0));
  EXPECT_EQ(to_double(*p["transformer.layers.1.ln2.bias"]), std::vector<double>(64, 0.0));
  // Same seed, same parameters; another seed differs.
  MoEUTLM<double> again(c, 21), other(c, 22);
  EXPECT_EQ(to_double(named_parameters(again)[5].second[0]), to_double(*named_parameters(model)[5].second));
  EXPECT_NE(to_double(named_parameters(other)[5].second[0]), to_double(*named_parameters(model)[5].second));
}

// Dropout on the attention output and attention expert dropout: the draws are replayed from the
// same seed, so the loss is a deterministic function of the parameters.
TEST(MoEUT, BackwardWithDropoutMatchesFiniteDifferences) {
  MoEUTConfig c = fd_config(3);
  c.dropout = 0.25;
  c.att_expert_dropout = 0.3;
  MoEUT<double> model(c, 8);
  randomise(named_parameters(model), 600);
  auto x = make_tensor<double>({2, 3, c.d_model}, random_values(2 * 3 * c.d_model, 9, -1, 1));
  ops::AttentionMask mask;
  mask.causal = true;
  const auto forward = [&] {
    Generator rng(77);
    return model.forward(x, mask, true, rng);
  };
  const auto f0 = forward();
  const auto r = random_values(f0.out.size(), 10);
  model.zero_grad();
  const auto dx = to_double(model.backward(f0, make_tensor<double>(f0.out.shape(), r), 1.0));
  const auto loss = [&]() {
    const auto f = forward();
    return dot(to_double(f.out), r) + f.reg_loss;
  };
  const auto check = [&](Tensor<double>& target, const std::vector<double>& analytic, const std::string& name) {
    const auto x0 = to_double(target);
    const auto fn = [&](const std::vector<double>& p) {
      target.copy_from_host(p);
      return loss();
    };
    EXPECT_LT(sampled_fd_error(x0, fn, analytic, fd_probes), fd_tolerance) << name;
    target.copy_from_host(x0);
  };
  check(x, dx, "x");
  auto params = named_parameters(model);
  auto grads = named_gradients(model);
  for (std::size_t i = 0; i < params.size(); ++i) check(*params[i].second, to_double(*grads[i].second), params[i].first);
  // The dropout is active: without it the output differs.
  c.dropout = 0;
  c.att_expert_dropout = 0;
  MoEUT<double> plain(c, 8);
  auto pp = named_parameters(plain);
  for (std::size_t i = 0; i < pp.size(); ++i) pp[i].second->copy_from_host(to_double(*params[i].second));
  Generator rng(77);
  EXPECT_GT(max_rel_error(to_double(plain.forward(x, mask, true, rng).out), to_double(f0.out)), 1e-3);
}
