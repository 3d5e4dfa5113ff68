// Matrices in HDF5 (2-D float32 or float64 datasets, rows × columns): the inputs and targets of
// kmoe-train's regression task and of kmoe-infer. Each rank reads only its rows.
#pragma once

#include "kmoe/dist/communicator.hpp"

#include <cstdint>
#include <string>
#include <vector>

namespace kmoe::io {

class MatrixDataset {
 public:
  // Status::io_error: a missing or unreadable file; Status::invalid_argument: no such dataset, or
  // one that is not a 2-D float dataset (naming it); Status::corrupt_file: a damaged file.
  MatrixDataset(const std::string& path, const std::string& dataset);
  ~MatrixDataset();
  MatrixDataset(const MatrixDataset&) = delete;
  MatrixDataset& operator=(const MatrixDataset&) = delete;

  std::int64_t rows() const { return rows_; }
  std::int64_t cols() const { return cols_; }
  // Rows [first, first + count), row-major (checksums verified where the file has them).
  std::vector<double> read_rows(std::int64_t first, std::int64_t count) const;
  // The given rows, in the given order, in one read.
  std::vector<double> read_row_set(const std::vector<std::int64_t>& rows) const;

 private:
  std::string path_, dataset_name_;
  std::int64_t file_ = -1, dataset_ = -1, rows_ = 0, cols_ = 0;
};

// One matrix of a file being written: `name` [total_rows, cols] (float32), of which this rank
// holds rows [first_row, first_row + values.size() / cols).
struct MatrixPart {
  std::string name;
  std::vector<double> values;
  std::int64_t first_row = 0, total_rows = 0, cols = 0;
};

// Writes the matrices to a new file at path, crash-safely: each rank its rows, in one collective
// parallel-HDF5 write per matrix (every rank passes the same names and shapes).
void write_matrices(const std::string& path, const std::vector<MatrixPart>& parts, const dist::Communicator& comm);

}  // namespace kmoe::io
