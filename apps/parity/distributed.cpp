#include "distributed.hpp"

#include "kmoe/dist/gradients.hpp"
#include "kmoe/dist/parameter_blocks.hpp"
#include "kmoe/dist/placement.hpp"
#include "kmoe/model/builder.hpp"

namespace kmoe::parity {

namespace {

// Axis 0 of shape replaced by rows.
Shape with_rows(const Shape& shape, index_t rows) {
  std::vector<index_t> dims = shape.dims();
  dims[0] = rows;
  return Shape(dims);
}

// This rank's rows of a [B, T] mask (a fresh View: the split may leave a rank none).
Kokkos::View<const bool**, Layout, MemSpace> mask_rows(const dist::Communicator& ranks,
                                                       const Kokkos::View<const bool**, Layout, MemSpace>& mask) {
  const auto [first, count] = dist::piece(static_cast<index_t>(mask.extent(0)), ranks.size(), ranks.rank());
  Kokkos::View<bool**, Layout, MemSpace> mine("parity::mask_rows", count, mask.extent(1));
  if (count > 0) Kokkos::deep_copy(mine, Kokkos::subview(mask, Kokkos::make_pair(first, first + count), Kokkos::ALL));
  return mine;
}

}  // namespace

template <class T>
FixtureRun<T> fixture_forward(const Fixture& fixture, model::Layer<T>& whole, const model::LayerInputs<T>& whole_inputs) {
  const dist::Communicator& ranks = fixture.ranks();
  FixtureRun<T> run;
  if (!ranks.distributed()) {
    Generator rng(fixture.seed());
    run.forward = whole.forward(whole_inputs, fixture.training(), rng);
    run.out = run.forward.out;
    return run;
  }
  run.layer = model::build_layer<T>(fixture.layer(), fixture.config(), fixture.seed(), ParameterInit::zeros, ranks);
  const model::ParameterList<T> mine = run.layer->parameters(), all = whole.parameters();
  for (std::size_t i = 0; i < mine.size(); ++i) dist::take_block(mine[i], *all[i].tensor, *mine[i].tensor);
  model::LayerInputs<T> inputs = whole_inputs;
  index_t batch = 0;
  if (!whole_inputs.x.empty()) {
    inputs.x = my_share(ranks, whole_inputs.x);
    batch = whole_inputs.x.dim(0);
  }
  if (!whole_inputs.tokens.empty()) {
    inputs.tokens = my_share(ranks, whole_inputs.tokens);
    batch = whole_inputs.tokens.dim(0);
  }
  if (!whole_inputs.mask.empty()) inputs.mask = my_share(ranks, whole_inputs.mask);
  // ST-MoE's replayed draws: [top_n, batch, n] and [2, groups, batch, C].
  if (!whole_inputs.route_uniform.empty()) inputs.route_uniform = my_share(ranks, whole_inputs.route_uniform, 1);
  if (!whole_inputs.route_uniform_inner.empty())
    inputs.route_uniform_inner = my_share(ranks, whole_inputs.route_uniform_inner, 2);
  if (whole_inputs.attention_mask && whole_inputs.attention_mask->src_length_mask.data() != nullptr)
    inputs.attention_mask->src_length_mask = mask_rows(ranks, whole_inputs.attention_mask->src_length_mask);
  Generator rng(fixture.seed());
  run.forward = run.layer->forward(inputs, fixture.training(), rng);
  run.out = whole_batch(ranks, run.forward.out, with_rows(run.forward.out.shape(), batch));
  return run;
}

template <class T>
Tensor<T> fixture_backward(const Fixture& fixture, FixtureRun<T>& run, model::Layer<T>& whole,
                           const Tensor<T>& whole_dout, T aux_weight) {
  if (!run.layer) return whole.backward(run.forward, whole_dout, aux_weight);
  const dist::Communicator& ranks = fixture.ranks();
  run.layer->zero_grad();
  const Tensor<T> dx = run.layer->backward(run.forward, my_share(ranks, whole_dout), aux_weight);
  // Every rank has the same kind of input: either all return a gradient or none does.
  const bool has_dx = ranks.sum(dx.empty() ? 0 : 1) > 0;
  const Tensor<T> all_dx = has_dx ? whole_batch(ranks, dx, with_rows(dx.shape(), whole_dout.dim(0))) : Tensor<T>();
  dist::all_reduce_dense_gradients(ranks, run.layer->parameters());
  whole.zero_grad();
  const model::ParameterList<T> mine = run.layer->parameters(), all = whole.parameters();
  for (std::size_t i = 0; i < mine.size(); ++i)
    if (mine[i].grad != nullptr) dist::gather_to_rank0(ranks, mine[i], *mine[i].grad, all[i].grad);
  return all_dx;
}

#define KMOE_INSTANTIATE(T)                                                                                        \
  template FixtureRun<T> fixture_forward<T>(const Fixture&, model::Layer<T>&, const model::LayerInputs<T>&); \
  template Tensor<T> fixture_backward<T>(const Fixture&, FixtureRun<T>&, model::Layer<T>&, const Tensor<T>&, T);
KMOE_INSTANTIATE(float)
KMOE_INSTANTIATE(double)
#undef KMOE_INSTANTIATE

}  // namespace kmoe::parity
