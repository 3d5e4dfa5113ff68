// The original's PyTorch state_dict, computed from the registry: the one mapping between kmoe's
// tensors and the reference's names and layouts (per-expert modules ↔ stacked expert tensors,
// nn.Linear's [out, in] ↔ kmoe's [in, out]). The parity tool, safetensors import and the tests
// all go through it.
#pragma once

#include "kmoe/model/parameter.hpp"

#include <map>
#include <string>
#include <vector>

namespace kmoe::model {

// A tensor on the host in the reference's shape and row-major layout.
struct HostTensor {
  Shape shape;
  std::vector<double> values;
};
using StateDict = std::map<std::string, HostTensor>;

// One state_dict entry of a parameter: its torch name and shape, and which expert slice it is
// (-1: the whole tensor).
struct TorchEntry {
  std::string name;
  Shape shape;
  int expert = -1;
};
template <class T>
std::vector<TorchEntry> torch_entries(const Parameter<T>& parameter);

enum class StateOf { parameters, gradients };

// Every entry of the list (buffers too, for parameters) under its torch name.
template <class T>
StateDict state_dict(const ParameterList<T>& list, StateOf what = StateOf::parameters);

// Sets parameters from state (by torch name, in the torch shape). A name that is not one of the
// list's, a wrong shape or a non-finite value throws naming the entry (Status::invalid_argument,
// shape_mismatch, non_finite). Buffers are not overwritten: their values must equal the layer's
// (which its config determines) within 1e-6 relative, else Status::invalid_argument. With
// require_complete, every trainable entry of the list must be present (Status::invalid_argument
// naming the missing ones); otherwise entries (and experts of a stacked tensor) not given keep their values.
template <class T>
void load_state_dict(const ParameterList<T>& list, const StateDict& state, bool require_complete);

}  // namespace kmoe::model
