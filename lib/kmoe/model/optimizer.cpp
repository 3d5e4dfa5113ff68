#include "kmoe/model/optimizer.hpp"

#include "kmoe/core/error.hpp"

#include <cmath>

namespace kmoe::model {

template <class T>
AdamW<T>::AdamW(const ParameterList<T>& parameters, const ops::AdamWConfig& config)
    : parameters_(trainable(parameters)), config_(config) {
  set_learning_rate(config.lr);
  for (const Parameter<T>& p : parameters_) {
    require(p.grad != nullptr, Status::internal, "AdamW: parameter '", p.name, "' has no gradient");
    moments_[p.name] = {Tensor<T>("adamw::exp_avg", p.tensor->shape()), Tensor<T>("adamw::exp_avg_sq", p.tensor->shape())};
  }
}

template <class T>
void AdamW<T>::set_learning_rate(double lr) {
  require(lr >= 0 && std::isfinite(lr), Status::invalid_argument, "AdamW: lr = ", lr, " must be finite and not negative");
  config_.lr = lr;
}

template <class T>
void AdamW<T>::set_steps(std::int64_t steps) {
  require(steps >= 0, Status::invalid_argument, "AdamW: step count ", steps, " must not be negative");
  steps_ = steps;
}

template <class T>
void AdamW<T>::step() {
  ++steps_;
  for (const Parameter<T>& p : parameters_) {
    AdamWMoments<T>& m = moments_.at(p.name);
    ops::adamw_step<T>(config_, steps_, p.tensor->flat(), p.grad->flat(), m.exp_avg.flat(), m.exp_avg_sq.flat());
  }
}

template class AdamW<float>;
template class AdamW<double>;

}  // namespace kmoe::model
