// kmoe-parity runner for layer "sigma_moe": RobertCsordas/moe_layer's MoE (Triton version), the
// dump format of data/golden/sigma_moe/README.md.
#include "registry.hpp"

#include "distributed.hpp"

#include <cmath>
#include <regex>

namespace kmoe::parity {

namespace {

// C in the stated loss "sum(out * grad_out) + C * reg_loss" (0 without the regulariser term).
double reg_loss_coefficient(const std::string& loss) {
  static const std::regex form(
      R"(\s*sum\(\s*out\s*\*\s*grad_out\s*\)\s*(?:\+\s*([-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)\s*\*\s*reg_loss\s*)?)");
  std::smatch match;
  require(std::regex_match(loss, match, form), Status::io_error, "attribute 'loss' is '", loss,
          "'; the sigma_moe runner knows only 'sum(out * grad_out) + C * reg_loss'");
  return match[1].matched ? std::stod(match[1].str()) : 0.0;
}

}  // namespace

template <class T>
void run_sigma_moe(const Fixture& fixture, Report& report) {
  const auto layer = build_fixture_layer<T>(fixture);
  load_fixture_parameters(fixture, *layer);
  model::LayerInputs<T> inputs;
  inputs.x = fixture.read<T>("/input/x");
  FixtureRun<T> run = fixture_forward(fixture, *layer, inputs);
  const Tensor<T> out = run.out;
  const double reg_loss = run.forward.losses.at("reg_loss");
  report.compare("/output/out", out);
  report.compare_scalar("/output/reg_loss", reg_loss);

  const bool has_loss = fixture.has("/output/loss"), has_grad = fixture.has("/grad");
  if (!has_loss && !has_grad) return;
  const double reg_coef = reg_loss_coefficient(fixture.loss());
  const Tensor<T> grad_out = fixture.read<T>("/input/grad_out", out.shape());
  const Dot d = dot(out, grad_out);
  if (has_loss) {
    report.compare_scalar("/output/loss", d.sum + reg_coef * reg_loss, d.magnitude + std::abs(reg_coef * reg_loss));
  }
  if (!has_grad) return;
  layer->zero_grad();
  report.compare("/grad/input/x", fixture_backward(fixture, run, *layer, grad_out, static_cast<T>(reg_coef)));
  report.compare_gradients(*layer);
}

template void run_sigma_moe<float>(const Fixture&, Report&);
template void run_sigma_moe<double>(const Fixture&, Report&);

}  // namespace kmoe::parity
