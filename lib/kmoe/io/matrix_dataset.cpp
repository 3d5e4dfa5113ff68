#include "kmoe/io/matrix_dataset.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/io/atomic_write.hpp"
#include "kmoe/io/impl/hdf5_handle.hpp"

#include <hdf5.h>

#include <algorithm>
#include <filesystem>

namespace kmoe::io {

using H5Object = impl::Handle;

MatrixDataset::MatrixDataset(const std::string& path, const std::string& dataset) : path_(path), dataset_name_(dataset) {
  impl::silence_hdf5_errors();
  require(std::filesystem::exists(path), Status::io_error, path, ": no such file");
  require(H5Fis_hdf5(path.c_str()) > 0, Status::io_error, path, ": not an HDF5 file");
  file_ = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  require(file_ >= 0, Status::corrupt_file, path, ": cannot open (truncated or damaged?)");
  const auto refuse = [&](Status s, const std::string& why) {
    if (dataset_ >= 0) H5Dclose(dataset_);
    H5Fclose(file_);
    dataset_ = file_ = -1;
    fail(s, path, ": ", why);
  };
  if (H5Lexists(file_, dataset.c_str(), H5P_DEFAULT) <= 0) refuse(Status::invalid_argument, "no dataset /" + dataset);
  dataset_ = H5Dopen2(file_, dataset.c_str(), H5P_DEFAULT);
  if (dataset_ < 0) refuse(Status::corrupt_file, "/" + dataset + " is unreadable");
  H5Object type(H5Dget_type(dataset_), H5Tclose);
  H5Object space(H5Dget_space(dataset_), H5Sclose);
  if (H5Tget_class(type.get()) != H5T_FLOAT || H5Sget_simple_extent_ndims(space.get()) != 2)
    refuse(Status::invalid_argument, "/" + dataset + " is not a 2-D float dataset (rows × columns)");
  hsize_t dims[2] = {0, 0};
  H5Sget_simple_extent_dims(space.get(), dims, nullptr);
  rows_ = static_cast<std::int64_t>(dims[0]);
  cols_ = static_cast<std::int64_t>(dims[1]);
}

MatrixDataset::~MatrixDataset() {
  if (dataset_ >= 0) H5Dclose(dataset_);
  if (file_ >= 0) H5Fclose(file_);
}

std::vector<double> MatrixDataset::read_rows(std::int64_t first, std::int64_t count) const {
  require(first >= 0 && count >= 0 && first + count <= rows_, Status::invalid_argument, path_, ": rows [", first, ", ",
          first + count, ") lie outside /", dataset_name_, " of ", rows_);
  std::vector<double> values(static_cast<std::size_t>(count * cols_));
  if (values.empty()) return values;
  H5Object space(H5Dget_space(dataset_), H5Sclose);
  const hsize_t start[2] = {static_cast<hsize_t>(first), 0}, n[2] = {static_cast<hsize_t>(count), static_cast<hsize_t>(cols_)};
  H5Sselect_hyperslab(space.get(), H5S_SELECT_SET, start, nullptr, n, nullptr);
  H5Object memory(H5Screate_simple(2, n, nullptr), H5Sclose);
  require(H5Dread(dataset_, H5T_NATIVE_DOUBLE, memory.get(), space.get(), H5P_DEFAULT, values.data()) >= 0,
          Status::corrupt_file, path_, ": /", dataset_name_, " is corrupt (checksum mismatch or truncated file)");
  return values;
}

std::vector<double> MatrixDataset::read_row_set(const std::vector<std::int64_t>& rows) const {
  std::vector<double> values(rows.size() * static_cast<std::size_t>(cols_));
  if (values.empty()) return values;
  // HDF5 reads a union of hyperslabs in file order: read the sorted distinct rows, then place them.
  std::vector<std::int64_t> sorted = rows;
  std::sort(sorted.begin(), sorted.end());
  sorted.erase(std::unique(sorted.begin(), sorted.end()), sorted.end());
  H5Object space(H5Dget_space(dataset_), H5Sclose);
  H5Sselect_none(space.get());
  for (const std::int64_t r : sorted) {
    require(r >= 0 && r < rows_, Status::invalid_argument, path_, ": row ", r, " lies outside /", dataset_name_, " of ",
            rows_);
    const hsize_t start[2] = {static_cast<hsize_t>(r), 0}, n[2] = {1, static_cast<hsize_t>(cols_)};
    H5Sselect_hyperslab(space.get(), H5S_SELECT_OR, start, nullptr, n, nullptr);
  }
  const hsize_t memory_dims[2] = {sorted.size(), static_cast<hsize_t>(cols_)};
  H5Object memory(H5Screate_simple(2, memory_dims, nullptr), H5Sclose);
  std::vector<double> distinct(sorted.size() * static_cast<std::size_t>(cols_));
  require(H5Dread(dataset_, H5T_NATIVE_DOUBLE, memory.get(), space.get(), H5P_DEFAULT, distinct.data()) >= 0,
          Status::corrupt_file, path_, ": /", dataset_name_, " is corrupt (checksum mismatch or truncated file)");
  const std::size_t c = static_cast<std::size_t>(cols_);
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const std::size_t at = static_cast<std::size_t>(std::lower_bound(sorted.begin(), sorted.end(), rows[i]) - sorted.begin());
    std::copy(distinct.begin() + at * c, distinct.begin() + (at + 1) * c, values.begin() + i * c);
  }
  return values;
}

