#include "kmoe/ops/topk.hpp"
#include "test_util.hpp"

#include <numeric>

using namespace kmoe;
using namespace kmoe::test;

namespace {

struct TopkResult {
  std::vector<double> values;
  std::vector<int> indices;
};

// torch.topk's rule, written independently of the kernel: NaN first, then larger, then lower column.
TopkResult reference_topk(const std::vector<double>& x, index_t rows, index_t cols, int k, ops::TopkOrder order) {
  TopkResult out;
  for (index_t r = 0; r < rows; ++r) {
    const double* row = x.data() + r * cols;
    std::vector<int> cols_of_row(cols);
    std::iota(cols_of_row.begin(), cols_of_row.end(), 0);
    std::partial_sort(cols_of_row.begin(), cols_of_row.begin() + k, cols_of_row.end(), [&](int a, int b) {
      if (std::isnan(row[a]) || std::isnan(row[b])) return std::isnan(row[a]) && (!std::isnan(row[b]) || a < b);
      return row[a] > row[b] || (row[a] == row[b] && a < b);
    });
    cols_of_row.resize(k);
    if (order == ops::TopkOrder::by_index) std::sort(cols_of_row.begin(), cols_of_row.end());
    for (int c : cols_of_row) {
      out.values.push_back(row[c]);
      out.indices.push_back(c);
    }
  }
  return out;
}

template <class T>
TopkResult run_topk(const std::vector<double>& x, index_t rows, index_t cols, int k, ops::TopkOrder order) {
  auto xt = make_tensor<T>({rows, cols}, x);
  Tensor<T> values("values", {rows, k});
  Tensor<int> indices("indices", {rows, k});
  ops::topk_forward<T>(xt.as_matrix(), k, order, values.as_matrix(), indices.as_matrix());
  return {to_double(values), indices.to_host()};
}

// Values drawn from a few integers, so most rows have ties at the k-th place.
std::vector<double> tie_heavy(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::vector<double> v(n);
  for (auto& x : v) x = random_int(gen, -2, 2);
  return v;
}

template <class T>
void expect_matches_reference(const std::vector<double>& x, index_t rows, index_t cols, int k) {
  for (auto order : {ops::TopkOrder::descending, ops::TopkOrder::by_index}) {
    // Round to T first, so ties and order are those of the T values.
    const auto rounded = cast_vector<T>(x);
    const auto xt = std::vector<double>(rounded.begin(), rounded.end());
    const auto expected = reference_topk(xt, rows, cols, k, order);
    const auto actual = run_topk<T>(x, rows, cols, k, order);
    const auto label = ::testing::Message() << "rows " << rows << " cols " << cols << " k " << k << " order "
                                            << static_cast<int>(order) << " sizeof(T) " << sizeof(T);
    EXPECT_EQ(actual.indices, expected.indices) << label;
    ASSERT_EQ(actual.values.size(), expected.values.size()) << label;
    for (std::size_t i = 0; i < expected.values.size(); ++i) {
      if (std::isnan(expected.values[i])) EXPECT_TRUE(std::isnan(actual.values[i])) << label;
      else EXPECT_EQ(actual.values[i], expected.values[i]) << label;
    }
  }
}

struct Case {
  index_t rows, cols;
  int k;
};
const Case kCases[] = {{7, 33, 1}, {7, 33, 33}, {5, 129, 64}, {9, 1, 1}, {3, 64, 64}, {13, 7, 4}, {11, 100, 17},
                       {0, 5, 2}};

}  // namespace

TEST(Topk, MatchesPartialSortWithFrequentTies) {
  std::uint64_t seed = 1;
  for (const auto& c : kCases) {
    const auto x = tie_heavy(c.rows * c.cols, ++seed);
    expect_matches_reference<float>(x, c.rows, c.cols, c.k);
    expect_matches_reference<double>(x, c.rows, c.cols, c.k);
  }
}

TEST(Topk, MatchesPartialSortOnDistinctValues) {
  std::uint64_t seed = 50;
  for (const auto& c : kCases) {
    const auto x = random_values(c.rows * c.cols, ++seed, -3, 3);
    expect_matches_reference<float>(x, c.rows, c.cols, c.k);
    expect_matches_reference<double>(x, c.rows, c.cols, c.k);
  }
}

