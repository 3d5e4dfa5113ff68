#include "kmoe/ops/gather_scatter.hpp"
#include "test_util.hpp"

using namespace kmoe;
using namespace kmoe::test;

namespace {

template <class T>
void check_gather(index_t src_rows, index_t cols, const std::vector<int>& index) {
  const index_t n = index.size();
  const auto src_values = random_values(src_rows * cols, 21 + n);
  auto src = make_tensor<T>({src_rows, cols}, src_values);
  Tensor<T> out("out", {n, cols});
  ops::gather_rows<T>(src.as_matrix(), device_ints(index), out.as_matrix());
  std::vector<double> expected(n * cols);
  for (index_t i = 0; i < n; ++i)
    for (index_t c = 0; c < cols; ++c) expected[i * cols + c] = static_cast<T>(src_values[index[i] * cols + c]);
  EXPECT_EQ(to_double(out), expected);
}

// out[index[i]] += src[i] for ascending i, in T: the implementation must reproduce it bit for bit.
template <class T>
void check_scatter_add(index_t out_rows, index_t cols, const std::vector<int>& index) {
  const index_t n = index.size();
  const auto src_values = cast_vector<T>(random_values(n * cols, 31 + n, -2, 2));
  const auto out_values = cast_vector<T>(random_values(out_rows * cols, 41 + n));
  std::vector<T> expected = out_values;
  for (index_t i = 0; i < n; ++i)
    for (index_t c = 0; c < cols; ++c) expected[index[i] * cols + c] += src_values[i * cols + c];

  auto src = Tensor<T>::from_host("src", {n, cols}, src_values);
  auto out = Tensor<T>::from_host("out", {out_rows, cols}, out_values);
  ops::scatter_add_rows<T>(src.as_matrix(), device_ints(index), out.as_matrix());
  EXPECT_EQ(out.to_host(), expected) << "out rows " << out_rows << " cols " << cols << " sources " << n;
}

}  // namespace

TEST(GatherRows, MatchesNaiveLoop) {
  check_gather<float>(33, 7, random_index(129, 33, 1));
  check_gather<double>(33, 7, random_index(129, 33, 2));
  check_gather<double>(1, 1, {0, 0, 0});
  check_gather<float>(5, 3, {});
}

TEST(ScatterAddRows, MatchesSequentialSumBitForBit) {
  check_scatter_add<float>(33, 7, random_index(129, 33, 3));
  check_scatter_add<double>(33, 7, random_index(129, 33, 4));
  check_scatter_add<float>(1, 1, random_index(1, 1, 5));
  check_scatter_add<float>(129, 33, random_index(7, 129, 6));  // most rows receive nothing
}

TEST(ScatterAddRows, ManySourcesPerRowAcrossSortChunks) {
  // ~600 sources per row, spread over many counting-sort chunks: float sums in another order
  // than ascending source index round differently.
  check_scatter_add<float>(5, 3, random_index(3001, 5, 7));
  check_scatter_add<double>(5, 3, random_index(3001, 5, 8));
}

TEST(ScatterAddRows, IsTheAdjointOfGather) {
  // ⟨gather(a), b⟩ = ⟨a, scatter_add(b)⟩ in double: scatter-add is gather's backward.
  const index_t rows = 17, cols = 9, n = 51;
  const auto index = random_index(n, rows, 9);
  const auto a_values = random_values(rows * cols, 10), b_values = random_values(n * cols, 11);
  auto a = make_tensor<double>({rows, cols}, a_values);
  auto b = make_tensor<double>({n, cols}, b_values);
  Tensor<double> gathered("gathered", {n, cols}), scattered("scattered", {rows, cols});
  ops::gather_rows<double>(a.as_matrix(), device_ints(index), gathered.as_matrix());
  ops::scatter_add_rows<double>(b.as_matrix(), device_ints(index), scattered.as_matrix());
  const double lhs = dot(to_double(gathered), b_values), rhs = dot(a_values, to_double(scattered));
  EXPECT_NEAR(lhs, rhs, 1e-12 * std::abs(lhs) + 1e-12);
}

TEST(GatherScatter, BadIndicesAndShapesAreErrors) {
  Tensor<float> src("src", {6, 4}), out("out", {3, 4}), wide("wide", {3, 5});
  expect_status([&] { ops::gather_rows<float>(src.as_matrix(), device_ints({0, 6, 1}), out.as_matrix()); },
                Status::invalid_argument, "gather_rows: index: value 6 at element 1");
  expect_status([&] { ops::gather_rows<float>(src.as_matrix(), device_ints({0, 1, -2}), out.as_matrix()); },
                Status::invalid_argument, "value -2 at element 2");
  expect_status([&] { ops::gather_rows<float>(src.as_matrix(), device_ints({0, 1}), out.as_matrix()); },
                Status::shape_mismatch, "gather_rows");
  expect_status([&] { ops::gather_rows<float>(src.as_matrix(), device_ints({0, 1, 2}), wide.as_matrix()); },
                Status::shape_mismatch, "gather_rows");
  expect_status(
      [&] { ops::scatter_add_rows<float>(src.as_matrix(), device_ints({0, 1, 2, 3, 2, 1}), out.as_matrix()); },
      Status::invalid_argument, "scatter_add_rows: index: value 3 at element 3");
  expect_status([&] { ops::scatter_add_rows<float>(src.as_matrix(), device_ints({0, 1}), out.as_matrix()); },
                Status::shape_mismatch, "scatter_add_rows");
  expect_status([&] { ops::scatter_add_rows<float>(out.as_matrix(), device_ints({0, 1, 2}), wide.as_matrix()); },
                Status::shape_mismatch, "scatter_add_rows");
}