void write_matrices(const std::string& path, const std::vector<MatrixPart>& parts, const dist::Communicator& comm) {
  impl::silence_hdf5_errors();
  const auto check = [&](bool ok, const std::string& what) {
    require(ok, Status::io_error, path, ": writing ", what, " failed (disk full or unwritable?)");
  };
  write_atomically(
      path,
      [&](const std::string& temporary) {
        const H5Object fapl = impl::checksummed_file_access();
        H5Object dxpl(H5Pcreate(H5P_DATASET_XFER), H5Pclose);
        if (comm.distributed()) {
          H5Pset_fapl_mpio(fapl.get(), comm.comm(), MPI_INFO_NULL);
          H5Pset_dxpl_mpio(dxpl.get(), H5FD_MPIO_COLLECTIVE);
        }
        H5Object file(H5Fcreate(temporary.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get()), H5Fclose);
        check(file.valid(), "the file");
        for (const MatrixPart& part : parts) {
          const hsize_t dims[2] = {static_cast<hsize_t>(part.total_rows), static_cast<hsize_t>(part.cols)};
          H5Object space(H5Screate_simple(2, dims, nullptr), H5Sclose);
          H5Object ds(H5Dcreate2(file.get(), part.name.c_str(), H5T_IEEE_F32LE, space.get(), H5P_DEFAULT, H5P_DEFAULT,
                                 H5P_DEFAULT),
                      H5Dclose);
          check(ds.valid(), "/" + part.name);
          const hsize_t rows = part.cols > 0 ? part.values.size() / static_cast<std::size_t>(part.cols) : 0;
          const hsize_t count[2] = {rows, static_cast<hsize_t>(part.cols)};
          const hsize_t start[2] = {static_cast<hsize_t>(part.first_row), 0};
          const hsize_t memory_dims[2] = {std::max<hsize_t>(count[0], 1), std::max<hsize_t>(count[1], 1)};
          H5Object memory(H5Screate_simple(2, memory_dims, nullptr), H5Sclose);
          if (count[0] > 0 && count[1] > 0) {
            H5Sselect_hyperslab(space.get(), H5S_SELECT_SET, start, nullptr, count, nullptr);
          } else {
            H5Sselect_none(space.get());
            H5Sselect_none(memory.get());
          }
          check(H5Dwrite(ds.get(), H5T_NATIVE_DOUBLE, memory.get(), space.get(), dxpl.get(), part.values.data()) >= 0,
                "/" + part.name);
        }
      },
      comm);
}

}  // namespace kmoe::io
