// Reading and writing .safetensors files (the format of huggingface/safetensors): an 8-byte
// little-endian header length N, N bytes of UTF-8 JSON {"name": {"dtype", "shape", "data_offsets":
// [begin, end]}, ..., "__metadata__": {string: string}}, then the raw little-endian tensor bytes,
// offsets relative to the end of the header. kmoe reads F32, F64, BF16 and F16 tensors.
//
// The reader trusts nothing in the file: a header length past the end of the file, invalid UTF-8
// or JSON, an unknown dtype, a shape whose element count times the dtype's size differs from its
// byte range, offsets out of range, overlapping or leaving holes, and duplicate names are all
// Status::corrupt_file errors naming the file and the tensor; an unreadable file is
// Status::io_error. No Kokkos here: this is plain host code.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace kmoe::io {

enum class SafetensorsDtype { f32, f64, bf16, f16 };
const char* safetensors_dtype_name(SafetensorsDtype dtype);  // "F32", "F64", "BF16", "F16"
std::size_t safetensors_dtype_size(SafetensorsDtype dtype);

struct SafetensorsEntry {
  std::string name;
  SafetensorsDtype dtype = SafetensorsDtype::f32;
  std::vector<std::int64_t> shape;  // empty for a 0-d tensor
  std::uint64_t begin = 0, end = 0;  // byte range in the data section
  std::int64_t elements() const;
};

class SafetensorsFile {
 public:
  // Reads and validates the whole file.
  explicit SafetensorsFile(const std::string& path);

  const std::string& path() const { return path_; }
  // __metadata__ (empty when the file has none).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // Every tensor, sorted by name.
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }
  // The entry of that name, or null.
  const SafetensorsEntry* find(const std::string& name) const;

  // The tensor's values converted to double (exact for every supported dtype).
  std::vector<double> read_double(const std::string& name) const;
  // The tensor's raw bytes (little-endian, as stored).
  std::vector<unsigned char> read_raw(const std::string& name) const;

 private:
  std::string path_;
  std::map<std::string, std::string> metadata_;
  std::vector<SafetensorsEntry> entries_;
  std::vector<unsigned char> data_;  // the data section
};

// One tensor to write: values stored in `dtype` (F32 / F64 exactly; BF16 / F16 rounded to nearest even).
struct SafetensorsTensor {
  std::string name;
  SafetensorsDtype dtype = SafetensorsDtype::f32;
  std::vector<std::int64_t> shape;
  std::vector<double> values;
};

// Writes a file the real safetensors library reads (header padded with spaces to a multiple of 8,
// tensors in name order), crash-safely: a temporary file in the target's folder, fsync, rename.
// Throws Status::invalid_argument for a shape that does not match the values or a duplicate name,
// Status::io_error when the file cannot be written.
void write_safetensors(const std::string& path, const std::vector<SafetensorsTensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace kmoe::io
