#include "kmoe/ops/adamw.hpp"
#include "test_util.hpp"

#include <cmath>

using namespace kmoe;
using namespace kmoe::test;

namespace {

struct State {
  std::vector<double> param, exp_avg, exp_avg_sq;
};

// torch.optim.AdamW's update (amsgrad off, maximize off), written out per element in double.
void naive_adamw_step(const ops::AdamWConfig& c, int step, State& s, const std::vector<double>& grad) {
  const double bias_correction1 = 1 - std::pow(c.beta1, step), bias_correction2 = 1 - std::pow(c.beta2, step);
  for (std::size_t i = 0; i < s.param.size(); ++i) {
    s.param[i] -= c.lr * c.weight_decay * s.param[i];  // decoupled weight decay, before the moments
    s.exp_avg[i] = c.beta1 * s.exp_avg[i] + (1 - c.beta1) * grad[i];
    s.exp_avg_sq[i] = c.beta2 * s.exp_avg_sq[i] + (1 - c.beta2) * grad[i] * grad[i];
    const double m_hat = s.exp_avg[i] / bias_correction1, v_hat = s.exp_avg_sq[i] / bias_correction2;
    s.param[i] -= c.lr * m_hat / (std::sqrt(v_hat) + c.eps);
  }
}

// Runs `steps` updates with fresh random gradients through adamw_step<T> and the naive loop; returns
// the worst relative error of param, exp_avg and exp_avg_sq over all steps.
template <class T>
double adamw_error(const ops::AdamWConfig& config, index_t n, int steps, std::uint64_t seed) {
  State expected{random_values(n, seed), std::vector<double>(n, 0.0), std::vector<double>(n, 0.0)};
  auto param = make_tensor<T>({n}, expected.param, "param");
  Tensor<T> exp_avg("exp_avg", {n}), exp_avg_sq("exp_avg_sq", {n});
  double worst = 0;
  for (int step = 1; step <= steps; ++step) {
    // gradients of mixed magnitude, some exactly zero
    auto grad = random_values(n, seed + step, -2, 2);
    for (index_t i = 0; i < n; i += 5) grad[i] = 0;
    for (index_t i = 1; i < n; i += 7) grad[i] *= 1e-3;
    // round the gradient to T so both sides see the same input
    const auto grad_t = cast_vector<T>(grad);
    grad.assign(grad_t.begin(), grad_t.end());
    auto g = make_tensor<T>({n}, grad, "grad");
    ops::adamw_step<T>(config, step, param.flat(), g.flat(), exp_avg.flat(), exp_avg_sq.flat());
    naive_adamw_step(config, step, expected, grad);
    worst = std::max({worst, max_rel_error(to_double(param), expected.param),
                      max_rel_error(to_double(exp_avg), expected.exp_avg),
                      max_rel_error(to_double(exp_avg_sq), expected.exp_avg_sq)});
  }
  return worst;
}

void expect_invalid(const ops::AdamWConfig& config, index_t step, const char* what) {
  Tensor<double> p("p", {4}), g("g", {4}), m("m", {4}), v("v", {4});
  try {
    ops::adamw_step<double>(config, step, p.flat(), g.flat(), m.flat(), v.flat());
    ADD_FAILURE() << what << ": no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::invalid_argument) << what;
    EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
  }
}

}  // namespace

TEST(AdamW, MatchesNaiveLoopOverSeveralStepsDouble) {
  EXPECT_LT(adamw_error<double>(ops::AdamWConfig{}, 1037, 6, 1), 1e-13);
  EXPECT_LT(adamw_error<double>(ops::AdamWConfig{0.1, 0.5, 0.9, 1e-3, 0.3}, 33, 10, 2), 1e-13);
  EXPECT_LT(adamw_error<double>(ops::AdamWConfig{1e-2, 0.0, 0.0, 1e-8, 0.0}, 7, 3, 3), 1e-13);  // no momentum
}

