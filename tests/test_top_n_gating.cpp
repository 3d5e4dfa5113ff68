#include "kmoe/moe/top_n_gating.hpp"
#include "st_moe_reference.hpp"
#include "test_util.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

using namespace kmoe;
using namespace kmoe::test;
using moe::BalanceDensity;
using moe::GateNormalisation;
using moe::TopNGatingOptions;

namespace {

struct Case {
  TopNGatingOptions options;
  index_t groups = 2, n = 9;
  double logit_scale = 2.0;
  bool with_importance = false;
  std::uint64_t seed = 1;
};

TopNGatingOptions options(int E, int k, std::vector<double> thresholds, double cf, bool losses) {
  TopNGatingOptions o;
  o.num_gates = E;
  o.top_n = k;
  o.thresholds = std::move(thresholds);
  o.capacity_factor = cf;
  o.compute_losses = losses;
  return o;
}

std::vector<double> importance_values(index_t N, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::vector<double> imp(N);
  for (auto& v : imp) v = std::vector<double>{0.0, 0.5, 1.0, 1.0}[random_int(gen, 0, 3)];
  return imp;
}

// Uniforms placed at least 0.2 · ratio away from each choice's route ratio: the routing cannot
// flip under finite-difference steps or float rounding.
std::vector<double> safe_uniforms(const RefGating& r, int k, index_t N, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::vector<double> u(k * N);
  for (int i = 0; i < k; ++i)
    for (index_t t = 0; t < N; ++t) {
      const double ratio = r.route_ratio[i * N + t];
      const bool route = random_int(gen, 0, 2) > 0;
      u[i * N + t] = ratio >= 1.0 ? 0.5 : route ? 0.5 * ratio : std::min(0.999, 0.2 * ratio + 0.8);
      if (ratio < 1.0 && !route && u[i * N + t] < 1.2 * ratio) u[i * N + t] = std::min(0.999, 1.2 * ratio + 0.01);
    }
  return u;
}

template <class T>
moe::TopNRouting<T> run(const Case& c, const std::vector<double>& logits, const std::vector<double>& uniform,
                        const std::vector<double>& importance) {
  const index_t E = c.options.num_gates, N = c.groups * c.n;
  const auto lt = make_tensor<T>({c.groups, c.n, E}, logits, "logits");
  const auto ut = make_tensor<T>({c.options.top_n, N}, uniform, "uniform");
  const auto it = importance.empty() ? Tensor<T>() : make_tensor<T>({c.groups, c.n}, importance, "importance");
  return moe::top_n_gating_forward<T>(c.options, lt, Tensor<T>(), it, ut, RngStream{});
}

std::vector<int> ints(const Tensor<int>& t) { return t.to_host(); }

template <class T>
void check_forward(const Case& c) {
  const index_t E = c.options.num_gates, N = c.groups * c.n;
  const int k = c.options.top_n;
  const auto logits = random_values(N * E, c.seed, -c.logit_scale, c.logit_scale);
  const auto importance = c.with_importance ? importance_values(N, c.seed + 7) : std::vector<double>();
  const auto first = reference_gating(c.options, logits, c.groups, c.n, std::vector<double>(k * N, 0.5), importance);
  const auto uniform = safe_uniforms(first, k, N, c.seed + 3);
  const auto ref = reference_gating(c.options, logits, c.groups, c.n, uniform, importance);
  const auto label = ::testing::Message() << "E " << E << " k " << k << " groups " << c.groups << " n " << c.n
                                          << " cf " << c.options.capacity_factor << (c.with_importance ? " importance" : "")
                                          << (sizeof(T) == 4 ? " float" : " double");
  const auto r = run<T>(c, logits, uniform, importance);
  EXPECT_EQ(r.capacity, ref.capacity) << label;
  EXPECT_EQ(ints(r.expert_index), ref.expert_index) << label;
  EXPECT_EQ(ints(r.position), ref.position) << label;
  const double tol = sizeof(T) == 4 ? 2e-6 : 1e-13;
  EXPECT_LT(max_rel_error(to_double(r.gate), ref.gate), tol) << label;
  EXPECT_LT(max_rel_error(to_double(r.normalised_gate), ref.normalised), tol) << label;
  EXPECT_NEAR(r.balance_loss, ref.balance, tol * std::max(1.0, ref.balance)) << label;
  EXPECT_NEAR(r.router_z_loss, ref.z, tol * std::max(1.0, ref.z)) << label;
}

// L = Σ gate ⊙ R + c_b · balance + c_z · z as a function of the logits, against the backward.
void check_gradient(const Case& c, double balance_coef, double z_coef) {
  const index_t E = c.options.num_gates, N = c.groups * c.n;
  const int k = c.options.top_n;
  const auto logits = random_values(N * E, c.seed, -c.logit_scale, c.logit_scale);
  const auto importance = c.with_importance ? importance_values(N, c.seed + 7) : std::vector<double>();
  const auto first = reference_gating(c.options, logits, c.groups, c.n, std::vector<double>(k * N, 0.5), importance);
  ASSERT_GT(*std::min_element(first.margins.begin(), first.margins.end()), 1e-4) << "test data has near-ties";
  const auto uniform = safe_uniforms(first, k, N, c.seed + 3);
  const auto R = random_values(N * k, c.seed + 5);
  const auto loss = [&](const std::vector<double>& l) {
    const auto r = run<double>(c, l, uniform, importance);
    return dot(to_double(r.gate), R) + balance_coef * r.balance_loss + z_coef * r.router_z_loss;
  };
  const auto r = run<double>(c, logits, uniform, importance);
  const auto dlogits = moe::top_n_gating_backward<double>(c.options, r, make_tensor<double>({N, k}, R), balance_coef,
                                                          z_coef);
  EXPECT_LT(finite_difference_error(logits, loss, to_double(dlogits)), fd_tolerance)
      << "E " << E << " k " << k << " cf " << c.options.capacity_factor << (c.with_importance ? " importance" : "");
}

}  // namespace

