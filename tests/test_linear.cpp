#include "kmoe/ops/linear.hpp"
#include "test_util.hpp"

#include <cmath>

using namespace kmoe;
using namespace kmoe::test;

namespace {

struct LinearCase {
  index_t n, in, out;
};
const LinearCase kCases[] = {{1, 1, 1}, {7, 33, 5}, {33, 7, 129}, {129, 5, 1}, {16, 64, 48}};

// y = x · Wᵀ + b by the naive loop, in double; an empty bias means none.
std::vector<double> naive_linear(const LinearCase& s, const std::vector<double>& x, const std::vector<double>& w,
                                 const std::vector<double>& b) {
  std::vector<double> y(static_cast<std::size_t>(s.n * s.out));
  for (index_t i = 0; i < s.n; ++i)
    for (index_t o = 0; o < s.out; ++o) {
      double sum = b.empty() ? 0.0 : b[o];
      for (index_t k = 0; k < s.in; ++k) sum += x[i * s.in + k] * w[o * s.in + k];
      y[i * s.out + o] = sum;
    }
  return y;
}

template <class T>
std::vector<double> run_forward(const LinearCase& s, const std::vector<double>& x, const std::vector<double>& w,
                                const std::vector<double>& b) {
  auto xt = make_tensor<T>({s.n, s.in}, x, "x");
  auto wt = make_tensor<T>({s.out, s.in}, w, "w");
  auto bt = b.empty() ? Tensor<T>() : make_tensor<T>({s.out}, b, "b");
  Tensor<T> y("y", {s.n, s.out});
  y.fill(T(NAN));  // forward must overwrite y, not accumulate into it
  ops::linear_forward<T>(xt.as_matrix(), wt.as_matrix(), bt.flat(), y.as_matrix());
  return to_double(y);
}

// Gradients from linear_backward, starting from the given accumulators.
struct Grads {
  std::vector<double> dx, dw, db;
};

template <class T>
Grads run_backward(const LinearCase& s, const std::vector<double>& x, const std::vector<double>& w,
                   const std::vector<double>& dy, const std::vector<double>& dw0, const std::vector<double>& db0,
                   int calls = 1) {
  auto xt = make_tensor<T>({s.n, s.in}, x, "x");
  auto wt = make_tensor<T>({s.out, s.in}, w, "w");
  auto dyt = make_tensor<T>({s.n, s.out}, dy, "dy");
  Tensor<T> dx("dx", {s.n, s.in});
  auto dw = make_tensor<T>({s.out, s.in}, dw0, "dw");
  auto db = make_tensor<T>({s.out}, db0, "db");
  for (int c = 0; c < calls; ++c) {
    dx.fill(T(NAN));  // dx must be overwritten
    ops::linear_backward<T>(xt.as_matrix(), wt.as_matrix(), dyt.as_matrix(), dx.as_matrix(), dw.as_matrix(), db.flat());
  }
  return {to_double(dx), to_double(dw), to_double(db)};
}

}  // namespace

TEST(Linear, ForwardMatchesNaiveLoop) {
  std::uint64_t seed = 10;
  for (const auto& s : kCases)
    for (const bool with_bias : {true, false}) {
      const auto x = random_values(s.n * s.in, seed++), w = random_values(s.out * s.in, seed++);
      const auto b = with_bias ? random_values(s.out, seed++) : std::vector<double>();
      const auto expected = naive_linear(s, x, w, b);
      EXPECT_LT(max_rel_error(run_forward<double>(s, x, w, b), expected), 1e-13)
          << s.n << "x" << s.in << "->" << s.out << " bias=" << with_bias;
      EXPECT_LT(max_rel_error(run_forward<float>(s, x, w, b), expected), 1e-5)
          << s.n << "x" << s.in << "->" << s.out << " bias=" << with_bias;
    }
}

TEST(Linear, BackwardMatchesNaiveLoopInFloat) {
  // n = 330 rows: the bias gradient's column reduction runs over several row blocks.
  const LinearCase s{330, 7, 129};
  const auto x = random_values(s.n * s.in, 20), w = random_values(s.out * s.in, 21);
  const auto dy = random_values(s.n * s.out, 22);
  const std::vector<double> dw0(s.out * s.in, 0.0), db0(s.out, 0.0);
  const auto g = run_backward<float>(s, x, w, dy, dw0, db0);
  std::vector<double> dx(s.n * s.in, 0.0), dw(s.out * s.in, 0.0), db(s.out, 0.0);
  for (index_t i = 0; i < s.n; ++i)
    for (index_t o = 0; o < s.out; ++o) {
      db[o] += dy[i * s.out + o];
      for (index_t k = 0; k < s.in; ++k) {
        dx[i * s.in + k] += dy[i * s.out + o] * w[o * s.in + k];
        dw[o * s.in + k] += dy[i * s.out + o] * x[i * s.in + k];
      }
    }
  EXPECT_LT(max_rel_error(g.dx, dx), 1e-5);
  EXPECT_LT(max_rel_error(g.dw, dw), 1e-5);
  EXPECT_LT(max_rel_error(g.db, db), 1e-5);
}

