// kmoe-demo: runs a σ-MoE-sized expert MLP (top-k routing, CVMM up/down projections, ReLU)
// forward and backward on random data and prints a short table: shapes, time, GFLOP/s, and the
// largest relative error of the analytic gradients against central finite differences (double).
#include "expert_mlp.hpp"
#include "bench/timing.hpp"

#include "kmoe/core/error.hpp"

#include <cmath>
#include <cstdio>
#include <functional>

using namespace kmoe;
using kmoe::apps::ExpertMlp;
using kmoe::apps::ExpertMlpShape;

namespace {

// Max over x, keys, values and gates of |analytic − numeric| / max|numeric|, on a small
// double-precision instance of the same pipeline.
double gradient_check_error() {
  ExpertMlpShape s;
  s.tokens = 7;
  s.dmodel = 6;
  s.experts = 5;
  s.expert_size = 4;
  s.k = 2;
  ExpertMlp<double> mlp(s, 7);
  mlp.route();
  mlp.forward();
  mlp.backward();
  const auto dy = mlp.dy.to_host();
  const auto loss = [&] {
    mlp.forward();
    const auto y = mlp.y.to_host();
    double l = 0;
    for (std::size_t i = 0; i < y.size(); ++i) l += y[i] * dy[i];
    return l;
  };
  double worst = 0;
  const auto check = [&](Tensor<double>& param, const Tensor<double>& grad) {
    auto values = param.to_host();
    const auto analytic = grad.to_host();
    double scale = 1e-12, err = 0;
    const double h = 1e-5;
    for (std::size_t i = 0; i < values.size(); ++i) {
      const double keep = values[i];
      values[i] = keep + h;
      param.copy_from_host(values);
      const double up = loss();
      values[i] = keep - h;
      param.copy_from_host(values);
      const double down = loss();
      values[i] = keep;
      param.copy_from_host(values);
      const double numeric = (up - down) / (2 * h);
      scale = std::max(scale, std::abs(numeric));
      err = std::max(err, std::abs(numeric - analytic[i]));
    }
    worst = std::max(worst, err / scale);
  };
  check(mlp.x, mlp.dx);
  check(mlp.keys, mlp.dkeys);
  check(mlp.values, mlp.dvalues);
  check(mlp.gates, mlp.dgates);
  return worst;
}

}  // namespace

int main(int argc, char** argv) {
  Kokkos::ScopeGuard kokkos(argc, argv);
  try {
    const ExpertMlpShape shape = apps::shape_from_options(apps::parse_options(argc, argv, 1, "kmoe-demo"), ExpertMlpShape(), "kmoe-demo");
    ExpertMlp<float> mlp(shape, 1);
    mlp.route();
    mlp.forward();  // warm-up: first-touch allocations, BLAS thread start
    mlp.backward();
    const int repeats = 5;
    const double fwd = apps::median_seconds(repeats, [&] { mlp.forward(); });
    const double bwd = apps::median_seconds(repeats, [&] { mlp.backward(); });
    const double grad_err = gradient_check_error();

    std::printf("kmoe demo: σ-MoE expert MLP (top-k → CVMM up → ReLU → CVMM down, gated), float32\n");
    std::printf("execution space: %s, concurrency %d\n", ExecSpace::name(), ExecSpace().concurrency());
    std::printf("shape: %s\n\n", shape.str().c_str());
    std::printf("| %-9s | %-48s | %9s | %8s |\n", "stage", "tensors", "time [ms]", "GFLOP/s");
    std::printf("|-----------|--------------------------------------------------|-----------|----------|\n");
    char tensors[128];
    std::snprintf(tensors, sizeof tensors, "x[%ld,%ld] keys[%d,%ld,%ld] values[%d,%ld,%ld]", long(shape.tokens),
                  long(shape.dmodel), shape.experts, long(shape.dmodel), long(shape.expert_size), shape.experts,
                  long(shape.expert_size), long(shape.dmodel));
    std::printf("| %-9s | %-48s | %9.2f | %8.1f |\n", "forward", tensors, fwd * 1e3, shape.forward_flops() / fwd * 1e-9);
    std::printf("| %-9s | %-48s | %9.2f | %8.1f |\n", "backward", "dx, dkeys, dvalues, dgates", bwd * 1e3,
                shape.backward_flops() / bwd * 1e-9);
    std::printf("\nmax gradient-check error (double, central differences; dx, dkeys, dvalues, dgates): %.2e\n",
                grad_err);
    return grad_err <= 1e-6 ? 0 : 1;
  } catch (const Error& e) {
    std::fprintf(stderr, "kmoe-demo: %s: %s\n", status_name(e.status()), e.what());
    return 2;
  }
}