TEST(TopNGating, MatchesReferenceTop2) {
  Case c{options(5, 2, {0.2}, 1.25, true), 3, 17, 2.0, false, 11};
  check_forward<float>(c);
  check_forward<double>(c);
}

TEST(TopNGating, MatchesReferenceTop1AndTop3WithPerChoiceThresholds) {
  Case top1{options(4, 1, {}, 1.0, true), 2, 13, 2.0, false, 12};
  check_forward<double>(top1);
  check_forward<float>(top1);
  Case top3{options(6, 3, {0.3, 0.1}, 2.0, true), 2, 33, 1.5, false, 13};
  check_forward<double>(top3);
  check_forward<float>(top3);
  top3.options.thresholds = {0.05, 0.6};
  top3.options.compute_losses = false;
  check_forward<double>(top3);
}

TEST(TopNGating, MatchesReferenceV0014WithImportance) {
  Case c{options(4, 2, {0.2}, 1.25, true), 4, 10, 3.0, true, 14};
  c.options.balance_density = BalanceDensity::before_capacity;
  c.options.normalisation = GateNormalisation::sum_plus_eps;
  check_forward<double>(c);
  check_forward<float>(c);
  c.with_importance = false;
  check_forward<double>(c);
}

TEST(TopNGating, CapacityEdgeCases) {
  // n < 4: C = 4 > n (nothing can be dropped).
  Case tiny{options(3, 2, {0.2}, 1.0, true), 2, 3, 2.0, false, 21};
  check_forward<double>(tiny);
  EXPECT_EQ(tiny.options.capacity(3), 4);
  // C ≥ n: no drops at all.
  Case roomy{options(4, 2, {0.2}, 8.0, true), 1, 29, 2.0, false, 22};
  EXPECT_EQ(roomy.options.capacity(29), 29);
  check_forward<double>(roomy);
  // One expert preferred by every token: its first choices beyond C = 4 are all dropped.
  TopNGatingOptions o = options(4, 2, {0.2}, 0.5, true);
  const index_t n = 12, E = 4;
  std::vector<double> logits(n * E);
  for (index_t t = 0; t < n; ++t)
    for (index_t e = 0; e < E; ++e) logits[t * E + e] = e == 0 ? 5.0 : 0.3 * e + 0.01 * t;
  const auto r = moe::top_n_gating_forward<double>(o, make_tensor<double>({1, n, E}, logits), Tensor<double>(),
                                                   Tensor<double>(), make_tensor<double>({2, n}, std::vector<double>(2 * n, 0.0)),
                                                   RngStream{});
  EXPECT_EQ(r.capacity, 4);
  const auto index = ints(r.expert_index), position = ints(r.position);
  const auto gate = to_double(r.gate);
  for (index_t t = 0; t < n; ++t) {
    EXPECT_EQ(index[t * 2], t < 4 ? 0 : -1) << t;
    EXPECT_EQ(position[t * 2], t < 4 ? static_cast<int>(t) : -1) << t;
    if (t >= 4) EXPECT_EQ(gate[t * 2], 0.0) << t;
  }
  // Density after capacity counts the 4 kept first choices only; before capacity all 12.
  EXPECT_NEAR(to_double(r.density)[0], 4.0 / 12.0, 1e-15);
  o.balance_density = BalanceDensity::before_capacity;
  const auto before = moe::top_n_gating_forward<double>(o, make_tensor<double>({1, n, E}, logits), Tensor<double>(),
                                                        Tensor<double>(), make_tensor<double>({2, n}, std::vector<double>(2 * n, 0.0)),
                                                        RngStream{});
  EXPECT_NEAR(to_double(before.density)[0], 1.0, 1e-15);
}

