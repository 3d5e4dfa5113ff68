#include "kmoe/ops/norms.hpp"
#include "test_util.hpp"

#include <cmath>

using namespace kmoe;
using namespace kmoe::test;

namespace {

using ops::RmsNormMode;

struct Size {
  index_t rows, cols;
};
std::string describe(const Size& s) { return "[" + std::to_string(s.rows) + ", " + std::to_string(s.cols) + "]"; }

const char* mode_name(RmsNormMode mode) { return mode == RmsNormMode::mean_square ? "mean_square" : "l2_normalize"; }

// A parameter vector or, when `values` is empty, an absent (default-constructed) View.
template <class T>
struct Param {
  bool present;
  Tensor<T> tensor;
  Param(const std::vector<double>& values, const char* label)
      : present(!values.empty()),
        tensor(present ? make_tensor<T>({static_cast<index_t>(values.size())}, values, label) : Tensor<T>()) {}
  View1<T> view() const { return present ? tensor.flat() : View1<T>(); }
  std::vector<double> values() const { return present ? to_double(tensor) : std::vector<double>(); }
};

// Forward outputs in double: y and the per-row statistics (mean and rstd, or scale).
struct NormOut {
  std::vector<double> y, stat0, stat1;
};

// ---- LayerNorm ----

NormOut layer_norm_reference(const Size& s, const std::vector<double>& x, const std::vector<double>& gamma,
                             const std::vector<double>& beta, double eps) {
  NormOut out{std::vector<double>(x.size()), std::vector<double>(s.rows), std::vector<double>(s.rows)};
  for (index_t r = 0; r < s.rows; ++r) {
    double mean = 0, var = 0;
    for (index_t j = 0; j < s.cols; ++j) mean += x[r * s.cols + j] / s.cols;
    for (index_t j = 0; j < s.cols; ++j) var += (x[r * s.cols + j] - mean) * (x[r * s.cols + j] - mean) / s.cols;
    const double rstd = 1 / std::sqrt(var + eps);
    for (index_t j = 0; j < s.cols; ++j)
      out.y[r * s.cols + j] =
          (x[r * s.cols + j] - mean) * rstd * (gamma.empty() ? 1 : gamma[j]) + (beta.empty() ? 0 : beta[j]);
    out.stat0[r] = mean;
    out.stat1[r] = rstd;
  }
  return out;
}

template <class T>
NormOut layer_norm(const Size& s, const std::vector<double>& x, const std::vector<double>& gamma,
                   const std::vector<double>& beta, double eps) {
  const auto xt = make_tensor<T>({s.rows, s.cols}, x, "x");
  const Param<T> g(gamma, "gamma"), b(beta, "beta");
  Tensor<T> y("y", xt.shape()), mean("mean", {s.rows}), rstd("rstd", {s.rows});
  ops::layer_norm_forward<T>(xt.as_matrix(), g.view(), b.view(), static_cast<T>(eps), y.as_matrix(), mean.flat(),
                             rstd.flat());
  return {to_double(y), to_double(mean), to_double(rstd)};
}

// Gradients in double; dgamma / dbeta start from `initial` (to see that they accumulate) or are
// absent when `initial` is empty.
struct LayerNormGrads {
  std::vector<double> dx, dgamma, dbeta;
};

LayerNormGrads layer_norm_grads(const Size& s, const std::vector<double>& x, const std::vector<double>& gamma,
                                const std::vector<double>& beta, double eps, const std::vector<double>& dy,
                                const std::vector<double>& dgamma_initial, const std::vector<double>& dbeta_initial) {
  const auto fwd = layer_norm<double>(s, x, gamma, beta, eps);
  const auto xt = make_tensor<double>({s.rows, s.cols}, x, "x"), dyt = make_tensor<double>(xt.shape(), dy, "dy");
  const auto mean = make_tensor<double>({s.rows}, fwd.stat0), rstd = make_tensor<double>({s.rows}, fwd.stat1);
  const Param<double> g(gamma, "gamma"), dg(dgamma_initial, "dgamma"), db(dbeta_initial, "dbeta");
  Tensor<double> dx("dx", xt.shape());
  ops::layer_norm_backward<double>(xt.as_matrix(), g.view(), mean.flat(), rstd.flat(), dyt.as_matrix(), dx.as_matrix(),
                                   dg.view(), db.view());
  return {to_double(dx), dg.values(), db.values()};
}

// ---- RMSNorm ----

NormOut rms_norm_reference(RmsNormMode mode, const Size& s, const std::vector<double>& x,
                           const std::vector<double>& gamma, double eps) {
  NormOut out{std::vector<double>(x.size()), std::vector<double>(s.rows), {}};
  for (index_t r = 0; r < s.rows; ++r) {
    double sum_squares = 0;
    for (index_t j = 0; j < s.cols; ++j) sum_squares += x[r * s.cols + j] * x[r * s.cols + j];
    const double scale = mode == RmsNormMode::mean_square
                             ? 1 / std::sqrt(sum_squares / s.cols + eps)
                             : std::sqrt(static_cast<double>(s.cols)) / std::max(std::sqrt(sum_squares), eps);
    for (index_t j = 0; j < s.cols; ++j)
      out.y[r * s.cols + j] = x[r * s.cols + j] * scale * (gamma.empty() ? 1 : gamma[j]);
    out.stat0[r] = scale;
  }
  return out;
}

template <class T>
NormOut rms_norm(RmsNormMode mode, const Size& s, const std::vector<double>& x, const std::vector<double>& gamma,
                 double eps) {
  const auto xt = make_tensor<T>({s.rows, s.cols}, x, "x");
  const Param<T> g(gamma, "gamma");
  Tensor<T> y("y", xt.shape()), scale("scale", {s.rows});
  ops::rms_norm_forward<T>(mode, xt.as_matrix(), g.view(), static_cast<T>(eps), y.as_matrix(), scale.flat());
  return {to_double(y), to_double(scale), {}};
}

struct RmsNormGrads {
  std::vector<double> dx, dgamma;
};

RmsNormGrads rms_norm_grads(RmsNormMode mode, const Size& s, const std::vector<double>& x,
                            const std::vector<double>& gamma, double eps, const std::vector<double>& dy,
                            const std::vector<double>& dgamma_initial) {
  const auto fwd = rms_norm<double>(mode, s, x, gamma, eps);
  const auto xt = make_tensor<double>({s.rows, s.cols}, x, "x"), dyt = make_tensor<double>(xt.shape(), dy, "dy");
  const auto scale = make_tensor<double>({s.rows}, fwd.stat0);
  const Param<double> g(gamma, "gamma"), dg(dgamma_initial, "dgamma");
  Tensor<double> dx("dx", xt.shape());
  ops::rms_norm_backward<double>(mode, xt.as_matrix(), g.view(), eps, scale.flat(), dyt.as_matrix(), dx.as_matrix(),
                                 dg.view());
  return {to_double(dx), dg.values()};
}

std::vector<double> minus(const std::vector<double>& a, const std::vector<double>& b) {
  std::vector<double> d(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) d[i] = a[i] - b[i];
  return d;
}

// Odd sizes, one-column rows, long rows and many short rows.
const Size kForwardSizes[] = {{1, 1}, {7, 33}, {33, 129}, {3, 4096}, {1000, 7}, {5, 1}};
const RmsNormMode kModes[] = {RmsNormMode::mean_square, RmsNormMode::l2_normalize};

template <class V>
void expect_status(Status status, const V& call, const char* what) {
  try {
    call();
    ADD_FAILURE() << what << ": no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), status) << what << ": " << e.what();
  }
}

}  // namespace

