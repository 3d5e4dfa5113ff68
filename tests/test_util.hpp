// Shared helpers for kmoe tests: random data, host/device round trips, error checks, and the central
// finite-difference gradient check every op's backward test uses.
#pragma once

#include "kmoe/core/random.hpp"
#include "kmoe/core/tensor.hpp"
#include "kmoe/model/parameter.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace kmoe::test {

inline std::vector<double> random_values(std::size_t n, std::uint64_t seed, double lo = -1.0, double hi = 1.0) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<double> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

inline int random_int(std::mt19937_64& gen, int lo, int hi) {  // inclusive
  return std::uniform_int_distribution<int>(lo, hi)(gen);
}

template <class T>
std::vector<T> cast_vector(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}

// n indices drawn uniformly from [0, bound): row ids, expert ids, sort keys.
inline std::vector<int> random_index(std::size_t n, int bound, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::vector<int> index(n);
  for (auto& i : index) i = random_int(gen, 0, bound - 1);
  return index;
}

template <class T>
Tensor<T> make_tensor(const Shape& shape, const std::vector<double>& values, const std::string& label = "t") {
  return Tensor<T>::from_host(label, shape, cast_vector<T>(values));
}

template <class T>
std::vector<double> to_double(const Tensor<T>& t) {
  const auto h = t.to_host();
  return std::vector<double>(h.begin(), h.end());
}

// A managed device copy (a Kokkos View that owns its memory, unlike a Tensor's flat()).
inline View1<int> device_ints(const std::vector<int>& values) {
  View1<int> out(Kokkos::view_alloc(Kokkos::WithoutInitializing, "ints"), values.size());
  Kokkos::deep_copy(out, Kokkos::View<const int*, Kokkos::HostSpace, Kokkos::MemoryUnmanaged>(values.data(),
                                                                                             values.size()));
  return out;
}

inline std::vector<int> host_ints(const View1<int>& view) {
  const auto mirror = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), view);
  return std::vector<int>(mirror.data(), mirror.data() + mirror.extent(0));
}

// call() must throw kmoe::Error with `status` and a message containing `needle`; `context` labels
// any failure.
inline void expect_status(const std::function<void()>& call, Status status, const std::string& needle,
                          const std::string& context = "") {
  try {
    call();
    ADD_FAILURE() << "no error: " << context;
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), status) << context;
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << context << ": " << e.what();
  }
}

// max_i |actual_i − expected_i| / max(max_i |expected_i|, floor): a relative error that stays
// meaningful when individual entries are near zero.
// ‖actual − expected‖₂ / ‖expected‖₂.
inline double relative_l2_error(const std::vector<double>& actual, const std::vector<double>& expected) {
  EXPECT_EQ(actual.size(), expected.size());
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < std::min(actual.size(), expected.size()); ++i) {
    diff += (actual[i] - expected[i]) * (actual[i] - expected[i]);
    norm += expected[i] * expected[i];
  }
  return std::sqrt(diff / std::max(norm, 1e-300));
}

inline double max_rel_error(const std::vector<double>& actual, const std::vector<double>& expected,
                            double floor = 1e-12) {
  EXPECT_EQ(actual.size(), expected.size());
  double scale = floor, worst = 0;
  for (double e : expected) scale = std::max(scale, std::abs(e));
  for (std::size_t i = 0; i < std::min(actual.size(), expected.size()); ++i) {
    const double d = std::abs(actual[i] - expected[i]);
    worst = std::max(worst, std::isnan(d) ? INFINITY : d);
  }
  return worst / scale;
}

// Limits for finite-difference checks under compute-sanitizer (cmake/gpu-check sets them), where
// every probe's two forwards take seconds: KMOE_TEST_FD_PROBES, the most entries probed in one
// tensor; KMOE_TEST_FD_TENSORS, the most tensors probed in one process (later ones are not probed:
// the tool needs each kernel once, and the first probe has run every kernel of the forward). The
// probed entries are still checked. Unset: no limit.
inline std::size_t fd_limit(const char* variable) {
  const char* value = std::getenv(variable);
  return value != nullptr ? static_cast<std::size_t>(std::max(1L, std::atol(value))) : SIZE_MAX;
}

inline std::size_t fd_probe_limit() {
  static const std::size_t limit = fd_limit("KMOE_TEST_FD_PROBES");
  return limit;
}

// Whether one more tensor may be probed in this process (counts the tensor when it may).
inline bool fd_tensor_allowed() {
  static const std::size_t limit = fd_limit("KMOE_TEST_FD_TENSORS");
  static std::size_t probed = 0;
  if (probed >= limit) return false;
  ++probed;
  return true;
}

// Central differences of f at (at most `probes`, and fd_probe_limit()) evenly spaced entries of x;
// returns the max relative error (as max_rel_error) of the analytic gradient there.
inline double sampled_fd_error(const std::vector<double>& x, const std::function<double(const std::vector<double>&)>& f,
                               const std::vector<double>& analytic, std::size_t probes, double h = 1e-5) {
  if (!fd_tensor_allowed()) return 0;
  const std::size_t step = std::max<std::size_t>(1, x.size() / std::min(probes, fd_probe_limit()));
  std::vector<double> probe = x, numeric, picked;
  for (std::size_t i = (x.size() - 1) % step; i < x.size(); i += step) {
    probe[i] = x[i] + h;
    const double up = f(probe);
    probe[i] = x[i] - h;
    const double down = f(probe);
    probe[i] = x[i];
    numeric.push_back((up - down) / (2 * h));
    picked.push_back(analytic[i]);
  }
  return max_rel_error(picked, numeric);
}

// The same at every entry of x.
inline double finite_difference_error(const std::vector<double>& x,
                                      const std::function<double(const std::vector<double>&)>& f,
                                      const std::vector<double>& analytic, double h = 1e-5) {
  return sampled_fd_error(x, f, analytic, SIZE_MAX, h);
}

// Every trainable parameter's gradient (already computed into its grad) against central differences
// of loss() over its values, within tolerance; `what` labels failures.
template <class L>
void expect_parameter_gradients(L& layer, const std::function<double()>& loss, double tolerance, const std::string& what) {
  for (auto& p : kmoe::model::trainable(layer.parameters())) {
    const std::vector<double> value = to_double(*p.tensor), grad = to_double(*p.grad);
    const double error = finite_difference_error(
        value,
        [&](const std::vector<double>& probe) {
          p.tensor->copy_from_host(probe);
          const double l = loss();
          p.tensor->copy_from_host(value);
          return l;
        },
        grad);
    EXPECT_LE(error, tolerance) << what << ": " << p.name;
  }
}

// Σ a ⊙ b: the scalar "loss" L = Σ out ⊙ R whose gradient with respect to out is R.
inline double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// stream.uniform<T>(i), or stream.normal<T>(i) when `normal`, for i in [0, n), drawn inside a
// device kernel.
template <class T>
std::vector<double> draw_on_device(const RngStream& stream, index_t n, bool normal = false) {
  View1<T> values("values", n);
  Kokkos::parallel_for(
      "kmoe::test::draw_on_device", Kokkos::RangePolicy<ExecSpace>(0, n), KOKKOS_LAMBDA(const index_t i) {
        const auto counter = static_cast<std::uint64_t>(i);
        values(i) = normal ? stream.normal<T>(counter) : stream.uniform<T>(counter);
      });
  const auto host = Kokkos::create_mirror_view_and_copy(HostSpace(), values);
  return std::vector<double>(host.data(), host.data() + n);
}

constexpr double fd_tolerance = 1e-6;  // the bound for double-precision gradient checks

}  // namespace kmoe::test
