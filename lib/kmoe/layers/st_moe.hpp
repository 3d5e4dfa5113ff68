// ST-MoE mixture-of-experts layer (Zoph et al., arXiv 2202.08906), numerically faithful to
// lucidrains/st-moe-pytorch v0.1.8 (`MoE` in st_moe_pytorch/st_moe_pytorch.py at
// lucidrains/st-moe-pytorch@d94e65d8a1f50eb5b41efa5317b0d1b17c9dbfad) and, by configuration, to
// its older generation v0.0.14 (`MoE` and the two-level `HeirarchicalMoE` in the same file at
// lucidrains/st-moe-pytorch@f1a7959278ca01a99908c53081a937d7a3de48fd).
//
// Forward: router logits x·W_gᵀ → top-n gating with stochastic routing of the choices after the
// first and per-sequence expert capacity (moe/top_n_gating.hpp) → the kept (token, choice) pairs
// dispatched by index through a DispatchPlan (no dense [batch, n, experts, capacity] tensors) →
// GEGLU experts (CVMM) → outputs combined with the kept gates: y_t = Σ_i ĝ_i keep_i f_{e_i}(x_t).
// Hierarchical: an outer top-2 gate picks expert groups and capacity slots; each group's slots are
// routed by its own inner top-2 gate (importance 1 for slots holding a first choice, 0.5 for a
// second choice, 0 for empty slots) to its experts; outputs are combined back through both gates.
// Training adds the balance loss and the router z-loss (zero in eval).
//
// Backward: input gradient and accumulated parameter gradients, including the auxiliary losses
// and, with straight_through_dispatch_tensor, the router's gradient through the expert inputs
// (the original's dispatch + combine − combine.detach()).
#pragma once

#include "kmoe/core/precision.hpp"
#include "kmoe/core/random.hpp"
#include "kmoe/core/tensor.hpp"
#include "kmoe/dist/communicator.hpp"
#include "kmoe/dist/expert_exchange.hpp"
#include "kmoe/dist/placement.hpp"
#include "kmoe/layers/geglu_expert.hpp"
#include "kmoe/moe/dispatch_plan.hpp"
#include "kmoe/moe/top_n_gating.hpp"

#include <cstdint>
#include <vector>

namespace kmoe::model {
template <class C>
struct Field;
}  // namespace kmoe::model

namespace kmoe::layers {

enum class RouterInit {
  linear_default,  // v0.1.8 nn.Linear(dim, E, bias=False): U(±1/√dim)
  standard_normal, // v0.0.14 torch.randn: N(0, 1)
};

// Which st-moe-pytorch generation's state_dict names the parameters carry.
enum class StMoEGeneration { v0_1_8, v0_0_14 };

// The original constructor's arguments (v0.1.8 names and defaults), plus the switches that select
// the v0.0.14 semantics (StMoEV0014Config::to_config sets them) and the hierarchy.
struct StMoEConfig {
  index_t dim = 0;
  int num_experts = 16;          // experts; hierarchical: expert groups (the outer gate's E)
  int num_experts_inner = 0;     // > 0: HeirarchicalMoE with num_experts groups of this many experts
  double expert_hidden_mult = 4;
  // τ of the choices after the first: one value for all of them, or top_n − 1 values.
  std::vector<double> threshold_train = {0.2};
  std::vector<double> threshold_eval = {0.2};
  double capacity_factor_train = 1.25;
  double capacity_factor_eval = 2.0;
  int gating_top_n = 2;          // 1 (Switch-style; the original refuses it) … min(num_experts, 64)
  double balance_loss_coef = 1e-2;
  double router_z_loss_coef = 1e-3;
  bool straight_through_dispatch_tensor = true;  // v0.0.14: !detached_dispatch_tensor
  moe::BalanceDensity balance_density = moe::BalanceDensity::after_capacity;  // v0.0.14: before_capacity
  moe::GateNormalisation gate_normalisation = moe::GateNormalisation::clamped_sum;  // v0.0.14: sum_plus_eps
  RouterInit router_init = RouterInit::linear_default;  // v0.0.14: standard_normal
  StMoEGeneration generation = StMoEGeneration::v0_1_8;  // v0.0.14: its state_dict names, no threshold buffers
  // kmoe's own option (core/precision.hpp): bfloat16 runs the GEGLU experts' GEMMs on bfloat16
  // operands (a float32 layer only); the gates, losses and combine stay float32.
  Precision precision = Precision::native;

