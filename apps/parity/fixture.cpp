#include "fixture.hpp"

#include "kmoe/dist/placement.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/io/checkpoint.hpp"
#include "kmoe/model/builder.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <ostream>

namespace kmoe::parity {

namespace {

std::string read_root_string(const io::H5Reader& reader, const std::string& name) {
  require(reader.has_attribute("/", name), Status::io_error, "no root attribute '", name,
          "' (see data/golden/README.md for the format)");
  return reader.read_string_attribute("/", name);
}

// H5Reader has no "is this a group" query; listing the members of a dataset is an io_error.
bool is_group(const io::H5Reader& reader, const std::string& object_path) {
  try {
    reader.members(object_path);
    return true;
  } catch (const Error&) {
    return false;
  }
}

// Every dataset below group (none when the group is absent), by full path.
void collect_datasets(const io::H5Reader& reader, const std::string& group, std::vector<std::string>& found) {
  if (!reader.has(group)) return;
  for (const std::string& name : reader.members(group)) {
    const std::string child = group + "/" + name;
    if (is_group(reader, child)) {
      collect_datasets(reader, child, found);
    } else {
      found.push_back(child);
    }
  }
}

}  // namespace

Fixture::Fixture(const std::string& path) : reader_(path) {
  layer_ = read_root_string(reader_, "layer");
  const std::string config_text = read_root_string(reader_, "config");
  try {
    config_ = nlohmann::json::parse(config_text);
  } catch (const nlohmann::json::exception& e) {
    fail(Status::io_error, "attribute 'config' is not valid JSON (", e.what(), "): ", config_text);
  }
  require(config_.is_object(), Status::io_error, "attribute 'config' is not a JSON object: ", config_text);

  const std::string mode = read_root_string(reader_, "mode");
  require(mode == "train" || mode == "eval", Status::io_error, "attribute 'mode' is '", mode,
          "', expected 'train' or 'eval'");
  training_ = mode == "train";

  const std::string dtype = read_root_string(reader_, "dtype");
  dtype_ = dtype == "float32" ? io::Dtype::float32 : dtype == "float64" ? io::Dtype::float64 : io::Dtype::other;
  require(dtype_ != io::Dtype::other, Status::io_error, "attribute 'dtype' is '", dtype,
          "', expected 'float32' or 'float64'");

  loss_ = reader_.has_attribute("/", "loss") ? reader_.read_string_attribute("/", "loss") : std::string();
  require(reader_.has_attribute("/", "seed"), Status::io_error, "no root attribute 'seed'");
  const double seed = reader_.read_number_attribute("/", "seed");
  require(seed >= 0 && seed == std::floor(seed) && seed < 9007199254740992.0, Status::io_error,
          "attribute 'seed' = ", seed, " is not a non-negative integer");
  seed_ = static_cast<std::uint64_t>(seed);
}

template <class T>
Tensor<T> Fixture::read(const std::string& dataset, const std::optional<Shape>& expected) const {
  Tensor<T> tensor = reader_.read_converted<T>(dataset, expected);
  used_.insert(dataset);
  return tensor;
}

Tensor<int> Fixture::read_indices(const std::string& dataset, const std::optional<Shape>& expected) const {
  Tensor<int> tensor = reader_.read_indices(dataset, expected);
  used_.insert(dataset);
  return tensor;
}

std::string Fixture::state_dict_path(const std::string& group, const std::string& name) {
  std::string path = group + "/" + name;
  std::replace(path.begin() + static_cast<std::ptrdiff_t>(group.size()), path.end(), '.', '/');
  return path;
}

void Fixture::require_all_used() const {
  std::vector<std::string> datasets;
  for (const char* group : {"/input", "/params", "/buffers", "/output", "/grad"}) {
    collect_datasets(reader_, group, datasets);
  }
  std::string unused;
  for (const std::string& dataset : datasets) {
    if (used_.count(dataset) == 0) unused += (unused.empty() ? "" : ", ") + dataset;
  }
  require(unused.empty(), Status::io_error, "datasets that the '", layer_,
          "' runner neither loads nor compares (does the config match the dump?): ", unused);
}

template <class T>
std::unique_ptr<model::Layer<T>> build_fixture_layer(const Fixture& fixture) {
  return model::build_layer<T>(fixture.layer(), fixture.config(), fixture.seed());
}

template <class T>
void load_fixture_parameters(const Fixture& fixture, model::Layer<T>& layer) {
  model::ParameterList<T> parameters = layer.parameters();
  model::StateDict state;
  for (const model::Parameter<T>& p : parameters) {
    const bool buffer = p.kind == model::ParameterKind::buffer;
    for (const model::TorchEntry& entry : model::torch_entries(p)) {
      const std::string dataset = Fixture::state_dict_path(buffer ? "/buffers" : "/params", entry.name);
      // Buffers come from the config; a dump that stores them must agree with it.
      if (buffer && !fixture.has(dataset)) continue;
      const bool replaced = !buffer && !fixture.parameters_checkpoint().empty();
      const std::vector<double> values = fixture.read<double>(dataset, entry.shape).to_host();
      if (!replaced) state[entry.name] = {entry.shape, values};
    }
  }
  model::load_state_dict(parameters, state, fixture.parameters_checkpoint().empty());
  if (!fixture.parameters_checkpoint().empty()) io::load_checkpoint(fixture.parameters_checkpoint(), layer);
}

Report::Report(const Fixture& fixture, double tolerance, std::ostream& out)
    : fixture_(fixture), tolerance_(tolerance), out_(out) {}

template <class T>
void Report::compare(const std::string& dataset, const Tensor<T>& computed) {
  const std::vector<T> values = computed.to_host();
  compare_values(dataset, computed.shape(), std::vector<double>(values.begin(), values.end()));
}

void Report::compare(const std::string& dataset, const model::HostTensor& computed) {
  compare_values(dataset, computed.shape, computed.values);
}

void Report::compare_scalar(const std::string& dataset, double computed, double magnitude) {
  compare_values(dataset, Shape(), {computed}, magnitude);
}

template <class T>
void Report::compare_gradients(model::Layer<T>& layer) {
  for (const auto& [name, grad] : model::state_dict(layer.parameters(), model::StateOf::gradients))
    compare(Fixture::state_dict_path("/grad/params", name), grad);
}

void Report::compare_values(const std::string& dataset, const Shape& shape, const std::vector<double>& computed,
                            double magnitude) {
  const std::vector<double> expected = fixture_.read<double>(dataset, shape).to_host();
  double max_abs = 0, diff_sq = 0, ref_sq = 0;
  bool finite = true;
  for (std::size_t i = 0; i < expected.size(); ++i) {
    const double diff = std::abs(computed[i] - expected[i]);
    finite = finite && std::isfinite(computed[i]);
    max_abs = std::max(max_abs, diff);
    diff_sq += diff * diff;
    ref_sq += expected[i] * expected[i];
  }
  // A zero reference makes the relative error the absolute one; a sum is judged against its terms.
  ref_sq = std::max(ref_sq, magnitude * magnitude);
  const double rel_l2 = ref_sq > 0 ? std::sqrt(diff_sq / ref_sq) : std::sqrt(diff_sq);
  const bool ok = finite && rel_l2 <= tolerance_;
  ++compared_;
  if (!ok) failed_.push_back(dataset);
  char line[256];
  std::snprintf(line, sizeof line, "  %-28s %-18s max_abs %9.3e  rel_l2 %9.3e  %s", dataset.c_str(),
                shape.rank() == 0 ? "scalar" : shape.str().c_str(), max_abs, rel_l2, ok ? "ok" : "FAIL");
  out_ << line << (finite ? "" : " (non-finite values)") << '\n';
}

double default_tolerance(io::Dtype dtype) { return dtype == io::Dtype::float64 ? 1e-10 : 1e-4; }

template Tensor<float> Fixture::read<float>(const std::string&, const std::optional<Shape>&) const;
template Tensor<double> Fixture::read<double>(const std::string&, const std::optional<Shape>&) const;
template void Report::compare<float>(const std::string&, const Tensor<float>&);
template void Report::compare<double>(const std::string&, const Tensor<double>&);
template void Report::compare_gradients<float>(model::Layer<float>&);
template void Report::compare_gradients<double>(model::Layer<double>&);
template std::unique_ptr<model::Layer<float>> build_fixture_layer<float>(const Fixture&);
template std::unique_ptr<model::Layer<double>> build_fixture_layer<double>(const Fixture&);
template void load_fixture_parameters<float>(const Fixture&, model::Layer<float>&);
template void load_fixture_parameters<double>(const Fixture&, model::Layer<double>&);

template <class T>
Tensor<T> my_share(const dist::Communicator& ranks, const Tensor<T>& whole, int axis) {
  std::vector<index_t> dims = whole.shape().dims();
  const index_t rows = dims[static_cast<std::size_t>(axis)];
  index_t outer = 1, width = 1;
  for (int a = 0; a < axis; ++a) outer *= dims[static_cast<std::size_t>(a)];
  for (std::size_t a = static_cast<std::size_t>(axis) + 1; a < dims.size(); ++a) width *= dims[a];
  const auto [first, count] = dist::piece(rows, ranks.size(), ranks.rank());
  const std::vector<T> all = whole.to_host();
  std::vector<T> mine;
  for (index_t o = 0; o < outer; ++o) {
    const auto from = all.begin() + (o * rows + first) * width;
    mine.insert(mine.end(), from, from + count * width);
  }
  dims[static_cast<std::size_t>(axis)] = count;
  return Tensor<T>::from_host("parity::share", Shape(dims), mine);
}

template <class T>
Tensor<T> whole_batch(const dist::Communicator& ranks, const Tensor<T>& share, const Shape& whole_shape) {
  const std::vector<T> mine = share.size() > 0 ? share.to_host() : std::vector<T>();
  const std::vector<std::size_t> counts(static_cast<std::size_t>(ranks.size()), mine.size() * sizeof(T));
  std::vector<unsigned char> send;
  for (int r = 0; r < ranks.size(); ++r) {
    const auto* bytes = reinterpret_cast<const unsigned char*>(mine.data());
    send.insert(send.end(), bytes, bytes + mine.size() * sizeof(T));
  }
  std::vector<std::size_t> received;
  const std::vector<unsigned char> all = ranks.all_to_all(send.data(), counts, received);
  std::vector<T> values(all.size() / sizeof(T));
  if (!values.empty()) std::memcpy(values.data(), all.data(), all.size());
  require(static_cast<index_t>(values.size()) == whole_shape.size(), Status::internal, "whole_batch: ", values.size(),
          " values for ", whole_shape.str());
  return Tensor<T>::from_host("parity::whole", whole_shape, values);
}

#define KMOE_INSTANTIATE(T)                                                           \
  template Tensor<T> my_share<T>(const dist::Communicator&, const Tensor<T>&, int);   \
  template Tensor<T> whole_batch<T>(const dist::Communicator&, const Tensor<T>&, const Shape&);
KMOE_INSTANTIATE(float)
KMOE_INSTANTIATE(double)
KMOE_INSTANTIATE(int)
#undef KMOE_INSTANTIATE

}  // namespace kmoe::parity
