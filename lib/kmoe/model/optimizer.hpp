// AdamW over a layer's registry: one update of every trainable entry from its gradient, the
// moments kept per entry under the entry's name (which is how checkpoints store them).
#pragma once

#include "kmoe/model/parameter.hpp"
#include "kmoe/ops/adamw.hpp"

#include <map>
#include <string>

namespace kmoe::model {

template <class T>
struct AdamWMoments {
  Tensor<T> exp_avg;
  Tensor<T> exp_avg_sq;
};

template <class T>
class AdamW {
 public:
  // Moments zero for every trainable entry of parameters (buffers are skipped). Invalid
  // hyper-parameters throw Status::invalid_argument.
  AdamW(const ParameterList<T>& parameters, const ops::AdamWConfig& config);

  const ops::AdamWConfig& config() const { return config_; }
  void set_learning_rate(double lr);
  // Updates done so far (the next step is steps() + 1).
  std::int64_t steps() const { return steps_; }
  void set_steps(std::int64_t steps);
  // One update of every entry from its current gradient.
  void step();

  const ParameterList<T>& parameters() const { return parameters_; }
  // Moments by parameter name.
  std::map<std::string, AdamWMoments<T>>& moments() { return moments_; }
  const std::map<std::string, AdamWMoments<T>>& moments() const { return moments_; }

 private:
  ParameterList<T> parameters_;
  ops::AdamWConfig config_;
  std::int64_t steps_ = 0;
  std::map<std::string, AdamWMoments<T>> moments_;
};

extern template class AdamW<float>;
extern template class AdamW<double>;

}  // namespace kmoe::model
