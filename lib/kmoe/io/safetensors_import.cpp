#include "kmoe/io/safetensors_import.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/model/state_dict.hpp"

namespace kmoe::io {

template <class T>
void load_safetensors(const SafetensorsFile& file, model::Layer<T>& layer) {
  model::StateDict state;
  for (const SafetensorsEntry& entry : file.entries()) {
    state[entry.name] = {Shape(std::vector<index_t>(entry.shape.begin(), entry.shape.end())),
                         file.read_double(entry.name)};
  }
  try {
    model::load_state_dict(layer.parameters(), state, true);
  } catch (const Error& e) {
    fail(e.status(), file.path(), ": ", e.what(), " (layer ", layer.kind(), ")");
  }
}

template <class T>
void save_safetensors(const std::string& path, model::Layer<T>& layer,
                      const std::map<std::string, std::string>& extra_metadata) {
  std::vector<SafetensorsTensor> tensors;
  const SafetensorsDtype dtype = std::is_same_v<T, float> ? SafetensorsDtype::f32 : SafetensorsDtype::f64;
  for (auto& [name, host] : model::state_dict(model::trainable(layer.parameters()))) {
    const std::vector<index_t> dims = host.shape.dims();
    tensors.push_back({name, dtype, std::vector<std::int64_t>(dims.begin(), dims.end()), std::move(host.values)});
  }
  std::map<std::string, std::string> metadata = extra_metadata;
  metadata["layer"] = layer.kind();
  metadata["config"] = layer.config().dump();
  metadata["dtype"] = model::dtype_name(model::dtype_of<T>());
  write_safetensors(path, tensors, metadata);
}

template void load_safetensors<float>(const SafetensorsFile&, model::Layer<float>&);
template void load_safetensors<double>(const SafetensorsFile&, model::Layer<double>&);
template void save_safetensors<float>(const std::string&, model::Layer<float>&, const std::map<std::string, std::string>&);
template void save_safetensors<double>(const std::string&, model::Layer<double>&,
                                       const std::map<std::string, std::string>&);

}  // namespace kmoe::io