TEST(Linear, BackwardMatchesFiniteDifferences) {
  std::uint64_t seed = 30;
  for (const LinearCase s : {LinearCase{1, 1, 1}, LinearCase{7, 5, 3}, LinearCase{5, 9, 7}}) {
    const auto x = random_values(s.n * s.in, seed++), w = random_values(s.out * s.in, seed++);
    const auto b = random_values(s.out, seed++), r = random_values(s.n * s.out, seed++);
    const std::vector<double> dw0(s.out * s.in, 0.0), db0(s.out, 0.0);
    const auto g = run_backward<double>(s, x, w, r, dw0, db0);
    // L = Σ y ⊙ r, so dL/dy = r
    EXPECT_LT(finite_difference_error(
                  x, [&](const std::vector<double>& p) { return dot(run_forward<double>(s, p, w, b), r); }, g.dx),
              fd_tolerance);
    EXPECT_LT(finite_difference_error(
                  w, [&](const std::vector<double>& p) { return dot(run_forward<double>(s, x, p, b), r); }, g.dw),
              fd_tolerance);
    EXPECT_LT(finite_difference_error(
                  b, [&](const std::vector<double>& p) { return dot(run_forward<double>(s, x, w, p), r); }, g.db),
              fd_tolerance);
  }
}

TEST(Linear, ParameterGradientsAccumulate) {
  const LinearCase s{7, 33, 5};
  const auto x = random_values(s.n * s.in, 40), w = random_values(s.out * s.in, 41);
  const auto dy = random_values(s.n * s.out, 42);
  const auto dw0 = random_values(s.out * s.in, 43), db0 = random_values(s.out, 44);
  const std::vector<double> zero_w(dw0.size(), 0.0), zero_b(db0.size(), 0.0);
  const auto once = run_backward<double>(s, x, w, dy, zero_w, zero_b);
  const auto twice = run_backward<double>(s, x, w, dy, zero_w, zero_b, 2);
  const auto onto = run_backward<double>(s, x, w, dy, dw0, db0);
  std::vector<double> dw2(dw0.size()), db2(db0.size()), dw_onto(dw0.size()), db_onto(db0.size());
  for (std::size_t i = 0; i < dw0.size(); ++i) {
    dw2[i] = 2 * once.dw[i];
    dw_onto[i] = dw0[i] + once.dw[i];
  }
  for (std::size_t i = 0; i < db0.size(); ++i) {
    db2[i] = 2 * once.db[i];
    db_onto[i] = db0[i] + once.db[i];
  }
  EXPECT_LT(max_rel_error(twice.dw, dw2), 1e-14);
  EXPECT_LT(max_rel_error(twice.db, db2), 1e-14);
  EXPECT_LT(max_rel_error(onto.dw, dw_onto), 1e-14);
  EXPECT_LT(max_rel_error(onto.db, db_onto), 1e-14);
  EXPECT_EQ(twice.dx, once.dx);  // the input gradient is overwritten, not accumulated
}

TEST(Linear, EmptyOptionalViewsAreSkipped) {
  const LinearCase s{7, 5, 3};
  const auto x = random_values(s.n * s.in, 50), w = random_values(s.out * s.in, 51);
  const auto dy = random_values(s.n * s.out, 52);
  const auto full =
      run_backward<double>(s, x, w, dy, std::vector<double>(s.out * s.in, 0.0), std::vector<double>(s.out, 0.0));
  auto xt = make_tensor<double>({s.n, s.in}, x), wt = make_tensor<double>({s.out, s.in}, w);
  auto dyt = make_tensor<double>({s.n, s.out}, dy);
  Tensor<double> dw("dw", {s.out, s.in});
  ops::linear_backward<double>(xt.as_matrix(), wt.as_matrix(), dyt.as_matrix(), View2<double>(), dw.as_matrix(),
                               View1<double>());
  EXPECT_EQ(to_double(dw), full.dw);
}

TEST(Linear, ShapeErrors) {
  Tensor<double> x("x", {4, 3}), w("w", {5, 3}), b("b", {5}), y("y", {4, 5}), dx("dx", {4, 3}), dw("dw", {5, 3}),
      db("db", {5});
  Tensor<double> w_bad("w", {5, 2}), b_bad("b", {4}), y_bad("y", {4, 6}), dx_bad("dx", {3, 3}), dw_bad("dw", {3, 5}),
      db_bad("db", {6}), dy_bad("dy", {4, 4});
  const auto expect_shape_error = [](const std::function<void()>& call, const char* what) {
    expect_status(call, Status::shape_mismatch, "linear_", what);
  };
  const auto fwd = [](const Tensor<double>& x, const Tensor<double>& w, const Tensor<double>& b, Tensor<double>& y) {
    ops::linear_forward<double>(x.as_matrix(), w.as_matrix(), b.flat(), y.as_matrix());
  };
  const auto bwd = [&](const Tensor<double>& w, const Tensor<double>& dy, const Tensor<double>& dx,
                       const Tensor<double>& dw, const Tensor<double>& db) {
    ops::linear_backward<double>(x.as_matrix(), w.as_matrix(), dy.as_matrix(), dx.as_matrix(), dw.as_matrix(),
                                 db.flat());
  };
  expect_shape_error([&] { fwd(x, w_bad, b, y); }, "forward: weight in 2 vs x in 3");
  expect_shape_error([&] { fwd(x, w, b_bad, y); }, "forward: bias 4 vs out 5");
  expect_shape_error([&] { fwd(x, w, b, y_bad); }, "forward: y [4, 6]");
  expect_shape_error([&] { bwd(w_bad, y, dx, dw, db); }, "backward: weight in 2");
  expect_shape_error([&] { bwd(w, dy_bad, dx, dw, db); }, "backward: dy [4, 4]");
  expect_shape_error([&] { bwd(w, y, dx_bad, dw, db); }, "backward: dx [3, 3]");
  expect_shape_error([&] { bwd(w, y, dx, dw_bad, db); }, "backward: dweight [3, 5]");
  expect_shape_error([&] { bwd(w, y, dx, dw, db_bad); }, "backward: dbias 6");
  EXPECT_NO_THROW(fwd(x, w, b, y));
  EXPECT_NO_THROW(bwd(w, y, dx, dw, db));
}
