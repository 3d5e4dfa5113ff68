// ST-MoE's top-n gating with expert capacity (Zoph et al., arXiv 2202.08906), as lucidrains'
// st-moe-pytorch implements it in st_moe_pytorch/st_moe_pytorch.py: TopNGating of v0.1.8
// (lucidrains/st-moe-pytorch@d94e65d8a1f50eb5b41efa5317b0d1b17c9dbfad, TopNGating.forward) and,
// through options, Top2Gating of v0.0.14
// (lucidrains/st-moe-pytorch@f1a7959278ca01a99908c53081a937d7a3de48fd, Top2Gating.forward),
// including its "importance" input of the hierarchical MoE.
//
// Tokens come in groups (a sequence, or a group's capacity slots); capacity and slot positions are
// per group. For each token, on probabilities p = softmax(logits [+ Gumbel noise]):
//   1. the top-n experts, best first, with values v_i = p[idx_i];
//   2. normalised gates ĝ_i = v_i / max(Σ v, eps)  (v0.0.14: v_i / (Σ v + eps));
//   3. choice 0 is always routed; choice i ≥ 1 is routed iff U_i < ĝ_i / max(τ_i, eps), with U_i a
//      uniform draw (injected, or from the caller's RngStream) — in training AND eval;
//   4. capacity C = max(min(n, ⌊n·cf/E⌋), 4) per expert and group; slots are given in priority
//      order: all routed first choices in sequence order, then all second choices, …; a choice whose
//      slot would be ≥ C is dropped;
//   5. the kept gate is ĝ_i (not renormalised after dropping), 0 for a choice not kept.
// Losses (training only): balance = E²·mean_{group,e}(mean_t p[t,e] · density[group,e]) with
// density the fraction of the group's first choices at e after capacity (v0.1.8, a side effect of an
// in-place update there) or before it (mesh-tensorflow, v0.0.14); router z-loss = mean_t LSE(logits)².
//
// Importance (v0.0.14 HeirarchicalMoE, top-2 only), per token ∈ {0, 0.5, 1}: a token with
// importance ≠ 1 has no first choice (its ĝ uses v_1 = 0) and its second choice is its best expert;
// importance 0 routes nothing; the balance proxy and the z-loss count only tokens of importance 1
// (z-loss averaged over their count).
//
// Outputs are per choice in [tokens, top_n] matrices; the backward maps gradients of the kept
// gates (and the loss coefficients) to gradients of the logits. Everything has a fixed summation
// order (bit-reproducible across thread counts).
#pragma once

#include "kmoe/core/random.hpp"
#include "kmoe/core/tensor.hpp"
#include "kmoe/dist/communicator.hpp"

#include <vector>

namespace kmoe::moe {

// Which first-choice counts the balance loss uses.
enum class BalanceDensity {
  after_capacity,   // v0.1.8 (the original's default behaviour): first choices that kept a slot
  before_capacity,  // mesh-tensorflow / tensor2tensor / v0.0.14: every first choice
};

// How the top-n values become gates.
enum class GateNormalisation {
  clamped_sum,   // v0.1.8: v / max(Σ v, eps) (with top_n = 1 every gate is exactly 1)
  sum_plus_eps,  // v0.0.14: v / (Σ v + eps)
  none,          // the probabilities themselves (Switch Transformer's top-1 gate)
};

constexpr int min_expert_capacity = 4;  // the original's MIN_EXPERT_CAPACITY

struct TopNGatingOptions {
  int num_gates = 0;                // E, the experts routed to
  int top_n = 2;                    // choices per token, 1 ≤ top_n ≤ min(E, 64)
  std::vector<double> thresholds;   // τ of choices 1 … top_n − 1 (top_n − 1 values) in the current mode
  double capacity_factor = 1.25;    // cf in the current mode
  double eps = 1e-9;
  BalanceDensity balance_density = BalanceDensity::after_capacity;
  GateNormalisation normalisation = GateNormalisation::clamped_sum;
  bool compute_losses = false;      // training: balance and z-loss; eval: both 0

