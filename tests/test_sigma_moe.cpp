#include "kmoe/io/hdf5_reader.hpp"
#include "kmoe/layers/sigma_moe.hpp"
#include "test_util.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <numeric>
#include <tuple>

using namespace kmoe;
using namespace kmoe::test;
using layers::SelectionMode;
using layers::SigmaMoE;
using layers::SigmaMoEConfig;


namespace {

// ---------------------------------------------------------------------------------------------
// Host reference of the original forward in double (MoE.forward, sinkhorn_unnorm and entropy_reg of
// RobertCsordas/moe_layer@c9b9c01c7071fe5c39d1f91ae6f24911fb75adb0
// triton_src/moe_layer/moe_layer_simple.py), dropout-free.

struct HostParams {
  std::vector<double> keys, values, expert_sel, bias, o_bias;
};

template <class T>
HostParams host_params(const layers::SigmaMoEParams<T>& p) {
  const auto get = [](const Tensor<T>& t) { return t.empty() ? std::vector<double>() : to_double(t); };
  return {get(p.keys), get(p.values), get(p.expert_sel), get(p.bias), get(p.o_bias)};
}

template <class T>
void set_params(layers::SigmaMoEParams<T>& p, const HostParams& h) {
  p.keys.copy_from_host(cast_vector<T>(h.keys));
  p.values.copy_from_host(cast_vector<T>(h.values));
  p.expert_sel.copy_from_host(cast_vector<T>(h.expert_sel));
  if (!p.bias.empty()) p.bias.copy_from_host(cast_vector<T>(h.bias));
  if (!p.o_bias.empty()) p.o_bias.copy_from_host(cast_vector<T>(h.o_bias));
}

// Parameters with non-trivial biases and a router spread wide enough for clear top-k margins.
HostParams random_params(const SigmaMoEConfig& c, std::uint64_t seed) {
  const std::size_t E = c.n_experts, D = c.dmodel, es = c.expert_size, Dv = c.value_dim();
  HostParams p{random_values(E * D * es, seed), random_values(E * es * Dv, seed + 1),
               random_values(E * D, seed + 2, -1.5, 1.5), {}, {}};
  if (c.bias) {
    p.bias = random_values(E * es, seed + 3, -0.3, 0.3);
    p.o_bias = random_values(Dv, seed + 4, -0.5, 0.5);
  }
  return p;
}

double host_activation(ops::Activation activation, double v) {
  switch (activation) {
    case ops::Activation::identity: return v;
    case ops::Activation::relu: return v > 0 ? v : 0;
    case ops::Activation::gelu: return 0.5 * v * (1 + std::erf(v / std::sqrt(2.0)));
    case ops::Activation::silu: return v / (1 + std::exp(-v));
    case ops::Activation::sigmoid: return 1 / (1 + std::exp(-v));
  }
  return v;
}

double sigmoid(double v) { return 1 / (1 + std::exp(-v)); }

double logsumexp(const std::vector<double>& v) {
  const double m = *std::max_element(v.begin(), v.end());
  double s = 0;
  for (double e : v) s += std::exp(e - m);
  return m + std::log(s);
}

// sinkhorn_unnorm of the original, literally, on groups of A consecutive rows of z [rows, E].
std::vector<double> reference_sinkhorn(const std::vector<double>& z, index_t rows, index_t E, index_t A, int iters) {
  std::vector<double> out(z.size());
  for (index_t g = 0; g < rows / A; ++g) {
    const auto at = [&](index_t t, index_t e) { return z[(g * A + t) * E + e]; };
    std::vector<double> a(E, 0.0), b(A, 0.0);
    for (int it = 0; it < iters; ++it) {
      for (index_t t = 0; t < A; ++t) {
        std::vector<double> v(E);
        for (index_t e = 0; e < E; ++e) v[e] = at(t, e) - a[e];
        b[t] = std::log(static_cast<double>(A)) - logsumexp(v);
      }
      for (index_t e = 0; e < E; ++e) {
        std::vector<double> v(A);
        for (index_t t = 0; t < A; ++t) v[t] = at(t, e) - b[t];
        a[e] = std::log(static_cast<double>(E)) - logsumexp(v);
      }
    }
    for (index_t t = 0; t < A; ++t)
      for (index_t e = 0; e < E; ++e) out[(g * A + t) * E + e] = std::exp(a[e] + b[t] + at(t, e));
  }
  return out;
}

struct Reference {
  std::vector<double> y, scores, gates;
  std::vector<int> index;  // [tokens, k], descending score (ties: lower expert)
  double reg_loss = 0;
};

Reference reference_forward(const SigmaMoEConfig& c, const HostParams& p, const std::vector<double>& x,
                            index_t rows_per_group, bool training) {
  const index_t D = c.dmodel, E = c.n_experts, es = c.expert_size, Dv = c.value_dim(), N = x.size() / D;
  const int K = c.k;
  Reference r;
  std::vector<double> z(N * E, 0.0);
  for (index_t n = 0; n < N; ++n)
    for (index_t e = 0; e < E; ++e)
      for (index_t d = 0; d < D; ++d) z[n * E + e] += x[n * D + d] * p.expert_sel[e * D + d];
  // Regulariser: log p̄_e = log mean_t softmax(z_t)_e; reg = Σ p̄ log p̄.
  std::vector<double> mean_p(E, 0.0);
  for (index_t n = 0; n < N; ++n) {
    const double lse = logsumexp(std::vector<double>(z.begin() + n * E, z.begin() + (n + 1) * E));
    for (index_t e = 0; e < E; ++e) mean_p[e] += std::exp(z[n * E + e] - lse) / static_cast<double>(N);
  }
  for (double v : mean_p) r.reg_loss += v * std::log(v);

  const bool sinkmoid = c.selection_mode == SelectionMode::sinkmoid;
  if (sinkmoid && training) {
    r.scores = reference_sinkhorn(z, N, E, rows_per_group, c.sinkhorn_n_iters);
  } else {
    r.scores = z;
    if (!c.activation_after_topk || sinkmoid) {
      for (index_t n = 0; n < N; ++n) {
        const double lse = logsumexp(std::vector<double>(z.begin() + n * E, z.begin() + (n + 1) * E));
        for (index_t e = 0; e < E; ++e)
          r.scores[n * E + e] =
              c.selection_mode == SelectionMode::softmax ? std::exp(z[n * E + e] - lse) : sigmoid(z[n * E + e]);
      }
    }
  }
  r.y.assign(N * Dv, 0.0);
  for (index_t n = 0; n < N; ++n) {
    std::vector<int> order(E);
    std::iota(order.begin(), order.end(), 0);
    const double* s = r.scores.data() + n * E;
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return s[a] > s[b]; });
    std::vector<double> gates(K);
    for (int j = 0; j < K; ++j) gates[j] = s[order[j]];
    if (c.activation_after_topk || sinkmoid) {
      std::vector<double> selected(K);
      for (int j = 0; j < K; ++j) selected[j] = z[n * E + order[j]];
      const double lse = logsumexp(selected);
      for (int j = 0; j < K; ++j)
        gates[j] = c.selection_mode == SelectionMode::softmax ? std::exp(selected[j] - lse) : sigmoid(selected[j]);
    }
    for (int j = 0; j < K; ++j) {
      const index_t e = order[j];
      r.index.push_back(order[j]);
      r.gates.push_back(gates[j]);
      for (index_t h = 0; h < es; ++h) {
        double u = c.bias ? p.bias[e * es + h] : 0.0;
        for (index_t d = 0; d < D; ++d) u += x[n * D + d] * p.keys[(e * D + d) * es + h];
        const double a = host_activation(c.activation, u);
        for (index_t v = 0; v < Dv; ++v) r.y[n * Dv + v] += gates[j] * a * p.values[(e * es + h) * Dv + v];
      }
    }
    if (c.bias)
      for (index_t v = 0; v < Dv; ++v) r.y[n * Dv + v] += p.o_bias[v];
  }
  return r;
}

