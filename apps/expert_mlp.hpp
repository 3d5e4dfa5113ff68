// The σ-MoE expert MLP as the demo and the benchmark run it, built only from kmoe's shared
// pieces: top-k routing → DispatchPlan → CVMM up-projection → ReLU → CVMM down-projection
// reduced with the gates, and the matching backward. W is the GEMMs' operand type (T, or bfloat16
// for mixed precision: the expert weights rounded once, everything else in T).
#pragma once

#include "options.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/core/tensor.hpp"
#include "kmoe/moe/cvmm.hpp"
#include "kmoe/moe/dispatch_plan.hpp"
#include "kmoe/ops/activations.hpp"
#include "kmoe/ops/topk.hpp"

#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace kmoe::apps {

struct ExpertMlpShape {
  index_t tokens = 2048;
  index_t dmodel = 512;
  int experts = 64;
  index_t expert_size = 128;
  int k = 4;

  // Multiply-adds × 2 of the active experts only: up and down projection of every pair.
  double forward_flops() const { return 4.0 * tokens * k * dmodel * expert_size; }
  // Input and weight gradients of both projections.
  double backward_flops() const { return 2.0 * forward_flops(); }
  std::string str() const {
    return "tokens " + std::to_string(tokens) + ", dmodel " + std::to_string(dmodel) + ", experts " +
           std::to_string(experts) + ", expert_size " + std::to_string(expert_size) + ", k " + std::to_string(k);
  }
};

// Overrides the fields of `shape` from the options --tokens, --dmodel, --experts, --expert-size
// and --k; any other option throws.
inline ExpertMlpShape shape_from_options(const Options& options, ExpertMlpShape shape, const std::string& app) {
  for (const auto& [key, value] : options) {
    require(key == "--tokens" || key == "--dmodel" || key == "--experts" || key == "--expert-size" || key == "--k",
            Status::invalid_argument, app, ": unknown option ", key, " (--tokens, --dmodel, --experts, --expert-size, --k)");
  }
  shape.tokens = positive_option(options, "--tokens", shape.tokens, app);
  shape.dmodel = positive_option(options, "--dmodel", shape.dmodel, app);
  shape.experts = static_cast<int>(positive_option(options, "--experts", shape.experts, app));
  shape.expert_size = positive_option(options, "--expert-size", shape.expert_size, app);
  shape.k = static_cast<int>(positive_option(options, "--k", shape.k, app));
  require(shape.k <= shape.experts, Status::invalid_argument, app, ": k = ", shape.k, " exceeds experts = ",
          shape.experts);
  return shape;
}

template <class T>
std::vector<T> random_vector(std::size_t n, std::mt19937_64& gen, double scale) {
  std::normal_distribution<double> dist(0.0, scale);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(dist(gen));
  return v;
}

template <class T, class W = T>
struct ExpertMlp {
  ExpertMlpShape shape;
  Tensor<T> x, keys, values, gates, scores, dy;           // inputs and parameters
  Tensor<W> key_operands, value_operands;                 // keys and values as the GEMMs read them
  Tensor<int> expert_index;
  Tensor<T> h_pre, h, y;                                   // forward results kept for backward
  Tensor<T> dx, dkeys, dvalues, dgates, dh;                // gradients
  moe::DispatchPlan plan;

  ExpertMlp(const ExpertMlpShape& s, std::uint64_t seed) : shape(s) {
    std::mt19937_64 gen(seed);
    const index_t pairs = s.tokens * s.k;
    x = Tensor<T>::from_host("x", {s.tokens, s.dmodel}, random_vector<T>(s.tokens * s.dmodel, gen, 1.0));
    keys = Tensor<T>::from_host("keys", {s.experts, s.dmodel, s.expert_size},
                                random_vector<T>(s.experts * s.dmodel * s.expert_size, gen, 1.0 / std::sqrt(s.dmodel)));
    values = Tensor<T>::from_host("values", {s.experts, s.expert_size, s.dmodel},
                                  random_vector<T>(s.experts * s.expert_size * s.dmodel, gen,
                                                   1.0 / std::sqrt(s.expert_size)));
    scores = Tensor<T>::from_host("scores", {s.tokens, s.experts}, random_vector<T>(s.tokens * s.experts, gen, 1.0));
    dy = Tensor<T>::from_host("dy", {s.tokens, s.dmodel}, random_vector<T>(s.tokens * s.dmodel, gen, 1.0));
    gates = Tensor<T>("gates", {s.tokens, s.k});
    expert_index = Tensor<int>("expert_index", {s.tokens, s.k});
    h_pre = Tensor<T>("h_pre", {pairs, s.expert_size});
    h = Tensor<T>("h", {pairs, s.expert_size});
    y = Tensor<T>("y", {s.tokens, s.dmodel});
    dx = Tensor<T>("dx", {s.tokens, s.dmodel});
    dkeys = Tensor<T>("dkeys", keys.shape());
    dvalues = Tensor<T>("dvalues", values.shape());
    dgates = Tensor<T>("dgates", {s.tokens, s.k});
    dh = Tensor<T>("dh", {pairs, s.expert_size});
    if constexpr (std::is_same_v<T, W>) {
      key_operands = keys;
      value_operands = values;
    } else {
      key_operands = convert_tensor<W>(keys, "keys_operand");
      value_operands = convert_tensor<W>(values, "values_operand");
    }
  }

  // Routing: top-k of the scores gives the experts and (sigmoid-free, for simplicity) the gates.
  void route() {
    ops::topk_forward<T>(scores.template view<2>(), shape.k, ops::TopkOrder::descending, gates.template view<2>(),
                         expert_index.template view<2>());
    plan = moe::DispatchPlan::build(expert_index.template view<2>(), shape.experts);
  }

  void forward() {
    moe::cvmm_forward<T, W>(plan, x.template view<2>(), key_operands.template view<3>(), h_pre.template view<2>());
    ops::activation_forward<T>(ops::Activation::relu, h_pre.flat(), h.flat());
    moe::cvmm_forward_reduced<T, W>(plan, h.template view<2>(), value_operands.template view<3>(),
                                    gates.template view<2>(), y.template view<2>());
  }

  void backward() {
    moe::cvmm_backward_reduced<T, W>(plan, h.template view<2>(), value_operands.template view<3>(),
                                     gates.template view<2>(), dy.template view<2>(), dh.template view<2>(),
                                     dvalues.template view<3>(), dgates.template view<2>());
    ops::activation_backward<T>(ops::Activation::relu, h_pre.flat(), dh.flat(), dh.flat());
    moe::cvmm_backward<T, W>(plan, x.template view<2>(), key_operands.template view<3>(), dh.template view<2>(),
                             dx.template view<2>(), dkeys.template view<3>());
  }
};

}  // namespace kmoe::apps
