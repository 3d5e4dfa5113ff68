#include "kmoe/ops/cross_entropy.hpp"
#include "test_util.hpp"

#include <cmath>

using namespace kmoe;
using namespace kmoe::test;

namespace {

constexpr int kIgnore = -100;  // PyTorch's default ignore_index

struct Problem {
  index_t rows, classes;
  std::vector<double> logits;
  std::vector<int> targets;
  int ignore_index;
};

// Random logits in [lo, hi]; every `ignore_every`-th row (if > 0) gets ignore_index as target.
Problem random_problem(index_t rows, index_t classes, std::uint64_t seed, int ignore_every, double lo = -4,
                       double hi = 4) {
  Problem p{rows, classes, random_values(rows * classes, seed, lo, hi), std::vector<int>(rows), kIgnore};
  std::mt19937_64 gen(seed + 1);
  for (index_t r = 0; r < rows; ++r)
    p.targets[r] =
        ignore_every > 0 && r % ignore_every == 1 ? kIgnore : random_int(gen, 0, static_cast<int>(classes) - 1);
  return p;
}

struct Reference {
  double loss;
  std::vector<double> row_logsumexp;
};

// Naive double loop: mean over non-ignored rows of logsumexp(row) − logit[target].
Reference reference(const Problem& p) {
  Reference ref{0, std::vector<double>(p.rows)};
  index_t valid = 0;
  for (index_t r = 0; r < p.rows; ++r) {
    double max_value = -INFINITY, sum = 0;
    for (index_t c = 0; c < p.classes; ++c) max_value = std::max(max_value, p.logits[r * p.classes + c]);
    for (index_t c = 0; c < p.classes; ++c) sum += std::exp(p.logits[r * p.classes + c] - max_value);
    ref.row_logsumexp[r] = max_value + std::log(sum);
    if (p.targets[r] == p.ignore_index) continue;
    ref.loss += ref.row_logsumexp[r] - p.logits[r * p.classes + p.targets[r]];
    ++valid;
  }
  ref.loss /= static_cast<double>(valid);
  return ref;
}

Tensor<int> targets_tensor(const Problem& p) {
  return Tensor<int>::from_host("targets", {static_cast<index_t>(p.targets.size())}, p.targets);
}

template <class T>
Reference forward(const Problem& p, const std::vector<double>& logits) {
  const auto lt = make_tensor<T>({p.rows, p.classes}, logits, "logits");
  const auto tt = targets_tensor(p);
  Tensor<T> lse("lse", {p.rows});
  const T loss = ops::cross_entropy_forward<T>(lt.as_matrix(), tt.flat(), p.ignore_index, lse.flat());
  return {static_cast<double>(loss), to_double(lse)};
}

std::vector<double> backward(const Problem& p, double dloss) {
  const auto lt = make_tensor<double>({p.rows, p.classes}, p.logits, "logits");
  const auto tt = targets_tensor(p);
  Tensor<double> lse("lse", {p.rows}), dlogits("dlogits", lt.shape());
  ops::cross_entropy_forward<double>(lt.as_matrix(), tt.flat(), p.ignore_index, lse.flat());
  dlogits.fill(123);  // overwritten, ignored rows included
  ops::cross_entropy_backward<double>(lt.as_matrix(), tt.flat(), p.ignore_index, lse.flat(), dloss,
                                      dlogits.as_matrix());
  return to_double(dlogits);
}

// |actual − expected| / |expected|, floored like max_rel_error (a single class gives loss 0).
double relative(double actual, double expected) { return max_rel_error({actual}, {expected}); }

template <class V>
void expect_status(Status status, const V& call, const char* what, const char* message_part = "") {
  try {
    call();
    ADD_FAILURE() << what << ": no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), status) << what << ": " << e.what();
    EXPECT_NE(std::string(e.what()).find(message_part), std::string::npos) << what << ": " << e.what();
  }
}

}  // namespace

TEST(CrossEntropy, ForwardMatchesNaiveLoop) {
  struct Size {
    index_t rows, classes;
    int ignore_every;
  };
  const Size sizes[] = {{1, 1, 0}, {7, 33, 3}, {129, 5, 4}, {33, 1000, 5}, {1000, 7, 2}, {3, 4096, 0}};
  std::uint64_t seed = 10;
  for (const Size& s : sizes) {
    const auto p = random_problem(s.rows, s.classes, seed += 2, s.ignore_every);
    const auto expected = reference(p);
    const auto out = forward<double>(p, p.logits), out_f = forward<float>(p, p.logits);
    const std::string what = std::to_string(s.rows) + " x " + std::to_string(s.classes);
    EXPECT_LT(relative(out.loss, expected.loss), 1e-13) << what;
    EXPECT_LT(max_rel_error(out.row_logsumexp, expected.row_logsumexp), 1e-13) << what;
    EXPECT_LT(relative(out_f.loss, expected.loss), 1e-5) << what << " float";
    EXPECT_LT(max_rel_error(out_f.row_logsumexp, expected.row_logsumexp), 1e-6) << what << " float";
  }
}

TEST(CrossEntropy, LargeLogitsAreStable) {
  const auto p = random_problem(9, 17, 20, 4, -1000, 1000);
  const auto expected = reference(p);
  ASSERT_TRUE(std::isfinite(expected.loss));
  EXPECT_LT(relative(forward<double>(p, p.logits).loss, expected.loss), 1e-13);
  EXPECT_LT(relative(forward<float>(p, p.logits).loss, expected.loss), 1e-5);
}