Shape with_last_dim(const Shape& shape, index_t last) {
  auto dims = shape.dims();
  dims.back() = last;
  return Shape(dims);
}

SigmaMoEConfig tiny_config(SelectionMode mode) {
  SigmaMoEConfig c;
  c.dmodel = 5;
  c.n_experts = 4;
  c.expert_size = 3;
  c.k = 2;
  c.selection_mode = mode;
  return c;
}

std::string describe(const SigmaMoEConfig& c, const Shape& x_shape, bool training) {
  return impl::concat(layers::selection_mode_name(c.selection_mode), c.activation_after_topk ? " after-topk" : "",
                      " ", ops::activation_name(c.activation), c.bias ? " bias" : "", " v_dim ", c.value_dim(),
                      " dropout ", c.dropout, " expert_dropout ", c.expert_dropout, training ? " train" : " eval",
                      " x ", x_shape.str());
}

// ---------------------------------------------------------------------------------------------
// Golden fixtures.

// The value of "key" in the fixture's flat JSON config ("null" for None), quotes stripped.
std::string json_field(const std::string& json, const std::string& key) {
  const auto at = json.find("\"" + key + "\":");
  if (at == std::string::npos) {
    ADD_FAILURE() << "config has no field " << key << ": " << json;
    return "";
  }
  auto begin = json.find_first_not_of(' ', at + key.size() + 3);
  auto end = json.find_first_of(",}", begin);
  std::string value = json.substr(begin, end - begin);
  if (!value.empty() && value.front() == '"') value = value.substr(1, value.size() - 2);
  return value;
}

SigmaMoEConfig config_from_json(const std::string& json) {
  SigmaMoEConfig c;
  c.dmodel = std::stoll(json_field(json, "dmodel"));
  c.n_experts = std::stoi(json_field(json, "n_experts"));
  c.expert_size = std::stoll(json_field(json, "expert_size"));
  c.k = std::stoi(json_field(json, "k"));
  c.dropout = std::stod(json_field(json, "dropout"));
  c.selection_mode = layers::parse_selection_mode(json_field(json, "selection_mode"));
  c.activation_after_topk = json_field(json, "activation_after_topk") == "true";
  c.activation = ops::parse_activation(json_field(json, "activation"));
  c.bias = json_field(json, "bias") == "true";
  const std::string v_dim = json_field(json, "v_dim");
  c.v_dim = v_dim == "null" ? 0 : std::stoll(v_dim);
  c.sinkhorn_n_iters = std::stoi(json_field(json, "sinkhorn_n_iters"));
  c.expert_dropout = std::stod(json_field(json, "expert_dropout"));
  c.weight_std_scale = std::stod(json_field(json, "weight_std_scale"));
  return c;
}

std::string golden_path(const std::string& name) {
  const char* root = std::getenv("KMOE_TEST_DATA");
  if (root == nullptr) {
    ADD_FAILURE() << "KMOE_TEST_DATA is not set: run through ctest, or export KMOE_TEST_DATA=<kmoe checkout>/data";
    return "";
  }
  return std::string(root) + "/golden/sigma_moe/" + name;
}

void load(Tensor<float>& param, const io::H5Reader& file, const std::string& dataset) {
  const auto stored = file.read<float>(dataset, param.shape());
  Kokkos::deep_copy(param.flat(), stored.flat());
}

