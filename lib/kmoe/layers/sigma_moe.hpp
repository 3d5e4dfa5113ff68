// σ-MoE feed-forward layer (Csordás et al., arXiv 2310.10837), numerically faithful to
// RobertCsordas/moe_layer@c9b9c01c7071fe5c39d1f91ae6f24911fb75adb0 (Triton version,
// triton_src/moe_layer/moe_layer_simple.py, class MoE). Forward: router logits → selection
// activation → [expert dropout] → top-k → gates → CVMM up-projection (+ bias, activation,
// dropout) → CVMM down-projection reduced with the gates (+ o_bias), plus the entropy regulariser
// of the batch-mean router distribution.
// Backward: input gradient and accumulated parameter gradients for every option.
#pragma once

#include "kmoe/core/precision.hpp"
#include "kmoe/core/random.hpp"
#include "kmoe/core/tensor.hpp"
#include "kmoe/dist/communicator.hpp"
#include "kmoe/dist/expert_exchange.hpp"
#include "kmoe/dist/placement.hpp"
#include "kmoe/model/parameter.hpp"
#include "kmoe/moe/dispatch_plan.hpp"
#include "kmoe/moe/entropy_regulariser.hpp"
#include "kmoe/moe/expert_operand.hpp"
#include "kmoe/ops/activations.hpp"

#include <cstdint>
#include <string>
#include <vector>

namespace kmoe::model {
template <class C>
struct Field;
}  // namespace kmoe::model

namespace kmoe::layers {

enum class SelectionMode { sigmoid, softmax, sinkmoid };
// "sigmoid", "softmax", "sinkmoid"; anything else throws Status::invalid_argument.
SelectionMode parse_selection_mode(const std::string& name);
const char* selection_mode_name(SelectionMode mode);

// The original constructor's arguments, names and defaults.
struct SigmaMoEConfig {
  index_t dmodel = 0;
  int n_experts = 0;
  index_t expert_size = 0;
  int k = 0;
  double dropout = 0.0;
  SelectionMode selection_mode = SelectionMode::sigmoid;
  bool activation_after_topk = false;
  ops::Activation activation = ops::Activation::relu;
  bool bias = false;
  index_t v_dim = 0;  // 0: v_dim = dmodel (the original's None)
  int sinkhorn_n_iters = 3;
  double expert_dropout = 0.0;
  double weight_std_scale = 1.0;
  // kmoe's own option (core/precision.hpp): bfloat16 runs the four expert GEMMs of forward and
  // backward on bfloat16 operands (a float32 layer only); routing stays float32.
  Precision precision = Precision::native;

  index_t value_dim() const { return v_dim > 0 ? v_dim : dmodel; }
  // Throws Status::invalid_argument naming the field: dmodel, n_experts, expert_size < 1;
  // k < 1 or k > n_experts (or > 64); dropout or expert_dropout outside [0, 1); v_dim < 0;
  // sinkhorn_n_iters < 0; weight_std_scale ≤ 0 or not finite.
  void validate() const;
};

// SigmaMoEConfig's fields under the original's argument names (model/config_fields.hpp).
const std::vector<model::Field<SigmaMoEConfig>>& sigma_moe_fields();

// Parameters (and, with the same shapes, their gradients) under the original's state_dict names.
template <class T>
struct SigmaMoEParams {
  // Expert tensors hold this rank's experts and hidden units (all of them on one rank).
  Tensor<T> keys;        // [n_experts, dmodel, expert_size]
  Tensor<T> values;      // [n_experts, expert_size, v_dim]
  Tensor<T> expert_sel;  // [n_experts, dmodel]
  Tensor<T> bias;        // [n_experts, expert_size], empty unless config.bias
  Tensor<T> o_bias;      // [v_dim], empty unless config.bias
};

// What forward returns: the outputs and everything backward needs.
template <class T>
struct SigmaMoEForward {
  Tensor<T> y;        // [..., v_dim]
  T reg_loss = T(0);  // entropy regulariser Σ_e p̄_e log p̄_e (train and eval)
  bool training = false;
  // [tokens, n_experts] what top-k ran on (after expert dropout), as the fixtures' /debug/selection_scores.
  Tensor<T> selection_scores;

