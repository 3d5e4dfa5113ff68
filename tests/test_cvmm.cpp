#include "kmoe/io/hdf5_reader.hpp"
#include "kmoe/moe/cvmm.hpp"
#include "test_util.hpp"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <tuple>

using namespace kmoe;
using namespace kmoe::test;

namespace {

// A CVMM problem in host double: the router's choice and the dense operands.
struct Problem {
  index_t tokens = 0;
  int k = 0, experts = 0;
  index_t K = 0, M = 0;
  bool per_token = true;  // x [tokens, K], else [tokens · k, K]
  std::vector<int> expert_index;
  std::vector<double> x, w, gates;

  index_t pairs() const { return tokens * k; }
  index_t x_rows() const { return per_token ? tokens : pairs(); }
  index_t row(index_t p) const { return per_token ? p / k : p; }
};

// Experts are drawn from [0, used_experts), so experts from used_experts on receive no rows.
Problem make_problem(index_t tokens, int k, int experts, index_t K, index_t M, bool per_token, std::uint64_t seed,
                     int used_experts = 0) {
  Problem p{tokens, k, experts, K, M, per_token, {}, {}, {}, {}};
  std::mt19937_64 gen(seed);
  p.expert_index.resize(p.pairs());
  for (index_t t = 0; t < tokens; ++t) {  // distinct experts per token, as a router picks them
    std::vector<int> pool(used_experts > 0 ? used_experts : experts);
    std::iota(pool.begin(), pool.end(), 0);
    std::shuffle(pool.begin(), pool.end(), gen);
    std::copy(pool.begin(), pool.begin() + k, p.expert_index.begin() + t * k);
  }
  p.x = random_values(p.x_rows() * K, seed + 1);
  p.w = random_values(static_cast<index_t>(experts) * K * M, seed + 2);
  p.gates = random_values(p.pairs(), seed + 3, 0, 1);
  return p;
}

std::vector<double> reference_y_pairs(const Problem& p, const std::vector<double>& x, const std::vector<double>& w) {
  std::vector<double> y(p.pairs() * p.M, 0.0);
  for (index_t pair = 0; pair < p.pairs(); ++pair) {
    const index_t e = p.expert_index[pair];
    for (index_t m = 0; m < p.M; ++m)
      for (index_t c = 0; c < p.K; ++c) y[pair * p.M + m] += x[p.row(pair) * p.K + c] * w[(e * p.K + c) * p.M + m];
  }
  return y;
}

std::vector<double> reference_reduce(const Problem& p, const std::vector<double>& y_pairs,
                                     const std::vector<double>& gates) {
  std::vector<double> y(p.tokens * p.M, 0.0);
  for (index_t pair = 0; pair < p.pairs(); ++pair)
    for (index_t m = 0; m < p.M; ++m) y[(pair / p.k) * p.M + m] += gates[pair] * y_pairs[pair * p.M + m];
  return y;
}

struct Gradients {
  std::vector<double> dx, dw, dgates;
};

// From dy_pairs: dx[row(p)] += dy_pair[p] · W[e]ᵀ, dw[e] += x[row(p)]ᵀ · dy_pair[p].
Gradients reference_backward(const Problem& p, const std::vector<double>& dy_pairs) {
  Gradients g{std::vector<double>(p.x_rows() * p.K, 0.0), std::vector<double>(p.w.size(), 0.0), {}};
  for (index_t pair = 0; pair < p.pairs(); ++pair) {
    const index_t e = p.expert_index[pair], r = p.row(pair);
    for (index_t c = 0; c < p.K; ++c)
      for (index_t m = 0; m < p.M; ++m) {
        g.dx[r * p.K + c] += dy_pairs[pair * p.M + m] * p.w[(e * p.K + c) * p.M + m];
        g.dw[(e * p.K + c) * p.M + m] += p.x[r * p.K + c] * dy_pairs[pair * p.M + m];
      }
  }
  return g;
}

Gradients reference_backward_reduced(const Problem& p, const std::vector<double>& dy) {
  std::vector<double> dy_pairs(p.pairs() * p.M);
  for (index_t pair = 0; pair < p.pairs(); ++pair)
    for (index_t m = 0; m < p.M; ++m) dy_pairs[pair * p.M + m] = p.gates[pair] * dy[(pair / p.k) * p.M + m];
  Gradients g = reference_backward(p, dy_pairs);
  const auto y_pairs = reference_y_pairs(p, p.x, p.w);
  g.dgates.assign(p.pairs(), 0.0);
  for (index_t pair = 0; pair < p.pairs(); ++pair)
    for (index_t m = 0; m < p.M; ++m) g.dgates[pair] += dy[(pair / p.k) * p.M + m] * y_pairs[pair * p.M + m];
  return g;
}

moe::DispatchPlan make_plan(const Problem& p) {
  auto index = Tensor<int>::from_host("expert_index", {p.tokens, p.k}, p.expert_index);
  return moe::DispatchPlan::build(index.as_matrix(), p.experts);
}

// The library's results for a problem, in T (GEMM operands of type W), read back as double.
struct Results {
  std::vector<double> y_pairs, y, dx, dw, dgates;
};

// Runs forward and backward; reduced uses gates and dy [tokens, M], else dy is dy_pairs. dw starts
// at dw_start (accumulation); dx and dgates start at garbage (overwritten). Outputs named in
// `skip` ("dx", "dw", "dgates") are passed as empty Views.
template <class T, class W = T>
Results run_cvmm(const Problem& p, bool reduced, const std::vector<double>& dy, const std::vector<double>& dw_start,
                 const std::string& skip = "") {
  const auto plan = make_plan(p);
  auto x = make_tensor<T>({p.x_rows(), p.K}, p.x);
  Tensor<W> w;
  if constexpr (std::is_same_v<T, W>) w = make_tensor<T>({p.experts, p.K, p.M}, p.w);
  else w = convert_tensor<W>(make_tensor<T>({p.experts, p.K, p.M}, p.w), "w_operand");
  auto gates = make_tensor<T>({p.tokens, p.k}, p.gates);
  Tensor<T> y_pairs("y_pairs", {p.pairs(), p.M}), y("y", {p.tokens, p.M});
  Tensor<T> dx("dx", {p.x_rows(), p.K}), dgates("dgates", {p.tokens, p.k});
  dx.fill(T(7));
  dgates.fill(T(7));
  auto dw = make_tensor<T>({p.experts, p.K, p.M}, dw_start);
  auto dy_t = make_tensor<T>({static_cast<index_t>(dy.size()) / p.M, p.M}, dy);
  const View2<T> dx_view = skip.find("dx") == std::string::npos ? dx.as_matrix() : View2<T>();
  const View3<T> dw_view = skip.find("dw") == std::string::npos ? dw.template view<3>() : View3<T>();
  const View2<T> dgates_view = skip.find("dgates") == std::string::npos ? dgates.as_matrix() : View2<T>();
  Results r;
  if (reduced) {
    moe::cvmm_forward<T, W>(plan, x.as_matrix(), w.template view<3>(), y_pairs.as_matrix());
    moe::cvmm_forward_reduced<T, W>(plan, x.as_matrix(), w.template view<3>(), gates.as_matrix(), y.as_matrix());
    moe::cvmm_backward_reduced<T, W>(plan, x.as_matrix(), w.template view<3>(), gates.as_matrix(), dy_t.as_matrix(),
                                     dx_view, dw_view, dgates_view);
    r.y = to_double(y);
    r.dgates = to_double(dgates);
  } else {
    moe::cvmm_forward<T, W>(plan, x.as_matrix(), w.template view<3>(), y_pairs.as_matrix());
    moe::cvmm_backward<T, W>(plan, x.as_matrix(), w.template view<3>(), dy_t.as_matrix(), dx_view, dw_view);
  }
  r.y_pairs = to_double(y_pairs);
  r.dx = to_double(dx);
  r.dw = to_double(dw);
  return r;
}

std::vector<Problem> problems() {
  std::vector<Problem> all;
  for (bool per_token : {true, false}) {
    all.push_back(make_problem(37, 4, 16, 17, 7, per_token, 10, 12));  // experts 12..15 receive nothing
    all.push_back(make_problem(9, 1, 5, 7, 1, per_token, 20));         // k = 1: both readings of x coincide
    all.push_back(make_problem(13, 6, 6, 5, 9, per_token, 30));        // k = E: every token uses every expert
    all.push_back(make_problem(20, 3, 8, 1, 17, per_token, 40, 4));
    all.push_back(make_problem(300, 2, 3, 5, 3, per_token, 50));  // ~200 rows an expert: dW in several GEMMs
  }
  return all;
}

std::string describe(const Problem& p) {
  return (::testing::Message() << "tokens " << p.tokens << " k " << p.k << " experts " << p.experts << " K " << p.K
                               << " M " << p.M << (p.per_token ? " per-token x" : " per-pair x"))
      .GetString();
}

std::vector<double> plus(const std::vector<double>& a, const std::vector<double>& b) {
  std::vector<double> s(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) s[i] = a[i] + b[i];
  return s;
}

template <class T>
void expect_matches_reference(const Problem& p, double tolerance) {
  const auto label = describe(p) + (sizeof(T) == 4 ? " float" : " double");
  const auto dw_start = random_values(p.w.size(), 5);
  const auto y_pairs = reference_y_pairs(p, p.x, p.w);

  const auto dy_pairs = random_values(p.pairs() * p.M, 6);
  const auto plain = run_cvmm<T>(p, false, dy_pairs, dw_start);
  const auto expected = reference_backward(p, dy_pairs);
  EXPECT_LT(max_rel_error(plain.y_pairs, y_pairs), tolerance) << label;
  EXPECT_LT(max_rel_error(plain.dx, expected.dx), tolerance) << label;
  EXPECT_LT(max_rel_error(plain.dw, plus(dw_start, expected.dw)), tolerance) << label;

  const auto dy = random_values(p.tokens * p.M, 7);
  const auto reduced = run_cvmm<T>(p, true, dy, dw_start);
  const auto expected_reduced = reference_backward_reduced(p, dy);
  EXPECT_LT(max_rel_error(reduced.y_pairs, y_pairs), tolerance) << label;
  EXPECT_LT(max_rel_error(reduced.y, reference_reduce(p, y_pairs, p.gates)), tolerance) << label;
  EXPECT_LT(max_rel_error(reduced.dx, expected_reduced.dx), tolerance) << label;
  EXPECT_LT(max_rel_error(reduced.dw, plus(dw_start, expected_reduced.dw)), tolerance) << label;
  EXPECT_LT(max_rel_error(reduced.dgates, expected_reduced.dgates), tolerance) << label;
}

void expect_shape_mismatch(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    FAIL() << "no error for " << needle;
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::shape_mismatch) << e.what();
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

}  // namespace

