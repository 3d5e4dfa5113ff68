#include "kmoe/model/parameter.hpp"

#include "kmoe/core/error.hpp"

namespace kmoe::model {

const char* parameter_kind_name(ParameterKind kind) {
  switch (kind) {
    case ParameterKind::dense: return "dense";
    case ParameterKind::expert: return "expert";
    case ParameterKind::buffer: return "buffer";
  }
  return "unknown";
}

std::vector<std::string> per_expert_names(const std::string& pattern, int experts) {
  const std::size_t star = pattern.find('*');
  require(star != std::string::npos, Status::internal, "per-expert name pattern '", pattern, "' has no '*'");
  std::vector<std::string> names;
  for (int e = 0; e < experts; ++e) names.push_back(pattern.substr(0, star) + std::to_string(e) + pattern.substr(star + 1));
  return names;
}

template <class T>
ParameterList<T> trainable(const ParameterList<T>& all) {
  ParameterList<T> out;
  for (const Parameter<T>& p : all)
    if (p.kind != ParameterKind::buffer) out.push_back(p);
  return out;
}

template <class T>
void zero_gradients(const ParameterList<T>& list) {
  for (const Parameter<T>& p : list)
    if (p.grad != nullptr) p.grad->fill(T(0));
}

template <class T>
index_t parameter_count(const ParameterList<T>& list) {
  index_t n = 0;
  for (const Parameter<T>& p : list)
    if (p.kind != ParameterKind::buffer) n += p.tensor->size();
  return n;
}

template <class T>
Parameter<T>& find_parameter(ParameterList<T>& list, const std::string& name) {
  std::string names;
  for (Parameter<T>& p : list) {
    if (p.name == name) return p;
    names += (names.empty() ? "" : ", ") + p.name;
  }
  fail(Status::invalid_argument, "no parameter '", name, "' (the layer has: ", names, ")");
}

#define KMOE_INSTANTIATE(T)                                                  \
  template ParameterList<T> trainable(const ParameterList<T>&);              \
  template void zero_gradients(const ParameterList<T>&);                     \
  template index_t parameter_count(const ParameterList<T>&);                 \
  template Parameter<T>& find_parameter(ParameterList<T>&, const std::string&);
KMOE_INSTANTIATE(float)
KMOE_INSTANTIATE(double)
#undef KMOE_INSTANTIATE

}  // namespace kmoe::model
