// Soft MoE (Puigcerver et al., arXiv 2308.00951) in its two public PyTorch forms, class SoftMoE of
// zhaozijie2022/soft-moe@5bf98ffddfb7ace8114fb3834e1ad91f1835572f soft_moe.py and of
// lucidrains/soft-moe-pytorch@f3779d58860bb302a45459fc7ab5c5e24005d46c soft_moe_pytorch/soft_moe.py:
//   lite:       zhaozijie2022/soft-moe SoftMoE(d_model, num_experts, num_slots): logits from the raw
//               tokens and φ [dim, E, S]; slots mix the raw tokens; experts are the Mlp
//               (Linear → LayerNorm → ReLU → Linear, orthogonal init with gain 0.01).
//   lucidrains: lucidrains/soft-moe-pytorch SoftMoE(dim, seq_len | num_slots, num_experts, ...):
//               tokens and slot embeddings [E, S, dim] are both RMSNorm-ed (F.normalize · √dim · γ)
//               or LayerNorm-ed (γ, β = 0 buffer); slots mix the NORMALISED tokens; experts are
//               GELU or GEGLU MLPs with dropout.
// Both: logits L[b, n, (e, s)] = ⟨token, slot embedding⟩; dispatch = softmax over tokens n per
// slot, combine = softmax over all E·S slots per token; slots = dispatchᵀ · tokens; the experts
// run as one grouped computation over all slots (soft_moe_experts.hpp); y = combine · expert
// outputs. Masked tokens' logits are set to −max(T) as both references do, so they get zero
// dispatch weight and a uniform combine row (their output is the mean of all slot outputs) —
// or, with MaskedTokenOutput::zeros, a zero output. A fully masked sequence stays finite: every
// slot then averages all of its (masked) tokens, as in the references.
// Dispatch and combine weights below the smallest normal number of T are flushed to 0: they
// change no result by more than rounding, and x86 CPUs multiply denormals ~100x slower.
// Backward: the input gradient (through the logits and the slot contents, and the norms) and
// accumulated gradients of every parameter.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kmoe/core/random.hpp"
#include "kmoe/core/tensor.hpp"
#include "kmoe/dist/communicator.hpp"
#include "kmoe/dist/expert_exchange.hpp"
#include "kmoe/dist/placement.hpp"
#include "kmoe/layers/soft_moe_experts.hpp"
#include "kmoe/model/parameter.hpp"
#include "kmoe/moe/dispatch_plan.hpp"

namespace kmoe::layers {

enum class SoftMoEVariant { lite, lucidrains };
const char* soft_moe_variant_name(SoftMoEVariant variant);

enum class MaskedTokenOutput {
  slot_mean,  // the references: a uniform combine row, i.e. the mean of all slot outputs
  zeros,      // masked tokens output 0 (and pass no gradient back through the combine step)
};

// lucidrains' constructor keywords with its defaults (seq_len and num_slots: 0 means None).
struct LucidrainsSoftMoEOptions {
  index_t seq_len = 0;
  int num_experts = 4;
  index_t num_slots = 0;
  double expert_mult = 4;
  double dropout = 0.0;
  bool geglu = false;
  bool use_layernorm = false;
};

struct SoftMoEConfig {
  SoftMoEVariant variant = SoftMoEVariant::lucidrains;
  index_t dim = 0;  // d_model (lite) / dim (lucidrains)
  int num_experts = 4;
  index_t num_slots = 0;         // slots per expert; 0 = None (lucidrains then takes seq_len / num_experts)
  index_t seq_len = 0;           // lucidrains only; 0 = None. Exactly one of num_slots and seq_len is given.
  bool use_layernorm = false;    // lucidrains: LayerNorm instead of RMSNorm for tokens and slot embeddings
  double layer_norm_eps = 1e-5;  // F.layer_norm's default
  double rms_norm_eps = 1e-12;   // F.normalize's default
  MaskedTokenOutput masked_output = MaskedTokenOutput::slot_mean;
  // The experts; experts.dim and experts.n_experts must equal dim and num_experts.
  SlotExpertConfig experts;

  // zhaozijie2022/soft-moe as its code builds it: experts Mlp(d, d, [d]) = Linear → LayerNorm →
  // ReLU → Linear, orthogonal init (gain 0.01). Its README's experts differ: set
  // experts.output_layer_norm = true and experts.output_activation = relu for those.
  static SoftMoEConfig lite(index_t d_model, int num_experts, index_t num_slots);
  // lucidrains/soft-moe-pytorch: FeedForward (hidden int(dim · mult), GELU) or GLUFeedForward
  // (hidden int(dim · mult · 2/3), GEGLU), dropout after the activation, PyTorch default init.
  static SoftMoEConfig lucidrains(index_t dim, const LucidrainsSoftMoEOptions& options = {});

  // S: num_slots, or seq_len / num_experts (integer division) when num_slots is None.
  index_t slots_per_expert() const;
  index_t total_slots() const { return slots_per_expert() * num_experts; }  // Z = E · S
  bool normalizes() const { return variant == SoftMoEVariant::lucidrains; }
  // Throws Status::invalid_argument naming the field: dim or num_experts < 1; both or neither of
  // num_slots and seq_len (lucidrains) or a seq_len / no num_slots (lite); negative values;
  // seq_len < num_experts (no slots); use_layernorm for lite; eps not finite or ≤ 0; an expert
  // config that is invalid or disagrees with dim / num_experts.
  void validate() const;
};

// Parameters (and, with the same shapes, their gradients). Tensors a variant does not have are
// empty. The expert weights are stacked in the CVMM layout (soft_moe_experts.hpp); visit_parameters
// maps them to the references' per-expert torch layouts.
template <class T>
struct SoftMoEParams {
  Tensor<T> phi;              // lite: [dim, E, S]
  Tensor<T> slot_embeds;      // lucidrains: [E, S, dim]
  Tensor<T> norm_gamma;       // lucidrains: [dim] (state_dict norm.gamma)
  Tensor<T> slot_norm_gamma;  // lucidrains: [dim] (slot_norm.gamma)
  SlotExpertParams<T> experts;