TEST(Topk, NanRanksAboveEverythingAndInfinitiesOrder) {
  const index_t rows = 4, cols = 9;
  auto x = tie_heavy(rows * cols, 99);
  x[0 * cols + 5] = NAN;  // one NaN: first
  x[1 * cols + 7] = NAN;  // two NaNs: lower column first, both above +inf
  x[1 * cols + 2] = NAN;
  x[1 * cols + 0] = INFINITY;
  x[2 * cols + 3] = -INFINITY;  // -inf ties with nothing; all others selected
  x[3 * cols + 8] = INFINITY;
  x[3 * cols + 1] = INFINITY;
  for (int k : {1, 2, 3, 8, 9}) {
    expect_matches_reference<float>(x, rows, cols, k);
    expect_matches_reference<double>(x, rows, cols, k);
  }
  const auto top3 = run_topk<double>(x, rows, cols, 3, ops::TopkOrder::descending);
  EXPECT_EQ(std::vector<int>(top3.indices.begin() + 3, top3.indices.begin() + 6), (std::vector<int>{2, 7, 0}));
}

TEST(Topk, BackwardPlacesGradientsAtSelectedColumns) {
  for (const auto& c : kCases) {
    // Distinct values at least 0.08 apart: the selection cannot change within the FD stencil.
    std::mt19937_64 gen(c.cols);
    std::vector<double> x(c.rows * c.cols);
    for (index_t r = 0; r < c.rows; ++r) {
      std::vector<int> perm(c.cols);
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), gen);
      for (index_t j = 0; j < c.cols; ++j) x[r * c.cols + j] = 0.1 * perm[j] + 0.01 * random_values(1, gen())[0];
    }
    for (auto order : {ops::TopkOrder::descending, ops::TopkOrder::by_index}) {
      const auto weights = random_values(c.rows * c.k, 7 + c.k);
      const auto selected = run_topk<double>(x, c.rows, c.cols, c.k, order);
      auto indices = Tensor<int>::from_host("indices", {c.rows, c.k}, selected.indices);
      auto dvalues = make_tensor<double>({c.rows, c.k}, weights);
      Tensor<double> dx("dx", {c.rows, c.cols});
      dx.fill(5.0);  // overwritten, not accumulated
      ops::topk_backward<double>(indices.as_matrix(), dvalues.as_matrix(), dx.as_matrix());
      // The forward is checked against the reference above; the host reference keeps FD fast.
      const auto loss = [&](const std::vector<double>& p) {
        return dot(reference_topk(p, c.rows, c.cols, c.k, order).values, weights);
      };
      EXPECT_LT(finite_difference_error(x, loss, to_double(dx)), fd_tolerance) << c.rows << "x" << c.cols;
    }
  }
}

TEST(Topk, BackwardSumsRepeatedIndicesInFloat) {
  auto indices = Tensor<int>::from_host("indices", {2, 3}, {2, 0, 2, 1, 1, 1});
  auto dvalues = make_tensor<float>({2, 3}, {1, 2, 4, 0.5, 0.25, 8});
  Tensor<float> dx("dx", {2, 4});
  ops::topk_backward<float>(indices.as_matrix(), dvalues.as_matrix(), dx.as_matrix());
  EXPECT_EQ(to_double(dx), (std::vector<double>{2, 0, 5, 0, 0, 8.75, 0, 0}));
}

TEST(Topk, InvalidKAndShapesAreErrors) {
  Tensor<float> x("x", {3, 70}), values("values", {3, 65}), narrow("narrow", {3, 5});
  Tensor<int> indices("indices", {3, 65});
  const auto call = [&](const Tensor<float>& input, int k) {
    Tensor<float> v("v", {input.dim(0), std::max(k, 0)});
    Tensor<int> i("i", {input.dim(0), std::max(k, 0)});
    ops::topk_forward<float>(input.as_matrix(), k, ops::TopkOrder::descending, v.as_matrix(), i.as_matrix());
  };
  expect_status([&] { call(x, 65); }, Status::invalid_argument, "k = 65");
  expect_status([&] { call(narrow, 6); }, Status::invalid_argument, "k = 6");
  expect_status([&] { call(narrow, 0); }, Status::invalid_argument, "k = 0");
  expect_status([&] { call(x, -1); }, Status::invalid_argument, "k = -1");
  EXPECT_NO_THROW(call(x, 64));
  expect_status(
      [&] {
        ops::topk_forward<float>(x.as_matrix(), 4, ops::TopkOrder::by_index, values.as_matrix(), indices.as_matrix());
      },
      Status::shape_mismatch, "topk_forward");
  auto bad = Tensor<int>::from_host("bad", {1, 2}, {3, 5});
  Tensor<float> dv("dv", {1, 2}), dx("dx", {1, 5}), dx_short("dx", {2, 5});
  expect_status([&] { ops::topk_backward<float>(bad.as_matrix(), dv.as_matrix(), dx.as_matrix()); },
                Status::invalid_argument, "value 5 at element 1");
  expect_status([&] { ops::topk_backward<float>(bad.as_matrix(), dv.as_matrix(), dx_short.as_matrix()); },
                Status::shape_mismatch, "topk_backward");
}
