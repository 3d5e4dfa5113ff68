// kmoe-parity runners for lucidrains/st-moe-pytorch: layers "st_moe" (v0.1.8 MoE), "st_moe_block"
// (v0.1.8 SparseMoEBlock), "st_moe_v0014" (v0.0.14 MoE), "hier_moe_v0014" (v0.0.14 HeirarchicalMoE)
// and "st_moe_block_v0014" (v0.0.14 SparseMoEBlock around either); dump format of
// data/golden/st_moe/README.md and data/golden/st_moe_v0014/README.md. The recorded routing draws
// (/input/route_uniform, or _outer / _inner) are replayed.
#include "distributed.hpp"
#include "registry.hpp"

#include "kmoe/layers/sparse_moe_block.hpp"
#include "kmoe/layers/st_moe.hpp"

#include <cmath>
#include <string>
#include <vector>

namespace kmoe::parity {

namespace {

// The differentiated scalar must be sum(out * grad_out) plus the returned losses, unweighted.
void require_known_loss(const Fixture& fixture) {
  const std::string& loss = fixture.loss();
  const std::string expected = fixture.layer().find("v0014") != std::string::npos
                                   ? "sum(out * grad_out) + balance_loss + router_z_loss"
                                   : "sum(out * grad_out) + total_aux_loss";
  require(loss.compare(0, expected.size(), expected) == 0, Status::io_error, "attribute 'loss' is '", loss,
          "'; the ", fixture.layer(), " runner knows only '", expected, "'");
}

// [rows...] → [2, rows...] with row 0 (the never-used first-choice draw) zero.
template <class T>
Tensor<T> with_unused_first_row(const Tensor<T>& second) {
  auto dims = second.shape().dims();
  dims.insert(dims.begin(), 2);
  std::vector<T> values(second.size(), T(0));
  const auto tail = second.to_host();
  values.insert(values.end(), tail.begin(), tail.end());
  return Tensor<T>::from_host("route_uniform", Shape(dims), values);
}

template <class T>
void run_st_moe_family(const Fixture& fixture, Report& report) {
  require_known_loss(fixture);
  const bool v0014 = fixture.layer().find("v0014") != std::string::npos;
  const auto layer = build_fixture_layer<T>(fixture);
  load_fixture_parameters(fixture, *layer);
  const layers::StMoE<T>* flat = layer->template as<layers::StMoE<T>>();
  const layers::StMoEConfig& c = flat ? flat->config() : layer->template as<layers::SparseMoEBlock<T>>()->moe().config();

  model::LayerInputs<T> inputs;
  inputs.x = fixture.read<T>("/input/x");
  if (!v0014) {
    inputs.route_uniform = fixture.read<T>("/input/route_uniform");
  } else if (!c.hierarchical()) {
    inputs.route_uniform = with_unused_first_row(fixture.read<T>("/input/route_uniform"));
  } else {
    inputs.route_uniform = with_unused_first_row(fixture.read<T>("/input/route_uniform_outer"));
    inputs.route_uniform_inner = with_unused_first_row(fixture.read<T>("/input/route_uniform_inner"));
  }
  // No draws: the uniforms are replayed, gate noise is off.
  FixtureRun<T> run = fixture_forward(fixture, *layer, inputs);
  const model::LayerForward<T>& f = run.forward;
  const double total_aux = f.losses.at("total_aux_loss"), balance = f.losses.at("balance_loss"),
               z = f.losses.at("router_z_loss");
  report.compare("/output/out", run.out);
  if (!v0014) {
    report.compare_scalar("/output/total_aux_loss", total_aux);
    report.compare_scalar("/output/balance_loss", balance);
    report.compare_scalar("/output/router_z_loss", z);
  } else {  // v0.0.14 returns the weighted losses
    report.compare_scalar("/output/balance_loss", c.balance_loss_coef * balance);
    report.compare_scalar("/output/router_z_loss", c.router_z_loss_coef * z);
  }

  const Tensor<T> grad_out = fixture.read<T>("/input/grad_out", run.out.shape());
  const Dot d = dot(run.out, grad_out);
  report.compare_scalar("/output/loss", d.sum + total_aux, d.magnitude + std::abs(total_aux));
  if (!fixture.has("/grad")) return;
  report.compare("/grad/input/x", fixture_backward(fixture, run, *layer, grad_out, T(1)));
  report.compare_gradients(*layer);
}

}  // namespace

template <class T>
void run_st_moe(const Fixture& fixture, Report& report) {
  run_st_moe_family<T>(fixture, report);
}

template void run_st_moe<float>(const Fixture&, Report&);
template void run_st_moe<double>(const Fixture&, Report&);

}  // namespace kmoe::parity