TEST(LayerNorm, ForwardMatchesNaiveLoop) {
  std::uint64_t seed = 10;
  for (const Size& s : kForwardSizes)
    for (int affine = 0; affine < 4; ++affine) {
      auto x = random_values(s.rows * s.cols, ++seed, -2, 2);
      for (auto& v : x) v += 3;  // an offset mean, which the normalisation must remove
      const auto gamma = affine & 1 ? random_values(s.cols, ++seed, 0.5, 1.5) : std::vector<double>();
      const auto beta = affine & 2 ? random_values(s.cols, ++seed) : std::vector<double>();
      const auto expected = layer_norm_reference(s, x, gamma, beta, 1e-5);
      const std::string what = describe(s) + " affine " + std::to_string(affine);
      for (int precision = 0; precision < 2; ++precision) {
        const auto out =
            precision ? layer_norm<float>(s, x, gamma, beta, 1e-5) : layer_norm<double>(s, x, gamma, beta, 1e-5);
        const double tol = precision ? 2e-5 : 1e-12;
        EXPECT_LT(max_rel_error(out.y, expected.y), tol) << what << " float " << precision;
        EXPECT_LT(max_rel_error(out.stat0, expected.stat0), tol) << what << " mean, float " << precision;
        EXPECT_LT(max_rel_error(out.stat1, expected.stat1), tol) << what << " rstd, float " << precision;
      }
    }
}