  // Throws Status::invalid_argument naming the field: num_gates < 1; top_n < 1, > num_gates or > 64;
  // thresholds not top_n − 1 values or a threshold not finite and > 0; capacity_factor not finite or
  // negative; eps not finite and > 0.
  void validate() const;
  // C = max(min(n, ⌊n·cf/E⌋), 4) for groups of n tokens.
  index_t capacity(index_t group_size) const;
};

// What the gating decided, and what its backward needs.
template <class T>
struct TopNRouting {
  index_t groups = 0, group_size = 0;  // tokens = groups · group_size, group-major
  index_t capacity = 0;
  Tensor<T> logits;          // [tokens, E] the un-noised logits (a view of the caller's tensor)
  Tensor<T> probs;           // [tokens, E] raw_gates = softmax(logits [+ noise])
  Tensor<T> logit_lse;       // [tokens] logsumexp of the un-noised logits
  Tensor<int> choice_index;  // [tokens, top_n] expert of each choice (before routing and capacity)
  Tensor<T> choice_value;    // [tokens, top_n] v_i = p[choice_index] (0 for an absent first choice)
  Tensor<T> normalised_gate; // [tokens, top_n] ĝ_i, before routing and capacity
  Tensor<int> expert_index;  // [tokens, top_n] expert of each kept choice, −1 where not routed or dropped
  Tensor<int> position;      // [tokens, top_n] slot of each kept choice in its expert, −1 where not kept
  Tensor<T> gate;            // [tokens, top_n] ĝ_i of kept choices, 0 elsewhere
  Tensor<T> density;         // [groups, E] the balance loss's first-choice fractions
  Tensor<T> importance;      // [tokens] as given (empty: none)
  double z_loss_count = 0;   // the z-loss's denominator: tokens, or max(#importance-1 tokens, 1e-5)
  index_t loss_groups = 0;   // the balance loss's groups (every rank's)
  T balance_loss = T(0);     // unweighted; 0 in eval
  T router_z_loss = T(0);    // unweighted; 0 in eval
};

// logits [groups, group_size, E]. noise: [groups, group_size, E] added to the logits before the
// softmax, or empty. importance: [groups, group_size] with values 0, 0.5 or 1, or empty (top_n must
// be 2 with importance). route_uniform: [top_n, tokens] (row i = U_i, row 0 unused, as the original
// draws them) or empty, in which case U_i(t) = routing.uniform(i · tokens + t). Throws
// Status::shape_mismatch on a wrong extent and Status::invalid_argument on invalid options.
// With a communicator of several ranks the groups are this rank's share of a batch split by
// groups: the losses are means over every rank's groups and tokens (collective; a rank may then
// bring no groups), everything else stays per group.
template <class T>
TopNRouting<T> top_n_gating_forward(const TopNGatingOptions& options, const Tensor<T>& logits,
                                    const Tensor<T>& noise, const Tensor<T>& importance,
                                    const Tensor<T>& route_uniform, const RngStream& routing,
                                    const dist::Communicator& comm = {});

// dgate [tokens, top_n]: gradient of the kept gates (entries of choices not kept are ignored).
// balance_coef, z_coef: the losses' weights in the differentiated scalar (ignored in eval, where
// the losses are constants). Returns dlogits [tokens, E] (the un-noised logits; the noise is additive).
template <class T>
Tensor<T> top_n_gating_backward(const TopNGatingOptions& options, const TopNRouting<T>& routing,
                                const Tensor<T>& dgate, T balance_coef, T z_coef);

// Gumbel noise −log(−log U) with log(t) = log(max(t, 1e-20)), U = stream.uniform(i) for element i,
// times noise_mult: the original's gate noise. Shape as given.
template <class T>
Tensor<T> gumbel_noise(const Shape& shape, const RngStream& stream, T noise_mult);

}  // namespace kmoe::moe
