// MoEUT: Mixture-of-Experts Universal Transformers (Csordás et al., NeurIPS 2024), numerically
// faithful to RobertCsordas/moeut@87f04973d3db3ad7cb4ca67a0750241e40210d3c (moeut/moeut.py,
// MoEUT and MoEUTLM) with its bugs fixed:
//
//   MoEUT    x [B, T, d_model] → the residual stream after n_layers layers, plus reg_loss;
//   MoEUTLM  tokens [B, T] → logits [B, T, n_tokens] (embedding → MoEUT → LayerNorm → lm_head).
//
// Layers: group_size distinct "peri-LayerNorm" layers applied in the order A B … A B …, the group
// repeated n_layers / group_size times with shared weights (gradients accumulate over repeats):
//     x̂ = LN1(x);  x = x + Dropout(SwitchHead(q, k, routers ← x̂; values ← x));
//     x = x + σ-MoE(experts ← x, router ← LN2(x)).
// reg_loss (training only, as the original) = entropy_reg · Σ σ-MoE entropies + att_entropy_reg ·
// Σ SwitchHead entropies (v and o selections), each per sequence over time × repeats
// (moe/entropy_regulariser.hpp).
//
// Fixed relative to the original (documented in the README of data/golden/moeut/): an odd rotary
// width rounds down to even (MoEUT_44M: d_head 82 → 40 rotated channels, where the original
// crashes); AttentionMask with no fields disables masking (the original crashes); the KV cache
// rotates new queries at their true positions, so cached decoding equals the full-sequence
// forward (the original rotates them from position 0); n_layers must be a multiple of group_size
// (the original silently drops the rest).
#pragma once

#include "kmoe/core/precision.hpp"
#include "kmoe/core/random.hpp"
#include "kmoe/core/tensor.hpp"
#include "kmoe/layers/sigma_moe.hpp"
#include "kmoe/layers/switchhead_attention.hpp"
#include "kmoe/model/parameter.hpp"
#include "kmoe/moe/entropy_regulariser.hpp"
#include "kmoe/ops/attention.hpp"

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace kmoe::model {
template <class C>
struct Field;
}  // namespace kmoe::model

namespace kmoe::layers {

// MoEUTLM's arguments, names and defaults (MoEUT takes the same minus n_tokens); SwitchHeadRope's
// rotate_fraction and rope_base are fixed there and exposed here.
struct MoEUTConfig {
  index_t n_tokens = 0;  // vocabulary (MoEUTLM only; ignored by MoEUT)
  index_t d_model = 0;
  int n_layers = 0;
  int n_heads = 0;
  int ff_n_experts = 0;
  int att_n_experts = 0;
  index_t d_head = 0;  // 0: d_model / n_heads (the original's None)
  int group_size = 2;
  int ff_k = 8;
  int att_k = 2;
  double ff_expert_dropout = 0.0;
  double att_expert_dropout = 0.0;
  index_t ff_expert_size = 128;
  double dropout = 0.0;  // on the attention output before the residual add
  double entropy_reg = 0.01;
  double att_entropy_reg = 0.001;
  double rotate_fraction = 0.5;
  double rope_base = 10000;
  // kmoe's own option (core/precision.hpp), passed to every layer's σ-MoE and SwitchHead experts:
  // bfloat16 runs their expert GEMMs on bfloat16 operands (a float32 model only).
  Precision precision = Precision::native;

