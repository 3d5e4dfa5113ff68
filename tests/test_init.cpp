#include "kmoe/ops/dropout.hpp"
#include "kmoe/ops/init.hpp"
#include "test_util.hpp"

#include <cmath>

using namespace kmoe;
using namespace kmoe::test;

TEST(Init, NormalHasTheAskedMomentsAndIsAFunctionOfTheStream) {
  const index_t n = 200000;
  Tensor<double> a("a", {n}), b("b", {n});
  Generator generator(42);
  const RngStream stream = generator.take(n);
  ops::fill_normal<double>(a.flat(), stream, 0.5, 2.0);
  ops::fill_normal<double>(b.flat(), stream, 0.5, 2.0);
  const auto values = to_double(a);
  EXPECT_EQ(values, to_double(b));
  double mean = 0, var = 0;
  for (double v : values) mean += v;
  mean /= n;
  for (double v : values) var += (v - mean) * (v - mean);
  var /= n - 1;
  EXPECT_NEAR(mean, 0.5, 5 * 2.0 / std::sqrt(n));
  EXPECT_NEAR(std::sqrt(var), 2.0, 0.02);
}

TEST(Init, UniformStaysInItsRangeAndCoversIt) {
  const index_t n = 100000;
  Tensor<float> a("a", {n});
  Generator generator(7);
  ops::fill_uniform<float>(a.flat(), generator.take(n), -0.25f, 0.75f);
  const auto values = to_double(a);
  double lo = 1, hi = -1, mean = 0;
  for (double v : values) {
    lo = std::min(lo, v);
    hi = std::max(hi, v);
    mean += v / n;
  }
  EXPECT_GE(lo, -0.25);
  EXPECT_LT(hi, 0.75);
  EXPECT_LT(lo, -0.24);
  EXPECT_GT(hi, 0.74);
  EXPECT_NEAR(mean, 0.25, 0.01);
}

TEST(Init, DropToMinusInfinityMasksAFractionP) {
  const index_t n = 100000;
  auto scores = make_tensor<float>({n}, random_values(n, 3));
  Generator generator(9);
  const RngStream stream = generator.take(n);
  ops::drop_to_minus_infinity<float>(scores.flat(), 0.3f, stream);
  const auto values = to_double(scores);
  std::size_t dropped = 0;
  for (double v : values) dropped += v == -INFINITY;
  EXPECT_NEAR(static_cast<double>(dropped) / n, 0.3, 0.01);
  auto again = make_tensor<float>({n}, random_values(n, 3));
  ops::drop_to_minus_infinity<float>(again.flat(), 0.3f, stream);
  EXPECT_EQ(to_double(again), values);  // the mask is a function of the stream
  expect_status([&] { ops::drop_to_minus_infinity<float>(again.flat(), 1.0f, stream); }, Status::invalid_argument,
                "outside [0, 1)");
}