  std::vector<Tensor<T>*> all();  // every non-empty tensor, in a fixed order
};

// Forward options of lucidrains' forward(x, mask, add_noise, noise_mult): Gumbel noise
// mult · (−log(−log u)) added to the logits before masking (no gradient flows into it).
struct SoftMoENoise {
  bool add = false;
  double mult = 1.0;
};

// What forward returns: the output and everything backward needs (also the references' debug
// intermediates).
template <class T>
struct SoftMoEForward {
  Tensor<T> y;  // the shape of x
  bool training = false;

  // Saved for backward. N = batch · tokens, Z = E · S.
  Shape input_shape;
  index_t batch = 0, tokens = 0;
  Tensor<int> mask;                    // [batch, tokens], nonzero = valid; empty when no mask was given
  Tensor<T> x_tokens;                  // [N, dim] the input as token rows (images transposed)
  Tensor<T> tokens_normed;             // [N, dim] what the logits and slots use (= x_tokens for lite)
  Tensor<T> norm_stat_a, norm_stat_b;  // token norm statistics (mean, rstd / scale)
  Tensor<T> slot_embeds_normed;        // [Z, dim] lucidrains (empty for lite)
  Tensor<T> slot_norm_stat_a, slot_norm_stat_b;
  Tensor<T> logits;    // [batch, tokens, Z], masked entries −max(T)
  Tensor<T> dispatch;  // [batch, tokens, Z] softmax over tokens
  Tensor<T> combine;   // [batch, tokens, Z] softmax over Z (zero rows for masked tokens with zeros)
  Tensor<T> slots;     // [batch · Z, dim] expert inputs, row (b · E + e) · S + s
  Tensor<T> slot_outputs;  // [batch · Z, dim] the expert outputs, back from their owners
  // The experts' side (dist/expert_exchange.hpp): the R slot rows this rank's experts received
  // (its own slots, with one rank) and the plan over them in local expert ids.
  dist::ExpertExchange exchange;
  moe::DispatchPlan plan;
  SlotExpertForward<T> experts;  // on the R received rows
};

template <class T>
class SoftMoE {
 public:
  using value_type = T;
  // Parameters initialised as the reference: φ / slot_embeds ~ N(0, 1), norm γ = 1, β = 0,
  // experts as config.experts.init; drawn from Generator(seed). Throws on an invalid config.
  // With a communicator of W ranks the experts are placed over them (dist/placement.hpp; W > E:
  // shards of their hidden units, not available for experts with an output LayerNorm, output
  // activation or residual): this rank keeps its block of the one-rank initialisation; φ / slot
  // embeddings and norms are on every rank. Every rank brings its own sequences (a rank may bring
  // none); each sequence's slots go to the experts' owners. Forward and backward are collective.
  SoftMoE(const SoftMoEConfig& config, std::uint64_t seed, ParameterInit init = ParameterInit::drawn,
          const dist::Communicator& comm = {});

  const SoftMoEConfig& config() const { return config_; }
  const dist::Communicator& communicator() const { return comm_; }
  const dist::Placement& placement() const { return placement_; }
  SoftMoEParams<T>& params() { return params_; }
  const SoftMoEParams<T>& params() const { return params_; }
  SoftMoEParams<T>& grads() { return grads_; }
  void zero_grad();

  // The registry (model/parameter.hpp): parameters under the reference's state_dict names, the
  // stacked expert tensors with their per-expert torch names (experts.experts.<e>.0.weight, ...),
  // and lucidrains' LayerNorm β buffers ([dim] zeros, norm.beta and slot_norm.beta) with use_layernorm.
  void visit_parameters(const model::ParameterVisitor<T>& visit, const std::string& prefix = "");

  // x: [batch, dim] (one token each), [batch, tokens, dim] or [batch, dim, height, width]
  // (tokens = height · width), as lucidrains accepts. mask: empty, or [batch, tokens] with
  // nonzero = valid token. training enables expert dropout; dropout and noise draw from rng.
  // Throws Status::shape_mismatch on a wrong shape, Status::non_finite on non-finite x.
  SoftMoEForward<T> forward(const Tensor<T>& x, const Tensor<int>& mask, bool training, Generator& rng,
                            const SoftMoENoise& noise = {}) const;
  SoftMoEForward<T> forward(const Tensor<T>& x, bool training, Generator& rng) const {
    return forward(x, Tensor<int>(), training, rng);
  }

  // dy: the shape of forward.y. Returns dx (the shape of x); accumulates every parameter gradient
  // into grads().
  Tensor<T> backward(const SoftMoEForward<T>& forward, const Tensor<T>& dy);

 private:
  // The expert entries of the registry over experts (params_ or grads_ shapes): placed.
  void visit_experts(const model::ParameterVisitor<T>& visit, const std::string& prefix, SlotExpertParams<T>& p,
                     SlotExpertParams<T>& g);

  SoftMoEConfig config_;
  dist::Communicator comm_;
  dist::Placement placement_;
  SlotExpertConfig local_experts_;  // this rank's block: its experts and hidden units
  dist::Communicator shards_;       // the ranks holding shards of this rank's expert (W > E)
  SoftMoEParams<T> params_;
  SoftMoEParams<T> grads_;
  Tensor<T> norm_beta_, slot_norm_beta_;
};

extern template class SoftMoE<float>;
extern template class SoftMoE<double>;

}  // namespace kmoe::layers
