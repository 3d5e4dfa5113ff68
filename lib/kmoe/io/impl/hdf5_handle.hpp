// What kmoe's HDF5 code shares (io/hdf5_reader.cpp, io/checkpoint.cpp): a handle closed on scope
// exit, and HDF5's own error printing turned off (kmoe reports errors itself).
#pragma once

#include <hdf5.h>

namespace kmoe::io::impl {

class Handle {
 public:
  Handle(hid_t id, herr_t (*close)(hid_t)) : id_(id), close_(close) {}
  ~Handle() {
    if (id_ >= 0) close_(id_);
  }
  Handle(Handle&& other) noexcept : id_(other.id_), close_(other.close_) { other.id_ = -1; }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  Handle& operator=(Handle&&) = delete;
  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }

 private:
  hid_t id_;
  herr_t (*close_)(hid_t);
};

// File access for every file kmoe writes: v2 object headers (libver 1.10+), which checksum the
// metadata too (names, attributes, layouts), so a damaged header is an HDF5 error rather than
// input HDF5 parses on trust (tests/fuzz/fuzz_token_dataset found HDF5 1.10.8 reading past a
// damaged v1 header's attribute name). The caller adds its driver (MPI-IO) to it.
inline Handle checksummed_file_access() {
  Handle fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
  H5Pset_libver_bounds(fapl.get(), H5F_LIBVER_V110, H5F_LIBVER_LATEST);
  return fapl;
}

// HDF5 prints its error stack to stderr by default.
inline void silence_hdf5_errors() {
  static const bool silenced = [] {
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
    return true;
  }();
  (void)silenced;
}

}  // namespace kmoe::io::impl