TEST(AdamW, MatchesNaiveLoopOverSeveralStepsFloat) {
  // 2e-6 also catches 1 − β formed in float (off by 1.3e-5 for β₂ = 0.999)
  EXPECT_LT(adamw_error<float>(ops::AdamWConfig{}, 1037, 6, 4), 2e-6);
  EXPECT_LT(adamw_error<float>(ops::AdamWConfig{0.1, 0.5, 0.9, 1e-3, 0.3}, 129, 10, 5), 2e-6);
}

TEST(AdamW, FirstStepMovesEachParameterByAboutLr) {
  // step 1: m̂ = g, v̂ = g², so p ← p(1 − lr·wd) − lr·g/(|g| + eps)
  const ops::AdamWConfig config{0.01, 0.9, 0.999, 1e-8, 0.1};
  auto param = make_tensor<double>({3}, {1.0, -2.0, 0.5});
  auto grad = make_tensor<double>({3}, {3.0, -0.25, 0.0});
  Tensor<double> m("m", {3}), v("v", {3});
  ops::adamw_step<double>(config, 1, param.flat(), grad.flat(), m.flat(), v.flat());
  const auto p = param.to_host();
  EXPECT_NEAR(p[0], 1.0 * (1 - 0.001) - 0.01 * 3 / (3 + 1e-8), 1e-15);
  EXPECT_NEAR(p[1], -2.0 * (1 - 0.001) + 0.01 * 0.25 / (0.25 + 1e-8), 1e-15);
  EXPECT_DOUBLE_EQ(p[2], 0.5 * (1 - 0.001));  // zero gradient: decay only
}

TEST(AdamW, InvalidHyperParametersAreErrors) {
  const ops::AdamWConfig ok;
  auto with = [&](auto field, double value) {
    ops::AdamWConfig c = ok;
    c.*field = value;
    return c;
  };
  expect_invalid(with(&ops::AdamWConfig::lr, -1e-3), 1, "lr");
  expect_invalid(with(&ops::AdamWConfig::lr, NAN), 1, "lr");
  expect_invalid(with(&ops::AdamWConfig::beta1, 1.0), 1, "beta1");
  expect_invalid(with(&ops::AdamWConfig::beta1, -0.1), 1, "beta1");
  expect_invalid(with(&ops::AdamWConfig::beta2, 1.0), 1, "beta2");
  expect_invalid(with(&ops::AdamWConfig::beta2, NAN), 1, "beta2");
  expect_invalid(with(&ops::AdamWConfig::eps, 0.0), 1, "eps");
  expect_invalid(with(&ops::AdamWConfig::weight_decay, -0.01), 1, "weight_decay");
  expect_invalid(ok, 0, "step");
  expect_invalid(ok, -3, "step");
  // the boundaries that are allowed
  Tensor<double> p("p", {4}), g("g", {4}), m("m", {4}), v("v", {4});
  EXPECT_NO_THROW(
      ops::adamw_step<double>(ops::AdamWConfig{0.0, 0.0, 0.0, 1e-30, 0.0}, 1, p.flat(), g.flat(), m.flat(), v.flat()));
}

TEST(AdamW, SizeMismatchIsAShapeError) {
  Tensor<double> p("p", {4}), g("g", {4}), m("m", {4}), v("v", {4}), short_view("short", {3});
  const ops::AdamWConfig config;
  for (int which = 0; which < 3; ++which) {
    try {
      ops::adamw_step<double>(config, 1, p.flat(), which == 0 ? short_view.flat() : g.flat(),
                              which == 1 ? short_view.flat() : m.flat(), which == 2 ? short_view.flat() : v.flat());
      ADD_FAILURE() << "no error for argument " << which;
    } catch (const Error& e) {
      EXPECT_EQ(e.status(), Status::shape_mismatch);
      EXPECT_NE(std::string(e.what()).find("adamw_step"), std::string::npos) << e.what();
    }
  }
}