TEST(Cvmm, ForwardAndBackwardMatchDenseLoop) {
  for (const auto& p : problems()) {
    expect_matches_reference<double>(p, 1e-13);
    expect_matches_reference<float>(p, 1e-5);
  }
}

TEST(Cvmm, BackwardMatchesFiniteDifferences) {
  for (const auto& p : problems()) {
    const auto label = describe(p);
    const auto zero_dw = std::vector<double>(p.w.size(), 0.0);
    const auto r_pairs = random_values(p.pairs() * p.M, 8);
    const auto plain = run_cvmm<double>(p, false, r_pairs, zero_dw);
    const auto loss_x = [&](const std::vector<double>& x) { return dot(reference_y_pairs(p, x, p.w), r_pairs); };
    const auto loss_w = [&](const std::vector<double>& w) { return dot(reference_y_pairs(p, p.x, w), r_pairs); };
    EXPECT_LT(finite_difference_error(p.x, loss_x, plain.dx), fd_tolerance) << label;
    EXPECT_LT(finite_difference_error(p.w, loss_w, plain.dw), fd_tolerance) << label;

    const auto r = random_values(p.tokens * p.M, 9);
    const auto reduced = run_cvmm<double>(p, true, r, zero_dw);
    const auto loss = [&](const std::vector<double>& x, const std::vector<double>& w, const std::vector<double>& g) {
      return dot(reference_reduce(p, reference_y_pairs(p, x, w), g), r);
    };
    EXPECT_LT(finite_difference_error(p.x, [&](const auto& x) { return loss(x, p.w, p.gates); }, reduced.dx),
              fd_tolerance)
        << label;
    EXPECT_LT(finite_difference_error(p.w, [&](const auto& w) { return loss(p.x, w, p.gates); }, reduced.dw),
              fd_tolerance)
        << label;
    EXPECT_LT(finite_difference_error(p.gates, [&](const auto& g) { return loss(p.x, p.w, g); }, reduced.dgates),
              fd_tolerance)
        << label;
  }
}