// Runs a fixture's forward and the backward of its stated loss sum(out · grad_out) + 0.37 · reg_loss
// in float; every output and gradient must match within relative L2 1e-4 and the selection exactly.
void check_golden(const std::string& name) {
  const io::H5Reader file(golden_path(name));
  const SigmaMoEConfig config = config_from_json(file.read_string_attribute("/", "config"));
  const std::string mode = file.read_string_attribute("/", "mode");
  ASSERT_TRUE(mode == "train" || mode == "eval") << mode;
  const float reg_coef = 0.37f;
  ASSERT_EQ(file.read_string_attribute("/", "loss"), "sum(out * grad_out) + 0.37 * reg_loss");

  SigmaMoE<float> layer(config, 0);
  load(layer.params().keys, file, "/params/keys");
  load(layer.params().values, file, "/params/values");
  load(layer.params().expert_sel, file, "/params/expert_sel");
  if (config.bias) {
    load(layer.params().bias, file, "/params/bias");
    load(layer.params().o_bias, file, "/params/o_bias");
  }
  const auto x = file.read<float>("/input/x");
  Generator rng(0);
  const auto f = layer.forward(x, mode == "train", rng);

  const index_t tokens = f.x.dim(0);
  EXPECT_EQ(f.expert_index.to_host(), file.read_indices("/debug/topk_index").to_host()) << "selected experts";
  const auto error = [](const Tensor<float>& actual, const Tensor<float>& expected) {
    return relative_l2_error(to_double(actual), to_double(expected));
  };
  std::map<std::string, double> errors;
  const Shape scores_shape{tokens, config.n_experts};
  errors["router_logits"] = error(f.router_logits, file.read<float>("/debug/router_logits").reshape(scores_shape));
  errors["selection_scores"] =
      error(f.selection_scores, file.read<float>("/debug/selection_scores").reshape(scores_shape));
  errors["out"] = error(f.y, file.read<float>("/output/out"));
  errors["gates"] = error(f.gates, file.read<float>("/debug/topk_gate").reshape({tokens, config.k}));
  const double golden_reg = file.read<float>("/output/reg_loss").to_host().at(0);
  errors["reg_loss"] = std::abs(f.reg_loss - golden_reg) / std::abs(golden_reg);

  const auto dx = layer.backward(f, file.read<float>("/input/grad_out"), reg_coef);
  errors["d x"] = error(dx, file.read<float>("/grad/input/x"));
  errors["d keys"] = error(layer.grads().keys, file.read<float>("/grad/params/keys"));
  errors["d values"] = error(layer.grads().values, file.read<float>("/grad/params/values"));
  errors["d expert_sel"] = error(layer.grads().expert_sel, file.read<float>("/grad/params/expert_sel"));
  if (config.bias) {
    errors["d bias"] = error(layer.grads().bias, file.read<float>("/grad/params/bias"));
    errors["d o_bias"] = error(layer.grads().o_bias, file.read<float>("/grad/params/o_bias"));
  }
  std::printf("%s relative L2 errors:", name.c_str());
  for (const auto& [what, value] : errors) {
    std::printf(" %s %.3g", what.c_str(), value);
    EXPECT_LE(value, 1e-4) << what;
  }
  std::printf("\n");
}

// ---------------------------------------------------------------------------------------------
// Finite-difference gradient checks in double.

struct GradientCase {
  SigmaMoEConfig config;
  Shape x_shape;
  bool training = false;
  std::uint64_t seed = 0;
};

// dx and every parameter gradient of L = Σ y ⊙ R + 0.37 · reg_loss against central differences;
// random draws replay from the same Generator seed at every probe, and a probe that changes the
// expert selection fails the test (the case needs another seed).
void check_gradients(const GradientCase& gc) {
  SCOPED_TRACE(describe(gc.config, gc.x_shape, gc.training));
  SigmaMoE<double> layer(gc.config, 1);
  set_params(layer.params(), random_params(gc.config, gc.seed));
  const auto x0 = random_values(gc.x_shape.size(), gc.seed + 10);
  const Shape y_shape = with_last_dim(gc.x_shape, gc.config.value_dim());
  const auto r = random_values(y_shape.size(), gc.seed + 11);
  const double reg_coef = 0.37;
  const std::uint64_t rng_seed = gc.seed + 12;

  Generator rng(rng_seed);
  const auto f = layer.forward(make_tensor<double>(gc.x_shape, x0), gc.training, rng);
  const auto selection = f.expert_index.to_host();
  const auto dx = layer.backward(f, make_tensor<double>(y_shape, r), reg_coef);
  ASSERT_EQ(dx.shape(), gc.x_shape);

  bool flipped = false;
  const auto loss_at = [&](const std::vector<double>& x) {
    Generator probe_rng(rng_seed);
    const auto out = layer.forward(make_tensor<double>(gc.x_shape, x), gc.training, probe_rng);
    if (out.expert_index.to_host() != selection) flipped = true;
    return dot(to_double(out.y), r) + reg_coef * out.reg_loss;
  };
  EXPECT_LT(finite_difference_error(x0, loss_at, to_double(dx)), fd_tolerance) << "d x";

  auto& params = layer.params();
  auto& grads = layer.grads();
  const std::vector<std::tuple<const char*, Tensor<double>*, Tensor<double>*>> checks = {
      {"keys", &params.keys, &grads.keys},         {"values", &params.values, &grads.values},
      {"expert_sel", &params.expert_sel, &grads.expert_sel}, {"bias", &params.bias, &grads.bias},
      {"o_bias", &params.o_bias, &grads.o_bias}};
  for (const auto& [name, param, grad] : checks) {
    if (param->empty()) continue;
    const auto start = param->to_host();
    const auto loss_of_param = [&, param = param](const std::vector<double>& value) {
      param->copy_from_host(value);
      return loss_at(x0);
    };
    EXPECT_LT(finite_difference_error(start, loss_of_param, to_double(*grad)), fd_tolerance) << "d " << name;
    param->copy_from_host(start);
  }
  EXPECT_FALSE(flipped) << "a finite-difference probe changed the expert selection; pick another seed";
}

GradientCase gradient_case(SelectionMode mode, bool training, std::uint64_t seed,
                           const std::function<void(SigmaMoEConfig&)>& adjust = {}, Shape x_shape = {6, 5}) {
  GradientCase gc{tiny_config(mode), x_shape, training, seed};
  if (adjust) adjust(gc.config);
  return gc;
}

}  // namespace

// ---------------------------------------------------------------------------------------------

