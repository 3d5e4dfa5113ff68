// The fuzz input as the harnesses use it: written to a file (kmoe's readers take paths), or drawn
// from as a sequence of choices. No kmoe code here: the C ABI harness links only libkmoe.so.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <string>

namespace kmoe::fuzz {

// The input written to one file of this process (under TMPDIR), rewritten for every input.
inline const std::string& input_file(const std::uint8_t* data, std::size_t size) {
  static const std::string path = [] {
    const char* dir = std::getenv("TMPDIR");
    return std::string(dir ? dir : "/tmp") + "/kmoe-fuzz-" + std::to_string(getpid()) + ".bin";
  }();
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  out.close();
  if (!out) std::abort();  // the harness's own file: nothing the input can cause
  return path;
}

// A little-endian reader of the fuzz input, for harnesses that draw choices from it.
class Draws {
 public:
  Draws(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {}
  bool empty() const { return at_ >= size_; }
  std::uint8_t byte() { return at_ < size_ ? data_[at_++] : 0; }
  std::int64_t integer(std::int64_t lo, std::int64_t hi) {  // in [lo, hi]
    std::uint64_t v = 0;
    for (int i = 0; i < 4; ++i) v = (v << 8) | byte();
    return lo + static_cast<std::int64_t>(v % static_cast<std::uint64_t>(hi - lo + 1));
  }
  std::string rest() {
    std::string s(reinterpret_cast<const char*>(data_ + at_), size_ - at_);
    at_ = size_;
    return s;
  }

 private:
  const std::uint8_t* data_;
  std::size_t size_, at_ = 0;
};

}  // namespace kmoe::fuzz