// bfloat16 operands: each operand element is rounded once (relative error ≤ u = 2⁻⁹), each GEMM
// output once more, and the float accumulation adds nothing visible; with random signs the errors
// do not line up, so a result's relative L2 error stays near 2u. The bound, 4u ≈ 0.0078, leaves
// room for the two roundings of a chained product (dgates, the reduced dx) and small sums; a
// float32 path would be far below it (1e-6), so the lower bound shows that bf16 really ran.
TEST(Cvmm, Bfloat16OperandsStayWithinRoundingOfFloat) {
  const double u = std::ldexp(1.0, -9), bound = 4 * u;
  double worst = 0;
  for (const auto& p : problems()) {
    const auto label = describe(p) + " bf16";
    const auto zero_dw = std::vector<double>(p.w.size(), 0.0);
    const auto dy_pairs = random_values(p.pairs() * p.M, 6);
    const auto plain = run_cvmm<float, bfloat16>(p, false, dy_pairs, zero_dw);
    const auto expected = reference_backward(p, dy_pairs);
    const auto dy = random_values(p.tokens * p.M, 7);
    const auto reduced = run_cvmm<float, bfloat16>(p, true, dy, zero_dw);
    const auto expected_reduced = reference_backward_reduced(p, dy);
    const auto y_pairs = reference_y_pairs(p, p.x, p.w);
    const std::vector<std::tuple<const char*, std::vector<double>, std::vector<double>>> outputs = {
        {"y_pairs", plain.y_pairs, y_pairs},
        {"dx", plain.dx, expected.dx},
        {"dw", plain.dw, expected.dw},
        {"y", reduced.y, reference_reduce(p, y_pairs, p.gates)},
        {"reduced dx", reduced.dx, expected_reduced.dx},
        {"reduced dw", reduced.dw, expected_reduced.dw},
        {"dgates", reduced.dgates, expected_reduced.dgates}};
    for (const auto& [name, actual, reference] : outputs) {
      const double error = relative_l2_error(actual, reference);
      worst = std::max(worst, error / u);
      EXPECT_LT(error, bound) << label << " " << name;
      EXPECT_GT(error, u / 64) << label << " " << name << ": no bfloat16 rounding seen";
    }
  }
  std::printf("bf16 CVMM: worst relative L2 error %.2f u\n", worst);
}