  int n_repeats() const { return n_layers / group_size; }
  index_t head_dim() const { return d_head > 0 ? d_head : d_model / n_heads; }
  // The init std scale √(2 / (repeats · group_size)).
  double init_scale() const;
  SwitchHeadConfig attention_config() const;
  SigmaMoEConfig ffn_config() const;
  // Throws Status::invalid_argument naming the field (sizes < 1, n_layers not a multiple of
  // group_size, k outside [1, experts], probabilities outside [0, 1)); n_tokens is checked by MoEUTLM.
  void validate() const;
};

// MoEUTLM's fields (lm) or MoEUT's (no n_tokens; ff_expert_size required, as the original has no
// default there), under the original's argument names plus kmoe's rotate_fraction and rope_base
// (model/config_fields.hpp).
const std::vector<model::Field<MoEUTConfig>>& moeut_fields(bool lm);

// The published profiles (moeut@87f0497 profiles.py) with n_tokens = the vocabulary:
// "MoEUT_44M", "MoEUT_126M", "MoEUT_244M", "MoEUT_318M", "MoEUT_727M" (as published: d_model
// 1024, 582M parameters with 8000 tokens), "MoEUT_727M_paper" (d_model 1280 as the paper's run,
// sweeps/c4_moeut_gigantic_switchead.yaml: 727M), "MoEUT_1B". Unknown names throw
// Status::invalid_argument listing the known ones.
MoEUTConfig moeut_profile(const std::string& name, index_t n_tokens);
std::vector<std::string> moeut_profile_names();
// Parameter count of MoEUT (lm = false) or MoEUTLM (lm = true) from the config alone.
index_t moeut_parameter_count(const MoEUTConfig& config, bool lm);

// One distinct layer's LayerNorms (state_dict ln1.weight, ln1.bias, ln2.weight, ln2.bias).
template <class T>
struct MoEUTNorms {
  Tensor<T> ln1_weight, ln1_bias, ln2_weight, ln2_bias;  // [d_model]
};

// The KV cache of every absolute layer l = r·group_size + i (the original's MultilayerKVCache).
template <class T>
struct MoEUTCache {
  std::vector<SwitchHeadCache<T>> layers;
  index_t length() const { return layers.empty() ? 0 : layers.front().length(); }
};

// What one application of a distinct layer keeps for backward.
template <class T>
struct MoEUTLayerForward {
  Tensor<T> x_hat, ln1_mean, ln1_rstd;     // LN1(x) [N, D] and its statistics
  SwitchHeadForward<T> attention;
  RngStream dropout_stream;                // the attention-output dropout's draws
  Tensor<T> mid;                           // x + attention [N, D]
  Tensor<T> sel_input, ln2_mean, ln2_rstd; // LN2(mid) [N, D]
  SigmaMoEForward<T> ffn;
};

template <class T>
struct MoEUTForward {
  Tensor<T> out;  // [B, T, d_model]
  T reg_loss = T(0);
  bool training = false;
  bool cached = false;
  bool kept_records = true;  // false: an eval forward for inference (cached, or not for backward)
  // Saved for backward: applications in order (absolute layer l = r·G + i; none unless
  // kept_records), and per distinct layer the regularisers of its R calls (FFN, attention o and v
  // selections).
  std::vector<MoEUTLayerForward<T>> calls;
  std::vector<moe::EntropyRegForward<T>> ffn_reg, att_o_reg, att_v_reg;
};

template <class T>
class MoEUT {
 public:
  using value_type = T;
  // Initialised as the original (moeut@87f0497 MoEUT.reset_parameters, scale √(2/n_layers)) from
  // Generator(seed): SwitchHead and σ-MoE weights with their renormalised routers, LayerNorms 1 / 0.
  // With a communicator of several ranks the σ-MoE FFN experts are placed over them (SigmaMoE);
  // the attention experts, norms and projections are on every rank (their gradients are summed
  // by dist::all_reduce_dense_gradients). Every rank brings its own sequences (at least one).
  MoEUT(const MoEUTConfig& config, std::uint64_t seed, ParameterInit init = ParameterInit::drawn,
        const dist::Communicator& comm = {});

  const MoEUTConfig& config() const { return config_; }
  const dist::Communicator& communicator() const { return comm_; }
  int group_size() const { return config_.group_size; }
  SwitchHeadAttention<T>& attention(int i) { return *attention_[i]; }
  SigmaMoE<T>& ffn(int i) { return *ffn_[i]; }
  MoEUTNorms<T>& norms(int i) { return norms_[i]; }
  MoEUTNorms<T>& norm_grads(int i) { return norm_grads_[i]; }
  // The registry: every parameter and gradient under its state_dict name
  // ("layers.<i>.attention.q.weight", "layers.<i>.ffn.keys", "layers.<i>.ln1.weight", …).
  void visit_parameters(const model::ParameterVisitor<T>& visit, const std::string& prefix = "");
  index_t parameter_count();
  void zero_grad();