  // Saved for backward.
  Tensor<T> x;                // [tokens, dmodel] (a view of the caller's input)
  Tensor<T> sel_input;        // [tokens, dmodel] the router's own input (MoEUT), empty when it reads x
  Tensor<T> router_logits;    // [tokens, n_experts] z = (sel_input or x) · expert_selᵀ
  moe::EntropyRegForward<T> regulariser;  // over all tokens of the batch (unset when skipped)
  bool has_regulariser = false;
  Tensor<int> expert_index;   // [tokens, k] selected experts (descending selection score)
  Tensor<T> gates;            // [tokens, k] reduction weights
  // The experts' side (dist/expert_exchange.hpp): the R token rows this rank's experts received
  // (its own tokens, with one rank), their gates, and the plan over their pairs in local expert
  // ids (pairs of experts held elsewhere dropped).
  dist::ExpertExchange exchange;
  Tensor<T> x_received;       // [R, dmodel]
  Tensor<T> gates_received;   // [R, k]
  moe::DispatchPlan plan;
  // Per-pair hidden units in the plan's sorted order (row s = pair plan.sorted_pair()[s]), so the
  // experts' rows stay contiguous between the two projections; in pair order when k = 1.
  Tensor<T> pre_activation;   // [R·k, local expert_size] u = x · keys[e] (+ bias)
  Tensor<T> hidden;           // [R·k, local expert_size] h = dropout(activation(u))
  // keys and values as the expert GEMMs read them (rounded once per forward under
  // Precision::bfloat16, else the parameters).
  moe::ExpertOperand<T> keys_operand, values_operand;
  RngStream dropout_stream;   // the hidden dropout's draws (replayed by backward)
  Tensor<std::int64_t> dropout_keys;  // [R·k] the counter of each hidden row's unit 0
};

// The expert weights as the GEMMs read them (moe/expert_operand.hpp).
template <class T>
struct SigmaMoEOperands {
  moe::ExpertOperand<T> keys, values;
};

// What backward_with_router returns.
template <class T>
struct SigmaMoEInputGrads {
  Tensor<T> dx;          // [..., dmodel]
  Tensor<T> dsel_input;  // [..., dmodel] the router input's gradient; empty when the router read x
};

template <class T>
class SigmaMoE {
 public:
  using value_type = T;
  // Parameters initialised as the original (moe_layer@c9b9c01 MoE.__init__: N(0, (D^-½·wss)²)
  // keys, N(0, ((E·es)^-½·wss)²) values, router rows renormalised by renorm_keep_std, zero
  // biases), drawn from Generator(seed). Throws on an invalid config.
  // With a communicator of W ranks the experts are placed over them (dist/placement.hpp): this
  // rank holds its experts' keys, values and biases (its shard of the hidden units when W > E),
  // drawn as their part of the one-rank initialisation; the router and o_bias are on every rank.
  // Every rank brings its own tokens; forward and backward are collective over comm.
  SigmaMoE(const SigmaMoEConfig& config, std::uint64_t seed, ParameterInit init = ParameterInit::drawn,
           const dist::Communicator& comm = {});

  const SigmaMoEConfig& config() const { return config_; }
  const dist::Communicator& communicator() const { return comm_; }
  const dist::Placement& placement() const { return placement_; }
  SigmaMoEParams<T>& params() { return params_; }
  const SigmaMoEParams<T>& params() const { return params_; }
  SigmaMoEParams<T>& grads() { return grads_; }
  void zero_grad();
  // The registry (model/parameter.hpp): keys and values (experts on axis 0; hidden units on axis 2 and 1), bias,
  // expert_sel and o_bias; every gradient under the original's
  // state_dict names, prefixed.
  void visit_parameters(const model::ParameterVisitor<T>& visit, const std::string& prefix = "");

  // x [..., dmodel] (rank 1-4). training enables expert dropout, hidden dropout and (sinkmoid)
  // Sinkhorn selection; every random draw comes from rng. Non-finite x throws Status::non_finite.
  SigmaMoEForward<T> forward(const Tensor<T>& x, bool training, Generator& rng) const;

  // MoEUT's SigmaMoE: the experts read x, the router reads sel_input (same shape as x, e.g.
  // LN2(x)); otherwise as forward(x, training, rng). sel_input of another shape throws
  // Status::shape_mismatch. batch_regulariser = false skips the entropy regulariser (reg_loss 0;
  // backward then needs reg_coef 0) for an owner that regularises the router logits itself, as
  // MoEUT does over time and repeats: it costs a host synchronisation and an [N, E] tensor.
  // operands: the experts' GEMM operands from expert_operands() of this layer (null: made here),
  // for an owner that applies the layer several times with the same weights.
  SigmaMoEForward<T> forward(const Tensor<T>& x, const Tensor<T>& sel_input, bool training, Generator& rng,
                             bool batch_regulariser = true, const SigmaMoEOperands<T>* operands = nullptr) const;

  // keys and values as the expert GEMMs read them now (rounded once under Precision::bfloat16;
  // valid until the parameters change). MoEUT makes them once per forward for all repeats.
  SigmaMoEOperands<T> expert_operands() const;

  // dy [..., v_dim]; reg_coef multiplies reg_loss in the differentiated loss. Returns dx
  // [..., dmodel] and accumulates every parameter gradient into grads(). After a forward with a
  // sel_input, dx is only the experts' share (use backward_with_router for the router's).
  Tensor<T> backward(const SigmaMoEForward<T>& forward, const Tensor<T>& dy, T reg_coef);

  // backward with an extra gradient for the router logits, drouter_logits [tokens, n_experts]
  // (empty: none; MoEUT's regulariser over time × repeats, computed by the owner from the saved
  // router_logits), and the router input's gradient returned separately when forward had a sel_input.
  SigmaMoEInputGrads<T> backward_with_router(const SigmaMoEForward<T>& forward, const Tensor<T>& dy, T reg_coef,
                                             const Tensor<T>& drouter_logits);

 private:
  SigmaMoEConfig config_;
  dist::Communicator comm_;
  dist::Placement placement_;
  SigmaMoEParams<T> params_;
  SigmaMoEParams<T> grads_;
};

extern template class SigmaMoE<float>;
extern template class SigmaMoE<double>;

}  // namespace kmoe::layers
