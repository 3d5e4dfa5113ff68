// SwitchHead attention (Csordás et al., "SwitchHead", arXiv 2312.07987) as MoEUT's
// SwitchHeadRope (RobertCsordas/moeut@87f04973d3db3ad7cb4ca67a0750241e40210d3c moeut/moeut.py,
// SwitchHeadCore + SwitchHeadRope, RotaryPosEncoding): dense q/k projections, each scaled by
// P^-¼; value and output projections mixed from att_n_experts experts per head, chosen per
// token and head by sigmoid top-k routers
// (sel_v reads the k source, sel_o the q source); RoPE on the first rotary channels of q and k;
// scaled dot-product attention with an AttentionMask. With n_experts == 1 the projections are
// plain linear maps and sel_o is a per-head sigmoid gate on the attention output.
//
// The entropy regulariser is deferred, as in the original: forward returns the router logits
// (sel_hist) and the owner (MoEUT's layer group) computes the per-sequence entropy over time and
// repeats, then hands the gradient of those logits back to backward.
//
// A KV cache makes incremental decoding equal to the full-sequence forward: cached keys (before
// RoPE, as the original caches them) and values are prepended, and the new queries are rotated at
// their true positions Tc … Tc+T−1 (the original rotates them from 0: it computes the RoPE
// position offset before prepending the cache, so the offset is always 0).
#pragma once

#include "kmoe/core/precision.hpp"
#include "kmoe/core/random.hpp"
#include "kmoe/core/tensor.hpp"
#include "kmoe/dist/communicator.hpp"
#include "kmoe/dist/expert_exchange.hpp"
#include "kmoe/dist/placement.hpp"
#include "kmoe/model/parameter.hpp"
#include "kmoe/moe/dispatch_plan.hpp"
#include "kmoe/moe/expert_operand.hpp"
#include "kmoe/ops/attention.hpp"

#include <cstdint>
#include <vector>

namespace kmoe::model {
template <class C>
struct Field;
}  // namespace kmoe::model

namespace kmoe::layers {

// SwitchHeadCore's arguments (state_size, n_heads, n_experts, projection_size, expert_dropout,
// moe_k) and SwitchHeadRope's (rotate_fraction, rope_base). The original's `dropout` (on q) is
// never set by MoEUT and is not supported.
struct SwitchHeadConfig {
  index_t state_size = 0;       // d_model
  int n_heads = 0;
  int n_experts = 0;            // experts per head (1: plain V/O with a sigmoid output gate)
  index_t projection_size = 0;  // d_head; 0: state_size / n_heads (the original's None)
  double expert_dropout = 0.0;
  int moe_k = 2;
  double rotate_fraction = 0.5;
  double rope_base = 10000;
  double init_scale = 1.0;  // MoEUT's √(2 / n_layers): multiplies every init std
  // kmoe's own option (core/precision.hpp): bfloat16 runs the value and output experts' GEMMs on
  // bfloat16 operands (a float32 layer with n_experts > 1); routing, attention and the dense
  // projections stay float32.
  Precision precision = Precision::native;

  index_t d_head() const { return projection_size > 0 ? projection_size : state_size / n_heads; }
  // The rotated channels per head, 2·⌊rotate_fraction·d_head / 2⌋ (even; see ops::rope_rotary_dims).
  int rotary_dims() const;
  // Throws Status::invalid_argument naming the field: state_size, n_heads, n_experts < 1;
  // d_head() < 1; moe_k < 1 or > n_experts (when n_experts > 1); expert_dropout outside [0, 1);
  // rotate_fraction outside [0, 1]; rope_base ≤ 0; init_scale ≤ 0.
  void validate() const;
};

// SwitchHeadConfig's fields (model/config_fields.hpp).
const std::vector<model::Field<SwitchHeadConfig>>& switchhead_fields();

// Parameters (and gradients) under the original's state_dict names (H heads, Ea experts, P = d_head, D = state_size).
template <class T>
struct SwitchHeadParams {
  Tensor<T> q;      // "q.weight" [H·P, D]
  Tensor<T> k;      // "k.weight" [H·P, D]
  Tensor<T> v;      // "v": [H·Ea, D, P] (Ea > 1) or [H·P, D] (Ea = 1, a Linear weight)
  Tensor<T> o;      // "o": [H·Ea, P, D] (Ea > 1) or [D, H·P] (Ea = 1)
  Tensor<T> sel_v;  // "sel_v" [H·Ea, D]; empty when Ea = 1
  Tensor<T> sel_o;  // "sel_o" [H·Ea, D] (Ea > 1) or [H, D] (Ea = 1, the output gate)
};

// One layer's KV cache, the original's {"k", "v"}: [B, H, Tc, P] keys (scaled by P^-¼, before
// RoPE) and values (after expert mixing). Empty tensors = nothing cached yet.
template <class T>
struct SwitchHeadCache {
  Tensor<T> k;
  Tensor<T> v;
  index_t length() const { return k.rank() == 4 ? k.dim(2) : 0; }
};

template <class T>
struct SwitchHeadForward {
  Tensor<T> y;  // [B, T, D]
  bool training = false;
  bool cached = false;  // a cache was given: inference only, backward refuses
  // Router logits for the regulariser (Ea > 1; empty otherwise): [B, T, H, Ea], fp32 in the
  // original (here T). sel_o reads the q source, sel_v the k source.
  Tensor<T> sel_o_logits;
  Tensor<T> sel_v_logits;

