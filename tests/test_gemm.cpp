#include "kmoe/ops/gemm.hpp"
#include "test_util.hpp"

#include <cmath>
#include <future>
#include <thread>

// OpenBLAS's thread control, looked up weakly as kmoe does (null with another BLAS).
extern "C" {
void openblas_set_num_threads(int threads) __attribute__((weak));
int openblas_get_num_threads(void) __attribute__((weak));
}

using namespace kmoe;
using namespace kmoe::test;

namespace {

// A [rows, cols] row-major matrix of random values for a test.
struct HostMatrix {
  index_t rows, cols;
  std::vector<double> values;
  double operator()(index_t i, index_t j) const { return values[i * cols + j]; }
};

HostMatrix random_matrix(index_t rows, index_t cols, std::uint64_t seed) {
  return {rows, cols, random_values(static_cast<std::size_t>(rows * cols), seed)};
}

// alpha · op(A) · op(B) + beta · C by the textbook triple loop, in double.
std::vector<double> naive_gemm(bool ta, bool tb, double alpha, const HostMatrix& a, const HostMatrix& b, double beta,
                               const HostMatrix& c) {
  const index_t m = c.rows, n = c.cols, k = ta ? a.rows : a.cols;
  std::vector<double> out(static_cast<std::size_t>(m * n));
  for (index_t i = 0; i < m; ++i)
    for (index_t j = 0; j < n; ++j) {
      double sum = 0;
      for (index_t p = 0; p < k; ++p) sum += (ta ? a(p, i) : a(i, p)) * (tb ? b(j, p) : b(p, j));
      out[i * n + j] = alpha * sum + beta * c(i, j);
    }
  return out;
}

template <class T>
std::vector<double> run_gemm(bool ta, bool tb, double alpha, const HostMatrix& a, const HostMatrix& b, double beta,
                             const HostMatrix& c) {
  auto at = make_tensor<T>({a.rows, a.cols}, a.values, "a");
  auto bt = make_tensor<T>({b.rows, b.cols}, b.values, "b");
  auto ct = make_tensor<T>({c.rows, c.cols}, c.values, "c");
  ops::gemm<T>(ta, tb, T(alpha), at.as_matrix(), bt.as_matrix(), T(beta), ct.as_matrix());
  return to_double(ct);
}

// Checks C = alpha · op(A) · op(B) + beta · C for C [m, n] and inner size k against the naive loop.
template <class T>
void check_gemm(bool ta, bool tb, index_t m, index_t n, index_t k, double alpha, double beta, double tolerance,
                std::uint64_t seed) {
  const auto a = ta ? random_matrix(k, m, seed) : random_matrix(m, k, seed);
  const auto b = tb ? random_matrix(n, k, seed + 1) : random_matrix(k, n, seed + 1);
  const auto c = random_matrix(m, n, seed + 2);
  const auto expected = naive_gemm(ta, tb, alpha, a, b, beta, c);
  EXPECT_LT(max_rel_error(run_gemm<T>(ta, tb, alpha, a, b, beta, c), expected), tolerance)
      << "ta=" << ta << " tb=" << tb << " m=" << m << " n=" << n << " k=" << k << " alpha=" << alpha
      << " beta=" << beta;
}

const index_t kSizes[][3] = {{1, 1, 1},   {7, 33, 5},   {33, 7, 129}, {129, 1, 33},
                             {5, 129, 7}, {64, 48, 32}, {33, 33, 33}};

}  // namespace

TEST(Gemm, AllTransposeCombinationsMatchNaiveLoop) {
  std::uint64_t seed = 100;
  for (bool ta : {false, true})
    for (bool tb : {false, true})
      for (const auto& s : kSizes) {
        check_gemm<double>(ta, tb, s[0], s[1], s[2], 1.0, 0.0, 1e-13, seed);
        check_gemm<float>(ta, tb, s[0], s[1], s[2], 1.0, 0.0, 1e-5, seed);
        seed += 3;
      }
}

TEST(Gemm, AlphaAndBetaScaleAndAccumulate) {
  std::uint64_t seed = 200;
  for (bool ta : {false, true})
    for (bool tb : {false, true})
      for (const double alpha : {0.0, -0.5, 2.0})
        for (const double beta : {0.0, 1.0, -1.5}) {
          check_gemm<double>(ta, tb, 7, 33, 5, alpha, beta, 1e-13, seed);
          check_gemm<float>(ta, tb, 33, 7, 129, alpha, beta, 1e-5, seed);
          seed += 3;
        }
}

