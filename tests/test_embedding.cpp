#include "kmoe/ops/embedding.hpp"
#include "test_util.hpp"

#include <array>

using namespace kmoe;
using namespace kmoe::test;

namespace {

Tensor<int> make_ids(const std::vector<int>& ids) {
  return Tensor<int>::from_host("ids", {static_cast<index_t>(ids.size())}, ids);
}

template <class T>
std::vector<double> run_forward(const std::vector<int>& ids, index_t rows, index_t dim,
                                const std::vector<double>& table) {
  auto idt = make_ids(ids);
  auto tt = make_tensor<T>({rows, dim}, table, "table");
  Tensor<T> y("y", {static_cast<index_t>(ids.size()), dim});
  ops::embedding_forward<T>(idt.flat(), tt.as_matrix(), y.as_matrix());
  return to_double(y);
}

// dtable after embedding_backward onto the initial values dtable0.
template <class T>
std::vector<T> run_backward(const std::vector<int>& ids, index_t rows, index_t dim, const std::vector<double>& dy,
                            const std::vector<double>& dtable0) {
  auto idt = make_ids(ids);
  auto dyt = make_tensor<T>({static_cast<index_t>(ids.size()), dim}, dy, "dy");
  auto dtable = make_tensor<T>({rows, dim}, dtable0, "dtable");
  ops::embedding_backward<T>(idt.flat(), dyt.as_matrix(), dtable.as_matrix());
  return dtable.to_host();
}

template <class T>
void check_forward(index_t n, index_t rows, index_t dim, std::uint64_t seed) {
  const auto ids = random_index(n, static_cast<int>(rows), seed);
  const auto table = random_values(rows * dim, seed + 1);
  std::vector<double> expected(n * dim);
  for (index_t i = 0; i < n; ++i)
    for (index_t c = 0; c < dim; ++c) expected[i * dim + c] = static_cast<T>(table[ids[i] * dim + c]);
  EXPECT_EQ(run_forward<T>(ids, rows, dim, table), expected) << n << " ids, table " << rows << "x" << dim;
}

// The error for an out-of-range id names the op and the id's value.
void expect_bad_id(const std::vector<int>& ids, int bad, bool backward) {
  auto idt = make_ids(ids);
  Tensor<double> table("table", {10, 3}), rows("rows", {static_cast<index_t>(ids.size()), 3});
  try {
    if (backward) {
      ops::embedding_backward<double>(idt.flat(), rows.as_matrix(), table.as_matrix());
    } else {
      ops::embedding_forward<double>(idt.flat(), table.as_matrix(), rows.as_matrix());
    }
    ADD_FAILURE() << "id " << bad << ": no error";
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_EQ(e.status(), Status::invalid_argument) << message;
    EXPECT_NE(message.find(backward ? "embedding_backward" : "embedding_forward"), std::string::npos) << message;
    EXPECT_NE(message.find(std::to_string(bad)), std::string::npos) << message;
  }
}

}  // namespace

TEST(Embedding, ForwardGathersRowsByIdFloatAndDouble) {
  std::uint64_t seed = 1;
  for (const auto& [n, rows, dim] :
       {std::array<index_t, 3>{1, 1, 1}, {7, 3, 33}, {129, 50, 7}, {33, 1000, 64}, {0, 5, 4}}) {
    check_forward<double>(n, rows, dim, seed++);
    check_forward<float>(n, rows, dim, seed++);
  }
}

TEST(Embedding, BackwardSumsRepeatedIdsInTokenOrder) {
  // ids repeat heavily; the float result must equal the serial sum in token order onto dtable0, bit for bit
  const index_t rows = 5, dim = 33;
  const std::vector<int> ids = {3, 0, 3, 3, 1, 0, 3, 4, 3, 0, 0, 3, 1, 3};
  const index_t n = ids.size();
  const auto dy = random_values(n * dim, 10, -100, 100), dtable0 = random_values(rows * dim, 11);
  std::vector<float> expected = cast_vector<float>(dtable0);
  for (index_t i = 0; i < n; ++i)
    for (index_t c = 0; c < dim; ++c) expected[ids[i] * dim + c] += static_cast<float>(dy[i * dim + c]);
  EXPECT_EQ(run_backward<float>(ids, rows, dim, dy, dtable0), expected);
  // row 2 is never used: untouched
  const auto got = run_backward<double>(ids, rows, dim, dy, dtable0);
  for (index_t c = 0; c < dim; ++c) EXPECT_EQ(got[2 * dim + c], dtable0[2 * dim + c]);
}

TEST(Embedding, BackwardMatchesFiniteDifferences) {
  const index_t rows = 7, dim = 5;
  const auto ids = std::vector<int>{6, 2, 2, 0, 6, 6, 3, 2, 5};  // repeated ids; rows 1 and 4 unused
  const index_t n = ids.size();
  const auto table = random_values(rows * dim, 20), r = random_values(n * dim, 21);
  const auto dtable = run_backward<double>(ids, rows, dim, r, std::vector<double>(rows * dim, 0.0));
  const auto loss = [&](const std::vector<double>& t) { return dot(run_forward<double>(ids, rows, dim, t), r); };
  EXPECT_LT(finite_difference_error(table, loss, std::vector<double>(dtable.begin(), dtable.end())), fd_tolerance);
}

TEST(Embedding, BackwardAccumulates) {
  const index_t rows = 11, dim = 7;
  const auto ids = random_index(129, rows, 30);
  const auto dy = random_values(129 * dim, 31), dtable0 = random_values(rows * dim, 32);
  const auto from_zero = run_backward<double>(ids, rows, dim, dy, std::vector<double>(rows * dim, 0.0));
  const auto onto = run_backward<double>(ids, rows, dim, dy, dtable0);
  std::vector<double> expected(rows * dim), got(onto.begin(), onto.end());
  for (index_t i = 0; i < rows * dim; ++i) expected[i] = dtable0[i] + from_zero[i];
  EXPECT_LT(max_rel_error(got, expected), 1e-14);
}

TEST(Embedding, OutOfRangeIdIsAnErrorNamingTheId) {
  for (const bool backward : {false, true}) {
    expect_bad_id({1, 2, -7, 3}, -7, backward);
    expect_bad_id({0, 9, 10}, 10, backward);  // one past the last row
    expect_bad_id({12345}, 12345, backward);
  }
}

TEST(Embedding, ShapeErrors) {
  auto ids = make_ids({0, 1, 2});
  Tensor<double> table("table", {4, 3}), y_rows("y", {2, 3}), y_cols("y", {3, 2});
  for (const Tensor<double>* y : {&y_rows, &y_cols}) {
    try {
      ops::embedding_forward<double>(ids.flat(), table.as_matrix(), y->as_matrix());
      ADD_FAILURE() << "forward into " << y->shape().str() << ": no error";
    } catch (const Error& e) {
      EXPECT_EQ(e.status(), Status::shape_mismatch);
      EXPECT_NE(std::string(e.what()).find("embedding_forward"), std::string::npos) << e.what();
    }
    try {
      ops::embedding_backward<double>(ids.flat(), y->as_matrix(), table.as_matrix());
      ADD_FAILURE() << "backward from " << y->shape().str() << ": no error";
    } catch (const Error& e) {
      EXPECT_EQ(e.status(), Status::shape_mismatch);
      EXPECT_NE(std::string(e.what()).find("embedding_backward"), std::string::npos) << e.what();
    }
  }
}
