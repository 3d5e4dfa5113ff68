// Reading a reference dump in the golden-fixture format (data/golden/README.md) and comparing
// kmoe's tensors with it. Every problem with the file itself (missing dataset or attribute,
// wrong shape, malformed config, unknown layer) is a kmoe::Error, which kmoe-parity reports as
// "cannot use this file" (exit 2); a tensor outside the tolerance is a FAIL line (exit 1).
#pragma once

#include "kmoe/core/error.hpp"
#include "kmoe/core/tensor.hpp"
#include "kmoe/dist/communicator.hpp"
#include "kmoe/io/hdf5_reader.hpp"
#include "kmoe/model/layer.hpp"
#include "kmoe/model/state_dict.hpp"

#include <cmath>
#include <cstdint>
#include <memory>
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

  // kmoe-parity --distributed: the runner splits the batch over these ranks (contiguous along
  // axis 0, uneven; ranks without any when there are more ranks than sequences), places the
  // experts over them, and gathers what it compares.
  void distribute_over(const dist::Communicator& ranks) { ranks_ = ranks; }
  const dist::Communicator& ranks() const { return ranks_; }

  // kmoe-parity --params: the parameters come from this kmoe checkpoint instead of /params.
  void use_parameters_from(const std::string& checkpoint) { parameters_checkpoint_ = checkpoint; }
  const std::string& parameters_checkpoint() const { return parameters_checkpoint_; }

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
  std::string parameters_checkpoint_;
  dist::Communicator ranks_;
  mutable std::set<std::string> used_;
};

// This rank's rows (along axis, the batch's axis) of a batch split over the ranks: contiguous,
// the first ranks one more.
template <class T>
Tensor<T> my_share(const dist::Communicator& ranks, const Tensor<T>& whole, int axis = 0);
// Every rank's share put back together, on every rank: the inverse of my_share.
template <class T>
Tensor<T> whole_batch(const dist::Communicator& ranks, const Tensor<T>& share, const Shape& whole_shape);

// The fixture's layer, built from its `layer` and `config` attributes (model/builder.hpp).
template <class T>
std::unique_ptr<model::Layer<T>> build_fixture_layer(const Fixture& fixture);

// Loads every parameter from /params under its state_dict name (checking /buffers where the dump
// has them), or from the --params checkpoint, whose model and config must be the fixture's.
template <class T>
void load_fixture_parameters(const Fixture& fixture, model::Layer<T>& layer);

// Compares kmoe's tensors with the dump's, one printed line per tensor.
class Report {
 public:
  Report(const Fixture& fixture, double tolerance, std::ostream& out);

  // Compares with the dataset of the same shape (a 0-d dataset for a scalar).
  template <class T>
  void compare(const std::string& dataset, const Tensor<T>& computed);
  void compare(const std::string& dataset, const model::HostTensor& computed);
  // A scalar that sums terms of size up to `magnitude` (Σ|terms|; 0: a plain value) is judged by
  // |computed − expected| / max(|expected|, magnitude): a sum with heavy cancellation is as
  // accurate as its terms, not as its small result.
  void compare_scalar(const std::string& dataset, double computed, double magnitude = 0);
  // Every parameter gradient of the layer against /grad/params, by state_dict name.
  template <class T>
  void compare_gradients(model::Layer<T>& layer);

  bool all_ok() const { return failed_.empty(); }
  int compared() const { return compared_; }
  const std::vector<std::string>& failed() const { return failed_; }
  double tolerance() const { return tolerance_; }

 private:
  void compare_values(const std::string& dataset, const Shape& shape, const std::vector<double>& computed,
                      double magnitude = 0);

  const Fixture& fixture_;
  double tolerance_;
  std::ostream& out_;
  int compared_ = 0;
  std::vector<std::string> failed_;
};

// Relative L2 error ≤ this passes: 1e-4 for float32 dumps, 1e-10 for float64.
double default_tolerance(io::Dtype dtype);

// Σ a ⊙ b in double (the "sum(out * grad_out)" term of the fixtures' losses) and Σ |a ⊙ b|, the
// magnitude of its terms that compare_scalar judges the sum against.
struct Dot {
  double sum = 0;
  double magnitude = 0;
};
template <class T>
Dot dot(const Tensor<T>& a, const Tensor<T>& b) {
  const std::vector<T> x = a.to_host(), y = b.to_host();
  Dot d;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double term = static_cast<double>(x[i]) * static_cast<double>(y[i]);
    d.sum += term;
    d.magnitude += std::abs(term);
  }
  return d;
}

}  // namespace kmoe::parity
