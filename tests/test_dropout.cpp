#include "kmoe/ops/dropout.hpp"
#include "test_util.hpp"

#include <cmath>

using namespace kmoe;
using namespace kmoe::test;

namespace {

constexpr index_t kLarge = 1 << 20;

// Values in [0.5, 1.5]: never zero, so "y[i] ≠ 0" is "element i kept".
std::vector<double> nonzero_values(index_t n, std::uint64_t seed) {
  return random_values(static_cast<std::size_t>(n), seed, 0.5, 1.5);
}

template <class T>
std::vector<T> run_forward(const std::vector<double>& x, T p, const RngStream& rng) {
  auto xt = make_tensor<T>({static_cast<index_t>(x.size())}, x, "x");
  Tensor<T> y("y", xt.shape());
  ops::dropout_forward<T>(xt.flat(), p, rng, y.flat());
  return y.to_host();
}

template <class T>
std::vector<bool> kept(const std::vector<T>& y) {
  std::vector<bool> mask(y.size());
  for (std::size_t i = 0; i < y.size(); ++i) mask[i] = y[i] != T(0);
  return mask;
}

// The mask is exactly {i : rng.uniform(i) ≥ p}, the fraction kept is within 5 sigma of 1 − p, and kept
// values are x · (1 / (1 − p)) to the last bit.
template <class T>
void check_forward(T p, std::uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "sizeof(T) " << sizeof(T));
  const auto x = nonzero_values(kLarge, seed);
  const RngStream rng{seed, 77};
  const auto y = run_forward<T>(x, p, rng);
  const T scale = T(1) / (T(1) - p);
  index_t kept_count = 0;
  index_t wrong = 0;
  for (index_t i = 0; i < kLarge; ++i) {
    const bool keep = rng.uniform<T>(static_cast<std::uint64_t>(i)) >= p;
    kept_count += keep;
    wrong += y[i] != (keep ? static_cast<T>(x[i]) * scale : T(0));
  }
  EXPECT_EQ(wrong, 0) << "p=" << p;
  const double q = 1 - static_cast<double>(p);
  EXPECT_NEAR(static_cast<double>(kept_count) / kLarge, q, 5 * std::sqrt(q * (1 - q) / kLarge)) << "p=" << p;
}

// dx = dy · mask / (1 − p) with the forward's mask, to the last bit; also when dx aliases dy.
template <class T>
void check_backward(T p, std::uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "sizeof(T) " << sizeof(T));
  const index_t n = 100003;
  const RngStream rng{seed, 5};
  const auto mask = kept(run_forward<T>(nonzero_values(n, seed), p, rng));
  const auto dy = random_values(n, seed + 1);
  auto dyt = make_tensor<T>({n}, dy, "dy");
  Tensor<T> dx("dx", {n});
  ops::dropout_backward<T>(dyt.flat(), p, rng, dx.flat());
  const auto got = dx.to_host();
  const T scale = T(1) / (T(1) - p);
  index_t wrong = 0;
  for (index_t i = 0; i < n; ++i) wrong += got[i] != (mask[i] ? static_cast<T>(dy[i]) * scale : T(0));
  EXPECT_EQ(wrong, 0) << "p=" << p;
  ops::dropout_backward<T>(dyt.flat(), p, rng, dyt.flat());  // in place
  EXPECT_EQ(dyt.to_host(), got) << "p=" << p;
}

template <class T>
void expect_invalid_p(T p) {
  Tensor<T> x("x", {8}), y("y", {8});
  for (const bool backward : {false, true}) {
    try {
      if (backward) {
        ops::dropout_backward<T>(x.flat(), p, RngStream{1, 0}, y.flat());
      } else {
        ops::dropout_forward<T>(x.flat(), p, RngStream{1, 0}, y.flat());
      }
      ADD_FAILURE() << "p=" << p << ": no error";
    } catch (const Error& e) {
      EXPECT_EQ(e.status(), Status::invalid_argument) << "p=" << p;
      EXPECT_NE(std::string(e.what()).find("dropout"), std::string::npos) << e.what();
    }
  }
}

}  // namespace

TEST(Dropout, ForwardKeepsOneMinusPAndScalesExactly) {
  for (const float p : {0.1f, 0.5f, 0.9f}) check_forward<float>(p, 1);
  for (const double p : {0.1, 0.5, 0.75}) check_forward<double>(p, 2);
}

TEST(Dropout, ZeroProbabilityIsTheIdentity) {
  const auto x = random_values(1037, 3);
  EXPECT_EQ(run_forward<double>(x, 0.0, RngStream{3, 0}), x);
  EXPECT_EQ(run_forward<float>(x, 0.0f, RngStream{3, 0}), cast_vector<float>(x));
}

TEST(Dropout, MaskIsAFunctionOfSeedAndOffset) {
  const index_t n = 4099;
  const auto x = nonzero_values(n, 4);
  const auto mask = kept(run_forward<float>(x, 0.5f, RngStream{10, 300}));
  EXPECT_EQ(kept(run_forward<float>(x, 0.5f, RngStream{10, 300})), mask);  // same (seed, offset): same mask
  EXPECT_NE(kept(run_forward<float>(x, 0.5f, RngStream{10, 301})), mask);  // another offset
  EXPECT_NE(kept(run_forward<float>(x, 0.5f, RngStream{11, 300})), mask);  // another seed
  // element i uses counter offset + i: shifting the offset by k shifts the mask by k
  const auto shifted = kept(run_forward<float>(x, 0.5f, RngStream{10, 300 + 7}));
  EXPECT_TRUE(std::equal(shifted.begin(), shifted.end() - 7, mask.begin() + 7));
}

TEST(Dropout, BackwardUsesTheForwardMask) {
  for (const float p : {0.0f, 0.3f, 0.9f}) check_backward<float>(p, 20);
  for (const double p : {0.0, 0.3, 0.9}) check_backward<double>(p, 21);
}

TEST(Dropout, ForwardInPlaceMatchesOutOfPlace) {
  const auto x = random_values(5001, 30);
  const RngStream rng{30, 9};
  auto xt = make_tensor<double>({5001}, x);
  ops::dropout_forward<double>(xt.flat(), 0.4, rng, xt.flat());
  EXPECT_EQ(xt.to_host(), run_forward<double>(x, 0.4, rng));
}

TEST(Dropout, ProbabilityOutsideZeroOneIsInvalid) {
  for (const double p : {-0.1, 1.0, 1.5, double(NAN)}) expect_invalid_p<double>(p);
  for (const float p : {-1e-6f, 1.0f, float(NAN)}) expect_invalid_p<float>(p);
}

TEST(Dropout, SizeMismatchIsAShapeError) {
  Tensor<double> x("x", {8}), y("y", {7});
  try {
    ops::dropout_forward<double>(x.flat(), 0.5, RngStream{}, y.flat());
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::shape_mismatch);
  }
  EXPECT_THROW(ops::dropout_backward<double>(x.flat(), 0.5, RngStream{}, y.flat()), Error);
}
