#include "kmoe/ops/rope.hpp"
#include "test_util.hpp"

#include <cmath>

using namespace kmoe;
using namespace kmoe::test;

namespace {

struct RopeShape {
  index_t b, h, t, d;
  int rot;
  index_t offset;
  index_t size() const { return b * h * t * d; }
};

// NeoX half-split rotation of the first rot channels, written out from the definition.
std::vector<double> naive_rope(const RopeShape& s, const std::vector<double>& x, double base, double sign = 1) {
  std::vector<double> y = x;
  const int half = s.rot / 2;
  for (index_t row = 0; row < s.b * s.h * s.t; ++row) {
    const index_t t = row % s.t;
    for (int c = 0; c < half; ++c) {
      const double angle = static_cast<double>(s.offset + t) * std::pow(base, -2.0 * c / s.rot);
      const double lo = x[row * s.d + c], hi = x[row * s.d + c + half];
      y[row * s.d + c] = lo * std::cos(angle) - sign * hi * std::sin(angle);
      y[row * s.d + c + half] = hi * std::cos(angle) + sign * lo * std::sin(angle);
    }
  }
  return y;
}

template <class T>
std::vector<double> run_rope(const RopeShape& s, const std::vector<double>& x, double base, bool backward = false) {
  const auto xt = make_tensor<T>({s.b, s.h, s.t, s.d}, x);
  Tensor<T> y("y", xt.shape());
  if (backward) {
    ops::rope_backward<T>(xt.template view<4>(), s.rot, base, s.offset, y.template view<4>());
  } else {
    ops::rope_forward<T>(xt.template view<4>(), s.rot, base, s.offset, y.template view<4>());
  }
  return to_double(y);
}

const RopeShape kShapes[] = {{2, 3, 7, 10, 6, 5}, {1, 1, 1, 2, 2, 0}, {2, 4, 33, 16, 8, 0},
                             {1, 2, 5, 82, 40, 129}, {3, 1, 4, 6, 0, 3}, {1, 2, 3, 8, 8, 1}};

}  // namespace

TEST(Rope, ForwardMatchesNaiveLoop) {
  for (const RopeShape& s : kShapes) {
    const auto x = random_values(s.size(), 21);
    const auto expected = naive_rope(s, x, 10000);
    EXPECT_LT(max_rel_error(run_rope<double>(s, x, 10000), expected), 1e-13) << s.d << " " << s.rot;
    EXPECT_LT(max_rel_error(run_rope<float>(s, x, 10000), expected), 2e-5) << s.d << " " << s.rot;
  }
  // Another base.
  const RopeShape s{1, 2, 9, 12, 12, 2};
  const auto x = random_values(s.size(), 22);
  EXPECT_LT(max_rel_error(run_rope<double>(s, x, 500), naive_rope(s, x, 500)), 1e-13);
}

TEST(Rope, OffsetEqualsLaterRowsOfALongerSequence) {
  // Rows 4..8 of a 9-row sequence at offset 0 = a 5-row sequence at offset 4 (cached decoding).
  const RopeShape full{1, 1, 9, 8, 8, 0}, tail{1, 1, 5, 8, 8, 4};
  const auto x = random_values(full.size(), 23);
  const std::vector<double> x_tail(x.begin() + 4 * 8, x.end());
  const auto y_full = run_rope<double>(full, x, 10000);
  const std::vector<double> expected(y_full.begin() + 4 * 8, y_full.end());
  EXPECT_LT(max_rel_error(run_rope<double>(tail, x_tail, 10000), expected), 1e-15);
}

TEST(Rope, BackwardMatchesFiniteDifferences) {
  for (const RopeShape& s : {RopeShape{2, 3, 7, 10, 6, 5}, RopeShape{1, 2, 5, 6, 6, 11}}) {
    const auto x = random_values(s.size(), 24);
    const auto r = random_values(s.size(), 25);
    const auto dx = run_rope<double>(s, r, 10000, true);
    const auto loss = [&](const std::vector<double>& p) { return dot(run_rope<double>(s, p, 10000), r); };
    EXPECT_LT(finite_difference_error(x, loss, dx), fd_tolerance);
    EXPECT_LT(max_rel_error(dx, naive_rope(s, r, 10000, -1)), 1e-13);
  }
}

TEST(Rope, InPlace) {
  const RopeShape s{2, 2, 5, 8, 4, 3};
  const auto x = random_values(s.size(), 26);
  auto t = make_tensor<double>({s.b, s.h, s.t, s.d}, x);
  ops::rope_forward<double>(t.view<4>(), s.rot, 10000, s.offset, t.view<4>());
  EXPECT_LT(max_rel_error(to_double(t), naive_rope(s, x, 10000)), 1e-13);
  ops::rope_backward<double>(t.view<4>(), s.rot, 10000, s.offset, t.view<4>());
  EXPECT_LT(max_rel_error(to_double(t), x), 1e-13);
}

TEST(Rope, RotaryDimsRoundDownToEven) {
  EXPECT_EQ(ops::rope_rotary_dims(82, 0.5), 40);  // MoEUT_44M: int(41) is odd in the original
  EXPECT_EQ(ops::rope_rotary_dims(16, 0.5), 8);
  EXPECT_EQ(ops::rope_rotary_dims(128, 0.5), 64);
  EXPECT_EQ(ops::rope_rotary_dims(7, 1.0), 6);
  EXPECT_EQ(ops::rope_rotary_dims(1, 0.5), 0);
  expect_status([] { ops::rope_rotary_dims(16, 1.5); }, Status::invalid_argument, "rotate_fraction");
  expect_status([] { ops::rope_rotary_dims(0, 0.5); }, Status::invalid_argument, "d_head");
}

TEST(Rope, BadArgumentsThrow) {
  Tensor<float> x("x", {1, 2, 3, 8}), y("y", {1, 2, 3, 8}), z("z", {1, 2, 4, 8});
  expect_status([&] { ops::rope_forward<float>(x.view<4>(), 3, 10000, 0, y.view<4>()); }, Status::invalid_argument,
                "rot_dims = 3");
  expect_status([&] { ops::rope_forward<float>(x.view<4>(), 10, 10000, 0, y.view<4>()); },
                Status::invalid_argument, "rot_dims = 10");
  expect_status([&] { ops::rope_forward<float>(x.view<4>(), 4, -1, 0, y.view<4>()); }, Status::invalid_argument,
                "base");
  expect_status([&] { ops::rope_backward<float>(x.view<4>(), 4, 10000, -2, y.view<4>()); },
                Status::invalid_argument, "position_offset");
  expect_status([&] { ops::rope_forward<float>(x.view<4>(), 4, 10000, 0, z.view<4>()); }, Status::shape_mismatch,
                "rope_forward");
}
