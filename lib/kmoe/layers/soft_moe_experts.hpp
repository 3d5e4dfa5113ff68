// The experts of a Soft MoE layer, run as ONE grouped computation over all slots: every slot row
// belongs to one expert, a DispatchPlan with one "pair" per slot row groups the rows by expert,
// and each Linear is one CVMM over all experts. Per-expert biases and per-expert LayerNorm
// affines are small row kernels indexed by the row's expert, so the work scales to hundreds of
// experts with no per-expert host loop.
//
// An expert maps a row u [dim] to [dim]:
//     p = u · W1[e] + b1[e]                                  [hidden, or 2·hidden with glu]
//     [p = LayerNorm(p) · γ1[e] + β1[e]]                      hidden_layer_norm
//     a = act(p)   or   a = act(gate) ⊙ value, p = [value | gate]   (glu: GEGLU with gelu)
//     [a = dropout(a)]                                        training, dropout > 0
//     h = u + a  if residual and hidden == dim,  else a
//     q = h · W2[e] + b2[e]                                  [dim]
//     [q = LayerNorm(q) · γ2[e] + β2[e]]                      output_layer_norm
//     y = h + out_act(q)  if residual and hidden == dim,  else out_act(q)
// This covers zhaozijie2022/soft-moe's Mlp(D, D, [D], ...) (ReLU, hidden LayerNorm, optional
// output LayerNorm / output activation / residual; class Mlp of soft_moe.py at
// zhaozijie2022/soft-moe@5bf98ffddfb7ace8114fb3834e1ad91f1835572f) and lucidrains' FeedForward
// and GLUFeedForward (GELU / GEGLU, dropout; soft_moe_pytorch/soft_moe.py at
// lucidrains/soft-moe-pytorch@f3779d58860bb302a45459fc7ab5c5e24005d46c).
//
// Weights are stacked in the CVMM layout [experts, in, out] (the TRANSPOSE of each torch
// nn.Linear weight [out, in]); set_expert_weight / expert_weight convert one expert's matrix.
#pragma once

#include <vector>

#include "kmoe/core/precision.hpp"
#include "kmoe/core/random.hpp"
#include "kmoe/core/tensor.hpp"
#include "kmoe/dist/communicator.hpp"
#include "kmoe/moe/dispatch_plan.hpp"
#include "kmoe/moe/expert_operand.hpp"
#include "kmoe/ops/activations.hpp"

namespace kmoe::layers {

enum class ExpertInit {
  torch_default,        // nn.Linear's default: W, b ~ U(−1/√in, 1/√in); LayerNorm γ = 1, β = 0
  orthogonal_gain_001,  // zhaozijie2022's m_init: W = 0.01 · orthogonal (torch.nn.init.orthogonal_), b = 0
};

struct SlotExpertConfig {
  index_t dim = 0;     // input and output width D
  index_t hidden = 0;  // width after the activation (the second Linear's input)
  int n_experts = 0;
  ops::Activation activation = ops::Activation::gelu;
  bool glu = false;  // the first Linear gives [value | gate] (2·hidden): a = act(gate) ⊙ value
  bool hidden_layer_norm = false;
  bool output_layer_norm = false;
  ops::Activation output_activation = ops::Activation::identity;
  bool residual = false;  // applied where widths agree (hidden == dim), as the lite Mlp does
  double dropout = 0.0;   // on a, in training only
  double layer_norm_eps = 1e-5;
  ExpertInit init = ExpertInit::torch_default;
  // bfloat16: both Linears' GEMMs on bfloat16 operands (core/precision.hpp; T = float only).
  Precision precision = Precision::native;

  index_t first_width() const { return glu ? 2 * hidden : hidden; }
  bool has_residual() const { return residual && hidden == dim; }
  // Throws Status::invalid_argument naming the field: dim, hidden, n_experts < 1; dropout
  // outside [0, 1); layer_norm_eps not finite or ≤ 0.
  void validate() const;
};

// Stacked parameters (and, with the same shapes, their gradients). Norm tensors are empty when
// that LayerNorm is off.
template <class T>
struct SlotExpertParams {
  Tensor<T> w1;                  // [E, dim, first_width]
  Tensor<T> b1;                  // [E, first_width]
  Tensor<T> hidden_norm_weight;  // [E, first_width]
  Tensor<T> hidden_norm_bias;    // [E, first_width]
  Tensor<T> w2;                  // [E, hidden, dim]
  Tensor<T> b2;                  // [E, dim]
  Tensor<T> output_norm_weight;  // [E, dim]
  Tensor<T> output_norm_bias;    // [E, dim]

