#include "kmoe/core/tensor.hpp"
#include "test_util.hpp"

#include <cmath>
#include <cstring>
#include <limits>
#include <random>

using namespace kmoe;
using namespace kmoe::test;

TEST(Shape, SizeRankAndString) {
  const Shape s{2, 3, 4};
  EXPECT_EQ(s.rank(), 3);
  EXPECT_EQ(s.size(), 24);
  EXPECT_EQ(s.product(1, 3), 12);
  EXPECT_EQ(s.str(), "[2, 3, 4]");
  EXPECT_EQ(Shape{}.size(), 1);  // a scalar
  EXPECT_EQ((Shape{2, 0, 5}).size(), 0);
  EXPECT_EQ(s, (Shape{2, 3, 4}));
  EXPECT_NE(s, (Shape{2, 12}));
}

TEST(Shape, RejectsNegativeDimsRankAboveFourAndBadAxes) {
  EXPECT_THROW((Shape{2, -1}), Error);
  EXPECT_THROW((Shape{1, 2, 3, 4, 5}), Error);
  EXPECT_THROW((Shape{2, 3})[2], Error);
}

// An element count past index_t is refused, not wrapped (the C ABI passes callers' shapes here).
TEST(Shape, RejectsShapesWhoseSizeOverflows) {
  const index_t big = index_t(1) << 32;
  expect_status([&] { (void)Shape({big, big}); }, Status::invalid_argument, "more than 2^63 - 1 elements");
  expect_status([&] { (void)Shape({3, big, big / 4}); }, Status::invalid_argument, "more than 2^63 - 1 elements");
  EXPECT_EQ((Shape{big, big / 2 - 1}).size(), big * (big / 2 - 1));
  EXPECT_EQ((Shape{0, big, big}).size(), 0);
}

TEST(Tensor, HostRoundTripAndZeroInitialisation) {
  const auto values = random_values(2 * 3 * 5, 1);
  const auto t = make_tensor<double>({2, 3, 5}, values);
  EXPECT_EQ(to_double(t), values);
  const Tensor<float> zeros("z", {7, 3});
  for (float v : zeros.to_host()) EXPECT_EQ(v, 0.0f);
  EXPECT_TRUE(Tensor<float>().empty());
  EXPECT_FALSE(zeros.empty());
}

TEST(Tensor, DefaultConstructedIsEmptyWithNoElements) {
  const Tensor<float> t;
  EXPECT_TRUE(t.empty());
  EXPECT_EQ(t.size(), 0);
  EXPECT_EQ(t.data(), nullptr);
  EXPECT_TRUE(t.to_host().empty());
  // Status::invalid_argument (not a Kokkos exception, nor a shape mismatch): it names the label.
  expect_status([&] { t.reshape({1}); }, Status::invalid_argument, "empty", "reshape({1})");
  expect_status([&] { t.reshape({0}); }, Status::invalid_argument, "empty", "reshape({0})");
  const Tensor<float> named = t.clone("named");
  EXPECT_TRUE(named.empty());
  EXPECT_EQ(named.label(), "named");
  expect_status([&] { named.reshape({1}); }, Status::invalid_argument, "'named'", "reshape names the label");
  expect_status([&] { t.view<1>(); }, Status::invalid_argument, "empty", "view<1>");
  expect_status([&] { t.as_matrix(); }, Status::invalid_argument, "empty", "as_matrix");
  expect_status([&] { t.as_3d(0); }, Status::invalid_argument, "empty", "as_3d");
  expect_status([&] { t.require_shape({}, "layer.bias"); }, Status::invalid_argument, "layer.bias", "require_shape");
  Tensor<float> u;
  EXPECT_NO_THROW(u.fill(1.0f));
  EXPECT_NO_THROW(u.copy_from_host({}));
  expect_status([&] { u.copy_from_host({1.0f}); }, Status::invalid_argument, "empty", "copy_from_host");
  EXPECT_TRUE(u.empty());
}

TEST(Tensor, ZeroSizedDimensionIsNotEmpty) {
  Tensor<float> t("rows", {0, 5});
  EXPECT_FALSE(t.empty());
  EXPECT_EQ(t.size(), 0);
  EXPECT_TRUE(t.to_host().empty());
  EXPECT_NO_THROW(t.fill(2.0f));
  EXPECT_NO_THROW(t.copy_from_host({}));
  const auto r = t.reshape({5, 0});
  EXPECT_FALSE(r.empty());
  EXPECT_EQ(r.shape(), (Shape{5, 0}));
  EXPECT_EQ(t.view<2>().extent(1), 5u);
  EXPECT_EQ(t.as_matrix().extent(0), 0u);
  const auto c = t.clone("copy");
  EXPECT_FALSE(c.empty());
  EXPECT_EQ(c.shape(), t.shape());
  EXPECT_NO_THROW(t.require_shape({0, 5}, "rows"));
  EXPECT_THROW(t.reshape({1}), Error);
}