TEST(TopNGating, EvalHasNoLossesAndGeneratedDrawsAreReproducible) {
  Case c{options(5, 3, {0.4, 0.4}, 2.0, false), 2, 16, 1.0, false, 31};
  const index_t N = c.groups * c.n, E = 5;
  const auto logits = make_tensor<double>({c.groups, c.n, E}, random_values(N * E, 31, -1, 1));
  const RngStream stream{99, 0};
  const auto a = moe::top_n_gating_forward<double>(c.options, logits, Tensor<double>(), Tensor<double>(),
                                                   Tensor<double>(), stream);
  const auto b = moe::top_n_gating_forward<double>(c.options, logits, Tensor<double>(), Tensor<double>(),
                                                   Tensor<double>(), stream);
  EXPECT_EQ(a.balance_loss, 0.0);
  EXPECT_EQ(a.router_z_loss, 0.0);
  EXPECT_EQ(ints(a.expert_index), ints(b.expert_index));
  // The generated draws are the stream's uniforms at i · tokens + t: injecting them gives the same routing.
  const auto drawn = draw_on_device<double>(stream, 3 * N);
  const auto injected = moe::top_n_gating_forward<double>(c.options, logits, Tensor<double>(), Tensor<double>(),
                                                          make_tensor<double>({3, N}, drawn), RngStream{});
  EXPECT_EQ(ints(a.expert_index), ints(injected.expert_index));
  // With thresholds 0.4 some later choices are routed and some are not.
  const auto index = ints(a.expert_index);
  int routed_later = 0;
  for (index_t t = 0; t < N; ++t) routed_later += (index[t * 3 + 1] >= 0) + (index[t * 3 + 2] >= 0);
  EXPECT_GT(routed_later, 0);
  EXPECT_LT(routed_later, 2 * N);
}

TEST(TopNGating, NoiseIsGumbelAndEntersOnlyTheSoftmax) {
  const auto noise = moe::gumbel_noise<double>({4000}, RngStream{5, 0}, 1.0);
  const auto v = to_double(noise);
  const double mean = std::accumulate(v.begin(), v.end(), 0.0) / v.size();
  EXPECT_NEAR(mean, 0.5772156649, 0.06);  // Euler–Mascheroni: the Gumbel mean
  Case c{options(4, 2, {0.2}, 2.0, true), 1, 8, 1.0, false, 41};
  const index_t N = 8, E = 4;
  const auto logits = make_tensor<double>({1, N, E}, random_values(N * E, 41, -1, 1));
  const auto big = moe::gumbel_noise<double>({1, N, E}, RngStream{6, 0}, 3.0);
  const auto clean = moe::top_n_gating_forward<double>(c.options, logits, Tensor<double>(), Tensor<double>(),
                                                       Tensor<double>(), RngStream{});
  const auto noisy = moe::top_n_gating_forward<double>(c.options, logits, big, Tensor<double>(), Tensor<double>(),
                                                       RngStream{});
  EXPECT_EQ(clean.router_z_loss, noisy.router_z_loss);  // the z-loss uses the un-noised logits
  EXPECT_NE(clean.balance_loss, noisy.balance_loss);    // the proxy uses the noisy probabilities
}

