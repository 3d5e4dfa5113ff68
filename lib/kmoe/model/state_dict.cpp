#include "kmoe/model/state_dict.hpp"

#include "kmoe/core/error.hpp"

#include <algorithm>
#include <cmath>
#include <set>

namespace kmoe::model {

namespace {

// v [lead, a, b] → [lead, b, a].
void swap_last_axes(const double* in, double* out, index_t lead, index_t a, index_t b) {
  for (index_t l = 0; l < lead; ++l)
    for (index_t i = 0; i < a; ++i)
      for (index_t j = 0; j < b; ++j) out[(l * b + j) * a + i] = in[(l * a + i) * b + j];
}

// The kmoe shape of one entry's slice (the whole tensor, or one expert's).
Shape kmoe_slice_shape(const Shape& full, bool per_expert) {
  std::vector<index_t> dims = full.dims();
  if (per_expert) dims.erase(dims.begin());
  return Shape(dims);
}

Shape transposed_shape(const Shape& shape) {
  std::vector<index_t> dims = shape.dims();
  std::swap(dims[dims.size() - 2], dims[dims.size() - 1]);
  return Shape(dims);
}

template <class T>
std::vector<double> host_values(const Tensor<T>& t) {
  const std::vector<T> v = t.to_host();
  return std::vector<double>(v.begin(), v.end());
}

// One entry's torch values from its slice of the kmoe tensor (host copies).
void kmoe_to_torch(const Shape& kmoe_slice, bool transposed, const double* kmoe, double* torch) {
  const index_t n = kmoe_slice.size();
  if (!transposed) {
    std::copy(kmoe, kmoe + n, torch);
    return;
  }
  const int r = kmoe_slice.rank();
  const index_t a = kmoe_slice[r - 2], b = kmoe_slice[r - 1];
  swap_last_axes(kmoe, torch, n / (a * b), a, b);
}

void torch_to_kmoe(const Shape& kmoe_slice, bool transposed, const double* torch, double* kmoe) {
  const index_t n = kmoe_slice.size();
  if (!transposed) {
    std::copy(torch, torch + n, kmoe);
    return;
  }
  const int r = kmoe_slice.rank();
  const index_t a = kmoe_slice[r - 2], b = kmoe_slice[r - 1];
  swap_last_axes(torch, kmoe, n / (a * b), b, a);
}

}  // namespace

template <class T>
std::vector<TorchEntry> torch_entries(const Parameter<T>& p) {
  const bool per_expert = !p.torch.per_expert_names.empty();
  Shape shape = kmoe_slice_shape(p.tensor->shape(), per_expert);
  if (p.torch.transposed) shape = transposed_shape(shape);
  if (!per_expert) return {{p.name, shape, -1}};
  std::vector<TorchEntry> entries;
  for (std::size_t e = 0; e < p.torch.per_expert_names.size(); ++e)
    entries.push_back({p.torch.per_expert_names[e], shape, static_cast<int>(e)});
  return entries;
}

template <class T>
StateDict state_dict(const ParameterList<T>& list, StateOf what) {
  StateDict state;
  for (const Parameter<T>& p : list) {
    if (what == StateOf::gradients && p.grad == nullptr) continue;
    const std::vector<double> all = host_values(what == StateOf::gradients ? *p.grad : *p.tensor);
    const Shape slice = kmoe_slice_shape(p.tensor->shape(), !p.torch.per_expert_names.empty());
    for (const TorchEntry& entry : torch_entries(p)) {
      HostTensor out{entry.shape, std::vector<double>(static_cast<std::size_t>(slice.size()))};
      const double* source = all.data() + (entry.expert < 0 ? 0 : entry.expert * slice.size());
      kmoe_to_torch(slice, p.torch.transposed, source, out.values.data());
      state.emplace(entry.name, std::move(out));
    }
  }
  return state;
}

template <class T>
void load_state_dict(const ParameterList<T>& list, const StateDict& state, bool require_complete) {
  std::set<std::string> used;
  std::string missing;
  // Everything is checked before any tensor changes.
  std::vector<std::pair<const Parameter<T>*, std::vector<double>>> pending;
  for (const Parameter<T>& p : list) {
    const std::vector<TorchEntry> entries = torch_entries(p);
    std::vector<const HostTensor*> given;
    for (const TorchEntry& entry : entries) {
      const auto found = state.find(entry.name);
      if (found == state.end()) continue;
      used.insert(entry.name);
      const HostTensor& value = found->second;
      require(value.shape == entry.shape, Status::shape_mismatch, "parameter '", entry.name, "': expected shape ",
              entry.shape.str(), ", got ", value.shape.str());
      require(static_cast<index_t>(value.values.size()) == entry.shape.size(), Status::internal, "parameter '",
              entry.name, "': ", value.values.size(), " values for shape ", entry.shape.str());
      for (const double v : value.values)
        require(std::isfinite(v), Status::non_finite, "parameter '", entry.name, "' contains NaN or Inf");
      given.push_back(&value);
    }
    if (given.size() != entries.size() && p.kind != ParameterKind::buffer && require_complete) {
      for (const TorchEntry& entry : entries)
        if (state.count(entry.name) == 0) missing += (missing.empty() ? "" : ", ") + entry.name;
    }
    if (given.empty()) continue;
    // Slices not given keep their values.
    const Shape slice = kmoe_slice_shape(p.tensor->shape(), !p.torch.per_expert_names.empty());
    std::vector<double> all = host_values(*p.tensor);
    for (std::size_t i = 0, g = 0; i < entries.size(); ++i) {
      if (state.count(entries[i].name) == 0) continue;
      double* target = all.data() + (entries[i].expert < 0 ? 0 : entries[i].expert * slice.size());
      torch_to_kmoe(slice, p.torch.transposed, given[g++]->values.data(), target);
    }
    if (p.kind == ParameterKind::buffer) {
      const std::vector<double> own = host_values(*p.tensor);
      for (std::size_t i = 0; i < own.size(); ++i) {
        require(std::abs(all[i] - own[i]) <= 1e-6 * std::max(1.0, std::abs(own[i])), Status::invalid_argument,
                "buffer '", p.name, "'[", i, "] = ", all[i], " differs from ", own[i], ", which the config determines");
      }
      continue;
    }
    pending.emplace_back(&p, std::move(all));
  }
  require(missing.empty(), Status::invalid_argument, "missing parameters: ", missing);
  std::string unknown;
  for (const auto& item : state)
    if (used.count(item.first) == 0) unknown += (unknown.empty() ? "" : ", ") + item.first;
  require(unknown.empty(), Status::invalid_argument, "not parameters of this layer: ", unknown);
  for (const auto& [p, values] : pending) p->tensor->copy_from_host(std::vector<T>(values.begin(), values.end()));
}

#define KMOE_INSTANTIATE(T)                                                         \
  template std::vector<TorchEntry> torch_entries(const Parameter<T>&);              \
  template StateDict state_dict(const ParameterList<T>&, StateOf);                  \
  template void load_state_dict(const ParameterList<T>&, const StateDict&, bool);
KMOE_INSTANTIATE(float)
KMOE_INSTANTIATE(double)
#undef KMOE_INSTANTIATE

}  // namespace kmoe::model