  // Saved for backward (N = B·T tokens, ka = moe_k).
  Tensor<T> qk_src, v_src;                  // [N, D] views of the inputs
  Tensor<int> v_local_index, o_local_index; // [N·H, ka] expert within the head
  Tensor<T> v_gates, o_gates;               // [N, H·ka] σ of the selected logits
  // The value and output experts' side (Ea > 1; dist/expert_exchange.hpp): each token goes to
  // the ranks holding its selected experts h·Ea + e (of each a shard of the P head channels when
  // there are more ranks than experts); the rows they received, their gates and the plans over
  // their pairs (k = H·ka) in local expert ids.
  dist::ExpertExchange v_exchange, o_exchange;
  Tensor<T> v_src_received, v_gates_received;      // [Rv, D], [Rv, H·ka]
  Tensor<T> attended_received, o_gates_received;   // [Ro, H·P], [Ro, H·ka]
  moe::DispatchPlan v_plan, o_plan;
  moe::ExpertOperand<T> v_operand, o_operand;  // V and O as the expert GEMMs read them
  Tensor<T> v_pairs;                        // [Rv·H·ka, local P] x_t · V[e] per pair
  Tensor<T> o_gate;                         // [N, H] σ(q_src · sel_oᵀ) (Ea = 1)
  Tensor<T> q_rot, k_rot, v_heads, probs;   // [B,H,T,P], [B,H,Tk,P], [B,H,Tk,P], [B,H,T,Tk]
  Tensor<T> attended;                       // [N, H·P] attention output in token-major rows
};

// The V/O expert weights as the GEMMs read them (moe/expert_operand.hpp).
template <class T>
struct SwitchHeadOperands {
  moe::ExpertOperand<T> v, o;
};

template <class T>
class SwitchHeadAttention {
 public:
  using value_type = T;
  // Parameters initialised as the original (moeut@87f0497 SwitchHeadCore.reset_parameters with
  // s = init_scale): q, k, v N(0, (s/√D)²), o N(0, (s/√(H·P))²), routers N(0, (s/√D)²) with rows
  // renormalised (renorm_rows); drawn from Generator(seed). Throws on an invalid config.
  // comm: the ranks that split the batch; with experts (n_experts > 1) the H·Ea value and output
  // experts are placed over them (dist/placement.hpp; W > H·Ea: shards of the P head channels),
  // q, k and the routers are on every rank. Draws are keyed by the global batch.
  SwitchHeadAttention(const SwitchHeadConfig& config, std::uint64_t seed,
                      ParameterInit init = ParameterInit::drawn, const dist::Communicator& comm = {});

  const SwitchHeadConfig& config() const { return config_; }
  const dist::Communicator& communicator() const { return comm_; }
  const dist::Placement& placement() const { return placement_; }
  SwitchHeadParams<T>& params() { return params_; }
  const SwitchHeadParams<T>& params() const { return params_; }
  SwitchHeadParams<T>& grads() { return grads_; }
  void zero_grad();
  // The registry (model/parameter.hpp): q, k, the routers and (with experts: stacked on axis 0,
  // head channels on axis 2 / 1) v and o; every gradient under the original's
  // state_dict names, prefixed.
  void visit_parameters(const model::ParameterVisitor<T>& visit, const std::string& prefix = "");

  // qk_src [B, T, D] feeds q, k and both routers (MoEUT: LN1(x)); v_src [B, T, D] feeds the
  // value experts (MoEUT: the raw residual x). mask: see ops::AttentionMask (its key length is
  // Tc + T with a cache). training enables expert dropout (draws from rng). cache: null, or the
  // state to extend in place (then the queries sit at positions Tc …). Throws
  // Status::shape_mismatch for inputs, masks or a cache of the wrong shape.
  // operands: the V/O experts' GEMM operands from expert_operands() of this layer (null: made
  // here), for an owner that applies the layer several times with the same weights.
  SwitchHeadForward<T> forward(const Tensor<T>& qk_src, const Tensor<T>& v_src, const ops::AttentionMask& mask,
                               bool training, Generator& rng, SwitchHeadCache<T>* cache = nullptr,
                               const SwitchHeadOperands<T>* operands = nullptr) const;

  // V and O as the expert GEMMs read them now (n_experts > 1; rounded once under
  // Precision::bfloat16; valid until the parameters change).
  SwitchHeadOperands<T> expert_operands() const;

  // Gradients of the inputs (overwritten): dqk_src, dv_src [B, T, D].
  struct InputGrads {
    Tensor<T> dqk_src;
    Tensor<T> dv_src;
  };
  // dy [B, T, D]; dsel_o_logits, dsel_v_logits: the gradients of the returned router logits
  // (from the regulariser), [B, T, H, Ea] or empty for none. Accumulates every parameter gradient.
  // Throws Status::invalid_argument after a cached forward, Status::shape_mismatch on bad shapes.
  InputGrads backward(const SwitchHeadForward<T>& forward, const Tensor<T>& dy, const Tensor<T>& dsel_o_logits,
                      const Tensor<T>& dsel_v_logits);

 private:
  SwitchHeadConfig config_;
  dist::Communicator comm_;
  dist::Placement placement_;  // of the H·Ea experts (n_experts > 1)
  SwitchHeadParams<T> params_;
  SwitchHeadParams<T> grads_;
};

extern template class SwitchHeadAttention<float>;
extern template class SwitchHeadAttention<double>;

}  // namespace kmoe::layers