TEST(LayerNorm, BackwardMatchesFiniteDifferences) {
  // 150 rows: γ and β's column reductions run over several row blocks (one partial).
  const Size sizes[] = {{7, 33}, {3, 1}, {2, 129}, {1, 6}, {150, 9}};
  std::uint64_t seed = 20;
  const double eps = 1e-5;
  for (const Size& s : sizes)
    for (int affine = 0; affine < 4; ++affine) {
      const auto x = random_values(s.rows * s.cols, ++seed, -2, 2);
      const auto gamma = affine & 1 ? random_values(s.cols, ++seed, 0.5, 1.5) : std::vector<double>();
      const auto beta = affine & 2 ? random_values(s.cols, ++seed) : std::vector<double>();
      const auto dy = random_values(x.size(), ++seed);
      // Pre-filled parameter gradients: the op must add to them.
      const auto dgamma0 = gamma.empty() ? std::vector<double>() : random_values(s.cols, ++seed);
      const auto dbeta0 = beta.empty() ? std::vector<double>() : random_values(s.cols, ++seed);
      const auto grads = layer_norm_grads(s, x, gamma, beta, eps, dy, dgamma0, dbeta0);
      const std::string what = describe(s) + " affine " + std::to_string(affine);

      const auto loss_x = [&](const std::vector<double>& p) {
        return dot(layer_norm<double>(s, p, gamma, beta, eps).y, dy);
      };
      EXPECT_LT(finite_difference_error(x, loss_x, grads.dx), fd_tolerance) << what << " dx";
      if (!gamma.empty()) {
        const auto loss_g = [&](const std::vector<double>& p) {
          return dot(layer_norm<double>(s, x, p, beta, eps).y, dy);
        };
        EXPECT_LT(finite_difference_error(gamma, loss_g, minus(grads.dgamma, dgamma0)), fd_tolerance)
            << what << " dgamma";
      }
      if (!beta.empty()) {
        const auto loss_b = [&](const std::vector<double>& p) {
          return dot(layer_norm<double>(s, x, gamma, p, eps).y, dy);
        };
        EXPECT_LT(finite_difference_error(beta, loss_b, minus(grads.dbeta, dbeta0)), fd_tolerance) << what << " dbeta";
      }
    }
}

TEST(LayerNorm, ParameterGradientsAreRepeatable) {
  // Fixed-order column sums: two runs over many rows agree bit for bit.
  const Size s{2000, 65};
  const auto x = random_values(s.rows * s.cols, 30), gamma = random_values(s.cols, 31),
             dy = random_values(x.size(), 32);
  const std::vector<double> zeros(s.cols, 0.0);
  const auto first = layer_norm_grads(s, x, gamma, gamma, 1e-5, dy, zeros, zeros);
  const auto second = layer_norm_grads(s, x, gamma, gamma, 1e-5, dy, zeros, zeros);
  EXPECT_EQ(first.dgamma, second.dgamma);
  EXPECT_EQ(first.dbeta, second.dbeta);
}

