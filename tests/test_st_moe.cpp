#include "kmoe/layers/sparse_moe_block.hpp"
#include "kmoe/layers/st_moe.hpp"
#include "st_moe_reference.hpp"
#include "test_util.hpp"

#include <algorithm>
#include <cmath>
#include <functional>
#include <optional>

using namespace kmoe;
using namespace kmoe::test;
using layers::SparseMoEBlock;
using layers::SparseMoEBlockConfig;
using layers::StMoE;
using layers::StMoECall;
using layers::StMoEConfig;
using layers::StMoEV0014Config;

namespace {

// ---------------------------------------------------------------------------------------------
// Parameters as flat host vectors, in a fixed order.

template <class T>
std::vector<Tensor<T>*> tensors_of(layers::StMoEParams<T>& p) {
  std::vector<Tensor<T>*> list = {&p.router};
  if (!p.router_inner.empty()) list.push_back(&p.router_inner);
  for (Tensor<T>* t : {&p.experts.w_in, &p.experts.b_in, &p.experts.mult_bias, &p.experts.w_out, &p.experts.b_out})
    list.push_back(t);
  return list;
}

template <class T>
std::vector<Tensor<T>*> tensors_of(layers::GegluExpertParams<T>& p) {
  return {&p.gamma, &p.w_in, &p.b_in, &p.mult_bias, &p.w_out, &p.b_out};
}

template <class T>
std::vector<double> get_flat(const std::vector<Tensor<T>*>& list) {
  std::vector<double> all;
  for (Tensor<T>* t : list) {
    if (t->empty()) continue;
    const auto v = to_double(*t);
    all.insert(all.end(), v.begin(), v.end());
  }
  return all;
}

template <class T>
void set_flat(const std::vector<Tensor<T>*>& list, const std::vector<double>& all, std::size_t offset = 0) {
  for (Tensor<T>* t : list) {
    if (t->empty()) continue;
    t->copy_from_host(cast_vector<T>(std::vector<double>(all.begin() + offset, all.begin() + offset + t->size())));
    offset += t->size();
  }
}

// Random parameters with non-trivial biases and multipliers and a router spread wide enough for
// clear top-k margins.
template <class T>
void randomise(const std::vector<Tensor<T>*>& list, std::uint64_t seed, double router_scale) {
  std::vector<double> all;
  for (std::size_t i = 0; i < list.size(); ++i) {
    if (list[i]->empty()) continue;
    const double scale = i == 0 ? router_scale : 0.6;
    auto v = random_values(list[i]->size(), seed + i, -scale, scale);
    if (list[i]->label().find("mult_bias") != std::string::npos || list[i]->label().find("gamma") != std::string::npos)
      for (auto& e : v) e += 1.0;
    all.insert(all.end(), v.begin(), v.end());
  }
  set_flat(list, all);
}

RefExperts host_experts(StMoE<double>& layer) {
  const auto& c = layer.config();
  auto& e = layer.params().experts;
  return {c.total_experts(), c.dim, c.expert_hidden(), to_double(e.w_in), to_double(e.b_in),
          to_double(e.mult_bias), to_double(e.w_out), to_double(e.b_out)};
}

// ---------------------------------------------------------------------------------------------
// Routing draws that keep every decision far from its threshold, and margin checks.

std::vector<double> safe_uniforms(const moe::TopNRouting<double>& r, const moe::TopNGatingOptions& o,
                                  std::uint64_t seed) {
  const index_t N = r.gate.dim(0);
  const int k = o.top_n;
  const auto gates = to_double(r.normalised_gate);
  std::mt19937_64 gen(seed);
  std::vector<double> u(k * N, 0.5);
  for (int i = 1; i < k; ++i)
    for (index_t t = 0; t < N; ++t) {
      const double ratio = gates[t * k + i] / std::max(o.thresholds[i - 1], o.eps);
      if (ratio >= 0.9) continue;  // always routed (u < 1 ≤ ratio / 0.9 margins)
      u[i * N + t] = random_int(gen, 0, 2) > 0 ? 0.5 * ratio : std::min(0.999, 1.3 * ratio + 0.02);
    }
  return u;
}

// The smallest gap among each token's top k + 1 probabilities (tokens of importance 0 skipped).
double min_topk_margin(const moe::TopNRouting<double>& r, int k) {
  const index_t N = r.probs.dim(0), E = r.probs.dim(1);
  const auto p = to_double(r.probs);
  const auto imp = r.importance.empty() ? std::vector<double>(N, 1.0) : to_double(r.importance);
  double margin = INFINITY;
  for (index_t t = 0; t < N; ++t) {
    if (imp[t] == 0) continue;
    std::vector<double> row(p.begin() + t * E, p.begin() + (t + 1) * E);
    std::sort(row.rbegin(), row.rend());
    for (int i = 0; i < std::min<int>(k, static_cast<int>(E) - 1); ++i) margin = std::min(margin, row[i] - row[i + 1]);
  }
  return margin;
}

// |g − 0.5| over the kept outer gates: the hierarchical importance threshold.
double min_importance_margin(const moe::TopNRouting<double>& r) {
  double margin = INFINITY;
  for (double g : to_double(r.gate))
    if (g > 0) margin = std::min(margin, std::abs(g - 0.5));
  return margin;
}

// Fills call's uniforms from forward passes so that no routing decision is near its threshold.
template <class Forward>
StMoECall<double> safe_call(const StMoEConfig& c, bool training, index_t B, index_t n, const Forward& forward,
                            std::uint64_t seed) {
  StMoECall<double> call;
  const int k = c.gating_top_n;
  call.route_uniform = make_tensor<double>({k, B, n}, std::vector<double>(k * B * n, 0.5));
  layers::StMoEForward<double> f = forward(call);
  call.route_uniform = make_tensor<double>({k, B, n}, safe_uniforms(f.gate.routing, c.gating_options(training), seed));
  if (c.hierarchical()) {
    f = forward(call);
    const index_t C = f.gate.routing.capacity, slots = c.num_experts * B * C;
    call.route_uniform_inner = make_tensor<double>({2, c.num_experts, B, C}, std::vector<double>(2 * slots, 0.5));
    f = forward(call);
    call.route_uniform_inner =
        make_tensor<double>({2, c.num_experts, B, C},
                            safe_uniforms(f.gate_inner.routing, c.gating_options(training, true), seed + 1));
    f = forward(call);
    EXPECT_GT(min_topk_margin(f.gate_inner.routing, 2), 1e-4) << "test data: inner near-ties";
    EXPECT_GT(min_importance_margin(f.gate.routing), 1e-4) << "test data: outer gates near 0.5";
  }
  EXPECT_GT(min_topk_margin(f.gate.routing, k), 1e-4) << "test data: near-ties";
  return call;
}

// ---------------------------------------------------------------------------------------------
// Cases.

StMoEConfig flat_config(index_t dim, int experts, int top_n, std::vector<double> thresholds, double cf) {
  StMoEConfig c;
  c.dim = dim;
  c.num_experts = experts;
  c.expert_hidden_mult = 1;
  c.gating_top_n = top_n;
  c.threshold_train = thresholds;
  c.threshold_eval = thresholds;
  c.capacity_factor_train = cf;
  c.capacity_factor_eval = cf;
  c.balance_loss_coef = 0.3;  // large, so the aux-loss gradients are visible in the checks
  c.router_z_loss_coef = 0.05;
  return c;
}

StMoEConfig v0014_config(index_t dim, int experts, int inner, double cf) {
  StMoEV0014Config v;
  v.dim = dim;
  v.num_experts = experts;
  v.num_experts_inner = inner;
  v.expert_hidden_mult = 1;
  v.capacity_factor_train = cf;
  v.capacity_factor_eval = cf;
  v.loss_coef = 0.3;
  v.router_z_loss_coef = 0.05;
  return v.to_config();
}

struct MoECase {
  StMoEConfig config;
  index_t B = 2, n = 7;
  bool training = true;
  std::uint64_t seed = 1;
  double router_scale = 1.5;
};

std::string describe(const MoECase& c) {
  const auto& k = c.config;
  return impl::concat("E ", k.num_experts, " inner ", k.num_experts_inner, " top ", k.gating_top_n, " cf ",
                      k.capacity_factor_train, k.straight_through_dispatch_tensor ? " st" : " detached",
                      c.training ? " train" : " eval", " B ", c.B, " n ", c.n);
}

template <class T>
void check_against_reference(const MoECase& mc) {
  const StMoEConfig& c = mc.config;
  StMoE<double> layer(c, mc.seed);
  randomise(tensors_of(layer.params()), mc.seed + 10, mc.router_scale);
  const auto xv = random_values(mc.B * mc.n * c.dim, mc.seed + 20);
  const auto x = make_tensor<double>({mc.B, mc.n, c.dim}, xv);
  Generator unused(0);
  const auto call = safe_call(c, mc.training, mc.B, mc.n,
                              [&](const StMoECall<double>& k) { return layer.forward(x, mc.training, unused, k); },
                              mc.seed + 30);
  const auto u = to_double(call.route_uniform);
  const auto experts = host_experts(layer);
  const auto router = to_double(layer.params().router);
  RefMoE ref;
  if (c.hierarchical()) {
    ref = reference_hierarchical_moe(c.gating_options(mc.training), c.gating_options(mc.training, true), experts,
                                     router, to_double(layer.params().router_inner), xv, mc.B, mc.n, u,
                                     to_double(call.route_uniform_inner));
  } else {
    ref = reference_moe(c.gating_options(mc.training), experts, router, xv, mc.B, mc.n, u);
  }

  StMoE<T> typed(c, mc.seed);
  set_flat(tensors_of(typed.params()), get_flat(tensors_of(layer.params())));
  StMoECall<T> typed_call;
  typed_call.route_uniform = make_tensor<T>(call.route_uniform.shape(), u);
  if (c.hierarchical())
    typed_call.route_uniform_inner = make_tensor<T>(call.route_uniform_inner.shape(), to_double(call.route_uniform_inner));
  const auto f = typed.forward(make_tensor<T>(x.shape(), xv), mc.training, unused, typed_call);
  const double tol = sizeof(T) == 4 ? 3e-5 : 1e-12;
  const std::string label = describe(mc) + (sizeof(T) == 4 ? " float" : " double");
  EXPECT_LT(max_rel_error(to_double(f.out), ref.out), tol) << label;
  EXPECT_NEAR(f.balance_loss, ref.balance, tol * std::max(1.0, ref.balance)) << label;
  EXPECT_NEAR(f.router_z_loss, ref.z, tol * std::max(1.0, ref.z)) << label;
  EXPECT_NEAR(f.total_aux_loss, c.balance_loss_coef * ref.balance + c.router_z_loss_coef * ref.z, tol) << label;
  // The kept choices are the reference's.
  EXPECT_EQ(f.gate.routing.expert_index.to_host(), ref.outer.expert_index) << label;
  if (c.hierarchical()) EXPECT_EQ(f.gate_inner.routing.expert_index.to_host(), ref.inner.expert_index) << label;
}

// The dense host reference as a function of v = [x, router, router_inner, w_in, b_in, mult_bias,
// w_out, b_out] (tensors_of order): L = Σ out ⊙ R + aux_weight · total_aux. With the straight-through
// dispatch it is the surrogate around the base point (reference_dispatch), whose gradient there is
// the original's.
struct ReferenceLoss {
  StMoEConfig c;
  bool training = true;
  index_t B = 0, n = 0;
  std::vector<double> uniform, uniform_inner, R;
  double aux_weight = 1;
  std::optional<RefMoE> detached;