TEST(Gemm, ZeroInnerSizeOnlyScalesC) {
  for (bool ta : {false, true})
    for (bool tb : {false, true})
      for (const double beta : {0.0, 1.0, 0.25}) {
        check_gemm<double>(ta, tb, 7, 5, 0, 3.0, beta, 1e-15, 300);
        check_gemm<float>(ta, tb, 7, 5, 0, 3.0, beta, 1e-7, 300);
      }
}

TEST(Gemm, BetaZeroIgnoresNaNInC) {  // BLAS semantics: beta = 0 means C is not read
  const auto a = random_matrix(7, 5, 400), b = random_matrix(5, 33, 401);
  HostMatrix c{7, 33, std::vector<double>(7 * 33, NAN)};
  const auto expected = naive_gemm(false, false, 1.0, a, b, 0.0, HostMatrix{7, 33, std::vector<double>(7 * 33, 0)});
  EXPECT_LT(max_rel_error(run_gemm<double>(false, false, 1.0, a, b, 0.0, c), expected), 1e-13);
}

TEST(Gemm, EmptyOutputIsANoOp) {
  const auto a = random_matrix(0, 5, 500), b = random_matrix(5, 3, 501), c = random_matrix(0, 3, 502);
  EXPECT_TRUE(run_gemm<double>(false, false, 1.0, a, b, 0.0, c).empty());
}

TEST(Gemm, MismatchedExtentsAreShapeErrors) {
  Tensor<double> a("a", {3, 4}), b("b", {5, 6}), c("c", {3, 6}), b_ok("b", {4, 6}), c_bad("c", {3, 7});
  const auto expect_shape_error = [](const std::function<void()>& call, const char* what) {
    expect_status(call, Status::shape_mismatch, "gemm", what);
  };
  expect_shape_error([&] { ops::gemm<double>(false, false, 1.0, a.as_matrix(), b.as_matrix(), 0.0, c.as_matrix()); },
                     "inner sizes 4 vs 5");
  expect_shape_error(
      [&] { ops::gemm<double>(false, false, 1.0, a.as_matrix(), b_ok.as_matrix(), 0.0, c_bad.as_matrix()); },
      "C has 7 columns");
  expect_shape_error([&] { ops::gemm<double>(true, false, 1.0, a.as_matrix(), b_ok.as_matrix(), 0.0, c.as_matrix()); },
                     "Aᵀ is 4x3");
  expect_shape_error([&] { ops::gemm<double>(false, true, 1.0, a.as_matrix(), b_ok.as_matrix(), 0.0, c.as_matrix()); },
                     "Bᵀ is 6x4");
  // the correct call passes
  EXPECT_NO_THROW(ops::gemm<double>(false, false, 1.0, a.as_matrix(), b_ok.as_matrix(), 0.0, c.as_matrix()));
}

// The BLAS thread count is the host program's: single-threaded sections on two host threads that
// overlap (the first ends while the second still runs) leave it as the program set it.
TEST(GemmPolicy, OverlappingSingleThreadedSectionsRestoreTheProgramsThreadCount) {
  if (openblas_set_num_threads == nullptr || openblas_get_num_threads == nullptr)
    GTEST_SKIP() << "the BLAS is not OpenBLAS";
  const int before = openblas_get_num_threads();
  openblas_set_num_threads(2);
  std::promise<void> first_in, second_in, first_out;
  std::thread first([&] {
    const ops::impl::SingleThreadedBlas section;
    first_in.set_value();
    second_in.get_future().wait();
  });
  std::thread second([&] {
    first_in.get_future().wait();
    const ops::impl::SingleThreadedBlas section;
    second_in.set_value();
    first_out.get_future().wait();
    EXPECT_EQ(openblas_get_num_threads(), 1) << "a section still runs: one BLAS thread";
  });
  first.join();
  first_out.set_value();
  second.join();
  EXPECT_EQ(openblas_get_num_threads(), 2);
  openblas_set_num_threads(before);
}

