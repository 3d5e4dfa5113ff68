#include "kmoe/io/hdf5_reader.hpp"

#include "kmoe/io/impl/hdf5_handle.hpp"
#include "kmoe/io/impl/hdf5_strings.hpp"

#include <hdf5.h>

#include <algorithm>
#include <limits>
#include <type_traits>

namespace kmoe::io {

namespace impl {

Dtype classify(hid_t type) {
  const H5T_class_t cls = H5Tget_class(type);
  const size_t size = H5Tget_size(type);
  if (cls == H5T_FLOAT) return size == 4 ? Dtype::float32 : size == 8 ? Dtype::float64 : Dtype::other;
  if (cls == H5T_INTEGER) {
    const bool is_signed = H5Tget_sign(type) == H5T_SGN_2;
    if (is_signed && size == 8) return Dtype::int64;
    if (is_signed && size == 4) return Dtype::int32;
    if (!is_signed && size == 1) return Dtype::uint8;
  }
  return Dtype::other;
}

template <class T>
constexpr Dtype dtype_of_type() {
  if constexpr (std::is_same_v<T, float>) return Dtype::float32;
  if constexpr (std::is_same_v<T, double>) return Dtype::float64;
  if constexpr (std::is_same_v<T, std::int64_t>) return Dtype::int64;
  if constexpr (std::is_same_v<T, int>) return Dtype::int32;
  return Dtype::other;
}

template <class T>
hid_t memory_type() {
  if constexpr (std::is_same_v<T, float>) return H5T_NATIVE_FLOAT;
  if constexpr (std::is_same_v<T, double>) return H5T_NATIVE_DOUBLE;
  if constexpr (std::is_same_v<T, std::int64_t>) return H5T_NATIVE_INT64;
  if constexpr (std::is_same_v<T, int>) return H5T_NATIVE_INT;
}

}  // namespace impl

const char* dtype_name(Dtype dtype) {
  switch (dtype) {
    case Dtype::float32: return "float32";
    case Dtype::float64: return "float64";
    case Dtype::int64: return "int64";
    case Dtype::int32: return "int32";
    case Dtype::uint8: return "uint8";
    case Dtype::other: return "unsupported type";
  }
  return "unsupported type";
}

H5Reader::H5Reader(const std::string& path) : path_(path) {
  impl::silence_hdf5_errors();
  require(H5Fis_hdf5(path.c_str()) > 0, Status::io_error, "cannot open '", path,
          "': missing, unreadable, truncated or not an HDF5 file");
  file_ = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  require(file_ >= 0, Status::io_error, "cannot open HDF5 file '", path, "'");
}

H5Reader::~H5Reader() {
  if (file_ >= 0) H5Fclose(file_);
}

H5Reader::H5Reader(H5Reader&& other) noexcept : path_(std::move(other.path_)), file_(other.file_) {
  other.file_ = -1;
}

H5Reader& H5Reader::operator=(H5Reader&& other) noexcept {
  if (this != &other) {
    if (file_ >= 0) H5Fclose(file_);
    path_ = std::move(other.path_);
    file_ = other.file_;
    other.file_ = -1;
  }
  return *this;
}

bool H5Reader::has(const std::string& object_path) const {
  if (object_path.empty()) return false;
  if (object_path == "/") return true;
  // Every prefix must exist before H5Oexists_by_name may be asked about the full path.
  std::size_t pos = object_path.front() == '/' ? 1 : 0;
  while (true) {
    pos = object_path.find('/', pos);
    const std::string prefix = object_path.substr(0, pos);
    if (H5Lexists(file_, prefix.c_str(), H5P_DEFAULT) <= 0) return false;
    if (H5Oexists_by_name(file_, prefix.c_str(), H5P_DEFAULT) <= 0) return false;
    if (pos == std::string::npos) return true;
    ++pos;
  }
}

namespace {

impl::Handle open_dataset(std::int64_t file, const std::string& file_path, const std::string& dataset) {
  kmoe::require(!dataset.empty(), Status::invalid_argument, file_path, ": empty dataset path");
  impl::Handle handle(H5Dopen2(file, dataset.c_str(), H5P_DEFAULT), H5Dclose);
  kmoe::require(handle.valid(), Status::io_error, file_path, ": no dataset '", dataset, "'");
  return handle;
}

Shape dataset_shape(hid_t dset, const std::string& file_path, const std::string& dataset) {
  impl::Handle space(H5Dget_space(dset), H5Sclose);
  const int rank = H5Sget_simple_extent_ndims(space.get());
  kmoe::require(rank >= 0 && rank <= Shape::max_rank, Status::io_error, file_path, ": dataset '", dataset,
                "' has rank ", rank, " (kmoe reads rank 0 to ", Shape::max_rank, ")");
  hsize_t dims[H5S_MAX_RANK];
  H5Sget_simple_extent_dims(space.get(), dims, nullptr);
  std::vector<index_t> d(dims, dims + rank);
  return Shape(d);
}

}  // namespace

Shape H5Reader::shape_of(const std::string& dataset) const {
  impl::Handle dset = open_dataset(file_, path_, dataset);
  return dataset_shape(dset.get(), path_, dataset);
}

Dtype H5Reader::dtype_of(const std::string& dataset) const {
  impl::Handle dset = open_dataset(file_, path_, dataset);
  impl::Handle type(H5Dget_type(dset.get()), H5Tclose);
  return impl::classify(type.get());
}

std::vector<std::string> H5Reader::members(const std::string& group) const {
  impl::Handle g(H5Gopen2(file_, group.c_str(), H5P_DEFAULT), H5Gclose);
  require(g.valid(), Status::io_error, path_, ": no group '", group, "'");
  H5G_info_t info;
  require(H5Gget_info(g.get(), &info) >= 0, Status::io_error, path_, ": cannot list group '", group, "'");
  std::vector<std::string> names;
  for (hsize_t i = 0; i < info.nlinks; ++i) {
    const ssize_t len = H5Lget_name_by_idx(g.get(), ".", H5_INDEX_NAME, H5_ITER_INC, i, nullptr, 0, H5P_DEFAULT);
    require(len >= 0, Status::io_error, path_, ": cannot read member ", i, " of '", group, "'");
    std::string name(static_cast<size_t>(len), '\0');
    H5Lget_name_by_idx(g.get(), ".", H5_INDEX_NAME, H5_ITER_INC, i, name.data(), name.size() + 1, H5P_DEFAULT);
    names.push_back(name);
  }
  std::sort(names.begin(), names.end());
  return names;
}

namespace {

// Reads the whole dataset, converted by HDF5 to the memory type of T, into a new tensor.
template <class T>
Tensor<T> read_dataset(std::int64_t file, const std::string& file_path, const std::string& dataset,
                       const std::vector<Dtype>& accepted, const std::optional<Shape>& expected) {
  impl::Handle dset = open_dataset(file, file_path, dataset);
  impl::Handle type(H5Dget_type(dset.get()), H5Tclose);
  const Dtype stored = impl::classify(type.get());
  const bool ok = std::find(accepted.begin(), accepted.end(), stored) != accepted.end();
  if (!ok) {
    std::string want;
    for (Dtype d : accepted) want += std::string(want.empty() ? "" : " or ") + dtype_name(d);
    fail(Status::io_error, file_path, ": dataset '", dataset, "' is ", dtype_name(stored), ", expected ", want);
  }
  const Shape shape = dataset_shape(dset.get(), file_path, dataset);
  if (expected) {
    require(shape == *expected, Status::shape_mismatch, file_path, ": dataset '", dataset, "' has shape ",
            shape.str(), ", expected ", expected->str());
  }
  std::vector<T> host(static_cast<size_t>(shape.size()));
  if (!host.empty()) {
    require(H5Dread(dset.get(), impl::memory_type<T>(), H5S_ALL, H5S_ALL, H5P_DEFAULT, host.data()) >= 0,
            Status::io_error, file_path, ": cannot read dataset '", dataset, "' (corrupt or truncated file?)");
  }
  return Tensor<T>::from_host(dataset, shape, host);
}

}  // namespace

template <class T>
Tensor<T> H5Reader::read(const std::string& dataset, const std::optional<Shape>& expected) const {
  return read_dataset<T>(file_, path_, dataset, {impl::dtype_of_type<T>()}, expected);
}

template <class T>
Tensor<T> H5Reader::read_converted(const std::string& dataset, const std::optional<Shape>& expected) const {
  static_assert(std::is_floating_point_v<T>, "read_converted converts between float32 and float64");
  return read_dataset<T>(file_, path_, dataset, {Dtype::float32, Dtype::float64}, expected);
}

Tensor<int> H5Reader::read_indices(const std::string& dataset, const std::optional<Shape>& expected) const {
  // Read as int64 first so values beyond int's range are detected rather than wrapped.
  const Tensor<std::int64_t> wide =
      read_dataset<std::int64_t>(file_, path_, dataset, {Dtype::int64, Dtype::int32, Dtype::uint8}, expected);
  const auto values = wide.to_host();
  std::vector<int> narrow(values.size());
  for (size_t i = 0; i < values.size(); ++i) {
    require(values[i] >= std::numeric_limits<int>::min() && values[i] <= std::numeric_limits<int>::max(),
            Status::io_error, path_, ": dataset '", dataset, "' value ", values[i], " does not fit in int");
    narrow[i] = static_cast<int>(values[i]);
  }
  return Tensor<int>::from_host(dataset, wide.shape(), narrow);
}

bool H5Reader::has_attribute(const std::string& object_path, const std::string& name) const {
  if (!has(object_path)) return false;
  return H5Aexists_by_name(file_, object_path.c_str(), name.c_str(), H5P_DEFAULT) > 0;
}

namespace {
impl::Handle open_attribute(std::int64_t file, const std::string& file_path, const std::string& object_path,
                            const std::string& name) {
  impl::Handle attr(H5Aopen_by_name(file, object_path.c_str(), name.c_str(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  kmoe::require(attr.valid(), Status::io_error, file_path, ": no attribute '", name, "' on '", object_path, "'");
  return attr;
}
}  // namespace

std::string H5Reader::read_string_attribute(const std::string& object_path, const std::string& name) const {
  require(has(object_path), Status::io_error, path_, ": no object '", object_path, "'");
  impl::Handle object(H5Oopen(file_, object_path.c_str(), H5P_DEFAULT), H5Oclose);
  require(object.valid(), Status::io_error, path_, ": cannot open '", object_path, "'");
  return impl::read_string_attribute(object.get(), name.c_str(), Status::io_error, path_ + " ('" + object_path + "')");
}

double H5Reader::read_number_attribute(const std::string& object_path, const std::string& name) const {
  impl::Handle attr = open_attribute(file_, path_, object_path, name);
  impl::Handle type(H5Aget_type(attr.get()), H5Tclose);
  const H5T_class_t cls = H5Tget_class(type.get());
  require(cls == H5T_FLOAT || cls == H5T_INTEGER, Status::io_error, path_, ": attribute '", name, "' on '",
          object_path, "' is not a number");
  impl::Handle space(H5Aget_space(attr.get()), H5Sclose);
  require(H5Sget_simple_extent_npoints(space.get()) == 1, Status::io_error, path_, ": attribute '", name,
          "' is not a single number");
  double value = 0;
  require(H5Aread(attr.get(), H5T_NATIVE_DOUBLE, &value) >= 0, Status::io_error, path_,
          ": cannot read attribute '", name, "'");
  return value;
}

template Tensor<float> H5Reader::read<float>(const std::string&, const std::optional<Shape>&) const;
template Tensor<double> H5Reader::read<double>(const std::string&, const std::optional<Shape>&) const;
template Tensor<std::int64_t> H5Reader::read<std::int64_t>(const std::string&, const std::optional<Shape>&) const;
template Tensor<float> H5Reader::read_converted<float>(const std::string&, const std::optional<Shape>&) const;
template Tensor<double> H5Reader::read_converted<double>(const std::string&, const std::optional<Shape>&) const;

}  // namespace kmoe::io