  RefMoE run(const std::vector<double>& v) const {
    const index_t D = c.dim, E = c.num_experts, I = c.num_experts_inner, Et = c.total_experts(), h = c.expert_hidden();
    std::size_t at = 0;
    const auto take = [&](index_t size) {
      std::vector<double> part(v.begin() + at, v.begin() + at + size);
      at += size;
      return part;
    };
    const auto x = take(B * n * D), router = take(E * D), router_inner = take(E * I * D);
    RefExperts experts{Et, D, h, take(Et * D * 2 * h), take(Et * 2 * h), take(Et * h), take(Et * h * D), take(Et * D)};
    const RefMoE* st = detached ? &*detached : nullptr;
    if (c.hierarchical())
      return reference_hierarchical_moe(c.gating_options(training), c.gating_options(training, true), experts, router,
                                        router_inner, x, B, n, uniform, uniform_inner, st);
    return reference_moe(c.gating_options(training), experts, router, x, B, n, uniform, st);
  }
  double operator()(const std::vector<double>& v) const {
    const RefMoE r = run(v);
    const double aux = c.balance_loss_coef * r.balance + c.router_z_loss_coef * r.z;
    return dot(r.out, R) + aux_weight * aux;
  }
};

// Central differences of the reference loss over x and every parameter, against the backward.
void check_gradients(const MoECase& mc, double aux_weight) {
  const StMoEConfig& c = mc.config;
  StMoE<double> layer(c, mc.seed);
  const auto params = tensors_of(layer.params());
  randomise(params, mc.seed + 10, mc.router_scale);
  const auto xv = random_values(mc.B * mc.n * c.dim, mc.seed + 20);
  const Shape shape{mc.B, mc.n, c.dim};
  const auto x = make_tensor<double>(shape, xv);
  Generator unused(0);
  const auto call = safe_call(c, mc.training, mc.B, mc.n,
                              [&](const StMoECall<double>& k) { return layer.forward(x, mc.training, unused, k); },
                              mc.seed + 30);
  ReferenceLoss loss{c, mc.training, mc.B, mc.n, to_double(call.route_uniform),
                     call.route_uniform_inner.empty() ? std::vector<double>() : to_double(call.route_uniform_inner),
                     random_values(xv.size(), mc.seed + 40), aux_weight, std::nullopt};
  std::vector<double> point = xv;
  const auto p0 = get_flat(params);
  point.insert(point.end(), p0.begin(), p0.end());
  if (c.straight_through_dispatch_tensor) loss.detached = loss.run(point);

  const auto f = layer.forward(x, mc.training, unused, call);
  layer.zero_grad();
  std::vector<double> analytic = to_double(layer.backward(f, make_tensor<double>(shape, loss.R), aux_weight));
  const auto g = get_flat(tensors_of(layer.grads()));
  analytic.insert(analytic.end(), g.begin(), g.end());
  EXPECT_LT(finite_difference_error(point, loss, analytic), fd_tolerance) << describe(mc);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Forward against the dense host reference.

TEST(StMoEForward, Top2TrainMatchesReference) {
  MoECase c{flat_config(6, 4, 2, {0.2}, 1.0), 2, 11, true, 1};
  check_against_reference<double>(c);
  check_against_reference<float>(c);
}

TEST(StMoEForward, Top1AndTop3PerChoiceThresholdsMatchReference) {
  MoECase top1{flat_config(5, 3, 1, {0.2}, 1.0), 2, 9, true, 2};
  check_against_reference<double>(top1);
  check_against_reference<float>(top1);
  MoECase top3{flat_config(6, 5, 3, {0.3, 0.08}, 1.5), 3, 10, false, 3};
  check_against_reference<double>(top3);
  check_against_reference<float>(top3);
}

TEST(StMoEForward, CapacityEdgeCases) {
  // n < 4: C = 4 > n.
  check_against_reference<double>({flat_config(5, 4, 2, {0.2}, 1.25), 3, 2, true, 4});
  // A single token.
  check_against_reference<double>({flat_config(5, 4, 2, {0.2}, 1.25), 1, 1, false, 5});
  // C ≥ n: nothing dropped.
  check_against_reference<double>({flat_config(5, 3, 2, {0.2}, 9.0), 2, 8, true, 6});
  // Every token prefers expert 0 (a dominant router row): tokens past its capacity are dropped
  // entirely unless their second choice is kept.
  StMoE<double> layer(flat_config(4, 3, 2, {1e-9}, 1.0), 7);
  const index_t n = 12;
  std::vector<double> x(n * 4);
  for (index_t t = 0; t < n; ++t)
    for (index_t d = 0; d < 4; ++d) x[t * 4 + d] = d == 0 ? 1.0 : 0.05 * static_cast<double>((t * 7 + d) % 5);
  layer.params().router.copy_from_host({4, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0});
  Generator rng(1);
  const auto f = layer.forward(make_tensor<double>({1, n, 4}, x), true, rng);
  EXPECT_EQ(f.gate.routing.capacity, 4);
  const auto index = f.gate.routing.expert_index.to_host();
  int kept_first = 0;
  for (index_t t = 0; t < n; ++t) kept_first += index[t * 2] == 0;
  EXPECT_EQ(kept_first, 4);
  int kept = 0;
  for (int e : index) kept += e >= 0;
  EXPECT_EQ(f.stage.plan.n_routed_pairs(), kept);
  EXPECT_LE(kept, 4 + 8);  // 4 first choices at expert 0, at most 4 second choices at each other expert
  const auto out = to_double(f.out);
  int zero_rows = 0;
  for (index_t t = 0; t < n; ++t) {
    const bool all_dropped = index[t * 2] < 0 && index[t * 2 + 1] < 0;
    double norm = 0;
    for (index_t d = 0; d < 4; ++d) norm += std::abs(out[t * 4 + d]);
    if (all_dropped) {
      EXPECT_EQ(norm, 0.0) << t;
      ++zero_rows;
    }
  }
  EXPECT_GT(zero_rows, 0);
}

TEST(StMoEForward, V0014AndHierarchicalMatchReference) {
  check_against_reference<double>({v0014_config(6, 4, 0, 1.25), 2, 12, true, 8});
  check_against_reference<float>({v0014_config(6, 4, 0, 1.25), 2, 12, true, 8});
  MoECase hier{v0014_config(6, 2, 3, 1.25), 2, 12, true, 9, 2.0};
  check_against_reference<double>(hier);
  check_against_reference<float>(hier);
  hier.training = false;
  check_against_reference<double>(hier);
}

TEST(StMoEForward, GeneratedDrawsAndNoiseAreReproducible) {
  StMoE<float> layer(flat_config(6, 4, 2, {0.3}, 1.25), 3);
  const auto x = make_tensor<float>({2, 9, 6}, random_values(108, 3));
  StMoECall<float> noisy;
  noisy.noise_gates = true;
  noisy.noise_mult = 0.5;
  Generator a(17), b(17);
  const auto fa = layer.forward(x, true, a, noisy), fb = layer.forward(x, true, b, noisy);
  EXPECT_EQ(fa.out.to_host(), fb.out.to_host());
  Generator c(17);
  const auto fc = layer.forward(x, true, c);
  EXPECT_EQ(fa.router_z_loss, fc.router_z_loss);  // the z-loss ignores the noise
  EXPECT_NE(fa.gate.routing.probs.to_host(), fc.gate.routing.probs.to_host());
}

// ---------------------------------------------------------------------------------------------
// Gradients against central differences (double; routing fixed by injected draws).

TEST(StMoEGradient, Top2TrainStraightThroughWithDrops) {
  check_gradients({flat_config(6, 4, 2, {0.2}, 1.0), 2, 9, true, 11}, 1.0);
}

TEST(StMoEGradient, DetachedDispatchAndEval) {
  MoECase c{flat_config(6, 4, 2, {0.2}, 1.25), 2, 9, true, 12};
  c.config.straight_through_dispatch_tensor = false;
  check_gradients(c, 0.7);
  c.training = false;
  c.config.straight_through_dispatch_tensor = true;
  check_gradients(c, 1.0);
}

TEST(StMoEGradient, Top1AndTop3) {
  check_gradients({flat_config(5, 3, 1, {0.2}, 1.0), 2, 8, true, 13}, 1.0);
  MoECase switch_style{flat_config(5, 3, 1, {0.2}, 1.0), 2, 8, true, 14};
  switch_style.config.gate_normalisation = moe::GateNormalisation::none;
  check_gradients(switch_style, 1.0);
  check_gradients({flat_config(6, 5, 3, {0.3, 0.1}, 1.5), 2, 8, true, 15}, 1.0);
}

TEST(StMoEGradient, V0014AndHierarchy) {
  check_gradients({v0014_config(6, 4, 0, 1.25), 2, 8, true, 16}, 1.0);
  check_gradients({v0014_config(5, 2, 2, 1.25), 2, 10, true, 17, 2.0}, 1.0);
  MoECase st_hier{v0014_config(5, 2, 2, 2.0), 1, 9, true, 18, 2.0};
  st_hier.config.straight_through_dispatch_tensor = true;
  check_gradients(st_hier, 0.5);
}

TEST(StMoEBackward, GradientsAccumulateAndZeroGradResets) {
  StMoE<double> layer(flat_config(5, 3, 2, {0.2}, 1.25), 21);
  const auto x = make_tensor<double>({2, 6, 5}, random_values(60, 21));
  const auto dy = make_tensor<double>({2, 6, 5}, random_values(60, 22));
  Generator rng(3);
  const auto f = layer.forward(x, true, rng);
  layer.backward(f, dy, 1.0);
  const auto once = get_flat(tensors_of(layer.grads()));
  layer.backward(f, dy, 1.0);
  const auto twice = get_flat(tensors_of(layer.grads()));
  for (std::size_t i = 0; i < once.size(); ++i) EXPECT_NEAR(twice[i], 2 * once[i], 1e-12 * (1 + std::abs(once[i])));
  layer.zero_grad();
  for (double g : get_flat(tensors_of(layer.grads()))) EXPECT_EQ(g, 0.0);
}

// ---------------------------------------------------------------------------------------------
// SparseMoEBlock.

namespace {

template <class T>
std::vector<Tensor<T>*> block_tensors(SparseMoEBlock<T>& block, bool grads) {
  std::vector<Tensor<T>*> list;
  const auto ff = [&](auto& expert) {
    for (Tensor<T>* t : tensors_of(grads ? expert->grads() : expert->params())) list.push_back(t);
  };
  if (block.ff_before()) ff(block.ff_before());
  list.push_back(grads ? &block.moe_prenorm_gamma_grad() : &block.moe_prenorm_gamma());
  for (Tensor<T>* t : tensors_of(grads ? block.moe().grads() : block.moe().params())) list.push_back(t);
  if (block.ff_after()) ff(block.ff_after());
  return list;
}

// Through kmoe's own forward, so with a detached dispatch (the straight-through path is checked on
// the MoE against the reference surrogate, and on the blocks by the fixtures).
void check_block_gradients(SparseMoEBlockConfig config, index_t B, index_t n, bool training, std::uint64_t seed) {
  config.moe.straight_through_dispatch_tensor = false;
  SparseMoEBlock<double> block(config, seed);
  const auto params = block_tensors(block, false);
  set_flat(params, [&] {
    auto v = get_flat(params);
    const auto noise = random_values(v.size(), seed + 1, -0.2, 0.2);
    for (std::size_t i = 0; i < v.size(); ++i) v[i] += noise[i];
    return v;
  }());
  const index_t D = config.moe.dim;
  const auto xv = random_values(B * n * D, seed + 2);
  const Shape shape{B, n, D};
  Generator unused(0);
  const auto call = safe_call(
      config.moe, training, B, n,
      [&](const StMoECall<double>& k) { return block.forward(make_tensor<double>(shape, xv), training, unused, k).moe; },
      seed + 3);
  const auto R = random_values(xv.size(), seed + 4);
  std::vector<double> point = xv;
  const auto p0 = get_flat(params);
  point.insert(point.end(), p0.begin(), p0.end());
  const auto loss = [&](const std::vector<double>& v) {
    set_flat(params, v, xv.size());
    const auto f = block.forward(make_tensor<double>(shape, std::vector<double>(v.begin(), v.begin() + xv.size())),
                                 training, unused, call);
    return dot(to_double(f.out), R) + f.total_aux_loss;
  };
  set_flat(params, point, xv.size());
  const auto f = block.forward(make_tensor<double>(shape, xv), training, unused, call);
  block.zero_grad();
  std::vector<double> analytic = to_double(block.backward(f, make_tensor<double>(shape, R), 1.0));
  const auto g = get_flat(block_tensors(block, true));
  analytic.insert(analytic.end(), g.begin(), g.end());
  EXPECT_LT(finite_difference_error(point, loss, analytic), fd_tolerance)
      << "ff_before " << config.add_ff_before << " ff_after " << config.add_ff_after << " hierarchical "
      << config.moe.hierarchical();
}

}  // namespace

TEST(SparseMoEBlockGradient, FeedForwardBeforeAndAfter) {
  SparseMoEBlockConfig c{flat_config(5, 3, 2, {0.2}, 1.25), true, true};
  check_block_gradients(c, 2, 6, true, 31);
}

TEST(SparseMoEBlockGradient, AfterOnlyAndNoFeedForward) {
  check_block_gradients({flat_config(5, 3, 2, {0.2}, 1.25), false, true}, 2, 6, false, 32);
  check_block_gradients({flat_config(5, 3, 2, {0.2}, 1.25), false, false}, 2, 6, true, 33);
}

TEST(SparseMoEBlockGradient, HierarchicalV0014) {
  check_block_gradients({v0014_config(5, 2, 2, 1.25), false, true}, 1, 10, true, 34);
}

TEST(SparseMoEBlock, ResidualStructure) {
  // Without feed-forwards the block is x + MoE(RMSNorm(x)).
  SparseMoEBlock<double> block({flat_config(4, 3, 2, {0.2}, 2.0), false, false}, 41);
  const auto x = make_tensor<double>({1, 5, 4}, random_values(20, 41));
  Generator a(5), b(5);
  const auto f = block.forward(x, false, a);
  const auto xv = to_double(x);
  std::vector<double> normed(20);
  for (int t = 0; t < 5; ++t) {
    double norm = 0;
    for (int d = 0; d < 4; ++d) norm += xv[t * 4 + d] * xv[t * 4 + d];
    for (int d = 0; d < 4; ++d) normed[t * 4 + d] = xv[t * 4 + d] / std::sqrt(norm) * 2.0;  // √dim = 2
  }
  const auto moe = block.moe().forward(make_tensor<double>({1, 5, 4}, normed), false, b);
  const auto out = to_double(f.out), m = to_double(moe.out);
  for (int i = 0; i < 20; ++i) EXPECT_NEAR(out[i], xv[i] + m[i], 1e-12);
}

// ---------------------------------------------------------------------------------------------
// Configuration and argument errors.

TEST(StMoEConfig, InvalidFieldsAreNamed) {
  const auto expect_invalid = [](const std::function<void(StMoEConfig&)>& edit, const std::string& needle) {
    StMoEConfig c = flat_config(8, 4, 2, {0.2}, 1.25);
    edit(c);
    expect_status([&] { c.validate(); }, Status::invalid_argument, needle, needle);
    expect_status([&] { StMoE<float>(c, 1); }, Status::invalid_argument, needle, needle);
  };
  expect_invalid([](StMoEConfig& c) { c.dim = 0; }, "dim = 0");
  expect_invalid([](StMoEConfig& c) { c.num_experts = 0; }, "num_experts = 0");
  expect_invalid([](StMoEConfig& c) { c.num_experts_inner = -1; }, "num_experts_inner = -1");
  expect_invalid([](StMoEConfig& c) { c.gating_top_n = 0; }, "gating_top_n = 0");
  expect_invalid([](StMoEConfig& c) { c.gating_top_n = 5; }, "gating_top_n = 5");
  expect_invalid([](StMoEConfig& c) { c.num_experts_inner = 3, c.gating_top_n = 3; }, "hierarchical MoE gates are top-2");
  expect_invalid([](StMoEConfig& c) { c.gating_top_n = 4, c.threshold_train = {0.2, 0.1}; }, "threshold_train has 2 values");
  expect_invalid([](StMoEConfig& c) { c.threshold_eval = {0.0}; }, "threshold_eval[0] = 0");
  expect_invalid([](StMoEConfig& c) { c.threshold_train = {NAN}; }, "threshold_train[0]");
  expect_invalid([](StMoEConfig& c) { c.capacity_factor_train = -1; }, "capacity_factor_train = -1");
  expect_invalid([](StMoEConfig& c) { c.capacity_factor_eval = INFINITY; }, "capacity_factor_eval");
  expect_invalid([](StMoEConfig& c) { c.balance_loss_coef = NAN; }, "balance_loss_coef");
  expect_invalid([](StMoEConfig& c) { c.router_z_loss_coef = INFINITY; }, "router_z_loss_coef");
  expect_invalid([](StMoEConfig& c) { c.expert_hidden_mult = 0.1; }, "hidden size");
  // One value or one per extra choice.
  StMoEConfig ok = flat_config(8, 4, 3, {0.2, 0.1}, 1.25);
  ok.validate();
  EXPECT_EQ(ok.gating_options(true).thresholds, (std::vector<double>{0.2, 0.1}));
  ok.threshold_train = {0.3};
  EXPECT_EQ(ok.gating_options(true).thresholds, (std::vector<double>{0.3, 0.3}));
  EXPECT_EQ(ok.expert_hidden(), 5);  // int(8 · 1 · 2/3)
  StMoEConfig defaults;
  defaults.dim = 512;
  EXPECT_EQ(defaults.expert_hidden(), 1365);
  EXPECT_EQ(defaults.num_experts, 16);
  EXPECT_EQ(defaults.gating_top_n, 2);
  EXPECT_EQ(defaults.capacity_factor_eval, 2.0);
}

TEST(StMoEForward, BadInputsAreErrors) {
  StMoE<double> layer(flat_config(4, 3, 2, {0.2}, 1.25), 1);
  Generator rng(1);
  expect_status([&] { layer.forward(make_tensor<double>({2, 3, 5}, random_values(30, 1)), true, rng); },
                Status::shape_mismatch, "expected [batch >= 1, n >= 1, dim = 4]");
  expect_status([&] { layer.forward(make_tensor<double>({6, 4}, random_values(24, 1)), true, rng); },
                Status::shape_mismatch, "StMoE::forward: x is [6, 4]");
  auto bad = random_values(24, 2);
  bad[5] = NAN;
  expect_status([&] { layer.forward(make_tensor<double>({2, 3, 4}, bad), true, rng); }, Status::non_finite, "x");
  StMoECall<double> call;
  call.route_uniform = make_tensor<double>({1, 2, 3}, random_values(6, 3));
  expect_status([&] { layer.forward(make_tensor<double>({2, 3, 4}, random_values(24, 1)), true, rng, call); },
                Status::shape_mismatch, "route_uniform");
  const auto f = layer.forward(make_tensor<double>({2, 3, 4}, random_values(24, 1)), true, rng);
  expect_status([&] { layer.backward(f, make_tensor<double>({2, 3, 3}, random_values(18, 1)), 1.0); },
                Status::shape_mismatch, "dout");
  expect_status([&] { layer.backward(layers::StMoEForward<double>(), make_tensor<double>({2, 3, 4}, random_values(24, 1)), 1.0); },
                Status::invalid_argument, "empty");
  StMoE<double> hier(v0014_config(4, 2, 2, 1.25), 1);
  StMoECall<double> noisy;
  noisy.noise_gates = true;
  expect_status([&] { hier.forward(make_tensor<double>({2, 3, 4}, random_values(24, 1)), true, rng, noisy); },
                Status::invalid_argument, "noise_gates");
  StMoECall<double> inner;
  inner.route_uniform_inner = make_tensor<double>({2, 2, 2, 3}, random_values(24, 3));
  expect_status([&] { hier.forward(make_tensor<double>({2, 3, 4}, random_values(24, 1)), true, rng, inner); },
                Status::shape_mismatch, "route_uniform_inner");
}

TEST(StMoEInit, MatchesTheOriginal) {
  StMoEConfig c = flat_config(24, 4, 2, {0.2}, 1.25);
  c.expert_hidden_mult = 2;  // h = 32
  StMoE<double> layer(c, 5);
  const auto bound = [](const std::vector<double>& v) {
    double m = 0;
    for (double e : v) m = std::max(m, std::abs(e));
    return m;
  };
  const auto& e = layer.params().experts;
  EXPECT_LE(bound(to_double(layer.params().router)), 1 / std::sqrt(24.0));
  EXPECT_GT(bound(to_double(layer.params().router)), 0.8 / std::sqrt(24.0));
  EXPECT_LE(bound(to_double(e.w_in)), 1 / std::sqrt(64.0));  // out_features = 2h
  EXPECT_GT(bound(to_double(e.w_in)), 0.9 / std::sqrt(64.0));
  EXPECT_LE(bound(to_double(e.b_out)), 1 / std::sqrt(24.0));
  EXPECT_LE(bound(to_double(e.w_out)), 1 / std::sqrt(24.0));
  for (double m : to_double(e.mult_bias)) EXPECT_EQ(m, 1.0);
  StMoE<double> old(v0014_config(24, 4, 0, 1.25), 5);
  const auto r = to_double(old.params().router);
  double sq = 0;
  for (double v : r) sq += v * v;
  EXPECT_NEAR(sq / r.size(), 1.0, 0.35);  // N(0, 1)
}