// Many bfloat16 products of different shapes and every transposition issued together
// (ops::for_each_independent_gemm: one grouped launch on a GPU), into a C of type C, against a
// double loop over the same bfloat16 inputs: float accumulation then at most one bfloat16 rounding
// keep each entry within 2⁻⁸ of the exact value relative to the row's scale. Shapes straddle the
// kmoe kernel's 128 × 128 × 32 tiles (1, 17, 130, 257), include an empty inner dimension
// (C = beta·C) and leading dimensions wider than the matrices (row ranges of a bigger one).
template <class C>
void check_grouped_bfloat16_products() {
  struct Case {
    bool ta, tb;
    index_t m, n, k;
    float alpha, beta;
  };
  const std::vector<Case> cases = {{false, false, 130, 17, 257, 1.f, 0.f}, {false, true, 1, 130, 40, 1.f, 0.f},
                                   {true, false, 257, 129, 33, 0.5f, 1.f}, {true, true, 17, 1, 130, 1.f, 0.f},
                                   {false, false, 5, 9, 0, 1.f, 0.5f},      {true, false, 128, 128, 64, 1.f, 0.f}};
  const index_t pad = 3;  // extra columns: every leading dimension exceeds its matrix's width
  struct Operands {
    Tensor<bfloat16> a, b;
    Tensor<C> c;
    std::vector<double> a_values, b_values, c_values;
  };
  const auto rounded = [](std::vector<double> v) {
    for (double& x : v) x = round_to_bfloat16(static_cast<float>(x));
    return v;
  };
  std::vector<Operands> operands;
  std::uint64_t seed = 70;
  for (const Case& c : cases) {
    Operands o;
    const index_t a_rows = c.ta ? c.k : c.m, a_cols = (c.ta ? c.m : c.k) + pad;
    const index_t b_rows = c.tb ? c.n : c.k, b_cols = (c.tb ? c.k : c.n) + pad;
    o.a_values = rounded(random_values(a_rows * a_cols, ++seed));
    o.b_values = rounded(random_values(b_rows * b_cols, ++seed));
    o.c_values = rounded(random_values(c.m * (c.n + pad), ++seed));
    o.a = convert_tensor<bfloat16>(make_tensor<float>({a_rows, a_cols}, o.a_values), "a");
    o.b = convert_tensor<bfloat16>(make_tensor<float>({b_rows, b_cols}, o.b_values), "b");
    const Tensor<float> c_float = make_tensor<float>({c.m, c.n + pad}, o.c_values);
    if constexpr (std::is_same_v<C, bfloat16>) o.c = convert_tensor<bfloat16>(c_float, "c");
    else o.c = c_float;
    operands.push_back(std::move(o));
  }
  const auto narrow = [](const auto& t, index_t cols) {
    return Kokkos::subview(t.template view<2>(), Kokkos::ALL, Kokkos::make_pair(index_t(0), cols));
  };
  ops::for_each_independent_gemm(static_cast<int>(cases.size()), [&](int i) {
    const Case& c = cases[i];
    const Operands& o = operands[i];
    ops::gemm_bf16(c.ta, c.tb, c.alpha, narrow(o.a, c.ta ? c.m : c.k), narrow(o.b, c.tb ? c.k : c.n), c.beta,
                   narrow(o.c, c.n));
  });
  for (std::size_t i = 0; i < cases.size(); ++i) {
    const Case& c = cases[i];
    const Operands& o = operands[i];
    const index_t lda = (c.ta ? c.m : c.k) + pad, ldb = (c.tb ? c.k : c.n) + pad, ldc = c.n + pad;
    std::vector<double> got;
    for (const C v : o.c.to_host()) got.push_back(convert<float>(v));
    for (index_t r = 0; r < c.m; ++r) {
      std::vector<double> want(c.n);
      double scale = 1e-30;
      for (index_t j = 0; j < c.n; ++j) {
        double sum = 0, magnitude = 0;
        for (index_t kk = 0; kk < c.k; ++kk) {
          const double a = c.ta ? o.a_values[kk * lda + r] : o.a_values[r * lda + kk];
          const double b = c.tb ? o.b_values[j * ldb + kk] : o.b_values[kk * ldb + j];
          sum += a * b;
          magnitude += std::abs(a * b);
        }
        want[j] = c.alpha * sum + c.beta * o.c_values[r * ldc + j];
        scale = std::max(scale, c.alpha * magnitude + std::abs(c.beta * o.c_values[r * ldc + j]));
      }
      for (index_t j = 0; j < c.n; ++j)
        EXPECT_NEAR(got[r * ldc + j], want[j], std::ldexp(scale, -8)) << "case " << i << " at (" << r << ", " << j << ")";
      for (index_t j = c.n; j < ldc; ++j)  // the padding columns are not C's: untouched
        EXPECT_EQ(got[r * ldc + j], o.c_values[r * ldc + j]) << "case " << i << " padding at (" << r << ", " << j << ")";
    }
  }
}

TEST(Gemm, GroupedBfloat16ProductsMatchADoubleLoop) { check_grouped_bfloat16_products<bfloat16>(); }

// Float C, as the weight gradients have it (on a GPU: cuBLAS's grouped call where it takes float C,
// else uniform batches, inner-dimension pieces added in rounds; beta 0 must not read C).
TEST(Gemm, GroupedBfloat16ProductsIntoFloatMatchADoubleLoop) { check_grouped_bfloat16_products<float>(); }
