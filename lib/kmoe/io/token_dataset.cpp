#include "kmoe/io/token_dataset.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/io/atomic_write.hpp"
#include "kmoe/io/impl/hdf5_handle.hpp"
#include "kmoe/io/impl/hdf5_strings.hpp"

#include <hdf5.h>

#include <algorithm>
#include <filesystem>

namespace kmoe::io {

namespace {

using H5Object = impl::Handle;

void check(bool ok, const std::string& path, const std::string& what) {
  require(ok, Status::io_error, path, ": writing ", what, " failed (disk full or unwritable?)");
}

void write_split(hid_t file, const char* name, const unsigned char* bytes, hsize_t n, const std::string& path) {
  H5Object space(H5Screate_simple(1, &n, nullptr), H5Sclose);
  H5Object plist(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
  const hsize_t chunk = std::min<hsize_t>(n, hsize_t(1) << 20);
  check(H5Pset_chunk(plist.get(), 1, &chunk) >= 0 && H5Pset_fletcher32(plist.get()) >= 0, path, name);
  H5Object ds(H5Dcreate2(file, name, H5T_STD_U8LE, space.get(), H5P_DEFAULT, plist.get(), H5P_DEFAULT), H5Dclose);
  check(ds.valid(), path, name);
  check(H5Dwrite(ds.get(), H5T_NATIVE_UCHAR, H5S_ALL, H5S_ALL, H5P_DEFAULT, bytes) >= 0, path, name);
}

void attribute(hid_t object, const char* name, std::int64_t value, const std::string& path) {
  H5Object space(H5Screate(H5S_SCALAR), H5Sclose);
  H5Object attr(H5Acreate2(object, name, H5T_STD_I64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  check(attr.valid() && H5Awrite(attr.get(), H5T_NATIVE_INT64, &value) >= 0, path, name);
}

void string_attribute(hid_t object, const char* name, const std::string& value, const std::string& path) {
  check(impl::write_string_attribute(object, name, value) >= 0, path, name);
}

}  // namespace

void write_token_dataset(const std::string& path, const std::string& text, double eval_fraction,
                         const std::string& source) {
  require(eval_fraction > 0 && eval_fraction < 1, Status::invalid_argument, "eval_fraction = ", eval_fraction,
          " must lie in (0, 1)");
  const auto n = static_cast<hsize_t>(text.size());
  const auto n_eval = static_cast<hsize_t>(static_cast<double>(n) * eval_fraction);
  require(n_eval >= 1 && n_eval < n, Status::invalid_argument, source, ": ", n,
          " bytes are too few for a train and an eval split");
  impl::silence_hdf5_errors();
  write_atomically(path, [&](const std::string& temporary) {
    const H5Object fapl = impl::checksummed_file_access();
    H5Object file(H5Fcreate(temporary.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get()), H5Fclose);
    check(file.valid(), path, "the file");
    const auto* bytes = reinterpret_cast<const unsigned char*>(text.data());
    write_split(file.get(), "train", bytes, n - n_eval, path);
    write_split(file.get(), "eval", bytes + (n - n_eval), n_eval, path);
    attribute(file.get(), "kmoe_tokens", 1, path);
    attribute(file.get(), "vocabulary", 256, path);
    string_attribute(file.get(), "source", source, path);
  });
}

TokenDataset::TokenDataset(const std::string& path, const std::string& split) : path_(path), split_(split) {
  impl::silence_hdf5_errors();
  require(std::filesystem::exists(path), Status::io_error, path, ": no such token dataset");
  require(H5Fis_hdf5(path.c_str()) > 0, Status::io_error, path, ": not an HDF5 file (make one with kmoe-data)");
  file_ = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  require(file_ >= 0, Status::corrupt_file, path, ": cannot open (truncated or damaged?)");
  const auto fail_here = [&](Status s, const std::string& why) {
    H5Fclose(file_);
    file_ = -1;
    fail(s, path, ": ", why);
  };
  if (H5Aexists(file_, "vocabulary") <= 0)
    fail_here(Status::invalid_argument, "not a kmoe token dataset (no vocabulary attribute; make one with kmoe-data)");
  {
    H5Object attr(H5Aopen(file_, "vocabulary", H5P_DEFAULT), H5Aclose);
    std::int64_t v = 0;
    if (!attr.valid() || H5Aread(attr.get(), H5T_NATIVE_INT64, &v) < 0 || v < 1 || v > 256)
      fail_here(Status::corrupt_file, "its vocabulary attribute is unreadable or outside [1, 256]");
    vocabulary_ = static_cast<int>(v);
  }
  if (H5Lexists(file_, split.c_str(), H5P_DEFAULT) <= 0) fail_here(Status::invalid_argument, "no /" + split + " split");
  dataset_ = H5Dopen2(file_, split.c_str(), H5P_DEFAULT);
  if (dataset_ < 0) fail_here(Status::corrupt_file, "/" + split + " is unreadable");
  H5Object space(H5Dget_space(dataset_), H5Sclose);
  hsize_t n = 0;
  if (H5Sget_simple_extent_ndims(space.get()) != 1) {
    H5Dclose(dataset_);
    fail_here(Status::invalid_argument, "/" + split + " is not a 1-D dataset of tokens");
  }
  H5Sget_simple_extent_dims(space.get(), &n, nullptr);
  size_ = static_cast<std::int64_t>(n);
}

TokenDataset::~TokenDataset() {
  if (dataset_ >= 0) H5Dclose(dataset_);
  if (file_ >= 0) H5Fclose(file_);
}

std::vector<int> TokenDataset::read(std::int64_t first, std::int64_t count) const {
  require(first >= 0 && count >= 0 && first + count <= size_, Status::invalid_argument, path_, ": tokens [", first,
          ", ", first + count, ") lie outside /", split_, " of ", size_);
  std::vector<unsigned char> bytes(static_cast<std::size_t>(count));
  if (count > 0) {
    H5Object space(H5Dget_space(dataset_), H5Sclose);
    const hsize_t start = static_cast<hsize_t>(first), n = static_cast<hsize_t>(count);
    H5Sselect_hyperslab(space.get(), H5S_SELECT_SET, &start, nullptr, &n, nullptr);
    H5Object memory(H5Screate_simple(1, &n, nullptr), H5Sclose);
    require(H5Dread(dataset_, H5T_NATIVE_UCHAR, memory.get(), space.get(), H5P_DEFAULT, bytes.data()) >= 0,
            Status::corrupt_file, path_, ": /", split_, " is corrupt (checksum mismatch or truncated file)");
  }
  std::vector<int> tokens(bytes.begin(), bytes.end());
  for (const int t : tokens)
    require(t < vocabulary_, Status::corrupt_file, path_, ": token ", t, " is outside the vocabulary of ",
            vocabulary_);
  return tokens;
}

}  // namespace kmoe::io
