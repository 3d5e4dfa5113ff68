#include "kmoe/ops/activations.hpp"
#include "test_util.hpp"

#include <cmath>

using namespace kmoe;
using namespace kmoe::test;

namespace {

double reference(ops::Activation a, double x) {
  switch (a) {
    case ops::Activation::identity: return x;
    case ops::Activation::relu: return x > 0 ? x : 0;
    case ops::Activation::gelu: return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0)));
    case ops::Activation::silu: return x / (1 + std::exp(-x));
    case ops::Activation::sigmoid: return 1 / (1 + std::exp(-x));
  }
  return NAN;
}

const ops::Activation kAll[] = {ops::Activation::identity, ops::Activation::relu, ops::Activation::gelu,
                                ops::Activation::silu, ops::Activation::sigmoid};

std::vector<double> forward(ops::Activation a, const std::vector<double>& x) {
  auto xt = make_tensor<double>({static_cast<index_t>(x.size())}, x);
  Tensor<double> y("y", xt.shape());
  ops::activation_forward<double>(a, xt.flat(), y.flat());
  return to_double(y);
}

}  // namespace

TEST(Activations, ForwardMatchesNaiveLoop) {
  for (auto a : kAll) {
    const auto x = random_values(1037, 11, -4, 4);
    std::vector<double> expected(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) expected[i] = reference(a, x[i]);
    EXPECT_LT(max_rel_error(forward(a, x), expected), 1e-14) << ops::activation_name(a);
    // float agrees to float rounding
    auto xf = make_tensor<float>({static_cast<index_t>(x.size())}, x);
    Tensor<float> yf("y", xf.shape());
    ops::activation_forward<float>(a, xf.flat(), yf.flat());
    EXPECT_LT(max_rel_error(to_double(yf), expected), 1e-6) << ops::activation_name(a);
  }
}

TEST(Activations, BackwardMatchesFiniteDifferences) {
  for (auto a : kAll) {
    auto x = random_values(203, 12, -3, 3);
    for (auto& v : x)  // keep ReLU's kink out of the central-difference stencil
      if (std::abs(v) < 1e-3) v = 0.5;
    const auto r = random_values(x.size(), 13);
    auto xt = make_tensor<double>({static_cast<index_t>(x.size())}, x);
    auto dy = make_tensor<double>(xt.shape(), r);
    Tensor<double> dx("dx", xt.shape());
    ops::activation_backward<double>(a, xt.flat(), dy.flat(), dx.flat());
    const auto loss = [&](const std::vector<double>& p) { return dot(forward(a, p), r); };
    EXPECT_LT(finite_difference_error(x, loss, to_double(dx)), fd_tolerance) << ops::activation_name(a);
  }
}

TEST(Activations, ParseRejectsUnknownNames) {
  EXPECT_EQ(ops::parse_activation("gelu"), ops::Activation::gelu);
  EXPECT_EQ(ops::parse_activation("swish"), ops::Activation::silu);
  try {
    ops::parse_activation("tanhh");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::invalid_argument);
    EXPECT_NE(std::string(e.what()).find("tanhh"), std::string::npos);
  }
}

TEST(Activations, ShapeMismatchIsAnError) {
  Tensor<float> x("x", {5}), y("y", {4});
  EXPECT_THROW(ops::activation_forward<float>(ops::Activation::relu, x.flat(), y.flat()), Error);
}
