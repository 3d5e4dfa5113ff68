#include "kmoe/ops/glu.hpp"
#include "test_util.hpp"

#include <cmath>

using namespace kmoe;
using namespace kmoe::test;

namespace {

double gelu(double x) { return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0))); }

// out[r, j] = gelu(in[r, h + j]) · in[r, j] · mult[j] (mult empty: 1).
std::vector<double> naive_geglu(const std::vector<double>& in, const std::vector<double>& mult, index_t rows,
                                index_t h) {
  std::vector<double> out(rows * h);
  for (index_t r = 0; r < rows; ++r)
    for (index_t j = 0; j < h; ++j)
      out[r * h + j] = gelu(in[r * 2 * h + h + j]) * in[r * 2 * h + j] * (mult.empty() ? 1.0 : mult[j]);
  return out;
}

template <class T>
std::vector<double> geglu(const std::vector<double>& in, const std::vector<double>& mult, index_t rows, index_t h) {
  const auto x = make_tensor<T>({rows, 2 * h}, in);
  const Tensor<T> m = mult.empty() ? Tensor<T>() : make_tensor<T>({h}, mult);
  Tensor<T> out("out", {rows, h});
  ops::glu_forward<T>(ops::Activation::gelu, x.template view<2>(), m.flat(), out.template view<2>());
  return to_double(out);
}

}  // namespace

TEST(Glu, ForwardMatchesNaiveLoop) {
  for (const index_t h : {1, 7, 33}) {
    const index_t rows = 13;
    const auto in = random_values(rows * 2 * h, 3 + h, -3, 3);
    const auto mult = random_values(h, 5 + h, 0.5, 1.5);
    for (const bool with_mult : {false, true}) {
      const auto m = with_mult ? mult : std::vector<double>();
      const auto expected = naive_geglu(in, m, rows, h);
      EXPECT_LT(max_rel_error(geglu<double>(in, m, rows, h), expected), 1e-14) << h;
      EXPECT_LT(max_rel_error(geglu<float>(in, m, rows, h), expected), 1e-6) << h;
    }
  }
}

TEST(Glu, BackwardMatchesFiniteDifferences) {
  const index_t rows = 9, h = 7;
  const auto in = random_values(rows * 2 * h, 21, -2, 2);
  const auto mult = random_values(h, 22, 0.5, 1.5);
  const auto r = random_values(rows * h, 23);
  const auto x = make_tensor<double>({rows, 2 * h}, in);
  const auto m = make_tensor<double>({h}, mult);
  const auto dout = make_tensor<double>({rows, h}, r);
  Tensor<double> din("din", x.shape());
  auto dmult = make_tensor<double>({h}, std::vector<double>(h, 0.25));  // accumulates onto 0.25
  ops::glu_backward<double>(ops::Activation::gelu, x.view<2>(), m.flat(), dout.view<2>(), din.view<2>(), dmult.flat());

  EXPECT_LT(finite_difference_error(in, [&](const std::vector<double>& p) { return dot(geglu<double>(p, mult, rows, h), r); },
                                    to_double(din)),
            fd_tolerance);
  auto dmult_only = to_double(dmult);
  for (auto& v : dmult_only) v -= 0.25;
  EXPECT_LT(finite_difference_error(mult, [&](const std::vector<double>& p) { return dot(geglu<double>(in, p, rows, h), r); },
                                    dmult_only),
            fd_tolerance);
}

TEST(Glu, BadShapesAreErrors) {
  Tensor<float> odd("odd", {4, 7}), out("out", {4, 3}), in("in", {4, 6}), wrong("wrong", {4, 4}), mult("mult", {2});
  expect_status([&] { ops::glu_forward<float>(ops::Activation::gelu, odd.view<2>(), {}, out.view<2>()); },
                Status::shape_mismatch, "odd");
  expect_status([&] { ops::glu_forward<float>(ops::Activation::gelu, in.view<2>(), {}, wrong.view<2>()); },
                Status::shape_mismatch, "expected [4, 3]");
  expect_status([&] { ops::glu_forward<float>(ops::Activation::gelu, in.view<2>(), mult.flat(), out.view<2>()); },
                Status::shape_mismatch, "mult has 2 entries, expected 3");
}
