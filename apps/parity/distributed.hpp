// kmoe-parity --distributed, shared by the runners: the fixture's whole layer (parameters loaded)
// is placed over fixture.ranks(), each rank runs its share of the batch (sequences along axis 0;
// none when there are more ranks than sequences), and what the report compares is put back
// together: outputs and input gradients on every rank, the gradients of entries held whole summed
// over the ranks, placed experts' gradients assembled on rank 0, whose report counts.
#pragma once

#include "fixture.hpp"

#include "kmoe/model/layer.hpp"

#include <memory>

namespace kmoe::parity {

template <class T>
struct DistributedRun {
  std::unique_ptr<model::Layer<T>> layer;  // this rank's part
  model::LayerForward<T> forward;          // of this rank's share
  Tensor<T> out;                           // every rank's out, in batch order
};

// The whole inputs' share of this rank (x or tokens, and a padding mask's rows) through the
// placed layer.
template <class T>
DistributedRun<T> distributed_forward(const Fixture& fixture, model::Layer<T>& whole,
                                      const model::LayerInputs<T>& whole_inputs);

// Backward of this rank's share of whole_dout; returns every rank's input gradient (empty for
// token inputs) and leaves the whole batch's parameter gradients in whole's (on rank 0).
template <class T>
Tensor<T> distributed_backward(const Fixture& fixture, DistributedRun<T>& run, model::Layer<T>& whole,
                               const Tensor<T>& whole_dout, T aux_weight);

}  // namespace kmoe::parity
