// A PyTorch state_dict in a .safetensors file ↔ a kmoe layer, through the registry's torch names
// and layouts (model/state_dict.hpp): what kmoe-convert does in both directions.
#pragma once

#include "kmoe/io/safetensors.hpp"
#include "kmoe/model/layer.hpp"

#include <map>
#include <string>

namespace kmoe::io {

// Sets every trainable parameter of layer from the file (any of F32, F64, BF16, F16, converted
// to T). Buffers in the file must equal the layer's. A missing parameter, a name the layer does
// not have, a wrong shape or a non-finite value is an error naming the tensor; nothing of the
// layer changes then.
template <class T>
void load_safetensors(const SafetensorsFile& file, model::Layer<T>& layer);

// Writes the layer's state_dict (trainable parameters, torch names and layouts) in T's dtype,
// with metadata layer, config and dtype (plus `extra`), crash-safely.
template <class T>
void save_safetensors(const std::string& path, model::Layer<T>& layer,
                      const std::map<std::string, std::string>& extra_metadata = {});

}  // namespace kmoe::io