TEST(SigmaMoEConfig, InvalidFieldsAreNamed) {
  const auto expect_invalid = [](const std::function<void(SigmaMoEConfig&)>& edit, const std::string& needle) {
    SigmaMoEConfig c = tiny_config(SelectionMode::sigmoid);
    edit(c);
    expect_status([&] { c.validate(); }, Status::invalid_argument, needle, needle);
    expect_status([&] { SigmaMoE<float>(c, 0); }, Status::invalid_argument, needle, needle + " (constructor)");
  };
  EXPECT_NO_THROW(tiny_config(SelectionMode::sigmoid).validate());
  expect_invalid([](auto& c) { c.dmodel = 0; }, "dmodel = 0");
  expect_invalid([](auto& c) { c.n_experts = -2; }, "n_experts = -2");
  expect_invalid([](auto& c) { c.expert_size = 0; }, "expert_size = 0");
  expect_invalid([](auto& c) { c.k = 0; }, "k = 0");
  expect_invalid([](auto& c) { c.k = 5; }, "k = 5 must lie in [1, n_experts = 4]");
  expect_invalid(
      [](auto& c) {
        c.n_experts = 100;
        c.k = 65;
      },
      "k = 65 exceeds the top-k limit 64");
  expect_invalid([](auto& c) { c.dropout = -0.1; }, "dropout = -0.1");
  expect_invalid([](auto& c) { c.dropout = 1.0; }, "dropout = 1 is outside [0, 1)");
  expect_invalid([](auto& c) { c.dropout = std::nan(""); }, "dropout = nan");
  expect_invalid([](auto& c) { c.expert_dropout = 1.5; }, "expert_dropout = 1.5");
  expect_invalid([](auto& c) { c.expert_dropout = -1; }, "expert_dropout = -1");
  expect_invalid([](auto& c) { c.v_dim = -3; }, "v_dim = -3");
  expect_invalid([](auto& c) { c.sinkhorn_n_iters = -1; }, "sinkhorn_n_iters = -1");
  expect_invalid([](auto& c) { c.weight_std_scale = 0; }, "weight_std_scale = 0");
  expect_invalid([](auto& c) { c.weight_std_scale = INFINITY; }, "weight_std_scale = inf");
}

TEST(SigmaMoEConfig, SelectionModeNames) {
  for (auto mode : {SelectionMode::sigmoid, SelectionMode::softmax, SelectionMode::sinkmoid})
    EXPECT_EQ(layers::parse_selection_mode(layers::selection_mode_name(mode)), mode);
  expect_status([] { layers::parse_selection_mode("topk"); }, Status::invalid_argument, "'topk'");
  expect_status([] { layers::parse_selection_mode("Sigmoid"); }, Status::invalid_argument, "'Sigmoid'");
  EXPECT_EQ(tiny_config(SelectionMode::sigmoid).value_dim(), 5);
}

TEST(SigmaMoEInit, RngStreamNormalHasStandardMoments) {
  const index_t n = 1 << 20;
  for (bool use_float : {true, false}) {
    const RngStream stream{77, 1000};
    const auto z = use_float ? draw_on_device<float>(stream, n, true)
                             : draw_on_device<double>(stream, n, true);
    double sum = 0, sum_sq = 0, sum_4 = 0, within_one = 0;
    for (double v : z) {
      ASSERT_TRUE(std::isfinite(v));
      sum += v;
      sum_sq += v * v;
      sum_4 += v * v * v * v;
      within_one += std::abs(v) < 1;
    }
    const double dn = static_cast<double>(n);
    EXPECT_NEAR(sum / dn, 0.0, 5 / std::sqrt(dn)) << use_float;
    EXPECT_NEAR(sum_sq / dn, 1.0, 5 * std::sqrt(2 / dn)) << use_float;
    EXPECT_NEAR(sum_4 / dn, 3.0, 5 * std::sqrt(96 / dn)) << use_float;
    EXPECT_NEAR(within_one / dn, 0.682689492, 5 * std::sqrt(0.2166 / dn)) << use_float;
  }
}

TEST(SigmaMoEInit, StatisticsMatchTheOriginal) {
  SigmaMoEConfig c;
  c.dmodel = 128;
  c.n_experts = 32;
  c.expert_size = 64;
  c.k = 4;
  c.bias = true;
  c.v_dim = 96;
  c.weight_std_scale = 0.5;
  SigmaMoE<float> layer(c, 2024);
  const auto& p = layer.params();
  const auto moments = [](const std::vector<double>& v) {
    double mean = 0, var = 0;
    for (double e : v) mean += e;
    mean /= static_cast<double>(v.size());
    for (double e : v) var += (e - mean) * (e - mean);
    return std::make_pair(mean, std::sqrt(var / static_cast<double>(v.size() - 1)));
  };
  const auto check = [&](const char* name, const Tensor<float>& t, double stddev, double rel_tol) {
    const auto [mean, sample_std] = moments(to_double(t));
    EXPECT_NEAR(mean, 0.0, 5 * stddev / std::sqrt(static_cast<double>(t.size()))) << name;
    EXPECT_NEAR(sample_std / stddev, 1.0, rel_tol) << name;
  };
  check("keys", p.keys, 0.5 / std::sqrt(128.0), 0.01);
  check("values", p.values, 0.5 / std::sqrt(32.0 * 64.0), 0.01);
  check("expert_sel", p.expert_sel, 0.5 / std::sqrt(128.0), 0.05);
  // renorm_keep_std: every router row has the same L2 norm.
  const auto w = to_double(p.expert_sel);
  std::vector<double> norms(32, 0.0);
  for (std::size_t i = 0; i < w.size(); ++i) norms[i / 128] += w[i] * w[i];
  for (double n : norms) EXPECT_NEAR(std::sqrt(n) / std::sqrt(norms[0]), 1.0, 1e-5);
  EXPECT_EQ(p.bias.shape(), (Shape{32, 64}));
  EXPECT_EQ(p.o_bias.shape(), Shape{96});
  for (const auto* t : {&p.bias, &p.o_bias})
    for (double v : to_double(*t)) EXPECT_EQ(v, 0.0);
  // Gradients: allocated with the parameters' shapes, zeroed.
  auto& grads = layer.grads();
  EXPECT_EQ(grads.keys.shape(), p.keys.shape());
  EXPECT_EQ(grads.values.shape(), p.values.shape());
  EXPECT_EQ(grads.expert_sel.shape(), p.expert_sel.shape());
  EXPECT_EQ(grads.bias.shape(), p.bias.shape());
  EXPECT_EQ(grads.o_bias.shape(), p.o_bias.shape());
  for (double v : to_double(grads.keys)) ASSERT_EQ(v, 0.0);
  // Without bias there are no bias tensors.
  c.bias = false;
  const SigmaMoE<float> no_bias(c, 2024);
  EXPECT_TRUE(no_bias.params().bias.empty());
  EXPECT_TRUE(no_bias.params().o_bias.empty());
  // The seed decides the parameters.
  EXPECT_EQ(to_double(no_bias.params().keys), to_double(p.keys));
  EXPECT_NE(to_double(SigmaMoE<float>(c, 2025).params().keys), to_double(p.keys));
}

