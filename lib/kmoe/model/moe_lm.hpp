// moe_lm: a language model of transformer blocks whose feed-forward is a σ-MoE or an ST-MoE —
// the driver's other LM besides MoEUTLM:
//
//   h = embedding[tokens] + position[t]
//   per block: h += Wo · attention(LN1(h) Wq, LN1(h) Wk, LN1(h) Wv) (causal, n_heads heads)
//              h += moe(LN2(h))
//   logits = LN_f(h) · lm_headᵀ
//
// tokens [B, T] (T ≤ max_seq_len) → logits [B, T, n_tokens]. The MoE layers are the builder's
// sigma_moe or st_moe ([B, T, d_model] sequences), placed over the ranks like the layer alone;
// everything else is dense. Config: {"n_tokens", "d_model", "n_layers", "n_heads", "max_seq_len",
// "moe_kind", "moe": the MoE's config (its width set to d_model), "norm_eps"}. Registry:
// embedding.weight, position.weight, blocks.<b>.{ln1, ln2}.{weight, bias},
// blocks.<b>.attention.{q, k, v, o}.weight, blocks.<b>.moe.<the MoE's names>, out_norm.{weight,
// bias}, lm_head.weight. The auxiliary loss is the sum of the blocks'.
#pragma once

#include "kmoe/model/layer.hpp"

#include <memory>
#include <string>

namespace kmoe::model {

struct MoELMConfig {
  index_t n_tokens = 0, d_model = 0, max_seq_len = 0;
  int n_layers = 1, n_heads = 1;
  std::string moe_kind = "sigma_moe";
  nlohmann::json moe = nlohmann::json::object();
  double norm_eps = 1e-5;
};

MoELMConfig read_moe_lm_config(const nlohmann::json& json);

template <class T>
std::unique_ptr<Layer<T>> make_moe_lm(const MoELMConfig& config, std::uint64_t seed, ParameterInit init,
                                      const dist::Communicator& comm);

}  // namespace kmoe::model
