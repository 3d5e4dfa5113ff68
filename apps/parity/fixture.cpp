#include "fixture.hpp"

#include "kmoe/core/error.hpp"

#include <algorithm>
#include <cmath>
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

void ConfigReader::finish() const {
  std::string unknown;
  for (const auto& item : fixture_.config().items()) {
    if (known_.count(item.key()) == 0) unknown += (unknown.empty() ? "'" : ", '") + item.key() + "'";
  }
  std::string accepted;
  for (const std::string& key : known_) accepted += (accepted.empty() ? "" : ", ") + key;
  require(unknown.empty(), Status::io_error, "config keys unknown to layer '", fixture_.layer(),
          "': ", unknown, " (accepted: ", accepted, ")");
}

Report::Report(const Fixture& fixture, double tolerance, std::ostream& out)
    : fixture_(fixture), tolerance_(tolerance), out_(out) {}

template <class T>
void Report::compare(const std::string& dataset, const Tensor<T>& computed) {
  const std::vector<T> values = computed.to_host();
  compare_values(dataset, computed.shape(), std::vector<double>(values.begin(), values.end()));
}

void Report::compare_scalar(const std::string& dataset, double computed) {
  compare_values(dataset, Shape(), {computed});
}

void Report::compare_values(const std::string& dataset, const Shape& shape, const std::vector<double>& computed) {
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
  // A zero reference makes the relative error the absolute one.
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

}  // namespace kmoe::parity
