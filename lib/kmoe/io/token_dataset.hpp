// Byte-level token datasets (HDF5), what kmoe-data writes and kmoe-train reads:
//
//   /train, /eval   uint8 datasets of token ids (the text's bytes), chunked, Fletcher32
//   /               attributes kmoe_tokens (1), vocabulary (256), source (the text's path)
//
// Each rank reads only the windows of its own sequences (hyperslabs of one dataset, opened
// read-only on its own), never the whole corpus.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace kmoe::io {

// Writes the bytes of `text` as /train (the first 1 - eval_fraction) and /eval (the rest),
// crash-safely. Status::invalid_argument for an eval_fraction outside (0, 1) or a text too short
// to give both splits a token.
void write_token_dataset(const std::string& path, const std::string& text, double eval_fraction,
                         const std::string& source);

class TokenDataset {
 public:
  // Opens /<split> of a token dataset: Status::io_error for a missing or unreadable file,
  // Status::invalid_argument for an HDF5 file that is not one (naming what is missing),
  // Status::corrupt_file for a damaged one.
  TokenDataset(const std::string& path, const std::string& split);
  ~TokenDataset();
  TokenDataset(const TokenDataset&) = delete;
  TokenDataset& operator=(const TokenDataset&) = delete;

  std::int64_t size() const { return size_; }
  int vocabulary() const { return vocabulary_; }
  // Tokens [first, first + count) (checksums verified): Status::corrupt_file when they fail.
  std::vector<int> read(std::int64_t first, std::int64_t count) const;

 private:
  std::string path_, split_;
  std::int64_t file_ = -1, dataset_ = -1;
  std::int64_t size_ = 0;
  int vocabulary_ = 0;
};

}  // namespace kmoe::io
