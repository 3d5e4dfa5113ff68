// kmoe-parity runner for layer "sigma_moe": RobertCsordas/moe_layer's MoE (Triton version), the
// dump format of data/golden/sigma_moe/README.md.
#include "registry.hpp"

#include "kmoe/layers/sigma_moe.hpp"

#include <regex>
#include <utility>
#include <vector>

namespace kmoe::parity {

namespace {

// The original constructor's keyword arguments; the optional ones default as there.
layers::SigmaMoEConfig parse_sigma_moe_config(const Fixture& fixture) {
  ConfigReader keys(fixture);
  layers::SigmaMoEConfig config;
  config.dmodel = keys.required<index_t>("dmodel");
  config.n_experts = keys.required<int>("n_experts");
  config.expert_size = keys.required<index_t>("expert_size");
  config.k = keys.required<int>("k");
  config.dropout = keys.get("dropout", config.dropout);
  config.selection_mode = layers::parse_selection_mode(keys.get<std::string>("selection_mode", "sigmoid"));
  config.activation_after_topk = keys.get("activation_after_topk", config.activation_after_topk);
  config.activation = ops::parse_activation(keys.get<std::string>("activation", "relu"));
  config.bias = keys.get("bias", config.bias);
  config.v_dim = keys.get_nullable<index_t>("v_dim").value_or(0);
  config.sinkhorn_n_iters = keys.get("sinkhorn_n_iters", config.sinkhorn_n_iters);
  config.expert_dropout = keys.get("expert_dropout", config.expert_dropout);
  config.weight_std_scale = keys.get("weight_std_scale", config.weight_std_scale);
  keys.finish();
  return config;
}

// C in the stated loss "sum(out * grad_out) + C * reg_loss" (0 without the regulariser term).
double reg_loss_coefficient(const std::string& loss) {
  static const std::regex form(
      R"(\s*sum\(\s*out\s*\*\s*grad_out\s*\)\s*(?:\+\s*([-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)\s*\*\s*reg_loss\s*)?)");
  std::smatch match;
  require(std::regex_match(loss, match, form), Status::io_error, "attribute 'loss' is '", loss,
          "'; the sigma_moe runner knows only 'sum(out * grad_out) + C * reg_loss'");
  return match[1].matched ? std::stod(match[1].str()) : 0.0;
}

// The parameters (or their gradients) under their state_dict names; bias and o_bias only when present.
template <class T>
std::vector<std::pair<std::string, Tensor<T>*>> named_tensors(layers::SigmaMoEParams<T>& params) {
  std::vector<std::pair<std::string, Tensor<T>*>> named = {
      {"keys", &params.keys}, {"values", &params.values}, {"expert_sel", &params.expert_sel}};
  if (!params.bias.empty()) named.emplace_back("bias", &params.bias);
  if (!params.o_bias.empty()) named.emplace_back("o_bias", &params.o_bias);
  return named;
}

}  // namespace

template <class T>
void run_sigma_moe(const Fixture& fixture, Report& report) {
  layers::SigmaMoE<T> layer(parse_sigma_moe_config(fixture), fixture.seed());
  for (auto& [name, param] : named_tensors(layer.params())) {
    const Tensor<T> stored = fixture.read<T>(Fixture::state_dict_path("/params", name), param->shape());
    Kokkos::deep_copy(param->flat(), stored.flat());
  }

  const Tensor<T> x = fixture.read<T>("/input/x");
  Generator rng(fixture.seed());
  const layers::SigmaMoEForward<T> forward = layer.forward(x, fixture.training(), rng);
  report.compare("/output/out", forward.y);
  report.compare_scalar("/output/reg_loss", forward.reg_loss);

  const bool has_loss = fixture.has("/output/loss"), has_grad = fixture.has("/grad");
  if (!has_loss && !has_grad) return;
  const double reg_coef = reg_loss_coefficient(fixture.loss());
  const Tensor<T> grad_out = fixture.read<T>("/input/grad_out", forward.y.shape());
  if (has_loss) report.compare_scalar("/output/loss", dot(forward.y, grad_out) + reg_coef * forward.reg_loss);
  if (!has_grad) return;
  layer.zero_grad();
  report.compare("/grad/input/x", layer.backward(forward, grad_out, static_cast<T>(reg_coef)));
  for (auto& [name, grad] : named_tensors(layer.grads())) {
    report.compare(Fixture::state_dict_path("/grad/params", name), *grad);
  }
}

template void run_sigma_moe<float>(const Fixture&, Report&);
template void run_sigma_moe<double>(const Fixture&, Report&);

}  // namespace kmoe::parity