  bool hierarchical() const { return num_experts_inner > 0; }
  int total_experts() const { return hierarchical() ? num_experts * num_experts_inner : num_experts; }
  index_t expert_hidden() const;  // int(dim · expert_hidden_mult · 2/3)
  // The gate options of the (outer) gate or of the inner gate in the given mode.
  moe::TopNGatingOptions gating_options(bool training, bool inner = false) const;
  // Throws Status::invalid_argument naming the field: dim < 1; num_experts < 1; num_experts_inner < 0;
  // gating_top_n < 1 or > num_experts (or the inner count) or > 64; gating_top_n ≠ 2 when hierarchical;
  // a threshold list that is neither one value nor top_n − 1 values, or a threshold ≤ 0 or not finite;
  // a capacity factor < 0 or not finite; a loss coefficient not finite; a hidden size < 1.
  void validate() const;
};

// The v0.1.8 MoE's arguments (model/config_fields.hpp); the original's experts,
// differentiable_topk and is_distributed are accepted only with values that leave the
// computation as kmoe implements it.
const std::vector<model::Field<StMoEConfig>>& st_moe_fields();

// st-moe-pytorch v0.0.14's MoE / HeirarchicalMoE arguments (names and defaults as there; a
// hierarchy is num_experts = (num_experts, num_experts_inner), the original's default (4, 4)).
struct StMoEV0014Config {
  index_t dim = 0;
  int num_experts = 16;
  int num_experts_inner = 0;  // > 0: HeirarchicalMoE
  double expert_hidden_mult = 4;
  double second_threshold_train = 0.2;
  double second_threshold_eval = 0.2;
  double capacity_factor_train = 1.25;
  double capacity_factor_eval = 2.0;
  double loss_coef = 1e-2;
  double router_z_loss_coef = 1e-3;
  bool detached_dispatch_tensor = true;

  // Top-2 gating with density before capacity, gates v/(Σv + eps), N(0,1) router init. The
  // second choices' slot offset is the count of kept first choices (upstream's fix of v0.0.16; the
  // literal v0.0.14 used their mean, which makes choices collide in slots).
  Precision precision = Precision::native;  // kmoe's own option, as StMoEConfig::precision
  StMoEConfig to_config() const;
};

// Parameters (and, with the same shapes, their gradients).
template <class T>
struct StMoEParams {
  // [num_experts, dim]: v0.1.8 gate.to_gates.weight; v0.0.14 gate.w_gating / gate_outer.w_gating is
  // its transpose [dim, E].
  Tensor<T> router;
  // [num_experts, num_experts_inner, dim], hierarchical only: v0.0.14 gate_inner.w_gating [O, dim, I]
  // with each group's matrix transposed.
  Tensor<T> router_inner;
  // total_experts() stacked experts; expert o · num_experts_inner + i is experts.<o>.experts.<i>
  // (flat: experts.experts.<e>); see GegluExpertsParams for the layout.
  GegluExpertsParams<T> experts;
};

// How forward draws its randomness; the route uniforms can be injected to replay a recorded run.
// Drawn ones are keyed by global coordinates (the token's or slot's place in the batch of every
// rank), so any world size draws what one rank draws.
template <class T>
struct StMoECall {
  bool noise_gates = false;  // Gumbel noise on the gate logits (not with the hierarchy)
  double noise_mult = 1.0;
  // [top_n, batch, n] the routing draws U_i of this rank's batch (row 0 unused, as the original
  // draws it), or empty: drawn from the generator.
  Tensor<T> route_uniform;
  // Hierarchical: the inner gate's draws [2, num_experts, batch, outer capacity], or empty.
  Tensor<T> route_uniform_inner;
};

// One routing level: the gate's decisions and where each kept choice's row is.
template <class T>
struct StMoERoutingLevel {
  moe::TopNRouting<T> routing;
  Tensor<int> rows;  // hierarchical outer gate: [tokens, 2] slot row of each kept choice, −1 elsewhere
};

// The experts' stage of a level (dist/expert_exchange.hpp): every row with a kept choice goes to
// the ranks holding its experts, which run them on what they received and send back their share
// of Σ_j ĝ_j f_{e_j}(row). Everything here is on the experts' side: the R received rows.
template <class T>
struct StMoEExpertStage {
  dist::ExpertExchange exchange;
  Tensor<T> x_received;     // [R, dim]
  Tensor<T> gate_received;  // [R, top_n] kept gates (0: not kept)
  Tensor<int> rows;         // [R, top_n] the plan's sorted position of each pair held here, −1 elsewhere
  moe::DispatchPlan plan;   // over the received pairs in local expert ids (others dropped)
  Tensor<T> expert_input;   // [plan pairs, dim] in the plan's sorted order
  Tensor<T> expert_output;  // [plan pairs, dim] in the plan's sorted order
  GegluExpertsSaved<T> experts;
};

// What forward returns: the outputs and everything backward needs.
template <class T>
struct StMoEForward {
  Tensor<T> out;            // [batch, n, dim]
  T balance_loss = T(0);    // unweighted (hierarchical: outer + inner); 0 in eval
  T router_z_loss = T(0);   // unweighted (hierarchical: outer + inner); 0 in eval
  T total_aux_loss = T(0);  // balance_loss_coef · balance_loss + router_z_loss_coef · router_z_loss
  bool training = false;