// Every selection mode and option against the host reference: selection, gates, y, reg_loss.
TEST(SigmaMoEForward, MatchesHostReference) {
  struct Case {
    SelectionMode mode;
    bool after_topk, bias, training;
    ops::Activation activation;
    index_t v_dim;
    Shape x_shape;
    int k = 2;  // top-1 keeps its hidden units in pair order, larger k in the plan's sorted order
  };
  using A = ops::Activation;
  const std::vector<Case> cases = {
      {SelectionMode::sigmoid, false, false, false, A::relu, 0, {6, 5}},
      {SelectionMode::sigmoid, true, true, true, A::gelu, 7, {2, 3, 5}},
      {SelectionMode::softmax, false, true, false, A::silu, 0, {6, 5}},
      {SelectionMode::softmax, true, false, true, A::relu, 3, {1, 2, 3, 5}},
      {SelectionMode::sinkmoid, false, true, false, A::relu, 0, {6, 5}},
      {SelectionMode::sinkmoid, false, false, true, A::gelu, 0, {6, 5}},
      {SelectionMode::sinkmoid, true, true, true, A::relu, 7, {2, 3, 5}},
      {SelectionMode::sinkmoid, false, false, true, A::relu, 0, {2, 1, 3, 5}},
      {SelectionMode::sigmoid, false, true, false, A::relu, 0, {6, 5}, 1},
      {SelectionMode::softmax, true, true, true, A::gelu, 3, {2, 3, 5}, 1},
      {SelectionMode::sigmoid, false, true, true, A::relu, 0, {7, 5}, 4},
  };
  for (std::size_t i = 0; i < cases.size(); ++i) {
    const Case& k = cases[i];
    SigmaMoEConfig c = tiny_config(k.mode);
    c.k = k.k;
    c.activation_after_topk = k.after_topk;
    c.bias = k.bias;
    c.activation = k.activation;
    c.v_dim = k.v_dim;
    c.sinkhorn_n_iters = 2 + static_cast<int>(i % 3);
    SCOPED_TRACE(describe(c, k.x_shape, k.training));
    const auto params = random_params(c, 100 + i);
    const auto x = random_values(k.x_shape.size(), 200 + i);
    const index_t rows_per_group = k.x_shape[k.x_shape.rank() - 2];
    const auto ref = reference_forward(c, params, x, rows_per_group, k.training);

    SigmaMoE<double> layer(c, 1);
    set_params(layer.params(), params);
    Generator rng(5);
    const auto f = layer.forward(make_tensor<double>(k.x_shape, x), k.training, rng);
    EXPECT_EQ(f.y.shape(), with_last_dim(k.x_shape, c.value_dim()));
    EXPECT_LT(max_rel_error(to_double(f.selection_scores), ref.scores), 1e-12);
    EXPECT_EQ(f.expert_index.to_host(), ref.index);
    EXPECT_LT(max_rel_error(to_double(f.gates), ref.gates), 1e-12);
    EXPECT_LT(max_rel_error(to_double(f.y), ref.y), 1e-12);
    EXPECT_NEAR(f.reg_loss, ref.reg_loss, 1e-12 * std::abs(ref.reg_loss));

    SigmaMoE<float> layer_f(c, 1);
    set_params(layer_f.params(), params);
    Generator rng_f(5);
    const auto ff = layer_f.forward(make_tensor<float>(k.x_shape, x), k.training, rng_f);
    EXPECT_EQ(ff.expert_index.to_host(), ref.index) << "float";
    EXPECT_LT(max_rel_error(to_double(ff.y), ref.y), 1e-5) << "float";
    EXPECT_NEAR(ff.reg_loss, ref.reg_loss, 1e-5 * std::abs(ref.reg_loss)) << "float";
  }
}

// Leading dimensions are flattened into tokens and kept in y and dx; rank 1 is a single token.
TEST(SigmaMoEForward, LeadingShapeIsKept) {
  SigmaMoEConfig c = tiny_config(SelectionMode::softmax);
  c.v_dim = 7;
  SigmaMoE<double> layer(c, 3);
  const auto x = random_values(12 * 5, 31);
  const auto dy = random_values(12 * 7, 32);
  std::vector<double> y_rows, dx_rows;
  for (const Shape& shape : {Shape{12, 5}, Shape{3, 4, 5}, Shape{2, 1, 6, 5}}) {
    Generator rng(0);
    layer.zero_grad();
    const auto f = layer.forward(make_tensor<double>(shape, x), false, rng);
    EXPECT_EQ(f.y.shape(), with_last_dim(shape, 7));
    const auto dx = layer.backward(f, make_tensor<double>(f.y.shape(), dy), 0.5);
    EXPECT_EQ(dx.shape(), shape);
    if (y_rows.empty()) {
      y_rows = to_double(f.y);
      dx_rows = to_double(dx);
    }
    EXPECT_EQ(to_double(f.y), y_rows) << shape.str();
    EXPECT_EQ(to_double(dx), dx_rows) << shape.str();
  }
  // One token alone: y equals the first row of the batched result (the regulariser differs).
  Generator rng(0);
  const auto f = layer.forward(make_tensor<double>({5}, {x.begin(), x.begin() + 5}), false, rng);
  EXPECT_EQ(f.y.shape(), Shape{7});
  EXPECT_LT(max_rel_error(to_double(f.y), {y_rows.begin(), y_rows.begin() + 7}), 1e-14);
  const auto dx = layer.backward(f, make_tensor<double>({7}, {dy.begin(), dy.begin() + 7}), 0.0);
  EXPECT_EQ(dx.shape(), Shape{5});
  // Sinkhorn in training on one token: a single group of one row.
  c.selection_mode = SelectionMode::sinkmoid;
  const auto single = SigmaMoE<double>(c, 3).forward(make_tensor<double>({5}, {x.begin(), x.begin() + 5}), true, rng);
  EXPECT_EQ(single.y.shape(), Shape{7});
  for (double v : to_double(single.y)) EXPECT_TRUE(std::isfinite(v));
}

