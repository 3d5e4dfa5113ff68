#include "kmoe/ops/softmax.hpp"
#include "test_util.hpp"

#include <cmath>
#include <limits>

using namespace kmoe;
using namespace kmoe::test;

namespace {

enum class Op { softmax, log_softmax, logsumexp };
const Op kAllOps[] = {Op::softmax, Op::log_softmax, Op::logsumexp};

const char* op_name(Op op) {
  switch (op) {
    case Op::softmax: return "softmax";
    case Op::log_softmax: return "log_softmax";
    case Op::logsumexp: return "logsumexp";
  }
  return "?";
}

// A tensor shape and the axis the op runs along.
struct Case {
  Shape shape;
  int axis;
};

std::string describe(const Case& c) { return c.shape.str() + " axis " + std::to_string(c.axis); }

// Naive host loop in double: for each line (o, i) of the [outer, len, inner] view, subtract the
// line maximum, exponentiate, sum. Output is [outer, len, inner] (or [outer, inner] for logsumexp).
std::vector<double> reference(Op op, const Case& c, const std::vector<double>& x) {
  const index_t outer = c.shape.product(0, c.axis), len = c.shape[c.axis],
                inner = c.shape.product(c.axis + 1, c.shape.rank());
  const auto at = [&](index_t o, index_t k, index_t i) { return (o * len + k) * inner + i; };
  std::vector<double> out(op == Op::logsumexp ? outer * inner : x.size());
  for (index_t o = 0; o < outer; ++o)
    for (index_t i = 0; i < inner; ++i) {
      double max_value = -INFINITY;
      for (index_t k = 0; k < len; ++k) max_value = std::max(max_value, x[at(o, k, i)]);
      double sum = 0;
      for (index_t k = 0; k < len; ++k) sum += std::exp(x[at(o, k, i)] - max_value);
      if (op == Op::logsumexp) out[o * inner + i] = max_value + std::log(sum);
      for (index_t k = 0; k < len && op != Op::logsumexp; ++k)
        out[at(o, k, i)] =
            op == Op::softmax ? std::exp(x[at(o, k, i)] - max_value) / sum : x[at(o, k, i)] - max_value - std::log(sum);
    }
  return out;
}

Shape line_shape(const Case& c) { return {c.shape.product(0, c.axis), c.shape.product(c.axis + 1, c.shape.rank())}; }

template <class T>
std::vector<double> forward(Op op, const Case& c, const std::vector<double>& x) {
  const auto xt = make_tensor<T>(c.shape, x, "x");
  if (op == Op::logsumexp) {
    Tensor<T> y("y", line_shape(c));
    ops::logsumexp_forward<T>(xt.as_3d(c.axis), y.as_matrix());
    return to_double(y);
  }
  Tensor<T> y("y", c.shape);
  if (op == Op::softmax) ops::softmax_forward<T>(xt.as_3d(c.axis), y.as_3d(c.axis));
  if (op == Op::log_softmax) ops::log_softmax_forward<T>(xt.as_3d(c.axis), y.as_3d(c.axis));
  return to_double(y);
}

// dx of L = Σ op(x) ⊙ dy, through the op's backward.
template <class T>
std::vector<double> backward(Op op, const Case& c, const std::vector<double>& x, const std::vector<double>& dy) {
  const auto xt = make_tensor<T>(c.shape, x, "x");
  const auto yt = make_tensor<T>(op == Op::logsumexp ? line_shape(c) : c.shape, forward<T>(op, c, x), "y");
  const auto dyt = make_tensor<T>(yt.shape(), dy, "dy");
  Tensor<T> dx("dx", c.shape);
  switch (op) {
    case Op::softmax: ops::softmax_backward<T>(yt.as_3d(c.axis), dyt.as_3d(c.axis), dx.as_3d(c.axis)); break;
    case Op::log_softmax: ops::log_softmax_backward<T>(yt.as_3d(c.axis), dyt.as_3d(c.axis), dx.as_3d(c.axis)); break;
    case Op::logsumexp:
      ops::logsumexp_backward<T>(xt.as_3d(c.axis), yt.as_matrix(), dyt.as_matrix(), dx.as_3d(c.axis));
      break;
  }
  return to_double(dx);
}

std::size_t output_size(Op op, const Case& c) {
  return static_cast<std::size_t>(op == Op::logsumexp ? line_shape(c).size() : c.shape.size());
}

// Odd sizes; the reduced axis first, middle and last of rank 1-3 tensors (inner = 1 and > 1),
// one element per line, long lines and many short lines.
const Case kForwardCases[] = {
    {{33}, 0},   {{7, 33}, 1},  {{7, 33}, 0},   {{3, 5, 4}, 0}, {{3, 5, 4}, 1},   {{3, 5, 4}, 2},
    {{5, 1}, 1}, {{1, 129}, 1}, {{2, 4096}, 1}, {{1000, 7}, 1}, {{2, 3, 129}, 1},
};

}  // namespace