TEST(RmsNorm, ForwardMatchesNaiveLoop) {
  std::uint64_t seed = 40;
  for (RmsNormMode mode : kModes)
    for (const Size& s : kForwardSizes)
      for (int affine = 0; affine < 2; ++affine) {
        const auto x = random_values(s.rows * s.cols, ++seed, -2, 2);
        const auto gamma = affine ? random_values(s.cols, ++seed, 0.5, 1.5) : std::vector<double>();
        const double eps = mode == RmsNormMode::mean_square ? 1e-6 : 1e-12;
        const auto expected = rms_norm_reference(mode, s, x, gamma, eps);
        const std::string what = std::string(mode_name(mode)) + " " + describe(s) + " affine " + std::to_string(affine);
        const auto out = rms_norm<double>(mode, s, x, gamma, eps), out_f = rms_norm<float>(mode, s, x, gamma, eps);
        EXPECT_LT(max_rel_error(out.y, expected.y), 1e-13) << what;
        EXPECT_LT(max_rel_error(out.stat0, expected.stat0), 1e-13) << what << " scale";
        EXPECT_LT(max_rel_error(out_f.y, expected.y), 2e-6) << what << " float";
        EXPECT_LT(max_rel_error(out_f.stat0, expected.stat0), 2e-6) << what << " float scale";
      }
}

TEST(RmsNorm, BackwardMatchesFiniteDifferences) {
  // No one-column rows: there y = sign(x)·γ (l2) or nearly so (mean_square), whose ~0 derivative
  // central differences cannot resolve to a relative 1e-6.
  const Size sizes[] = {{7, 33}, {3, 2}, {2, 129}};
  std::uint64_t seed = 50;
  for (RmsNormMode mode : kModes)
    for (const Size& s : sizes)
      for (int affine = 0; affine < 2; ++affine) {
        const auto x = random_values(s.rows * s.cols, ++seed, -2, 2);
        const auto gamma = affine ? random_values(s.cols, ++seed, 0.5, 1.5) : std::vector<double>();
        const auto dy = random_values(x.size(), ++seed);
        const auto dgamma0 = gamma.empty() ? std::vector<double>() : random_values(s.cols, ++seed);
        const double eps = mode == RmsNormMode::mean_square ? 1e-6 : 1e-12;
        const auto grads = rms_norm_grads(mode, s, x, gamma, eps, dy, dgamma0);
        const std::string what = std::string(mode_name(mode)) + " " + describe(s) + " affine " + std::to_string(affine);

        const auto loss_x = [&](const std::vector<double>& p) {
          return dot(rms_norm<double>(mode, s, p, gamma, eps).y, dy);
        };
        EXPECT_LT(finite_difference_error(x, loss_x, grads.dx), fd_tolerance) << what << " dx";
        if (!gamma.empty()) {
          const auto loss_g = [&](const std::vector<double>& p) {
            return dot(rms_norm<double>(mode, s, x, p, eps).y, dy);
          };
          EXPECT_LT(finite_difference_error(gamma, loss_g, minus(grads.dgamma, dgamma0)), fd_tolerance)
              << what << " dgamma";
        }
        // The float instantiation agrees with double.
        const auto fwd_f = rms_norm<float>(mode, s, x, gamma, eps);
        EXPECT_LT(max_rel_error(fwd_f.y, rms_norm<double>(mode, s, x, gamma, eps).y), 2e-6) << what << " float";
      }
}

TEST(RmsNorm, L2NormalizeGradientFollowsTheClamp) {
  // Rows 0 and 2 have ‖x‖ ≈ 1e-5 < eps = 1e-3 (also within ± the FD step): there y = x·√D/eps·γ,
  // a linear map, so dx = dy·γ·√D/eps. Row 1 is ordinary.
  const Size s{3, 5};
  auto x = random_values(s.rows * s.cols, 60, -1, 1);
  for (index_t j = 0; j < s.cols; ++j) {
    x[j] *= 4e-6;
    x[2 * s.cols + j] *= 4e-6;
  }
  const auto gamma = random_values(s.cols, 61, 0.5, 1.5), dy = random_values(x.size(), 62);
  const double eps = 1e-3, clamped_scale = std::sqrt(5.0) / eps;
  const auto fwd = rms_norm<double>(RmsNormMode::l2_normalize, s, x, gamma, eps);
  EXPECT_DOUBLE_EQ(fwd.stat0[0], clamped_scale);
  EXPECT_DOUBLE_EQ(fwd.stat0[2], clamped_scale);
  EXPECT_LT(fwd.stat0[1], clamped_scale);

  const auto grads = rms_norm_grads(RmsNormMode::l2_normalize, s, x, gamma, eps, dy, std::vector<double>(s.cols, 0.0));
  for (index_t j = 0; j < s.cols; ++j) {
    EXPECT_NEAR(grads.dx[j], dy[j] * gamma[j] * clamped_scale, 1e-12 * clamped_scale) << j;
    EXPECT_NEAR(grads.dx[2 * s.cols + j], dy[2 * s.cols + j] * gamma[j] * clamped_scale, 1e-12 * clamped_scale) << j;
  }
  // The FD step (1e-5) keeps the tiny rows inside the clamp and the ordinary row far outside it.
  const auto loss = [&](const std::vector<double>& p) {
    return dot(rms_norm<double>(RmsNormMode::l2_normalize, s, p, gamma, eps).y, dy);
  };
  EXPECT_LT(finite_difference_error(x, loss, grads.dx), fd_tolerance);
}