TEST(TopNGatingGradient, Top2TrainWithDrops) {
  check_gradient({options(5, 2, {0.2}, 1.0, true), 2, 11, 2.0, false, 51}, 0.7, 0.3);
}

TEST(TopNGatingGradient, Top1AndTop3) {
  Case top1{options(4, 1, {}, 1.0, true), 2, 9, 2.0, false, 52};
  check_gradient(top1, 0.5, 0.2);
  top1.options.normalisation = GateNormalisation::none;  // Switch-style gate = probability
  check_gradient(top1, 0.5, 0.2);
  check_gradient({options(6, 3, {0.25, 0.1}, 1.5, true), 2, 13, 1.5, false, 53}, 0.4, 0.6);
}

TEST(TopNGatingGradient, EvalAndV0014Importance) {
  check_gradient({options(5, 2, {0.2}, 2.0, false), 2, 10, 2.0, false, 54}, 0.7, 0.3);
  Case v{options(4, 2, {0.2}, 1.25, true), 4, 8, 2.0, true, 55};
  v.options.balance_density = BalanceDensity::before_capacity;
  v.options.normalisation = GateNormalisation::sum_plus_eps;
  check_gradient(v, 0.8, 0.5);
}

TEST(TopNGating, InvalidOptionsAndShapesAreErrors) {
  const auto logits = make_tensor<double>({1, 6, 4}, random_values(24, 1));
  const auto call = [&](const TopNGatingOptions& o) {
    moe::top_n_gating_forward<double>(o, logits, Tensor<double>(), Tensor<double>(), Tensor<double>(), RngStream{});
  };
  expect_status([&] { call(options(4, 0, {}, 1.0, true)); }, Status::invalid_argument, "top_n = 0");
  expect_status([&] { call(options(4, 5, {0.2, 0.2, 0.2, 0.2}, 1.0, true)); }, Status::invalid_argument, "top_n = 5");
  expect_status([&] { call(options(4, 3, {0.2}, 1.0, true)); }, Status::invalid_argument, "thresholds has 1 values");
  expect_status([&] { call(options(4, 2, {-0.2}, 1.0, true)); }, Status::invalid_argument, "thresholds[0] = -0.2");
  expect_status([&] { call(options(4, 2, {0.2}, NAN, true)); }, Status::invalid_argument, "capacity_factor");
  expect_status([&] { call(options(5, 2, {0.2}, 1.0, true)); }, Status::shape_mismatch, "num_gates = 5");
  const auto o = options(4, 2, {0.2}, 1.0, true);
  expect_status(
      [&] {
        moe::top_n_gating_forward<double>(o, logits, Tensor<double>(), Tensor<double>(),
                                          make_tensor<double>({2, 5}, random_values(10, 2)), RngStream{});
      },
      Status::shape_mismatch, "route_uniform");
  expect_status(
      [&] {
        moe::top_n_gating_forward<double>(o, logits, Tensor<double>(), make_tensor<double>({1, 5}, random_values(5, 2)),
                                          Tensor<double>(), RngStream{});
      },
      Status::shape_mismatch, "importance");
  const auto r = moe::top_n_gating_forward<double>(o, logits, Tensor<double>(), Tensor<double>(), Tensor<double>(),
                                                   RngStream{});
  expect_status([&] { moe::top_n_gating_backward<double>(o, r, make_tensor<double>({6, 3}, random_values(18, 3)), 1.0, 1.0); },
                Status::shape_mismatch, "dgate");
}