  // Saved for backward (and for inspection).
  Tensor<T> x;                      // [tokens, dim] (a view of the caller's input)
  StMoERoutingLevel<T> gate;        // the (outer) gate
  StMoERoutingLevel<T> gate_inner;  // hierarchical: the inner gate over the slots
  Tensor<T> slot_input;             // hierarchical [groups · batch · C_outer, dim] (empty slots: 0)
  Tensor<T> slot_output;            // hierarchical [groups · batch · C_outer, dim]
  StMoEExpertStage<T> stage;        // the experts, fed by the tokens (flat) or the slots
};

template <class T>
class StMoE {
 public:
  using value_type = T;
  // Parameters initialised as the original (router per config.router_init; experts as Expert.init_)
  // from Generator(seed). Throws on an invalid config.
  // With a communicator of W ranks the total_experts() experts are placed over them
  // (dist/placement.hpp; W > E: shards of their hidden units): this rank holds its block, drawn as
  // its part of the one-rank initialisation; the routers are on every rank. Every rank brings its
  // own sequences (the same n; a rank may bring none); forward and backward are collective, the
  // balance and z-losses are means over every rank's sequences, capacity stays per sequence.
  StMoE(const StMoEConfig& config, std::uint64_t seed, ParameterInit init = ParameterInit::drawn,
        const dist::Communicator& comm = {});

  const StMoEConfig& config() const { return config_; }
  const dist::Communicator& communicator() const { return comm_; }
  const dist::Placement& placement() const { return placement_; }
  StMoEParams<T>& params() { return params_; }
  const StMoEParams<T>& params() const { return params_; }
  StMoEParams<T>& grads() { return grads_; }
  void zero_grad();
  // The registry: the router(s) (v0.1.8 gate.to_gates.weight; v0.0.14 gate.w_gating, or
  // gate_outer / gate_inner, stored transposed by the original), the stacked experts with their
  // per-expert names (experts.experts.<e>.net.<i>... or experts.<o>.experts.<i>.net...), and
  // v0.1.8's threshold buffers gate.threshold_train / threshold_eval = [eps, τ_1, …].
  void visit_parameters(const model::ParameterVisitor<T>& visit, const std::string& prefix = "");

  // x [batch, n, dim] (each batch row is one routing group; batch 0 on a rank of several). training selects thresholds,
  // capacity factor and losses. Draws (route uniforms unless injected, gate noise) come from rng.
  // Throws Status::shape_mismatch for a wrong x or injected uniform shape, Status::non_finite for
  // non-finite x, Status::invalid_argument for noise_gates with the hierarchy.
  StMoEForward<T> forward(const Tensor<T>& x, bool training, Generator& rng, const StMoECall<T>& call = {}) const;

  // dout [batch, n, dim]; aux_weight multiplies total_aux_loss in the differentiated scalar.
  // Returns dx [batch, n, dim] and accumulates every parameter gradient into grads().
  Tensor<T> backward(const StMoEForward<T>& forward, const Tensor<T>& dout, T aux_weight);

 private:
  StMoEConfig config_;
  dist::Communicator comm_;
  dist::Placement placement_;
  GegluExpertsShare share_;  // this rank's block of the experts
  StMoEParams<T> params_;
  StMoEParams<T> grads_;
  Tensor<T> threshold_train_, threshold_eval_;  // v0.1.8 buffers, from the config
};

extern template class StMoE<float>;
extern template class StMoE<double>;

}  // namespace kmoe::layers