TEST(Norms, BadArgumentsAreErrors) {
  Tensor<float> x("x", {4, 6}), y_bad("y", {4, 5}), rows("rows", {4}), rows_bad("rows", {3}), cols("cols", {6}),
      cols_bad("cols", {5}), empty_x("x", {4, 0});
  const View2<float> xm = x.as_matrix(), ym_bad = y_bad.as_matrix();
  const View1<float> r = rows.flat(), r_bad = rows_bad.flat(), c = cols.flat(), c_bad = cols_bad.flat(), none;
  const auto mismatch = Status::shape_mismatch, invalid = Status::invalid_argument;
  expect_status(
      mismatch, [&] { ops::layer_norm_forward<float>(xm, c, c, 1e-5f, ym_bad, r, r); }, "LN y");
  expect_status(
      mismatch, [&] { ops::layer_norm_forward<float>(xm, c_bad, c, 1e-5f, xm, r, r); }, "LN gamma");
  expect_status(
      mismatch, [&] { ops::layer_norm_forward<float>(xm, c, c_bad, 1e-5f, xm, r, r); }, "LN beta");
  expect_status(
      mismatch, [&] { ops::layer_norm_forward<float>(xm, c, c, 1e-5f, xm, r_bad, r); }, "LN mean");
  expect_status(
      mismatch,
      [&] { ops::layer_norm_forward<float>(empty_x.as_matrix(), none, none, 1e-5f, empty_x.as_matrix(), r, r); },
      "LN zero columns");
  expect_status(
      invalid, [&] { ops::layer_norm_forward<float>(xm, c, c, -1e-5f, xm, r, r); }, "LN eps");
  expect_status(
      mismatch, [&] { ops::layer_norm_backward<float>(xm, c, r, r, ym_bad, xm, c, c); }, "LN dy");
  expect_status(
      mismatch, [&] { ops::layer_norm_backward<float>(xm, c, r, r, xm, ym_bad, c, c); }, "LN dx");
  expect_status(
      mismatch, [&] { ops::layer_norm_backward<float>(xm, c, r, r_bad, xm, xm, c, c); }, "LN rstd");
  expect_status(
      mismatch, [&] { ops::layer_norm_backward<float>(xm, c, r, r, xm, xm, c, c_bad); }, "LN dbeta");
  for (RmsNormMode mode : kModes) {
    expect_status(
        mismatch, [&] { ops::rms_norm_forward<float>(mode, xm, c, 1e-6f, ym_bad, r); }, "RMS y");
    expect_status(
        mismatch, [&] { ops::rms_norm_forward<float>(mode, xm, c, 1e-6f, xm, r_bad); }, "RMS scale");
    expect_status(
        mismatch, [&] { ops::rms_norm_forward<float>(mode, xm, c_bad, 1e-6f, xm, r); }, "RMS gamma");
    expect_status(
        invalid, [&] { ops::rms_norm_forward<float>(mode, xm, c, NAN, xm, r); }, "RMS eps");
    expect_status(
        mismatch, [&] { ops::rms_norm_backward<float>(mode, xm, c, 1e-6f, r, ym_bad, xm, c); }, "RMS dy");
    expect_status(
        mismatch, [&] { ops::rms_norm_backward<float>(mode, xm, c, 1e-6f, r, xm, xm, c_bad); }, "RMS dgamma");
  }
  expect_status(
      invalid, [&] { ops::rms_norm_forward<float>(static_cast<RmsNormMode>(7), xm, c, 1e-6f, xm, r); }, "RMS mode");
}
