#include "kmoe/ops/adamw.hpp"

#include "kmoe/core/error.hpp"

#include <cmath>

namespace kmoe::ops {

template <class T>
void adamw_step(const AdamWConfig& config, index_t step, const View1<T>& param, const View1<const T>& grad,
                const View1<T>& exp_avg, const View1<T>& exp_avg_sq) {
  // Each check is phrased so that a NaN hyper-parameter fails it.
  require(config.lr >= 0, Status::invalid_argument, "adamw_step: lr = ", config.lr, " must be >= 0");
  require(config.beta1 >= 0 && config.beta1 < 1, Status::invalid_argument, "adamw_step: beta1 = ", config.beta1,
          " is outside [0, 1)");
  require(config.beta2 >= 0 && config.beta2 < 1, Status::invalid_argument, "adamw_step: beta2 = ", config.beta2,
          " is outside [0, 1)");
  require(config.eps > 0, Status::invalid_argument, "adamw_step: eps = ", config.eps, " must be > 0");
  require(config.weight_decay >= 0, Status::invalid_argument, "adamw_step: weight_decay = ", config.weight_decay,
          " must be >= 0");
  require(step >= 1, Status::invalid_argument, "adamw_step: step = ", step, " must be >= 1 (1-based)");
  const std::size_t n = param.extent(0);
  require(grad.extent(0) == n && exp_avg.extent(0) == n && exp_avg_sq.extent(0) == n, Status::shape_mismatch,
          "adamw_step: param, grad, exp_avg, exp_avg_sq have ", n, ", ", grad.extent(0), ", ", exp_avg.extent(0), ", ",
          exp_avg_sq.extent(0), " elements; they must be equal");

  // Scalars in double on the host, in torch's form (torch/optim/adamw.py, single tensor), then cast:
  // 1 − β must be formed in double, since float(0.999) alone is 1.3e-5 off in 1 − β₂.
  const double bias_correction1 = 1 - std::pow(config.beta1, static_cast<double>(step));
  const double bias_correction2 = 1 - std::pow(config.beta2, static_cast<double>(step));
  const T decay = static_cast<T>(1 - config.lr * config.weight_decay);
  const T beta1 = static_cast<T>(config.beta1), beta2 = static_cast<T>(config.beta2);
  const T one_minus_beta1 = static_cast<T>(1 - config.beta1), one_minus_beta2 = static_cast<T>(1 - config.beta2);
  const T step_size = static_cast<T>(config.lr / bias_correction1);
  const T bias_correction2_sqrt = static_cast<T>(std::sqrt(bias_correction2));
  const T eps = static_cast<T>(config.eps);
  Kokkos::parallel_for(
      "kmoe::adamw_step", Kokkos::RangePolicy<ExecSpace>(0, n), KOKKOS_LAMBDA(const index_t i) {
        const T g = grad(i);
        const T m = beta1 * exp_avg(i) + one_minus_beta1 * g;
        const T v = beta2 * exp_avg_sq(i) + one_minus_beta2 * g * g;
        exp_avg(i) = m;
        exp_avg_sq(i) = v;
        const T denom = Kokkos::Experimental::sqrt(v) / bias_correction2_sqrt + eps;
        param(i) = param(i) * decay - step_size * (m / denom);  // torch: addcdiv_(m, denom, -step_size)
      });
}

template void adamw_step<float>(const AdamWConfig&, index_t, const View1<float>&, const View1<const float>&,
                                const View1<float>&, const View1<float>&);
template void adamw_step<double>(const AdamWConfig&, index_t, const View1<double>&, const View1<const double>&,
                                 const View1<double>&, const View1<double>&);

}  // namespace kmoe::ops
