// Reading a reference dump in the golden-fixture format (data/golden/README.md) and comparing
// kmoe's tensors with it. Every problem with the file itself (missing dataset or attribute,
// wrong shape, malformed config, unknown layer) is a kmoe::Error, which kmoe-parity reports as
// "cannot use this file" (exit 2); a tensor outside the tolerance is a FAIL line (exit 1).
#pragma once

#include "kmoe/core/error.hpp"
#include "kmoe/core/tensor.hpp"
#include "kmoe/io/hdf5_reader.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <iosfwd>
#include <limits>
#include <optional>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

namespace kmoe::parity {

class Fixture {
 public:
  // Opens the dump and reads the root attributes layer, config (JSON), mode, dtype, loss, seed.
  explicit Fixture(const std::string& path);

  const std::string& path() const { return reader_.path(); }
  const std::string& layer() const { return layer_; }
  const nlohmann::json& config() const { return config_; }
  bool training() const { return training_; }  // mode "train" (module.train()) or "eval"
  io::Dtype dtype() const { return dtype_; }  // float32 or float64
  const std::string& loss() const { return loss_; }  // the differentiated scalar, as written
  std::uint64_t seed() const { return seed_; }
  bool has(const std::string& object_path) const { return reader_.has(object_path); }

  // The dataset converted to T, with its shape checked when expected is given; marks it used.
  template <class T>
  Tensor<T> read(const std::string& dataset, const std::optional<Shape>& expected = std::nullopt) const;
  // An integer dataset (int64, int32 or uint8: token ids, boolean masks) as int; marks it used.
  Tensor<int> read_indices(const std::string& dataset, const std::optional<Shape>& expected = std::nullopt) const;
  // "/params/a/b" for the state_dict name "a.b" (group "/params", "/grad/params" or "/buffers").
  static std::string state_dict_path(const std::string& group, const std::string& name);

  // Throws naming every dataset under /input, /params, /buffers, /output and /grad that no
  // read() took: a tensor the runner did not load or compare would pass unchecked.
  void require_all_used() const;

 private:
  io::H5Reader reader_;
  std::string layer_;
  nlohmann::json config_;
  bool training_ = false;
  io::Dtype dtype_ = io::Dtype::other;
  std::string loss_;
  std::uint64_t seed_ = 0;
  mutable std::set<std::string> used_;
};

// Typed access to the config JSON with the file named in every error: required keys, keys with
// the original constructor's defaults, nullable keys; finish() rejects keys nobody asked for
// (an option kmoe does not know could change the computation).
class ConfigReader {
 public:
  explicit ConfigReader(const Fixture& fixture) : fixture_(fixture) {}

  template <class V>
  V required(const std::string& key);
  template <class V>
  V get(const std::string& key, const V& fallback);
  // Absent or null → nullopt (the original's None).
  template <class V>
  std::optional<V> get_nullable(const std::string& key);
  void finish() const;

 private:
  template <class V>
  V convert(const std::string& key, const nlohmann::json& value) const;

  const Fixture& fixture_;
  std::set<std::string> known_;
};

template <class V>
V ConfigReader::convert(const std::string& key, const nlohmann::json& value) const {
  const char* expected = nullptr;
  if constexpr (std::is_same_v<V, bool>) {
    if (!value.is_boolean()) expected = "a boolean";
  } else if constexpr (std::is_integral_v<V>) {
    if (!value.is_number_integer()) expected = "an integer";
  } else if constexpr (std::is_floating_point_v<V>) {
    if (!value.is_number()) expected = "a number";
  } else {
    static_assert(std::is_same_v<V, std::string>, "config values are booleans, numbers or strings");
    if (!value.is_string()) expected = "a string";
  }
  require(expected == nullptr, Status::io_error, "config key '", key, "' must be ", expected,
          ", got ", value.dump());
  if constexpr (std::is_integral_v<V> && !std::is_same_v<V, bool>) {
    const auto wide = value.get<std::int64_t>();
    require(wide >= std::numeric_limits<V>::min() && wide <= std::numeric_limits<V>::max(), Status::io_error,
            "config key '", key, "' = ", wide, " is out of range");
    return static_cast<V>(wide);
  } else {
    return value.get<V>();
  }
}

template <class V>
V ConfigReader::required(const std::string& key) {
  known_.insert(key);
  const nlohmann::json& config = fixture_.config();
  require(config.contains(key), Status::io_error, "config has no '", key,
          "' (required by layer '", fixture_.layer(), "'): ", config.dump());
  return convert<V>(key, config.at(key));
}

template <class V>
V ConfigReader::get(const std::string& key, const V& fallback) {
  known_.insert(key);
  const nlohmann::json& config = fixture_.config();
  return config.contains(key) ? convert<V>(key, config.at(key)) : fallback;
}

template <class V>
std::optional<V> ConfigReader::get_nullable(const std::string& key) {
  known_.insert(key);
  const nlohmann::json& config = fixture_.config();
  if (!config.contains(key) || config.at(key).is_null()) return std::nullopt;
  return convert<V>(key, config.at(key));
}

// Compares kmoe's tensors with the dump's, one printed line per tensor.
class Report {
 public:
  Report(const Fixture& fixture, double tolerance, std::ostream& out);

  // Compares with the dataset of the same shape (a 0-d dataset for a scalar).
  template <class T>
  void compare(const std::string& dataset, const Tensor<T>& computed);
  void compare_scalar(const std::string& dataset, double computed);

  bool all_ok() const { return failed_.empty(); }
  int compared() const { return compared_; }
  const std::vector<std::string>& failed() const { return failed_; }
  double tolerance() const { return tolerance_; }

 private:
  void compare_values(const std::string& dataset, const Shape& shape, const std::vector<double>& computed);

  const Fixture& fixture_;
  double tolerance_;
  std::ostream& out_;
  int compared_ = 0;
  std::vector<std::string> failed_;
};

// Relative L2 error ≤ this passes: 1e-4 for float32 dumps, 1e-10 for float64.
double default_tolerance(io::Dtype dtype);

// Σ a ⊙ b in double: the "sum(out * grad_out)" term of the fixtures' losses.
template <class T>
double dot(const Tensor<T>& a, const Tensor<T>& b) {
  const std::vector<T> x = a.to_host(), y = b.to_host();
  double sum = 0;
  for (std::size_t i = 0; i < x.size(); ++i) sum += static_cast<double>(x[i]) * static_cast<double>(y[i]);
  return sum;
}

}  // namespace kmoe::parity