  // x [B, T, d_model]. mask: ops::AttentionMask (absent fields = not masked; with a cache its key
  // length is cache length + T). training: expert dropout, dropout and the regulariser (draws
  // from rng). cache: null, or the state to extend (inference: backward refuses). for_backward =
  // false (eval only): keep no layer's records past its call, so the forward's memory is one
  // layer's, not the stack's; backward refuses such a forward (as it does a cached one, which
  // keeps none either). Throws Status::shape_mismatch for a wrong x, mask or cache.
  MoEUTForward<T> forward(const Tensor<T>& x, const ops::AttentionMask& mask, bool training, Generator& rng,
                          MoEUTCache<T>* cache = nullptr, bool for_backward = true) const;

  // dout [B, T, d_model]; dreg_loss: the loss's derivative with respect to reg_loss (1 when the
  // loss adds reg_loss). Returns dx [B, T, d_model]; accumulates every parameter gradient.
  Tensor<T> backward(const MoEUTForward<T>& forward, const Tensor<T>& dout, T dreg_loss);

 private:
  MoEUTConfig config_;
  dist::Communicator comm_;
  std::vector<std::unique_ptr<SwitchHeadAttention<T>>> attention_;
  std::vector<std::unique_ptr<SigmaMoE<T>>> ffn_;
  std::vector<MoEUTNorms<T>> norms_, norm_grads_;
};

template <class T>
struct MoEUTLMForward {
  Tensor<T> logits;  // [B, T, n_tokens]
  T reg_loss = T(0);
  // Saved for backward.
  Tensor<int> tokens;  // [B·T]
  MoEUTForward<T> body;
  Tensor<T> normed, norm_mean, norm_rstd;  // out_norm(body.out) [N, D] and statistics
};

template <class T>
class MoEUTLM {
 public:
  using value_type = T;
  // As the original: embedding N(0, 1/d_model) (kaiming_normal_, fan_in), lm_head U(±1/√d_model)
  // (PyTorch's Linear default) for weight and bias, out_norm 1 / 0. Throws on an invalid config
  // (including n_tokens < 1).
  MoEUTLM(const MoEUTConfig& config, std::uint64_t seed, ParameterInit init = ParameterInit::drawn,
          const dist::Communicator& comm = {});

  const MoEUTConfig& config() const { return config_; }
  const dist::Communicator& communicator() const { return transformer_.communicator(); }
  MoEUT<T>& transformer() { return transformer_; }
  // The registry: "embedding.weight", "transformer.…", "out_norm.…", "lm_head.…".
  void visit_parameters(const model::ParameterVisitor<T>& visit, const std::string& prefix = "");
  index_t parameter_count();
  void zero_grad();

  // tokens [B, T] (ids in [0, n_tokens), else Status::invalid_argument). mask: nullopt = causal
  // (as the original's default); with a cache, the causal mask puts the queries after the cached
  // keys. Other arguments as MoEUT::forward.
  MoEUTLMForward<T> forward(const Tensor<int>& tokens, const std::optional<ops::AttentionMask>& mask, bool training,
                            Generator& rng, MoEUTCache<T>* cache = nullptr, bool for_backward = true) const;

  // dlogits [B, T, n_tokens], dreg_loss as MoEUT::backward. Accumulates every parameter gradient.
  void backward(const MoEUTLMForward<T>& forward, const Tensor<T>& dlogits, T dreg_loss);

  // Greedy decoding with the KV cache: feeds prompt [B, T0], then appends the argmax token
  // n_new times (eval mode). Returns [B, T0 + n_new].
  Tensor<int> generate(const Tensor<int>& prompt, int n_new) const;

 private:
  MoEUTConfig config_;
  MoEUT<T> transformer_;
  Tensor<T> embedding_, lm_head_weight_, lm_head_bias_, out_norm_weight_, out_norm_bias_;
  Tensor<T> embedding_grad_, lm_head_weight_grad_, lm_head_bias_grad_, out_norm_weight_grad_, out_norm_bias_grad_;
};

extern template class MoEUT<float>;
extern template class MoEUT<double>;
extern template class MoEUTLM<float>;
extern template class MoEUTLM<double>;

}  // namespace kmoe::layers
