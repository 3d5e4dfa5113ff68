// kmoe-parity runner for layer "sigma_moe": RobertCsordas/moe_layer's MoE (Triton version), the
// dump format of data/golden/sigma_moe/README.md.
#include "registry.hpp"

#include "kmoe/dist/gradients.hpp"
#include "kmoe/dist/parameter_blocks.hpp"
#include "kmoe/model/builder.hpp"

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

// --distributed: the experts placed over the fixture's ranks, each rank running its share of the
// batch; what the report compares is put back together (outputs and input gradients on every
// rank, dense gradients summed over the ranks, expert gradients assembled on rank 0, whose
// report counts).
template <class T>
void run_distributed(const Fixture& fixture, Report& report, model::Layer<T>& whole) {
  const dist::Communicator& ranks = fixture.ranks();
  const auto layer = model::build_layer<T>(fixture.layer(), fixture.config(), fixture.seed(), ParameterInit::zeros, ranks);
  const model::ParameterList<T> mine = layer->parameters(), all = whole.parameters();
  for (std::size_t i = 0; i < mine.size(); ++i) dist::take_block(mine[i], *all[i].tensor, *mine[i].tensor);
  const Tensor<T> x = fixture.read<T>("/input/x");
  model::LayerInputs<T> inputs;
  inputs.x = my_share(ranks, x);
  Generator rng(fixture.seed());
  const model::LayerForward<T> forward = layer->forward(inputs, fixture.training(), rng);
  const double reg_loss = forward.losses.at("reg_loss");
  const Shape out_shape = [&] {
    std::vector<index_t> dims = forward.out.shape().dims();
    dims[0] = x.dim(0);
    return Shape(dims);
  }();
  const Tensor<T> out = whole_batch(ranks, forward.out, out_shape);
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
  const Tensor<T> dx = layer->backward(forward, my_share(ranks, grad_out), static_cast<T>(reg_coef));
  report.compare("/grad/input/x", whole_batch(ranks, dx, x.shape()));
  dist::all_reduce_dense_gradients(ranks, layer->parameters());
  whole.zero_grad();
  for (std::size_t i = 0; i < mine.size(); ++i)
    if (mine[i].grad != nullptr) dist::gather_to_rank0(ranks, mine[i], *mine[i].grad, all[i].grad);
  report.compare_gradients(whole);
}

template <class T>
void run_sigma_moe(const Fixture& fixture, Report& report) {
  const auto layer = build_fixture_layer<T>(fixture);
  load_fixture_parameters(fixture, *layer);
  if (fixture.ranks().distributed()) return run_distributed(fixture, report, *layer);
  model::LayerInputs<T> inputs;
  inputs.x = fixture.read<T>("/input/x");
  Generator rng(fixture.seed());
  const model::LayerForward<T> forward = layer->forward(inputs, fixture.training(), rng);
  const double reg_loss = forward.losses.at("reg_loss");
  report.compare("/output/out", forward.out);
  report.compare_scalar("/output/reg_loss", reg_loss);

  const bool has_loss = fixture.has("/output/loss"), has_grad = fixture.has("/grad");
  if (!has_loss && !has_grad) return;
  const double reg_coef = reg_loss_coefficient(fixture.loss());
  const Tensor<T> grad_out = fixture.read<T>("/input/grad_out", forward.out.shape());
  const Dot d = dot(forward.out, grad_out);
  if (has_loss) {
    report.compare_scalar("/output/loss", d.sum + reg_coef * reg_loss, d.magnitude + std::abs(reg_coef * reg_loss));
  }
  if (!has_grad) return;
  layer->zero_grad();
  report.compare("/grad/input/x", layer->backward(forward, grad_out, static_cast<T>(reg_coef)));
  report.compare_gradients(*layer);
}

template void run_sigma_moe<float>(const Fixture&, Report&);
template void run_sigma_moe<double>(const Fixture&, Report&);

}  // namespace kmoe::parity