TEST(SigmaMoEForward, BadInputsAreErrors) {
  SigmaMoE<float> layer(tiny_config(SelectionMode::sigmoid), 0);
  Generator rng(0);
  expect_status([&] { layer.forward(Tensor<float>("x", {6, 4}), false, rng); }, Status::shape_mismatch,
                "[..., dmodel = 5]");
  expect_status([&] { layer.forward(Tensor<float>("x", {0, 5}), false, rng); }, Status::shape_mismatch,
                "no tokens");
  auto values = random_values(30, 1);
  values[17] = std::nan("");
  expect_status([&] { layer.forward(make_tensor<float>({6, 5}, values), false, rng); }, Status::non_finite, "x");
  values[17] = -INFINITY;
  expect_status([&] { layer.forward(make_tensor<float>({2, 3, 5}, values), true, rng); }, Status::non_finite, "x");

  const auto f = layer.forward(make_tensor<float>({2, 3, 5}, random_values(30, 2)), true, rng);
  expect_status([&] { layer.backward(f, Tensor<float>("dy", {6, 5}), 0.f); }, Status::shape_mismatch, "dy");
  expect_status([&] { layer.backward(layers::SigmaMoEForward<float>(), Tensor<float>("dy", {6, 5}), 0.f); },
                Status::invalid_argument, "empty");
  SigmaMoEConfig other = tiny_config(SelectionMode::sigmoid);
  other.expert_size = 4;
  SigmaMoE<float> other_layer(other, 0);
  expect_status([&] { other_layer.backward(f, Tensor<float>("dy", {2, 3, 5}), 0.f); }, Status::shape_mismatch,
                "does not come from");
}

TEST(SigmaMoEGolden, SigmoidReluTrain) { check_golden("sigma_moe_sigmoid_relu_train.h5"); }
TEST(SigmaMoEGolden, SigmoidGeluEval) { check_golden("sigma_moe_sigmoid_gelu_eval.h5"); }
TEST(SigmaMoEGolden, SoftmaxAfterTopkBiasVdim48Train) {
  check_golden("sigma_moe_softmax_after_topk_bias_vdim48_train.h5");
}
TEST(SigmaMoEGolden, SinkmoidEval) { check_golden("sigma_moe_sinkmoid_eval.h5"); }
// Sinkhorn selection in training, reproduced literally (moe_layer@c9b9c01 sinkhorn_unnorm, whose
// updates subtract the log-domain potentials but whose output adds them) down to the reference's choice.
TEST(SigmaMoEGolden, SinkmoidTrain) { check_golden("sigma_moe_sinkmoid_train.h5"); }

TEST(SigmaMoEGradient, SigmoidEval) { check_gradients(gradient_case(SelectionMode::sigmoid, false, 1)); }

TEST(SigmaMoEGradient, TopOneBias) {
  check_gradients(gradient_case(SelectionMode::sigmoid, false, 11, [](auto& c) {
    c.k = 1;
    c.bias = true;
  }));
}

TEST(SigmaMoEGradient, SigmoidTrainBiasDropout) {
  // Hidden dropout in training: backward must replay the forward mask.
  check_gradients(gradient_case(
      SelectionMode::sigmoid, true, 2,
      [](auto& c) {
        c.bias = true;
        c.dropout = 0.3;
      },
      {2, 3, 5}));
}

TEST(SigmaMoEGradient, SigmoidAfterTopkGeluVdim) {
  check_gradients(gradient_case(SelectionMode::sigmoid, false, 3, [](auto& c) {
    c.activation_after_topk = true;
    c.activation = ops::Activation::gelu;
    c.v_dim = 3;
  }));
}

TEST(SigmaMoEGradient, SoftmaxBeforeTopkBiasGelu) {
  check_gradients(gradient_case(SelectionMode::softmax, false, 4, [](auto& c) {
    c.bias = true;
    c.activation = ops::Activation::gelu;
  }));
}

TEST(SigmaMoEGradient, SoftmaxBeforeTopkTrainVdim) {
  check_gradients(gradient_case(SelectionMode::softmax, true, 5, [](auto& c) { c.v_dim = 7; }));
}

TEST(SigmaMoEGradient, SoftmaxAfterTopkExpertDropoutBiasVdim) {
  // Expert dropout in training (the masks replay from the seed); gates use the raw logits.
  check_gradients(gradient_case(
      SelectionMode::softmax, true, 6,
      [](auto& c) {
        c.activation_after_topk = true;
        c.expert_dropout = 0.25;
        c.bias = true;
        c.v_dim = 7;
      },
      {2, 3, 5}));
}

TEST(SigmaMoEGradient, SinkmoidEvalBias) {
  check_gradients(gradient_case(SelectionMode::sinkmoid, false, 7, [](auto& c) { c.bias = true; }));
}

TEST(SigmaMoEGradient, SinkmoidTrainGroups) {
  check_gradients(gradient_case(SelectionMode::sinkmoid, true, 8, [](auto& c) { c.v_dim = 7; }, {2, 3, 5}));
}

TEST(SigmaMoEGradient, SinkmoidTrainGeluBias) {
  check_gradients(gradient_case(SelectionMode::sinkmoid, true, 9, [](auto& c) {
    c.bias = true;
    c.activation = ops::Activation::gelu;
  }));
}

