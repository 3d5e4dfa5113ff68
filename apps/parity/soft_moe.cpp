// kmoe-parity runners for layers "soft_moe_lite" (zhaozijie2022/soft-moe) and
// "soft_moe_lucidrains" (lucidrains/soft-moe-pytorch): the dump formats of
// data/golden/soft_moe_lite/README.md and data/golden/soft_moe_lucidrains/README.md.
#include "kmoe/layers/soft_moe.hpp"

#include <regex>
#include <vector>

#include "registry.hpp"

namespace kmoe::parity {

namespace {

// SoftMoE(d_model, num_experts, num_slots): no other arguments.
layers::SoftMoEConfig parse_lite_config(const Fixture& fixture) {
  ConfigReader keys(fixture);
  const auto d_model = keys.required<index_t>("d_model");
  const auto num_experts = keys.required<int>("num_experts");
  const auto num_slots = keys.required<index_t>("num_slots");
  keys.finish();
  return layers::SoftMoEConfig::lite(d_model, num_experts, num_slots);
}

// SoftMoE(dim, *, seq_len=None, num_experts=4, num_slots=None, expert_mult=4, dropout=0., geglu=False,
// is_distributed=None, offload_unused_experts_to_cpu=True, use_layernorm=False).
layers::SoftMoEConfig parse_lucidrains_config(const Fixture& fixture) {
  ConfigReader keys(fixture);
  layers::LucidrainsSoftMoEOptions o;
  const auto dim = keys.required<index_t>("dim");
  o.seq_len = keys.get_nullable<index_t>("seq_len").value_or(0);
  o.num_experts = keys.get("num_experts", o.num_experts);
  o.num_slots = keys.get_nullable<index_t>("num_slots").value_or(0);
  o.expert_mult = keys.get("expert_mult", o.expert_mult);
  o.dropout = keys.get("dropout", o.dropout);
  o.geglu = keys.get("geglu", o.geglu);
  o.use_layernorm = keys.get("use_layernorm", o.use_layernorm);
  // Where the experts live (ranks, CPU offload) does not change the computed values.
  keys.get_nullable<bool>("is_distributed");
  keys.get("offload_unused_experts_to_cpu", true);
  keys.finish();
  return layers::SoftMoEConfig::lucidrains(dim, o);
}

void require_plain_loss(const Fixture& fixture) {
  static const std::regex form(R"(\s*sum\(\s*out\s*\*\s*grad_out\s*\)\s*)");
  require(std::regex_match(fixture.loss(), form), Status::io_error, "attribute 'loss' is '", fixture.loss(), "'; the ",
          fixture.layer(), " runner knows only 'sum(out * grad_out)'");
}

// The debug intermediates of the folder READMEs, each compared when the dump has it.
template <class T>
void compare_debug(const Fixture& fixture, Report& report, const layers::SoftMoEConfig& c,
                   const layers::SoftMoEForward<T>& f) {
  const index_t B = f.batch, n = f.tokens, E = c.num_experts, S = c.slots_per_expert(), D = c.dim;
  const auto compare = [&](const char* dataset, const Tensor<T>& computed, const Shape& shape) {
    if (fixture.has(dataset)) report.compare(dataset, computed.reshape(shape));
  };
  compare("/debug/logits", f.logits, {B, n, E, S});
  compare("/debug/dispatch_weights", f.dispatch, {B, n, E, S});
  compare("/debug/combine_weights", f.combine, {B, n, E * S});
  compare("/debug/slots", f.slots, {B, E, S, D});
  compare("/debug/expert_out", f.experts.y, {B, E, S, D});
  if (c.normalizes()) {
    compare("/debug/x_normed", f.tokens_normed, {B, n, D});
    compare("/debug/slot_embeds_normed", f.slot_embeds_normed, {E, S, D});
  }
}

template <class T>
void run_soft_moe(const Fixture& fixture, Report& report, const layers::SoftMoEConfig& config) {
  require_plain_loss(fixture);
  layers::SoftMoE<T> layer(config, fixture.seed());
  std::vector<layers::NamedTensor<T>> stored;
  for (const auto& entry : layer.state_dict()) {
    stored.push_back(
        {entry.name, fixture.read<T>(Fixture::state_dict_path("/params", entry.name), entry.tensor.shape())});
  }
  for (const auto& entry : layer.buffers()) {
    stored.push_back(
        {entry.name, fixture.read<T>(Fixture::state_dict_path("/buffers", entry.name), entry.tensor.shape())});
  }
  layer.load_state_dict(stored);

  const Tensor<T> x = fixture.read<T>("/input/x");
  Tensor<int> mask;
  if (fixture.has("/input/mask")) {
    // The batch and token extents of x as the layer reads it: [B, n, D], [B, D] or [B, D, H, W].
    const index_t tokens = x.rank() == 3 ? x.dim(1) : x.rank() == 4 ? x.dim(2) * x.dim(3) : 1;
    mask = fixture.read_indices("/input/mask", Shape{x.dim(0), tokens});
  }
  Generator rng(fixture.seed());
  const layers::SoftMoEForward<T> forward = layer.forward(x, mask, fixture.training(), rng);
  report.compare("/output/out", forward.y);
  compare_debug(fixture, report, config, forward);

  const bool has_loss = fixture.has("/output/loss"), has_grad = fixture.has("/grad");
  if (!has_loss && !has_grad) return;
  const Tensor<T> grad_out = fixture.read<T>("/input/grad_out", forward.y.shape());
  if (has_loss) report.compare_scalar("/output/loss", dot(forward.y, grad_out));
  if (!has_grad) return;
  layer.zero_grad();
  report.compare("/grad/input/x", layer.backward(forward, grad_out));
  for (const auto& grad : layer.grad_state_dict()) {
    report.compare(Fixture::state_dict_path("/grad/params", grad.name), grad.tensor);
  }
}

}  // namespace

template <class T>
void run_soft_moe_lite(const Fixture& fixture, Report& report) {
  run_soft_moe<T>(fixture, report, parse_lite_config(fixture));
}

template <class T>
void run_soft_moe_lucidrains(const Fixture& fixture, Report& report) {
  run_soft_moe<T>(fixture, report, parse_lucidrains_config(fixture));
}

template void run_soft_moe_lite<float>(const Fixture&, Report&);
template void run_soft_moe_lite<double>(const Fixture&, Report&);
template void run_soft_moe_lucidrains<float>(const Fixture&, Report&);
template void run_soft_moe_lucidrains<double>(const Fixture&, Report&);

}  // namespace kmoe::parity
