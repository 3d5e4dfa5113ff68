// Reading HDF5 datasets by path into Tensors, with the shape and dtype checked against what the
// caller expects. Errors are kmoe::Error (Status::io_error or Status::shape_mismatch) naming the
// file and the dataset. Used by the golden fixtures now and the checkpoints later.
#pragma once

#include "kmoe/core/tensor.hpp"

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace kmoe::io {

enum class Dtype { float32, float64, int64, int32, uint8, other };
const char* dtype_name(Dtype dtype);

class H5Reader {
 public:
  // Opens read-only; a missing file or one that is not HDF5 throws Status::io_error.
  explicit H5Reader(const std::string& path);
  ~H5Reader();
  H5Reader(H5Reader&&) noexcept;
  H5Reader& operator=(H5Reader&&) noexcept;
  H5Reader(const H5Reader&) = delete;
  H5Reader& operator=(const H5Reader&) = delete;

  const std::string& path() const { return path_; }
  bool has(const std::string& object_path) const;  // a dataset or group at that path
  Shape shape_of(const std::string& dataset) const;  // rank 0 for a scalar dataset
  Dtype dtype_of(const std::string& dataset) const;
  // Names of the members of a group, sorted.
  std::vector<std::string> members(const std::string& group) const;

  // Reads the dataset; its dtype must be T's own (float32 for float, float64 for double,
  // int64 for std::int64_t) and, when expected is given, its shape must equal it.
  template <class T>
  Tensor<T> read(const std::string& dataset, const std::optional<Shape>& expected = std::nullopt) const;
  // As read, but accepts float32 or float64 and converts to T (running fp32 fixtures in double).
  template <class T>
  Tensor<T> read_converted(const std::string& dataset, const std::optional<Shape>& expected = std::nullopt) const;
  // An integer dataset (int64, int32 or uint8) as int indices; values must fit in int.
  Tensor<int> read_indices(const std::string& dataset, const std::optional<Shape>& expected = std::nullopt) const;

  // Attributes of the object at object_path ("/" for the root).
  bool has_attribute(const std::string& object_path, const std::string& name) const;
  std::string read_string_attribute(const std::string& object_path, const std::string& name) const;
  double read_number_attribute(const std::string& object_path, const std::string& name) const;

 private:
  std::string path_;
  std::int64_t file_ = -1;  // hid_t, kept out of this header so users need no HDF5 include
};

}  // namespace kmoe::io
