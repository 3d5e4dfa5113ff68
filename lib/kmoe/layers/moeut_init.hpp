// Initialisation helpers shared by MoEUT's layers (SwitchHead attention, the layer group and LM):
// seeded normal draws and the original's row renormalisation of router weights.
#pragma once

#include "kmoe/core/random.hpp"
#include "kmoe/core/tensor.hpp"

namespace kmoe::layers::moeut_init {

// tensor = stddev · N(0, 1), drawn from the next tensor.size() counters of generator.
template <class T>
void fill_normal(const Tensor<T>& tensor, Generator& generator, double stddev);

// The original's renorm_rows (SwitchHeadCore.renorm_rows): each row r of a [rows, cols] matrix
// becomes W_r / ‖W_r‖ · std_r / std(all row-normalised rows), std_r the unbiased std of row r
// before. Host pass in double (a one-time O(rows·cols) init step, independent of thread count).
template <class T>
void renorm_rows(Tensor<T>& weight);

// tensor = U(−bound, bound) (PyTorch's default Linear init), from the next counters of generator.
template <class T>
void fill_uniform(const Tensor<T>& tensor, Generator& generator, double bound);

}  // namespace kmoe::layers::moeut_init