// An expert without rows gets exactly zero weight gradient on the bfloat16 path too (no GEMM
// writes its block; some cuBLAS grouped GEMM versions get empty groups wrong).
TEST(Cvmm, Bfloat16EmptyExpertsGetExactlyZeroGradient) {
  for (bool per_token : {true, false}) {
    const auto p = make_problem(37, 4, 16, 17, 7, per_token, 10, 12);  // experts 12..15 receive nothing
    const auto dw_start = random_values(p.w.size(), 5);
    const auto expert_block = [&](const std::vector<double>& dw, int e) {
      return std::vector<double>(dw.begin() + e * p.K * p.M, dw.begin() + (e + 1) * p.K * p.M);
    };
    // dw_start rounded to float, as run_cvmm stores it.
    const auto start = to_double(make_tensor<float>({p.experts, p.K, p.M}, dw_start));
    for (bool reduced : {false, true}) {
      const auto dy = random_values((reduced ? p.tokens : p.pairs()) * p.M, 6);
      const auto r = run_cvmm<float, bfloat16>(p, reduced, dy, dw_start);
      for (int e = 12; e < 16; ++e) EXPECT_EQ(expert_block(r.dw, e), expert_block(start, e)) << e << " " << reduced;
      EXPECT_NE(expert_block(r.dw, 0), expert_block(start, 0));
    }
  }
}

TEST(Cvmm, EmptyGradientOutputsAreSkipped) {
  const auto p = make_problem(37, 4, 16, 33, 7, true, 50, 12);
  const auto dw_start = random_values(p.w.size(), 51);
  const auto dy = random_values(p.tokens * p.M, 52);
  const auto all = run_cvmm<double>(p, true, dy, dw_start);
  const auto no_dx = run_cvmm<double>(p, true, dy, dw_start, "dx dgates");
  EXPECT_EQ(no_dx.dw, all.dw);
  EXPECT_EQ(no_dx.dx, std::vector<double>(all.dx.size(), 7.0));
  EXPECT_EQ(no_dx.dgates, std::vector<double>(all.dgates.size(), 7.0));
  const auto no_dw = run_cvmm<double>(p, true, dy, dw_start, "dw");
  EXPECT_EQ(no_dw.dx, all.dx);
  EXPECT_EQ(no_dw.dgates, all.dgates);
  EXPECT_EQ(no_dw.dw, dw_start);
}

TEST(Cvmm, RepeatedRunsAreBitwiseIdentical) {
  for (bool per_token : {true, false}) {
    const auto p = make_problem(300, 4, 37, 96, 80, per_token, 60);
    const auto dw_start = random_values(p.w.size(), 61);
    const auto dy = random_values(p.tokens * p.M, 62);
    const auto first = run_cvmm<float>(p, true, dy, dw_start), second = run_cvmm<float>(p, true, dy, dw_start);
    // Compared as doubles converted from float: equality is bit equality (no NaN, up to the sign of 0).
    EXPECT_EQ(first.y, second.y);
    EXPECT_EQ(first.y_pairs, second.y_pairs);
    EXPECT_EQ(first.dx, second.dx);
    EXPECT_EQ(first.dw, second.dw);
    EXPECT_EQ(first.dgates, second.dgates);
  }
}

