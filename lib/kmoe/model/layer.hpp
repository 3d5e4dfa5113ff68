// One type-erased interface over every layer family, built from JSON (model/builder.hpp): forward,
// backward, the parameter registry and the config back as JSON. The parity tool, the checkpoints,
// the C ABI and the drivers all hold layers through it; family-specific calls (KV cache, generate)
// reach the concrete layer through as<L>().
#pragma once

#include "kmoe/core/random.hpp"
#include "kmoe/core/tensor.hpp"
#include "kmoe/dist/communicator.hpp"
#include "kmoe/model/parameter.hpp"
#include "kmoe/ops/attention.hpp"

#include <nlohmann/json.hpp>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <typeinfo>
#include <vector>

namespace kmoe::model {

// The histogram of expert ids (−1 ignored) over n experts, counted on the device:
// LayerForward::expert_counts of one call.
Tensor<std::int64_t> count_experts(const Tensor<int>& expert_index, index_t n);
// a += b, element by element, on the device (a empty: a becomes a copy of b).
void add_counts(Tensor<std::int64_t>& a, const Tensor<std::int64_t>& b);

enum class Dtype { float32, float64 };
const char* dtype_name(Dtype dtype);  // "float32", "float64"
// "float32" / "float64"; anything else throws Status::invalid_argument.
Dtype parse_dtype(const std::string& name);
template <class T>
constexpr Dtype dtype_of() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "layers are float or double");
  return std::is_same_v<T, float> ? Dtype::float32 : Dtype::float64;
}

// What a forward call takes; each family reads the fields it knows and refuses the ones it does not.
template <class T>
struct LayerInputs {
  Tensor<T> x;             // the input ([..., dim]); MoEUTLM: empty
  Tensor<int> tokens;      // MoEUTLM: [B, T] token ids
  Tensor<int> mask;        // Soft MoE: [batch, tokens] nonzero = valid (empty: none)
  // MoEUT / MoEUTLM; nullopt: MoEUT unmasked, MoEUTLM causal (the originals' defaults).
  std::optional<ops::AttentionMask> attention_mask;
  Tensor<T> route_uniform;        // ST-MoE: injected routing draws (empty: drawn from the generator)
  Tensor<T> route_uniform_inner;  // hierarchical ST-MoE's inner gate draws
};

// What forward returns: the main output, the auxiliary losses by their reference names, and the
// family's saved state for backward.
template <class T>
struct LayerForward {
  Tensor<T> out;  // σ-MoE y, ST-MoE / Soft MoE / MoEUT out, MoEUTLM logits
  // Unweighted losses as the family reports them: reg_loss (σ-MoE, MoEUT), balance_loss,
  // router_z_loss and total_aux_loss (ST-MoE).
  std::map<std::string, double> losses;
  // The loss that backward's aux_weight multiplies: reg_loss, or ST-MoE's total_aux_loss; 0 for
  // Soft MoE.
  T aux_loss = T(0);
  bool training = false;
  // (token, expert) pairs of this rank's tokens routed to each global expert, summed over the
  // layer's MoE calls (σ-MoE's, ST-MoE's kept choices of its gate); empty for families that
  // route no tokens (Soft MoE, SwitchHead alone). Drivers report the load balance from it. Kept on
  // the device, so that a step does not wait for it: read it (to_host) only where it is reported.
  Tensor<std::int64_t> expert_counts;
  std::shared_ptr<const void> state;  // the family's forward struct

  // The family's forward struct (layers::SigmaMoEForward<T>, ...); F must be the layer's own.
  template <class F>
  const F& state_as() const {
    require(state != nullptr, Status::invalid_argument, "the forward state is empty");
    return *static_cast<const F*>(state.get());
  }
};

template <class T>
class Layer {
 public:
  using value_type = T;
  virtual ~Layer() = default;

  // The builder's layer kind ("sigma_moe", "moeut_lm", ...) and the config as JSON in the
  // original's argument names, complete (every key, defaults included).
  virtual const std::string& kind() const = 0;
  virtual nlohmann::json config() const = 0;
  static constexpr Dtype dtype() { return dtype_of<T>(); }
  // The ranks the layer's experts are placed over (one rank unless built with a communicator).
  virtual const dist::Communicator& communicator() const = 0;

  // The registry: every parameter, gradient and buffer under its state_dict name.
  virtual void visit_parameters(const ParameterVisitor<T>& visit, const std::string& prefix = "") = 0;
  ParameterList<T> parameters() { return collect_parameters(*this); }
  void zero_grad() { zero_gradients(parameters()); }

  // training enables dropout, stochastic choices and the training losses; every draw comes from rng.
  virtual LayerForward<T> forward(const LayerInputs<T>& inputs, bool training, Generator& rng) const = 0;
  // The out of an eval forward that nothing will differentiate (an inference runner): the same
  // values as forward(inputs, false, rng).out, but families whose forward keeps a record per layer
  // of a stack for backward (MoEUT, MoEUTLM) keep none, so the memory is one layer's.
  virtual Tensor<T> infer(const LayerInputs<T>& inputs, Generator& rng) const { return forward(inputs, false, rng).out; }
  // dout: the gradient of out; aux_weight multiplies forward.aux_loss in the differentiated scalar.
  // Returns the input gradient (empty for MoEUTLM, whose input is token ids) and accumulates every
  // parameter gradient.
  virtual Tensor<T> backward(const LayerForward<T>& forward, const Tensor<T>& dout, T aux_weight) = 0;

  // The concrete layer (layers::SigmaMoE<T>, ...), or null when it is another family.
  template <class L>
  L* as() {
    return static_cast<L*>(concrete(typeid(L)));
  }
  template <class L>
  const L* as() const {
    return static_cast<const L*>(const_cast<Layer*>(this)->concrete(typeid(L)));
  }

 protected:
  virtual void* concrete(const std::type_info& type) = 0;
};

}  // namespace kmoe::model
