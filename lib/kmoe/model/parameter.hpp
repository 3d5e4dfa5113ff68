// The parameter registry: every layer enumerates its parameters, their gradients and its buffers
// as Parameter entries through one traversal, visit_parameters(visitor, prefix), in which
// composites visit their children under a name prefix. Everything that needs "all the weights"
// is built on it: zero_grad, the original's state_dict names (model/state_dict.hpp), checkpoints
// (io/checkpoint.hpp), the AdamW optimiser (model/optimizer.hpp), and later MPI gradient
// synchronisation and the C ABI.
#pragma once

#include "kmoe/core/tensor.hpp"

#include <functional>
#include <string>
#include <vector>

namespace kmoe::model {

enum class ParameterKind {
  dense,   // one tensor shared by every expert (routers, norms, projections, embeddings)
  expert,  // experts stacked along expert_axis: slice i belongs to global expert first_expert + i
  buffer,  // not trained, determined by the config (LayerNorm β = 0, ST-MoE thresholds)
};
const char* parameter_kind_name(ParameterKind kind);

// How the original's PyTorch state_dict holds the tensor.
struct TorchLayout {
  // Empty: one state_dict entry under the parameter's name. Otherwise one entry per expert (the
  // original keeps a module per expert): slice e of the expert axis under per_expert_names[e].
  std::vector<std::string> per_expert_names;
  // The torch tensor (each per-expert slice) is kmoe's with the last two axes swapped: nn.Linear
  // keeps [out, in] where kmoe's grouped GEMMs want [in, out].
  bool transposed = false;
};

template <class T>
struct Parameter {
  // The original's state_dict name ("layers.0.ffn.keys"). A tensor that the original keeps per
  // expert is named with its expert index replaced by '*' ("experts.experts.*.net.0.weight").
  std::string name;
  Tensor<T>* tensor = nullptr;
  Tensor<T>* grad = nullptr;  // null for buffers
  ParameterKind kind = ParameterKind::dense;
  // Expert parameters: the axis that indexes experts, the global index of slice 0, and the
  // axis that MPI sharding of one expert splits (its hidden units; -1 when the tensor has none).
  int expert_axis = -1;
  int first_expert = 0;
  int hidden_axis = -1;
  // An expert split over ranks by its hidden units (dist/placement.hpp) holds hidden units
  // [hidden_begin, hidden_begin + dim(hidden_axis)) of hidden_total; hidden_total −1: all of them.
  index_t hidden_begin = 0;
  index_t hidden_total = -1;
  // The hidden axis may hold several blocks of hidden_total units side by side (a GEGLU's
  // [value | gate] first layer: 2); a shard holds its range of each block. An expert entry without
  // a hidden axis (a GEGLU's output bias) is kept by every shard of its expert, and only the
  // shard at hidden_begin 0 uses and trains it.
  int hidden_blocks = 1;
  // All of the layer's experts along expert_axis (−1: the ones held here are all of them).
  int total_experts = -1;
  TorchLayout torch;

  int local_experts() const { return kind == ParameterKind::expert ? static_cast<int>(tensor->dim(expert_axis)) : 0; }
  // Held here only in part (some experts, or a shard of their hidden units): distributed.
  bool partial() const {
    return kind == ParameterKind::expert &&
           ((total_experts >= 0 && total_experts != local_experts()) ||
            (hidden_total >= 0 && hidden_axis >= 0 && hidden_total * hidden_blocks != tensor->dim(hidden_axis)));
  }
  // The shape of the whole tensor over every rank.
  Shape global_shape() const {
    if (kind != ParameterKind::expert) return tensor->shape();
    std::vector<index_t> dims = tensor->shape().dims();
    if (total_experts >= 0) dims[static_cast<std::size_t>(expert_axis)] = total_experts;
    if (hidden_total >= 0 && hidden_axis >= 0)
      dims[static_cast<std::size_t>(hidden_axis)] = hidden_total * hidden_blocks;
    return Shape(dims);
  }
};

template <class T>
using ParameterVisitor = std::function<void(Parameter<T>&)>;
template <class T>
using ParameterList = std::vector<Parameter<T>>;

// Builders of entries, for the layers' visit_parameters.
template <class T>
Parameter<T> dense_parameter(std::string name, Tensor<T>& tensor, Tensor<T>& grad, TorchLayout torch = {}) {
  Parameter<T> p;
  p.name = std::move(name);
  p.tensor = &tensor;
  p.grad = &grad;
  p.torch = std::move(torch);
  return p;
}

// Experts stacked along axis 0 (the layout of every kmoe expert tensor).
template <class T>
Parameter<T> expert_parameter(std::string name, Tensor<T>& tensor, Tensor<T>& grad, int hidden_axis,
                              TorchLayout torch = {}) {
  Parameter<T> p = dense_parameter(std::move(name), tensor, grad, std::move(torch));
  p.kind = ParameterKind::expert;
  p.expert_axis = 0;
  p.hidden_axis = hidden_axis;
  return p;
}

template <class T>
Parameter<T> buffer_parameter(std::string name, Tensor<T>& tensor) {
  Parameter<T> p;
  p.name = std::move(name);
  p.tensor = &tensor;
  p.kind = ParameterKind::buffer;
  return p;
}

// Per-expert state_dict names: pattern with its '*' replaced by 0 … experts − 1.
std::vector<std::string> per_expert_names(const std::string& pattern, int experts);

// Every entry of a layer (anything with visit_parameters), prefixes applied.
template <class Layer>
auto collect_parameters(Layer& layer, const std::string& prefix = "") {
  using T = typename Layer::value_type;
  ParameterList<T> list;
  layer.visit_parameters([&](Parameter<T>& p) { list.push_back(p); }, prefix);
  return list;
}

// Trainable entries only (dense and expert; no buffers).
template <class T>
ParameterList<T> trainable(const ParameterList<T>& all);

template <class T>
void zero_gradients(const ParameterList<T>& list);

// Total element count of the trainable entries.
template <class T>
index_t parameter_count(const ParameterList<T>& list);

// The entry named `name`, or Status::invalid_argument listing the names.
template <class T>
Parameter<T>& find_parameter(ParameterList<T>& list, const std::string& name);

}  // namespace kmoe::model