// σ-MoE's Triton CVMM on the recorded layer: expert_scores = relu(cvmm(x, keys)) per (token, slot)
// in topk_index_raw order, out = Σ_slot gate · cvmm(scores, values), and the weight gradients of
// sum(out · grad_out) (the entropy regulariser does not reach keys or values).
TEST(Cvmm, MatchesSigmaMoeTritonGolden) {
  const char* data = std::getenv("KMOE_TEST_DATA");
  ASSERT_NE(data, nullptr) << "KMOE_TEST_DATA is not set: run through ctest or point it at the repository's data/";
  const io::H5Reader file(std::string(data) + "/golden/sigma_moe/sigma_moe_sigmoid_relu_train.h5");
  const index_t tokens = 64, dmodel = 64, experts = 16, expert_size = 32;
  const int k = 4;
  const auto x = file.read<float>("/input/x", Shape{4, 16, dmodel}).reshape({tokens, dmodel});
  const auto keys = file.read<float>("/params/keys", Shape{experts, dmodel, expert_size});
  const auto values = file.read<float>("/params/values", Shape{experts, expert_size, dmodel});
  const auto raw_index = file.read_indices("/debug/topk_index_raw", Shape{4, 16, k}).reshape({tokens, k});
  const auto plan = moe::DispatchPlan::build(raw_index.as_matrix(), experts);

  // The gates come in topk_index order; put them in the raw order of the pairs.
  const auto sorted_index = file.read_indices("/debug/topk_index", Shape{4, 16, k}).to_host();
  const auto sorted_gate = file.read<float>("/debug/topk_gate", Shape{4, 16, k}).to_host();
  const auto raw = raw_index.to_host();
  std::vector<float> gate(tokens * k);
  for (index_t t = 0; t < tokens; ++t)
    for (int j = 0; j < k; ++j) {
      const auto* row = sorted_index.data() + t * k;
      const auto at = std::find(row, row + k, raw[t * k + j]) - row;
      ASSERT_LT(at, k) << "token " << t << " slot " << j;
      gate[t * k + j] = sorted_gate[t * k + at];
    }
  const auto gates = Tensor<float>::from_host("gates", {tokens, k}, gate);

  Tensor<float> scores("scores", {tokens * k, expert_size});
  moe::cvmm_forward<float>(plan, x.as_matrix(), keys.view<3>(), scores.as_matrix());
  auto h = scores.to_host();
  for (auto& v : h) v = std::max(v, 0.0f);
  const auto hidden = Tensor<float>::from_host("hidden", scores.shape(), h);
  const auto golden_scores = to_double(file.read<float>("/debug/expert_scores", Shape{4, 16, k, expert_size}));
  const double scores_error = relative_l2_error(to_double(hidden), golden_scores);
  EXPECT_LE(scores_error, 1e-5);

  Tensor<float> out("out", {tokens, dmodel});
  moe::cvmm_forward_reduced<float>(plan, hidden.as_matrix(), values.view<3>(), gates.as_matrix(), out.as_matrix());
  const double out_error = relative_l2_error(to_double(out), to_double(file.read<float>("/output/out")));
  EXPECT_LE(out_error, 1e-5);

  const auto grad_out = file.read<float>("/input/grad_out").reshape({tokens, dmodel});
  Tensor<float> dhidden("dhidden", hidden.shape()), dvalues("dvalues", values.shape()), dkeys("dkeys", keys.shape());
  moe::cvmm_backward_reduced<float>(plan, hidden.as_matrix(), values.view<3>(), gates.as_matrix(),
                                    grad_out.as_matrix(), dhidden.as_matrix(), dvalues.view<3>(), View2<float>());
  auto dpre = dhidden.to_host();
  for (std::size_t i = 0; i < dpre.size(); ++i)
    if (!(h[i] > 0)) dpre[i] = 0;
  const auto dscores = Tensor<float>::from_host("dscores", hidden.shape(), dpre);
  moe::cvmm_backward<float>(plan, x.as_matrix(), keys.view<3>(), dscores.as_matrix(), View2<float>(), dkeys.view<3>());
  const double dvalues_error =
      relative_l2_error(to_double(dvalues), to_double(file.read<float>("/grad/params/values")));
  const double dkeys_error = relative_l2_error(to_double(dkeys), to_double(file.read<float>("/grad/params/keys")));
  EXPECT_LE(dvalues_error, 1e-5);
  EXPECT_LE(dkeys_error, 1e-5);
  std::printf("golden relative L2 errors: expert_scores %.3g, out %.3g, d values %.3g, d keys %.3g\n", scores_error,
              out_error, dvalues_error, dkeys_error);
}