TEST(Softmax, ForwardMatchesNaiveLoop) {
  std::uint64_t seed = 100;
  for (Op op : kAllOps)
    for (const Case& c : kForwardCases) {
      const auto x = random_values(c.shape.size(), ++seed, -5, 5);
      const auto expected = reference(op, c, x);
      EXPECT_LT(max_rel_error(forward<double>(op, c, x), expected), 1e-13) << op_name(op) << " " << describe(c);
      EXPECT_LT(max_rel_error(forward<float>(op, c, x), expected), 2e-6) << op_name(op) << " float " << describe(c);
    }
}

TEST(Softmax, LargeMagnitudeInputsDoNotOverflow) {
  // exp(±1000) overflows / underflows both float and double; the max-subtracted form must not.
  const Case c{{4, 9, 3}, 1};
  auto x = random_values(c.shape.size(), 7, -1000, 1000);
  for (Op op : kAllOps) {
    const auto expected = reference(op, c, x);
    for (double v : expected) ASSERT_TRUE(std::isfinite(v));
    EXPECT_LT(max_rel_error(forward<double>(op, c, x), expected), 1e-13) << op_name(op);
    EXPECT_LT(max_rel_error(forward<float>(op, c, x), expected), 1e-6) << op_name(op) << " float";
  }
  // Closed forms: [1000, 1000, −1000] → softmax [½, ½, e^−2000 = 0], logsumexp 1000 + ln 2.
  const Case row{{3}, 0};
  const std::vector<double> big = {1000, 1000, -1000};
  const double ln2 = std::log(2.0);
  EXPECT_LT(max_rel_error(forward<float>(Op::softmax, row, big), {0.5, 0.5, 0}), 1e-7);
  EXPECT_LT(max_rel_error(forward<double>(Op::log_softmax, row, big), {-ln2, -ln2, -2000 - ln2}), 1e-15);
  EXPECT_LT(max_rel_error(forward<double>(Op::logsumexp, row, big), {1000 + ln2}), 1e-15);
}

