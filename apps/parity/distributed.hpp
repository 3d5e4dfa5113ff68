// How the runners run the fixture's whole layer (parameters loaded): on one rank directly, or with
// kmoe-parity --distributed placed over fixture.ranks(), each rank running its share of the batch
// (sequences along axis 0; none when there are more ranks than sequences), and what the report
// compares put back together: outputs and input gradients on every rank, the gradients of entries
// held whole summed over the ranks, placed experts' gradients assembled on rank 0, whose report
// counts.
#pragma once

#include "fixture.hpp"

#include "kmoe/model/layer.hpp"

#include <memory>

namespace kmoe::parity {

template <class T>
struct FixtureRun {
  std::unique_ptr<model::Layer<T>> layer;  // this rank's part (distributed only)
  model::LayerForward<T> forward;          // of this rank's share (the whole batch on one rank)
  Tensor<T> out;                           // every rank's out, in batch order
};

// Forward of the whole inputs, or of this rank's share (x or tokens, and a padding mask's rows)
// through the placed layer; draws from Generator(fixture.seed()).
template <class T>
FixtureRun<T> fixture_forward(const Fixture& fixture, model::Layer<T>& whole, const model::LayerInputs<T>& whole_inputs);

// Backward of whole_dout (of this rank's share); returns every rank's input gradient (empty for
// token inputs) and leaves the whole batch's parameter gradients in whole's (on rank 0).
template <class T>
Tensor<T> fixture_backward(const Fixture& fixture, FixtureRun<T>& run, model::Layer<T>& whole,
                           const Tensor<T>& whole_dout, T aux_weight);

}  // namespace kmoe::parity