TEST(Cvmm, BadShapesAreErrors) {
  const auto p = make_problem(10, 3, 4, 6, 5, true, 70);
  const auto plan = make_plan(p);
  Tensor<float> x("x", {10, 6}), x_bad_rows("x", {11, 6}), w("w", {4, 6, 5}), w_bad_k("w", {4, 7, 5}),
      w_bad_e("w", {5, 6, 5}), y_pairs("y_pairs", {30, 5}), y_pairs_bad("y_pairs", {30, 4}), y("y", {10, 5}),
      y_bad("y", {9, 5}), gates("gates", {10, 3}), gates_bad("gates", {10, 2}), dx_bad("dx", {30, 6}),
      dw_bad("dw", {4, 6, 4}), dy("dy", {10, 5}), dgates_bad("dgates", {3, 10});
  const auto X = x.as_matrix();
  const auto W = w.view<3>();
  expect_shape_mismatch([&] { moe::cvmm_forward<float>(plan, x_bad_rows.as_matrix(), W, y_pairs.as_matrix()); },
                        "cvmm_forward: x is [11, 6], but the plan has 10 tokens and 30 pairs");
  expect_shape_mismatch([&] { moe::cvmm_forward<float>(plan, X, w_bad_k.view<3>(), y_pairs.as_matrix()); },
                        "cvmm_forward: w is [4, 7, 5]");
  expect_shape_mismatch([&] { moe::cvmm_forward<float>(plan, X, w_bad_e.view<3>(), y_pairs.as_matrix()); },
                        "cvmm_forward: w is [5, 6, 5]");
  expect_shape_mismatch([&] { moe::cvmm_forward<float>(plan, X, W, y_pairs_bad.as_matrix()); },
                        "cvmm_forward: y_pairs is [30, 4], expected [30, 5]");
  expect_shape_mismatch(
      [&] {
        moe::cvmm_forward_reduced<float>(plan, X, W, gates_bad.as_matrix(), y.as_matrix());
      },
      "cvmm_forward_reduced: gates is [10, 2], expected [10, 3]");
  expect_shape_mismatch(
      [&] { moe::cvmm_forward_reduced<float>(plan, X, W, gates.as_matrix(), y_bad.as_matrix()); },
      "cvmm_forward_reduced: y is [9, 5]");
  expect_shape_mismatch(
      [&] { moe::cvmm_backward<float>(plan, X, W, y_pairs_bad.as_matrix(), View2<float>(), View3<float>()); },
      "cvmm_backward: dy_pairs is [30, 4]");
  expect_shape_mismatch(
      [&] { moe::cvmm_backward<float>(plan, X, W, y_pairs.as_matrix(), dx_bad.as_matrix(), View3<float>()); },
      "cvmm_backward: dx is [30, 6], expected [10, 6]");
  expect_shape_mismatch(
      [&] { moe::cvmm_backward<float>(plan, X, W, y_pairs.as_matrix(), View2<float>(), dw_bad.view<3>()); },
      "cvmm_backward: dw is [4, 6, 4], w is [4, 6, 5]");
  expect_shape_mismatch(
      [&] {
        moe::cvmm_backward_reduced<float>(plan, X, W, gates.as_matrix(), y_bad.as_matrix(), View2<float>(),
                                          View3<float>(), View2<float>());
      },
      "cvmm_backward_reduced: dy is [9, 5]");
  expect_shape_mismatch(
      [&] {
        moe::cvmm_backward_reduced<float>(plan, X, W, gates.as_matrix(), dy.as_matrix(), View2<float>(),
                                          View3<float>(), dgates_bad.as_matrix());
      },
      "cvmm_backward_reduced: dgates is [3, 10]");
}