TEST(SigmaMoEBackward, GradientsAccumulateAndZeroGradResets) {
  SigmaMoEConfig c = tiny_config(SelectionMode::softmax);
  c.bias = true;
  SigmaMoE<double> layer(c, 4);
  Generator rng(0);
  const auto f = layer.forward(make_tensor<double>({6, 5}, random_values(30, 41)), false, rng);
  const auto dy = make_tensor<double>({6, 5}, random_values(30, 42));
  const auto dx1 = to_double(layer.backward(f, dy, 0.2));
  const auto all_grads = [&] {
    std::vector<std::vector<double>> g;
    for (const auto* t : {&layer.grads().keys, &layer.grads().values, &layer.grads().expert_sel,
                          &layer.grads().bias, &layer.grads().o_bias})
      g.push_back(to_double(*t));
    return g;
  };
  const auto once = all_grads();
  const auto dx2 = to_double(layer.backward(f, dy, 0.2));
  EXPECT_EQ(dx1, dx2) << "dx is overwritten, not accumulated";
  const auto twice = all_grads();
  for (std::size_t t = 0; t < once.size(); ++t) {
    double norm = 0;
    for (std::size_t i = 0; i < once[t].size(); ++i) {
      EXPECT_NEAR(twice[t][i], 2 * once[t][i], 1e-14) << t;
      norm += std::abs(once[t][i]);
    }
    EXPECT_GT(norm, 0) << "gradient " << t << " is all zero";
  }
  layer.zero_grad();
  for (const auto& g : all_grads())
    for (double v : g) ASSERT_EQ(v, 0.0);
}

TEST(SigmaMoEDropout, HiddenDropoutKeepsOneMinusPScaled) {
  SigmaMoEConfig c;
  c.dmodel = 16;
  c.n_experts = 8;
  c.expert_size = 64;
  c.k = 2;
  c.dropout = 0.25;
  c.activation = ops::Activation::identity;  // every unit non-zero before dropout
  SigmaMoE<float> layer(c, 5);
  const auto x = make_tensor<float>({512, 16}, random_values(512 * 16, 51));
  Generator train_rng(9), eval_rng(9);
  const auto train = layer.forward(x, true, train_rng);
  const auto eval = layer.forward(x, false, eval_rng);
  ASSERT_EQ(train.expert_index.to_host(), eval.expert_index.to_host());
  const auto h_train = to_double(train.hidden), h_eval = to_double(eval.hidden);
  EXPECT_EQ(h_eval, to_double(eval.pre_activation)) << "no dropout in eval";
  std::size_t kept = 0;
  for (std::size_t i = 0; i < h_train.size(); ++i) {
    ASSERT_NE(h_eval[i], 0.0);
    if (h_train[i] == 0) continue;
    ++kept;
    ASSERT_NEAR(h_train[i], h_eval[i] / 0.75, 1e-6 * std::abs(h_eval[i] / 0.75)) << i;
  }
  const double n = static_cast<double>(h_train.size()), fraction = static_cast<double>(kept) / n;
  EXPECT_NEAR(fraction, 0.75, 5 * std::sqrt(0.75 * 0.25 / n));
}

TEST(SigmaMoEDropout, ExpertDropoutMasksAFractionP) {
  SigmaMoEConfig c;
  c.dmodel = 8;
  c.n_experts = 16;
  c.expert_size = 4;
  c.k = 2;
  c.expert_dropout = 0.3;
  SigmaMoE<float> layer(c, 6);
  const auto x = make_tensor<float>({1024, 8}, random_values(1024 * 8, 61));
  Generator rng(10);
  const auto train = layer.forward(x, true, rng);
  const auto scores = to_double(train.selection_scores);
  const auto index = train.expert_index.to_host();
  std::size_t dropped = 0;
  for (double s : scores) dropped += s == -INFINITY;
  const double n = static_cast<double>(scores.size()), fraction = static_cast<double>(dropped) / n;
  EXPECT_NEAR(fraction, 0.3, 5 * std::sqrt(0.3 * 0.7 / n));
  for (std::size_t p = 0; p < index.size(); ++p) {  // only dropped experts are avoided
    const auto row = scores.begin() + (p / 2) * 16;
    const auto finite = std::count_if(row, row + 16, [](double s) { return s != -INFINITY; });
    if (finite >= 2) EXPECT_NE(row[index[p]], -INFINITY) << p;
  }
  const auto eval = layer.forward(x, false, rng);
  for (double s : to_double(eval.selection_scores)) ASSERT_NE(s, -INFINITY) << "no expert dropout in eval";
}

TEST(SigmaMoEDropout, SameSeedSameBitsOtherSeedDiffers) {
  SigmaMoEConfig c;
  c.dmodel = 16;
  c.n_experts = 8;
  c.expert_size = 16;
  c.k = 3;
  c.dropout = 0.2;
  c.expert_dropout = 0.2;
  c.selection_mode = SelectionMode::softmax;
  c.activation_after_topk = true;
  SigmaMoE<float> layer(c, 7);
  const auto x = make_tensor<float>({4, 32, 16}, random_values(4 * 32 * 16, 71));
  const auto run = [&](std::uint64_t seed) {
    Generator rng(seed);
    const auto f = layer.forward(x, true, rng);
    return std::make_pair(f.y.to_host(), f.expert_index.to_host());
  };
  const auto first = run(11), again = run(11), other = run(12);
  ASSERT_EQ(first.first.size(), again.first.size());
  EXPECT_EQ(std::memcmp(first.first.data(), again.first.data(), first.first.size() * sizeof(float)), 0);
  EXPECT_EQ(first.second, again.second);
  EXPECT_NE(first.first, other.first);
  EXPECT_NE(first.second, other.second);
}