TEST(CrossEntropy, IgnoreIndexMayBeAClass) {
  // ignore_index = 2 (a valid class): rows targeting class 2 drop out of the mean.
  auto p = random_problem(40, 5, 30, 0);
  p.ignore_index = 2;
  p.targets[0] = p.targets[7] = 2;
  const auto expected = reference(p);
  EXPECT_LT(relative(forward<double>(p, p.logits).loss, expected.loss), 1e-13);
  const auto dlogits = backward(p, 1.0);
  for (index_t c = 0; c < p.classes; ++c) EXPECT_EQ(dlogits[7 * p.classes + c], 0.0);
}

TEST(CrossEntropy, BackwardMatchesFiniteDifferences) {
  struct Size {
    index_t rows, classes;
    int ignore_every;
  };
  const Size sizes[] = {{7, 9, 3}, {1, 1, 0}, {5, 33, 2}, {13, 2, 0}};
  const double dloss = 0.7;
  std::uint64_t seed = 40;
  for (const Size& s : sizes) {
    const auto p = random_problem(s.rows, s.classes, seed += 2, s.ignore_every);
    const auto dlogits = backward(p, dloss);
    const auto loss = [&](const std::vector<double>& logits) { return dloss * forward<double>(p, logits).loss; };
    EXPECT_LT(finite_difference_error(p.logits, loss, dlogits), fd_tolerance) << s.rows << " x " << s.classes;
    for (index_t r = 0; r < p.rows; ++r)
      if (p.targets[r] == kIgnore)
        for (index_t c = 0; c < p.classes; ++c) EXPECT_EQ(dlogits[r * p.classes + c], 0.0) << r;
  }
}

TEST(CrossEntropy, FloatBackwardMatchesDouble) {
  const auto p = random_problem(31, 11, 50, 3);
  const auto expected = backward(p, 0.7);
  const auto lt = make_tensor<float>({p.rows, p.classes}, p.logits, "logits");
  const auto tt = targets_tensor(p);
  Tensor<float> lse("lse", {p.rows}), dlogits("dlogits", lt.shape());
  ops::cross_entropy_forward<float>(lt.as_matrix(), tt.flat(), p.ignore_index, lse.flat());
  ops::cross_entropy_backward<float>(lt.as_matrix(), tt.flat(), p.ignore_index, lse.flat(), 0.7f, dlogits.as_matrix());
  EXPECT_LT(max_rel_error(to_double(dlogits), expected), 1e-6);
}

TEST(CrossEntropy, AllRowsIgnoredGivesNaNLossAndZeroGradient) {
  auto p = random_problem(4, 6, 60, 0);
  for (auto& t : p.targets) t = kIgnore;
  EXPECT_TRUE(std::isnan(forward<double>(p, p.logits).loss));
  for (double g : backward(p, 1.0)) EXPECT_EQ(g, 0.0);
}

TEST(CrossEntropy, BadArgumentsAreErrors) {
  auto p = random_problem(6, 5, 70, 0);
  const auto lt = make_tensor<float>({p.rows, p.classes}, p.logits, "logits");
  Tensor<float> lse("lse", {p.rows}), lse_bad("lse", {p.rows - 1}), dlogits("d", lt.shape()),
      dlogits_bad("d", {p.rows, p.classes + 1});
  const auto logits = lt.as_matrix();
  const auto with_targets = [&](const std::vector<int>& targets) {
    return Tensor<int>::from_host("targets", {static_cast<index_t>(targets.size())}, targets);
  };
  const auto good = with_targets(p.targets);

  auto too_large = p.targets;
  too_large[4] = static_cast<int>(p.classes);
  const auto too_large_t = with_targets(too_large);
  expect_status(
      Status::invalid_argument,
      [&] { ops::cross_entropy_forward<float>(logits, too_large_t.flat(), kIgnore, lse.flat()); }, "target = classes",
      "targets[4] = 5");
  auto negative = p.targets;
  negative[2] = -1;
  const auto negative_t = with_targets(negative);
  expect_status(
      Status::invalid_argument,
      [&] { ops::cross_entropy_forward<float>(logits, negative_t.flat(), kIgnore, lse.flat()); }, "target = -1",
      "targets[2] = -1");
  expect_status(
      Status::invalid_argument,
      [&] {
        ops::cross_entropy_backward<float>(logits, negative_t.flat(), kIgnore, lse.flat(), 1.0f, dlogits.as_matrix());
      },
      "backward target = -1", "targets[2]");

  const auto short_t = with_targets(std::vector<int>(p.targets.begin(), p.targets.end() - 1));
  expect_status(
      Status::shape_mismatch, [&] { ops::cross_entropy_forward<float>(logits, short_t.flat(), kIgnore, lse.flat()); },
      "targets length");
  expect_status(
      Status::shape_mismatch, [&] { ops::cross_entropy_forward<float>(logits, good.flat(), kIgnore, lse_bad.flat()); },
      "row_logsumexp length");
  expect_status(
      Status::shape_mismatch,
      [&] {
        ops::cross_entropy_backward<float>(logits, good.flat(), kIgnore, lse.flat(), 1.0f, dlogits_bad.as_matrix());
      },
      "dlogits shape");
}