// PairRows::sorted: per-pair matrices given and returned in the plan's sorted order hold the
// same numbers as in pair order, row s being pair sorted_pair(s).
TEST(Cvmm, SortedPairRowsArePairOrderPermuted) {
  for (const int k : {3, 1})  // k = 1: x's rows named (a per-token and a sorted per-pair x look alike)
  for (bool per_token : {true, false}) {
    const auto p = make_problem(203, k, 11, 40, 24, per_token, 70, 9);
    const moe::XRows named = per_token ? moe::XRows::per_token : moe::XRows::per_pair;
    const auto plan = make_plan(p);
    const std::vector<int> sorted_pair = host_ints(plan.sorted_pair());
    // rows of a [pairs, cols] pair-order matrix in sorted order
    const auto to_sorted = [&](const std::vector<double>& m, index_t cols) {
      std::vector<double> out(m.size());
      for (index_t s = 0; s < p.pairs(); ++s)
        std::copy_n(m.begin() + sorted_pair[s] * cols, cols, out.begin() + s * cols);
      return out;
    };
    const auto x_in = per_token ? p.x : to_sorted(p.x, p.K);
    const auto x = make_tensor<double>({p.x_rows(), p.K}, p.x), xs = make_tensor<double>({p.x_rows(), p.K}, x_in);
    const auto w = make_tensor<double>({p.experts, p.K, p.M}, p.w);
    const auto gates = make_tensor<double>({p.tokens, p.k}, p.gates);
    const auto dy_pairs_values = random_values(p.pairs() * p.M, 71), dy_values = random_values(p.tokens * p.M, 72);
    const auto dy_pairs = make_tensor<double>({p.pairs(), p.M}, dy_pairs_values);
    const auto dy_pairs_sorted = make_tensor<double>({p.pairs(), p.M}, to_sorted(dy_pairs_values, p.M));
    const auto dy = make_tensor<double>({p.tokens, p.M}, dy_values);
    const auto sorted = moe::PairRows::sorted;

    Tensor<double> y_pairs("y_pairs", {p.pairs(), p.M}), y_sorted("y_sorted", {p.pairs(), p.M});
    moe::cvmm_forward<double>(plan, x.as_matrix(), w.view<3>(), y_pairs.as_matrix());
    moe::cvmm_forward<double>(plan, xs.as_matrix(), w.view<3>(), y_sorted.as_matrix(), sorted, named);
    EXPECT_EQ(to_double(y_sorted), to_sorted(to_double(y_pairs), p.M)) << per_token;

    Tensor<double> y("y", {p.tokens, p.M}), y2("y2", {p.tokens, p.M});
    moe::cvmm_forward_reduced<double>(plan, x.as_matrix(), w.view<3>(), gates.as_matrix(), y.as_matrix());
    moe::cvmm_forward_reduced<double>(plan, xs.as_matrix(), w.view<3>(), gates.as_matrix(), y2.as_matrix(), sorted,
                                      named);
    EXPECT_EQ(to_double(y2), to_double(y)) << per_token;

    const auto x_rows_in = [&](const Tensor<double>& t) { return per_token ? to_double(t) : to_sorted(to_double(t), p.K); };
    Tensor<double> dx("dx", x.shape()), dx2("dx2", x.shape()), dw("dw", w.shape()), dw2("dw2", w.shape());
    moe::cvmm_backward<double>(plan, x.as_matrix(), w.view<3>(), dy_pairs.as_matrix(), dx.as_matrix(), dw.view<3>());
    moe::cvmm_backward<double>(plan, xs.as_matrix(), w.view<3>(), dy_pairs_sorted.as_matrix(), dx2.as_matrix(),
                               dw2.view<3>(), sorted, named);
    EXPECT_EQ(to_double(dx2), x_rows_in(dx)) << per_token;
    EXPECT_EQ(to_double(dw2), to_double(dw)) << per_token;

    Tensor<double> dg("dg", {p.tokens, p.k}), dg2("dg2", {p.tokens, p.k}), dw3("dw3", w.shape()), dw4("dw4", w.shape());
    moe::cvmm_backward_reduced<double>(plan, x.as_matrix(), w.view<3>(), gates.as_matrix(), dy.as_matrix(), dx.as_matrix(),
                                       dw3.view<3>(), dg.as_matrix());
    moe::cvmm_backward_reduced<double>(plan, xs.as_matrix(), w.view<3>(), gates.as_matrix(), dy.as_matrix(),
                                       dx2.as_matrix(), dw4.view<3>(), dg2.as_matrix(), sorted, named);
    EXPECT_EQ(to_double(dx2), x_rows_in(dx)) << per_token;
    EXPECT_EQ(to_double(dw4), to_double(dw3)) << per_token;
    EXPECT_EQ(to_double(dg2), to_double(dg)) << per_token;
  }
}

// With k = 1 a per-token and a sorted per-pair x look alike: x's rows must be named, and a named
// kind must match x's row count.
TEST(Cvmm, KOneSortedRowsNeedTheRowKindNamed) {
  const auto p = make_problem(9, 1, 4, 6, 5, true, 80);
  const auto plan = make_plan(p);
  const auto x = make_tensor<float>({p.tokens, p.K}, p.x);
  const auto w = make_tensor<float>({p.experts, p.K, p.M}, p.w);
  Tensor<float> y("y", {p.pairs(), p.M});
  expect_status([&] { moe::cvmm_forward<float>(plan, x.as_matrix(), w.view<3>(), y.as_matrix(), moe::PairRows::sorted); },
                Status::invalid_argument, "XRows::per_pair");
  const auto p3 = make_problem(9, 3, 4, 6, 5, true, 81);
  const auto plan3 = make_plan(p3);
  const auto x3 = make_tensor<float>({p3.tokens, p3.K}, p3.x);
  Tensor<float> y3("y3", {p3.pairs(), p3.M});
  expect_status([&] { moe::cvmm_forward<float>(plan3, x3.as_matrix(), w.view<3>(), y3.as_matrix(), moe::PairRows::pair_order,
                                               moe::XRows::per_pair); },
                Status::shape_mismatch, "one row per pair");
}