// MoEUT's use: the router reads its own input (sel_input, e.g. LN2(x)) and the caller adds a
// gradient for the router logits (its deferred regulariser); checked against central differences
// of L = Σ y·R + Σ z·R_z + reg_coef·reg_loss for x, sel_input and every parameter.
TEST(SigmaMoEBackward, SeparateRouterInputAndRouterLogitGradient) {
  const SigmaMoEConfig c = tiny_config(SelectionMode::sigmoid);
  SigmaMoE<double> layer(c, 9);
  set_params(layer.params(), random_params(c, 90));
  const index_t tokens = 7, D = c.dmodel;
  auto x = make_tensor<double>({tokens, D}, random_values(tokens * D, 91));
  auto sel = make_tensor<double>({tokens, D}, random_values(tokens * D, 92));
  Generator rng(0);
  const auto f = layer.forward(x, sel, false, rng);
  const auto r = random_values(f.y.size(), 93), r_z = random_values(f.router_logits.size(), 94);
  const double reg_coef = 0.3;
  layer.zero_grad();
  const auto g = layer.backward_with_router(f, make_tensor<double>(f.y.shape(), r), reg_coef,
                                            make_tensor<double>(f.router_logits.shape(), r_z));
  ASSERT_FALSE(g.dsel_input.empty());
  const auto loss = [&] {
    const auto fp = layer.forward(x, sel, false, rng);
    return dot(to_double(fp.y), r) + dot(to_double(fp.router_logits), r_z) + reg_coef * fp.reg_loss;
  };
  const auto check = [&](Tensor<double>& target, const std::vector<double>& analytic, const char* name) {
    const auto x0 = to_double(target);
    const auto fn = [&](const std::vector<double>& p) {
      target.copy_from_host(p);
      return loss();
    };
    EXPECT_LT(finite_difference_error(x0, fn, analytic), fd_tolerance) << name;
    target.copy_from_host(x0);
  };
  check(x, to_double(g.dx), "x");
  check(sel, to_double(g.dsel_input), "sel_input");
  check(layer.params().keys, to_double(layer.grads().keys), "keys");
  check(layer.params().values, to_double(layer.grads().values), "values");
  check(layer.params().expert_sel, to_double(layer.grads().expert_sel), "expert_sel");

  // With sel_input = x it is the plain layer: same output, and dx + dsel_input = the plain dx.
  const auto same = layer.forward(x, x, false, rng), plain = layer.forward(x, false, rng);
  EXPECT_EQ(to_double(same.y), to_double(plain.y));
  const auto dy = make_tensor<double>(plain.y.shape(), r);
  const auto split = layer.backward_with_router(same, dy, reg_coef, Tensor<double>());
  const auto joint = to_double(layer.backward(plain, dy, reg_coef));
  const auto dx = to_double(split.dx), ds = to_double(split.dsel_input);
  for (std::size_t i = 0; i < joint.size(); ++i) EXPECT_NEAR(dx[i] + ds[i], joint[i], 1e-12);
  expect_status([&] { layer.forward(x, make_tensor<double>({tokens, D + 1}, random_values(tokens * (D + 1), 95)), false, rng); },
                Status::shape_mismatch, "sel_input");
}

// Precision::bfloat16 against the float32 layer on the same parameters and input: routing is
// float32 in both, so logits, selected experts, gates and the regulariser are bit-identical; the
// expert outputs and every gradient differ by bfloat16 rounding of the GEMM operands and outputs.
// Two chained GEMMs of rounded operands (relative error ≤ u = 2⁻⁹ each, random signs) give a
// relative L2 error near 2u–3u; 6u ≈ 0.012 bounds it with room for the backward's third and
// fourth GEMM (d keys reads the rounded dh). A float32 path would be ~1e-6: the lower bound
// shows the bfloat16 path ran.
TEST(SigmaMoEPrecision, Bfloat16TracksFloat32WithTheSameRouting) {
  SigmaMoEConfig c;
  c.dmodel = 48;
  c.n_experts = 12;
  c.expert_size = 16;
  c.k = 3;
  c.bias = true;
  c.dropout = 0.1;
  c.selection_mode = SelectionMode::softmax;
  c.activation = ops::Activation::gelu;
  SigmaMoE<float> native(c, 7);
  c.precision = Precision::bfloat16;
  SigmaMoE<float> mixed(c, 7);
  const auto x = make_tensor<float>({4, 25, c.dmodel}, random_values(4 * 25 * c.dmodel, 61));
  const auto dy = make_tensor<float>({4, 25, c.dmodel}, random_values(4 * 25 * c.dmodel, 62));
  Generator rng_native(3), rng_mixed(3);
  const auto fn = native.forward(x, true, rng_native);
  const auto fm = mixed.forward(x, true, rng_mixed);
  EXPECT_EQ(fm.router_logits.to_host(), fn.router_logits.to_host());
  EXPECT_EQ(fm.expert_index.to_host(), fn.expert_index.to_host());
  EXPECT_EQ(fm.gates.to_host(), fn.gates.to_host());
  EXPECT_EQ(fm.reg_loss, fn.reg_loss);
  const auto dxn = to_double(native.backward(fn, dy, 0.1f)), dxm = to_double(mixed.backward(fm, dy, 0.1f));

  const double u = std::ldexp(1.0, -9);
  const auto expect_close = [&](const std::vector<double>& m, const std::vector<double>& n, const char* what) {
    const double error = relative_l2_error(m, n);
    std::printf("bf16 vs float32, %s: relative L2 %.2e (u = %.2e)\n", what, error, u);
    EXPECT_LT(error, 6 * u) << what;
    EXPECT_GT(error, u / 64) << what << ": no bfloat16 rounding seen";
  };
  expect_close(to_double(fm.y), to_double(fn.y), "y");
  expect_close(dxm, dxn, "dx");
  expect_close(to_double(mixed.grads().keys), to_double(native.grads().keys), "d keys");
  expect_close(to_double(mixed.grads().values), to_double(native.grads().values), "d values");
  expect_close(to_double(mixed.grads().expert_sel), to_double(native.grads().expert_sel), "d expert_sel");
  expect_close(to_double(mixed.grads().bias), to_double(native.grads().bias), "d bias");
  // d o_bias sums dy alone: no expert GEMM reaches it.
  EXPECT_EQ(mixed.grads().o_bias.to_host(), native.grads().o_bias.to_host());
  // The master weights stay float32: the layer's parameters are the native layer's.
  EXPECT_EQ(mixed.params().keys.to_host(), native.params().keys.to_host());
}

TEST(SigmaMoEPrecision, NamesAndFloat64AreChecked) {
  for (auto p : {Precision::native, Precision::bfloat16}) EXPECT_EQ(parse_precision(precision_name(p)), p);
  expect_status([] { parse_precision("bf16"); }, Status::invalid_argument, "'bf16'");
  SigmaMoEConfig c = tiny_config(SelectionMode::sigmoid);
  c.precision = Precision::bfloat16;
  expect_status([&] { SigmaMoE<double>(c, 0); }, Status::unsupported, "needs a float32 layer");
  EXPECT_NO_THROW(SigmaMoE<float>(c, 0));
}