  // Every non-empty tensor, in a fixed order (for zeroing, optimisers, tests).
  std::vector<Tensor<T>*> all();
};

// Parameters drawn as config.init says from the generator; throws on an invalid config.
template <class T>
SlotExpertParams<T> init_slot_expert_params(const SlotExpertConfig& config, Generator& generator);
// Zero tensors with the shapes of params (empty where params are).
template <class T>
SlotExpertParams<T> zeros_like(const SlotExpertParams<T>& params);

// One plan row per slot row of a [batch, n_experts, slots_per_expert] layout: row
// r = (b · E + e) · S + s belongs to expert e.
moe::DispatchPlan slot_dispatch_plan(index_t batch, int n_experts, index_t slots_per_expert);

// Where a rank's slot experts and rows sit in the whole (dist/placement.hpp). The config a rank's
// experts run with is its own block (n_experts = its experts, hidden = its hidden units); this says
// which part of the whole that is and where its rows are, so that every rank computes its exact
// share: a shard's partial outputs add up to the expert's (the second bias only on the shard at
// hidden unit 0), the hidden LayerNorm's statistics are summed over the expert's shards, and each
// dropout unit draws what it draws in the whole batch.
struct SlotExpertShare {
  index_t hidden_begin = 0;
  index_t hidden_total = 0;  // 0: config.hidden (not sharded)
  // The ranks holding the shards of this rank's expert (they receive the same rows in the same
  // order); one rank when not sharded.
  dist::Communicator shards;
  // The global row of each row (empty: row r is global row r) and the whole batch's row count
  // (0: the rows given).
  View1<const std::int64_t> global_rows;
  std::int64_t total_rows = 0;

  bool output_bias() const { return hidden_begin == 0; }
};

// What the forward returns: the output rows and what backward needs.
template <class T>
struct SlotExpertForward {
  Tensor<T> y;  // [rows, dim]

  // Saved for backward.
  Tensor<T> u;            // [rows, dim] the input rows (the caller's tensor)
  moe::ExpertOperand<T> w1, w2;  // the weights as the expert GEMMs read them
  Tensor<T> first;        // [rows, first_width] u · W1 + b1 (before the hidden LayerNorm)
  Tensor<T> hidden_mean;  // [rows] hidden LayerNorm statistics (empty without it)
  Tensor<T> hidden_rstd;
  Tensor<T> activation_in;  // [rows, first_width] what the activation / GLU ran on
  Tensor<T> h;              // [rows, hidden] the second Linear's input
  Tensor<T> second;         // [rows, dim] h · W2 + b2 (before the output LayerNorm)
  Tensor<T> output_mean;    // [rows] (empty without the output LayerNorm)
  Tensor<T> output_rstd;
  Tensor<T> output_in;   // [rows, dim] what the output activation ran on
  bool dropped = false;  // dropout was applied
  RngStream dropout_stream;
  Tensor<std::int64_t> dropout_keys;  // [rows] the counter of each row's hidden unit 0
  SlotExpertShare share;
};

// u [rows, dim] with rows = plan.n_tokens() (plan with k = 1, e.g. slot_dispatch_plan). training
// enables dropout, drawn from rng. Throws Status::shape_mismatch on mismatched shapes.
// With a share of a whole (above): collective over share.shards when the hidden LayerNorm is on.
// A shard must not have an output LayerNorm, an output activation or the residual (its partial
// outputs would not add up): Status::unsupported.
template <class T>
SlotExpertForward<T> slot_experts_forward(const SlotExpertConfig& config, const SlotExpertParams<T>& params,
                                          const moe::DispatchPlan& plan, const Tensor<T>& u, bool training,
                                          Generator& rng, const SlotExpertShare& share = {});

// dy [rows, dim]. Returns du [rows, dim]; accumulates every parameter gradient into grads.
template <class T>
Tensor<T> slot_experts_backward(const SlotExpertConfig& config, const SlotExpertParams<T>& params,
                                const moe::DispatchPlan& plan, const SlotExpertForward<T>& forward, const Tensor<T>& dy,
                                SlotExpertParams<T>& grads);

// Expert e's matrix of a stacked weight [E, in, out] as a torch nn.Linear weight [out, in], and
// the reverse copy. Throws Status::shape_mismatch / invalid_argument on a wrong shape or expert.
template <class T>
Tensor<T> expert_weight(const Tensor<T>& stacked, int expert);
template <class T>
void set_expert_weight(const Tensor<T>& stacked, int expert, const Tensor<T>& torch_weight);
// Row e of a stacked per-expert vector [E, width] (biases, LayerNorm γ / β), and the reverse copy.
template <class T>
Tensor<T> expert_row(const Tensor<T>& stacked, int expert);
template <class T>
void set_expert_row(const Tensor<T>& stacked, int expert, const Tensor<T>& row);

}  // namespace kmoe::layers