// Dropped pairs (expert −1, capacity-limited routers): every path leaves them out of its sums and
// gives them zero rows and zero gate gradients, in pair order and in sorted order alike.
TEST(Cvmm, DroppedPairsAreLeftOut) {
  for (bool per_token : {true, false}) {
    auto p = make_problem(41, 3, 6, 10, 7, per_token, 90);
    std::vector<int> dropped_index = p.expert_index;
    std::mt19937_64 gen(91);
    for (auto& e : dropped_index)
      if (gen() % 3 == 0) e = -1;
    const auto index = Tensor<int>::from_host("index", {p.tokens, p.k}, dropped_index);
    const auto plan = moe::DispatchPlan::build_with_drops(index.as_matrix(), p.experts);
    // The reference: the same problem without drops, dropped pairs' gates 0 and rows zeroed.
    Problem kept = p;
    for (std::size_t i = 0; i < dropped_index.size(); ++i)
      if (dropped_index[i] < 0) kept.gates[i] = 0;
    const auto dy = random_values(p.tokens * p.M, 92), dy_pairs = random_values(p.pairs() * p.M, 93);
    const auto zero_dropped = [&](std::vector<double> rows, index_t cols) {
      for (index_t q = 0; q < p.pairs(); ++q)
        if (dropped_index[q] < 0) std::fill_n(rows.begin() + q * cols, cols, 0.0);
      return rows;
    };
    const auto expected_pairs = zero_dropped(reference_y_pairs(kept, kept.x, kept.w), p.M);
    const auto expected_y = reference_reduce(kept, reference_y_pairs(kept, kept.x, kept.w), kept.gates);

    const auto x = make_tensor<double>({p.x_rows(), p.K}, p.x);
    const auto w = make_tensor<double>({p.experts, p.K, p.M}, p.w);
    const auto gates = make_tensor<double>({p.tokens, p.k}, p.gates);  // nonzero gates on dropped pairs
    Tensor<double> y_pairs("y_pairs", {p.pairs(), p.M}), y("y", {p.tokens, p.M});
    y_pairs.fill(7.0);
    moe::cvmm_forward<double>(plan, x.as_matrix(), w.view<3>(), y_pairs.as_matrix());
    EXPECT_LT(max_rel_error(to_double(y_pairs), expected_pairs), 1e-13) << per_token;
    moe::cvmm_forward_reduced<double>(plan, x.as_matrix(), w.view<3>(), gates.as_matrix(), y.as_matrix());
    EXPECT_LT(max_rel_error(to_double(y), expected_y), 1e-13) << per_token;

    // Backward of the reduced form: dropped pairs get zero dgates; with per-pair x, zero dx rows.
    Tensor<double> dx("dx", x.shape()), dw("dw", w.shape()), dgates("dgates", {p.tokens, p.k});
    dx.fill(7.0);
    dgates.fill(7.0);
    const auto dy_t = make_tensor<double>({p.tokens, p.M}, dy);
    moe::cvmm_backward_reduced<double>(plan, x.as_matrix(), w.view<3>(), gates.as_matrix(), dy_t.as_matrix(),
                                       dx.as_matrix(), dw.view<3>(), dgates.as_matrix());
    const auto g = reference_backward_reduced(kept, dy);
    auto expected_dgates = g.dgates;
    for (std::size_t i = 0; i < dropped_index.size(); ++i)
      if (dropped_index[i] < 0) expected_dgates[i] = 0;
    EXPECT_LT(max_rel_error(to_double(dgates), expected_dgates), 1e-13) << per_token;
    EXPECT_LT(max_rel_error(to_double(dx), g.dx), 1e-13) << per_token;
    EXPECT_LT(max_rel_error(to_double(dw), g.dw), 1e-13) << per_token;

    // Unreduced backward: a dropped pair's upstream gradient reaches nothing.
    const auto dyp = make_tensor<double>({p.pairs(), p.M}, zero_dropped(dy_pairs, p.M));
    const auto dyp_raw = make_tensor<double>({p.pairs(), p.M}, dy_pairs);
    Tensor<double> dx1("dx1", x.shape()), dx2("dx2", x.shape()), dw1("dw1", w.shape()), dw2("dw2", w.shape());
    const auto plan_kept = make_plan(p);
    moe::cvmm_backward<double>(plan, x.as_matrix(), w.view<3>(), dyp_raw.as_matrix(), dx1.as_matrix(), dw1.view<3>());
    moe::cvmm_backward<double>(plan_kept, x.as_matrix(), w.view<3>(), dyp.as_matrix(), dx2.as_matrix(), dw2.view<3>());
    EXPECT_LT(max_rel_error(to_double(dx1), per_token ? to_double(dx2) : zero_dropped(to_double(dx2), p.K)), 1e-13);
    EXPECT_LT(max_rel_error(to_double(dw1), to_double(dw2)), 1e-13) << per_token;
  }
}