TEST(Softmax, InfiniteEntries) {
  // Row 0 mixes −inf with finite values; row 1 is all −inf: NaN for softmax and log-softmax and
  // −inf for logsumexp, as PyTorch gives.
  const double inf = std::numeric_limits<double>::infinity();
  const Case c{{2, 4}, 1};
  const std::vector<double> x = {-inf, 0, -inf, std::log(3.0), -inf, -inf, -inf, -inf};
  const auto softmax = forward<double>(Op::softmax, c, x);
  const auto log_softmax = forward<float>(Op::log_softmax, c, x);
  const auto logsumexp = forward<double>(Op::logsumexp, c, x);
  EXPECT_LT(max_rel_error({softmax.begin(), softmax.begin() + 4}, {0, 0.25, 0, 0.75}), 1e-15);
  EXPECT_EQ(log_softmax[0], -inf);
  EXPECT_EQ(log_softmax[2], -inf);
  EXPECT_NEAR(log_softmax[1], std::log(0.25), 1e-6);
  EXPECT_NEAR(log_softmax[3], std::log(0.75), 1e-6);
  EXPECT_NEAR(logsumexp[0], std::log(4.0), 1e-15);
  for (int k = 4; k < 8; ++k) {
    EXPECT_TRUE(std::isnan(softmax[k])) << k;
    EXPECT_TRUE(std::isnan(log_softmax[k])) << k;
  }
  EXPECT_EQ(logsumexp[1], -inf);
  // A +inf entry makes logsumexp +inf (not inf − inf = NaN), as torch.logsumexp.
  EXPECT_EQ(forward<double>(Op::logsumexp, {{2}, 0}, {inf, 0})[0], inf);

  // Gradients stay finite on the mixed row: zero-probability entries get dx = 0 (softmax) and
  // dx = dy (log-softmax, exp(−inf) = 0).
  const Case row{{4}, 0};
  const std::vector<double> x0(x.begin(), x.begin() + 4), dy = {0.3, -0.2, 0.5, 0.7};
  const auto dx_softmax = backward<double>(Op::softmax, row, x0, dy);
  const auto dx_log_softmax = backward<double>(Op::log_softmax, row, x0, dy);
  const double dot_y = -0.2 * 0.25 + 0.7 * 0.75, sum_dy = 0.3 - 0.2 + 0.5 + 0.7;
  EXPECT_LT(max_rel_error(dx_softmax, {0, 0.25 * (-0.2 - dot_y), 0, 0.75 * (0.7 - dot_y)}), 1e-15);
  EXPECT_LT(max_rel_error(dx_log_softmax, {0.3, -0.2 - 0.25 * sum_dy, 0.5, 0.7 - 0.75 * sum_dy}), 1e-15);
}

TEST(Softmax, BackwardMatchesFiniteDifferences) {
  const Case cases[] = {{{3, 5, 4}, 0}, {{3, 5, 4}, 1}, {{3, 5, 4}, 2}, {{7, 9}, 1}, {{1, 1}, 1}, {{17}, 0}};
  std::uint64_t seed = 200;
  for (Op op : kAllOps)
    for (const Case& c : cases) {
      const auto x = random_values(c.shape.size(), ++seed, -3, 3);
      const auto r = random_values(output_size(op, c), ++seed);
      const auto loss = [&](const std::vector<double>& p) { return dot(forward<double>(op, c, p), r); };
      const auto dx = backward<double>(op, c, x, r);
      EXPECT_LT(finite_difference_error(x, loss, dx), fd_tolerance) << op_name(op) << " " << describe(c);
      EXPECT_LT(max_rel_error(backward<float>(op, c, x, r), dx), 1e-5) << op_name(op) << " float " << describe(c);
    }
}

TEST(Softmax, ShapeMismatchIsAnError) {
  Tensor<float> x("x", {3, 5, 4}), y_bad("y", {3, 4, 5}), lines_bad("lse", {3, 5});
  const auto x3 = x.as_3d(1);
  const auto expect_mismatch = [](const std::function<void()>& call, const char* what) {
    try {
      call();
      ADD_FAILURE() << what << ": no error";
    } catch (const Error& e) {
      EXPECT_EQ(e.status(), Status::shape_mismatch) << what;
    }
  };
  const auto bad3 = y_bad.as_3d(1);
  const auto bad2 = lines_bad.as_matrix();
  expect_mismatch([&] { ops::softmax_forward<float>(x3, bad3); }, "softmax_forward y");
  expect_mismatch([&] { ops::log_softmax_forward<float>(x3, bad3); }, "log_softmax_forward y");
  expect_mismatch([&] { ops::softmax_backward<float>(x3, bad3, x3); }, "softmax_backward dy");
  expect_mismatch([&] { ops::log_softmax_backward<float>(x3, x3, bad3); }, "log_softmax_backward dx");
  expect_mismatch([&] { ops::logsumexp_forward<float>(x3, bad2); }, "logsumexp_forward y");
  Tensor<float> lines("lse", {3, 4});
  const auto good2 = lines.as_matrix();
  expect_mismatch([&] { ops::logsumexp_backward<float>(x3, good2, bad2, x3); }, "logsumexp_backward dy");
  expect_mismatch([&] { ops::logsumexp_backward<float>(x3, good2, good2, bad3); }, "logsumexp_backward dx");
}