TEST(Tensor, ViewsAliasStorageWithTheRightExtents) {
  auto t = make_tensor<float>({2, 3, 4}, random_values(24, 2));
  const auto v3 = t.view<3>();
  EXPECT_EQ(v3.extent(0), 2u);
  EXPECT_EQ(v3.extent(2), 4u);
  const auto m = t.as_matrix();
  EXPECT_EQ(m.extent(0), 6u);
  EXPECT_EQ(m.extent(1), 4u);
  const auto a1 = t.as_3d(1);
  EXPECT_EQ(a1.extent(0), 2u);
  EXPECT_EQ(a1.extent(1), 3u);
  EXPECT_EQ(a1.extent(2), 4u);
  const auto a0 = t.as_3d(0);
  EXPECT_EQ(a0.extent(0), 1u);
  EXPECT_EQ(a0.extent(2), 12u);
  EXPECT_EQ(m.data(), t.data());
  EXPECT_THROW(t.view<2>(), Error);
  EXPECT_THROW(t.as_3d(3), Error);
  // Element (1, 2, 3) is the last one in row-major order.
  Kokkos::deep_copy(Kokkos::subview(v3, 1, 2, 3), 42.0f);
  EXPECT_EQ(t.to_host().back(), 42.0f);
}

TEST(Tensor, ReshapeSharesStorageAndCloneCopies) {
  auto t = make_tensor<double>({4, 6}, random_values(24, 3));
  auto r = t.reshape({2, 3, 4});
  EXPECT_EQ(r.data(), t.data());
  EXPECT_THROW(t.reshape({5, 5}), Error);
  auto c = t.clone("copy");
  EXPECT_NE(c.data(), t.data());
  EXPECT_EQ(to_double(c), to_double(t));
  t.fill(1.5);
  EXPECT_EQ(r.to_host()[23], 1.5);
  EXPECT_NE(c.to_host()[23], 1.5);
}

TEST(Tensor, RequireShapeNamesTheTensor) {
  const Tensor<float> t("weights", {3, 4});
  t.require_shape({3, 4}, "weights");
  try {
    t.require_shape({4, 3}, "layer.keys");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::shape_mismatch);
    const std::string msg = e.what();
    EXPECT_NE(msg.find("layer.keys"), std::string::npos);
    EXPECT_NE(msg.find("[4, 3]"), std::string::npos);
    EXPECT_NE(msg.find("[3, 4]"), std::string::npos);
  }
  EXPECT_THROW(Tensor<float>::from_host("x", {2, 2}, std::vector<float>(3)), Error);
}

TEST(Tensor, RequireFiniteFindsNanAndInf) {
  auto values = random_values(1000, 4);
  values[3] = std::numeric_limits<float>::max();  // extreme finite values pass
  values[4] = -std::numeric_limits<float>::max();
  values[5] = std::numeric_limits<float>::denorm_min();
  auto t = make_tensor<float>({1000}, values);
  EXPECT_NO_THROW(require_finite(t, "x"));
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    auto host = t.to_host();
    host[617] = bad;
    auto u = Tensor<float>::from_host("u", t.shape(), host);
    try {
      require_finite(u, "input x");
      FAIL() << "no error for " << bad;
    } catch (const Error& e) {
      EXPECT_EQ(e.status(), Status::non_finite);
      EXPECT_NE(std::string(e.what()).find("input x"), std::string::npos);
    }
  }
}

// The kernels' bfloat16 conversions (CUDA's __float2bfloat16_rn on a device, kmoe's own on the
// host) round exactly as the host reference float_to_bfloat16_bits: ties to even, carries into
// the exponent, overflow to infinity, subnormals; widening back is exact.
TEST(TensorConvert, Bfloat16RoundTripMatchesTheHostRounding) {
  std::vector<float> values = {1.0f, -2.0f, 3.14159265f, 1e-3f, -65504.0f, 3.0e38f,
                               std::numeric_limits<float>::max(), std::numeric_limits<float>::infinity(),
                               -std::numeric_limits<float>::infinity(), 0.0f, -0.0f};
  for (std::uint32_t bits : {0x3F808000u, 0x3F818000u, 0x3F808001u, 0x3F807FFFu, 0x3FFFFFFFu, 0x7F7F8000u,
                             0x7F7F7FFFu, 0x00008000u, 0x00018000u, 0x00000001u}) {
    float v;
    std::memcpy(&v, &bits, sizeof v);
    values.push_back(v);
  }
  std::mt19937_64 gen(5);
  std::uniform_real_distribution<double> exponent(-40, 40);
  for (int i = 0; i < 2000; ++i) values.push_back(static_cast<float>((i % 2 ? 1 : -1) * std::exp(exponent(gen))));
  const auto source = Tensor<float>::from_host("source", {static_cast<index_t>(values.size())}, values);
  const auto rounded = convert_tensor<float>(convert_tensor<bfloat16>(source, "bf16"), "back").to_host();
  for (std::size_t i = 0; i < values.size(); ++i) {
    const float expected = round_to_bfloat16(values[i]);
    std::uint32_t want, got;
    std::memcpy(&want, &expected, sizeof want);
    std::memcpy(&got, &rounded[i], sizeof got);
    EXPECT_EQ(got, want) << "value " << values[i];
  }
  const auto nan = Tensor<float>::from_host("nan", {1}, {std::numeric_limits<float>::quiet_NaN()});
  EXPECT_TRUE(std::isnan(convert_tensor<float>(convert_tensor<bfloat16>(nan, "bf16"), "back").to_host()[0]));
}
