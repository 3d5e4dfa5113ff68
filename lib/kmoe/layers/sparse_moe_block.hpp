// ST-MoE's SparseMoEBlock (SparseMoEBlock.forward in st_moe_pytorch/st_moe_pytorch.py of
// lucidrains/st-moe-pytorch@d94e65d8a1f50eb5b41efa5317b0d1b17c9dbfad, v0.1.8, and
// lucidrains/st-moe-pytorch@f1a7959278ca01a99908c53081a937d7a3de48fd, v0.0.14):
//   [x = FF_before(x) + x]; x = MoE(RMSNorm(x)) + x; [x = FF_after(x) + x]
// with FF = Expert(dim, hidden_mult 4, prenorm) (a GegluExpert) and the MoE any StMoE (flat or
// hierarchical, either generation). Returns the MoE's losses unchanged.
#pragma once

#include "kmoe/layers/geglu_expert.hpp"
#include "kmoe/layers/st_moe.hpp"

#include <optional>

namespace kmoe::layers {

struct SparseMoEBlockConfig {
  StMoEConfig moe;
  bool add_ff_before = false;
  bool add_ff_after = true;
  void validate() const { moe.validate(); }
};

template <class T>
struct SparseMoEBlockForward {
  Tensor<T> out;  // [batch, n, dim]
  T total_aux_loss = T(0), balance_loss = T(0), router_z_loss = T(0);  // the MoE's

  // Saved for backward (and for inspection).
  std::optional<GegluExpertForward<T>> ff_before, ff_after;
  Tensor<T> residual;   // [tokens, dim] the MoE's residual stream (x after FF_before)
  Tensor<T> moe_input;  // [tokens, dim] RMSNorm(residual), the MoE's input
  Tensor<T> moe_scale;  // [tokens] the RMSNorm's per-row factor
  StMoEForward<T> moe;
};

template <class T>
class SparseMoEBlock {
 public:
  using value_type = T;
  // The MoE from Generator(seed) as StMoE, then RMSNorm γ = 1 and the feed-forwards (seeds derived
  // from seed). Throws on an invalid config.
  // With a communicator the MoE's experts are placed over its ranks (StMoE); the feed-forwards
  // and the norm are on every rank (their gradients are summed over the ranks with the other
  // dense parameters, dist/gradients.hpp).
  SparseMoEBlock(const SparseMoEBlockConfig& config, std::uint64_t seed, ParameterInit init = ParameterInit::drawn,
                 const dist::Communicator& comm = {});

  const SparseMoEBlockConfig& config() const { return config_; }
  const dist::Communicator& communicator() const { return moe_.communicator(); }
  StMoE<T>& moe() { return moe_; }
  const StMoE<T>& moe() const { return moe_; }
  Tensor<T>& moe_prenorm_gamma() { return gamma_; }  // [dim], state_dict moe_prenorm.gamma
  Tensor<T>& moe_prenorm_gamma_grad() { return dgamma_; }
  // Empty unless the config adds them.
  std::optional<GegluExpert<T>>& ff_before() { return ff_before_; }
  std::optional<GegluExpert<T>>& ff_after() { return ff_after_; }
  void zero_grad();
  // The registry: ff_before.*, moe_prenorm.gamma, moe.*, ff_after.* (the original's module names).
  void visit_parameters(const model::ParameterVisitor<T>& visit, const std::string& prefix = "");

  // x [batch, n, dim]; as StMoE::forward (the call's noise and route uniforms go to the MoE).
  SparseMoEBlockForward<T> forward(const Tensor<T>& x, bool training, Generator& rng,
                                   const StMoECall<T>& call = {}) const;
  // dout [batch, n, dim]; aux_weight multiplies total_aux_loss in the differentiated scalar.
  // Returns dx and accumulates every parameter gradient.
  Tensor<T> backward(const SparseMoEBlockForward<T>& forward, const Tensor<T>& dout, T aux_weight);

 private:
  SparseMoEBlockConfig config_;
  StMoE<T> moe_;
  Tensor<T> gamma_, dgamma_;
  std::optional<GegluExpert<T>> ff_before_, ff_after_;
};

extern template class SparseMoEBlock<float>;
extern template class SparseMoEBlock<double>;

}  // namespace kmoe::layers
