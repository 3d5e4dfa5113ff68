#include "kmoe/moe/entropy_regulariser.hpp"
#include "test_util.hpp"

#include <cmath>

using namespace kmoe;
using namespace kmoe::test;

namespace {

// (1/(B·G)) Σ_{b,g} Σ_e p̄ log p̄ with p̄_{b,g} the mean of softmax_E over the R·T rows, in double.
double naive_entropy_reg(const std::vector<std::vector<double>>& calls, index_t B, index_t T, index_t G, index_t E) {
  double total = 0;
  for (index_t b = 0; b < B; ++b)
    for (index_t g = 0; g < G; ++g) {
      std::vector<double> mean(E, 0.0);
      for (const auto& z : calls)
        for (index_t t = 0; t < T; ++t) {
          const double* row = &z[((b * T + t) * G + g) * E];
          double mx = row[0], s = 0;
          for (index_t e = 1; e < E; ++e) mx = std::max(mx, row[e]);
          for (index_t e = 0; e < E; ++e) s += std::exp(row[e] - mx);
          for (index_t e = 0; e < E; ++e) mean[e] += std::exp(row[e] - mx) / s / (T * calls.size());
        }
      for (double p : mean) total += p * std::log(p);
    }
  return total / (B * G);
}

}  // namespace

TEST(EntropyRegulariser, ForwardMatchesNaiveLoop) {
  for (auto [B, T, G, E, R] : std::vector<std::tuple<index_t, index_t, index_t, index_t, int>>{
           {2, 5, 3, 4, 2}, {1, 1, 1, 7, 1}, {3, 4, 1, 16, 3}}) {
    std::vector<std::vector<double>> calls;
    std::vector<Tensor<double>> td;
    std::vector<Tensor<float>> tf;
    for (int r = 0; r < R; ++r) {
      calls.push_back(random_values(B * T * G * E, 70 + r, -3, 3));
      td.push_back(make_tensor<double>({B, T, G, E}, calls.back()));
      tf.push_back(make_tensor<float>({B, T, G, E}, calls.back()));
    }
    const double expected = naive_entropy_reg(calls, B, T, G, E);
    EXPECT_NEAR(moe::entropy_reg_forward(td).value, expected, 1e-13);
    EXPECT_NEAR(moe::entropy_reg_forward(tf).value, expected, 1e-5);
  }
}

TEST(EntropyRegulariser, BackwardMatchesFiniteDifferences) {
  for (const int R : {3, 1}) {  // one call is σ-MoE's case (no stacking copy)
    const index_t B = 2, T = 3, G = 2, E = 4;
    std::vector<double> all = random_values(R * B * T * G * E, 80, -2, 2);
    const auto split = [&](const std::vector<double>& v) {
      std::vector<Tensor<double>> calls;
      for (int r = 0; r < R; ++r) {
        calls.push_back(make_tensor<double>(
            {B, T, G, E}, std::vector<double>(v.begin() + r * B * T * G * E, v.begin() + (r + 1) * B * T * G * E)));
      }
      return calls;
    };
    const double coef = 0.37;
    const auto f = moe::entropy_reg_forward(split(all));
    std::vector<double> analytic;
    for (const auto& g : moe::entropy_reg_backward(f, coef)) {
      const auto h = to_double(g);
      analytic.insert(analytic.end(), h.begin(), h.end());
    }
    const auto loss = [&](const std::vector<double>& v) { return coef * moe::entropy_reg_forward(split(v)).value; };
    EXPECT_LT(finite_difference_error(all, loss, analytic), fd_tolerance) << R;
  }
}

// backward_add accumulates onto what the gradient tensors hold (σ-MoE adds it to its router gradient).
TEST(EntropyRegulariser, BackwardAddAccumulates) {
  const auto z = make_tensor<double>({1, 9, 1, 5}, random_values(45, 90, -2, 2));
  const auto f = moe::entropy_reg_forward(std::vector<Tensor<double>>{z});
  const auto fresh = to_double(moe::entropy_reg_backward(f, 0.5).front());
  const auto start = random_values(45, 91);
  const auto d = make_tensor<double>({1, 9, 1, 5}, start);
  moe::entropy_reg_backward_add(f, 0.5, std::vector<Tensor<double>>{d});
  const auto got = to_double(d);
  for (std::size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], start[i] + fresh[i], 1e-15) << i;
  expect_status([&] { moe::entropy_reg_backward_add(f, 0.5, std::vector<Tensor<double>>{}); }, Status::shape_mismatch,
                "0 gradient tensors for 1 calls");
}

TEST(EntropyRegulariser, BadArgumentsThrow) {
  expect_status([] { moe::entropy_reg_forward(std::vector<Tensor<float>>()); }, Status::invalid_argument,
                "no router logits");
  std::vector<Tensor<float>> calls = {Tensor<float>("a", {1, 2, 1, 3}), Tensor<float>("b", {1, 3, 1, 3})};
  expect_status([&] { moe::entropy_reg_forward(calls); }, Status::shape_mismatch, "router logits");
}
