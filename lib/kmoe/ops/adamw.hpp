// AdamW, as torch.optim.AdamW (decoupled weight decay, bias-corrected moments).
#pragma once

#include "kmoe/core/config.hpp"

namespace kmoe::ops {

struct AdamWConfig {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;
};

// One update of param from grad; exp_avg and exp_avg_sq are the optimiser state (zero before
// step 1). step is the 1-based number of this update. Invalid hyper-parameters (lr < 0,
// betas outside [0, 1), eps ≤ 0, weight_decay < 0, step < 1) throw Status::invalid_argument.
template <class T>
void adamw_step(const AdamWConfig& config, index_t step, const View1<T>& param, const View1<const T>& grad,
                const View1<T>& exp_avg, const View1<T>& exp_avg_sq);

}  // namespace kmoe::ops
