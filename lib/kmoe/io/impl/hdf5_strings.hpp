// String attributes, the one way kmoe's HDF5 files write and read them (checkpoints, token
// datasets, the fixtures' reader).
//
// Written as fixed-length UTF-8: the bytes live in the attribute message, which the v2 object
// headers of kmoe's files checksum, so a damaged string is an HDF5 read error. Variable-length
// strings (h5py's default, kmoe's before 2026-12) live in the global heap, which carries no
// checksum: HDF5 1.10's reader copies whatever length a damaged heap object claims (found by
// tests/fuzz/fuzz_checkpoint; tests/fuzz/regressions/checkpoint/). They are still read.
#pragma once

#include "kmoe/core/error.hpp"
#include "kmoe/io/impl/hdf5_handle.hpp"

#include <hdf5.h>

#include <algorithm>
#include <string>

namespace kmoe::io::impl {

// Negative on failure, for the caller's error.
inline herr_t write_string_attribute(hid_t object, const char* name, const std::string& value) {
  Handle type(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(type.get(), std::max<std::size_t>(value.size(), 1));
  H5Tset_strpad(type.get(), H5T_STR_NULLPAD);
  H5Tset_cset(type.get(), H5T_CSET_UTF8);
  Handle space(H5Screate(H5S_SCALAR), H5Sclose);
  const Handle attr(H5Acreate2(object, name, type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  if (!attr.valid()) return -1;
  // c_str(): an empty value is written as its one NUL byte (the type's size is at least 1)
  return H5Awrite(attr.get(), type.get(), value.c_str());
}

// The attribute `name` of object, one string of either kind; `failure` (naming `where`) when it is
// missing, not a single string, or unreadable.
inline std::string read_string_attribute(hid_t object, const char* name, Status failure, const std::string& where) {
  Handle attr(H5Aopen(object, name, H5P_DEFAULT), H5Aclose);
  require(attr.valid(), failure, where, ": no attribute '", name, "'");
  Handle type(H5Aget_type(attr.get()), H5Tclose);
  require(type.valid() && H5Tget_class(type.get()) == H5T_STRING, failure, where, ": attribute '", name,
          "' is not a string");
  // The reads below have room for one string; an array of strings would overrun them.
  Handle space(H5Aget_space(attr.get()), H5Sclose);
  require(space.valid() && H5Sget_simple_extent_npoints(space.get()) == 1, failure, where, ": attribute '", name,
          "' is not a single string");
  if (H5Tis_variable_str(type.get()) > 0) {
    Handle memtype(H5Tcopy(H5T_C_S1), H5Tclose);
    H5Tset_size(memtype.get(), H5T_VARIABLE);
    H5Tset_cset(memtype.get(), H5Tget_cset(type.get()));
    char* value = nullptr;
    require(H5Aread(attr.get(), memtype.get(), &value) >= 0 && value != nullptr, failure, where,
            ": cannot read attribute '", name, "'");
    std::string result(value);
    H5Dvlen_reclaim(memtype.get(), space.get(), H5P_DEFAULT, &value);
    return result;
  }
  const std::size_t size = H5Tget_size(type.get());
  require(size > 0 && size < (std::size_t(1) << 30), failure, where, ": attribute '", name, "' has a size of ", size);
  std::string value(size, '\0');
  require(H5Aread(attr.get(), type.get(), value.data()) >= 0, failure, where, ": cannot read attribute '", name, "'");
  value.resize(std::min(value.find('\0'), value.size()));
  return value;
}

}  // namespace kmoe::io::impl
