// kmoe-parity runners for layers "soft_moe_lite" (zhaozijie2022/soft-moe) and
// "soft_moe_lucidrains" (lucidrains/soft-moe-pytorch): the dump formats of
// data/golden/soft_moe_lite/README.md and data/golden/soft_moe_lucidrains/README.md.
#include "kmoe/layers/soft_moe.hpp"

#include <regex>
#include <vector>

#include "distributed.hpp"
#include "registry.hpp"

namespace kmoe::parity {

namespace {

void require_plain_loss(const Fixture& fixture) {
  static const std::regex form(R"(\s*sum\(\s*out\s*\*\s*grad_out\s*\)\s*)");
  require(std::regex_match(fixture.loss(), form), Status::io_error, "attribute 'loss' is '", fixture.loss(), "'; the ",
          fixture.layer(), " runner knows only 'sum(out * grad_out)'");
}

// The debug intermediates of the folder READMEs, each compared when the dump has it (per-sequence
// ones put back together from every rank's sequences; batch: the whole batch's).
template <class T>
void compare_debug(const Fixture& fixture, Report& report, const layers::SoftMoEConfig& c,
                   const layers::SoftMoEForward<T>& f, index_t batch) {
  const index_t B = f.batch, n = f.tokens, E = c.num_experts, S = c.slots_per_expert(), D = c.dim;
  const dist::Communicator& ranks = fixture.ranks();
  const auto compare = [&](const char* dataset, const Tensor<T>& computed, Shape shape) {
    if (!fixture.has(dataset)) return;
    const Tensor<T> mine = B > 0 ? computed.reshape(shape) : Tensor<T>();
    std::vector<index_t> dims = shape.dims();
    dims[0] = batch;
    report.compare(dataset, ranks.distributed() ? whole_batch(ranks, mine, Shape(dims)) : mine);
  };
  compare("/debug/logits", f.logits, {B, n, E, S});
  compare("/debug/dispatch_weights", f.dispatch, {B, n, E, S});
  compare("/debug/combine_weights", f.combine, {B, n, E * S});
  compare("/debug/slots", f.slots, {B, E, S, D});
  compare("/debug/expert_out", f.slot_outputs, {B, E, S, D});
  if (c.normalizes()) {
    compare("/debug/x_normed", f.tokens_normed, {B, n, D});
    // The same on every rank with sequences; the report's rank 0 has some.
    if (fixture.has("/debug/slot_embeds_normed") && B > 0)
      report.compare("/debug/slot_embeds_normed", f.slot_embeds_normed.reshape({E, S, D}));
  }
}

template <class T>
void run_soft_moe(const Fixture& fixture, Report& report) {
  require_plain_loss(fixture);
  const auto layer = build_fixture_layer<T>(fixture);
  load_fixture_parameters(fixture, *layer);
  const layers::SoftMoEConfig& config = layer->template as<layers::SoftMoE<T>>()->config();

  model::LayerInputs<T> inputs;
  inputs.x = fixture.read<T>("/input/x");
  const Tensor<T>& x = inputs.x;
  if (fixture.has("/input/mask")) {
    // The batch and token extents of x as the layer reads it: [B, n, D], [B, D] or [B, D, H, W].
    const index_t tokens = x.rank() == 3 ? x.dim(1) : x.rank() == 4 ? x.dim(2) * x.dim(3) : 1;
    inputs.mask = fixture.read_indices("/input/mask", Shape{x.dim(0), tokens});
  }
  FixtureRun<T> run = fixture_forward(fixture, *layer, inputs);
  report.compare("/output/out", run.out);
  compare_debug(fixture, report, config, run.forward.template state_as<layers::SoftMoEForward<T>>(), x.dim(0));

  const bool has_loss = fixture.has("/output/loss"), has_grad = fixture.has("/grad");
  if (!has_loss && !has_grad) return;
  const Tensor<T> grad_out = fixture.read<T>("/input/grad_out", run.out.shape());
  const Dot d = dot(run.out, grad_out);
  if (has_loss) report.compare_scalar("/output/loss", d.sum, d.magnitude);
  if (!has_grad) return;
  layer->zero_grad();
  report.compare("/grad/input/x", fixture_backward(fixture, run, *layer, grad_out, T(0)));
  report.compare_gradients(*layer);
}

}  // namespace

template <class T>
void run_soft_moe_lite(const Fixture& fixture, Report& report) {
  run_soft_moe<T>(fixture, report);
}

template <class T>
void run_soft_moe_lucidrains(const Fixture& fixture, Report& report) {
  run_soft_moe<T>(fixture, report);
}

template void run_soft_moe_lite<float>(const Fixture&, Report&);
template void run_soft_moe_lite<double>(const Fixture&, Report&);
template void run_soft_moe_lucidrains<float>(const Fixture&, Report&);
template void run_soft_moe_lucidrains<double>(const Fixture&, Report&);

}  // namespace kmoe::parity
