#include "kmoe/io/safetensors.hpp"

#include "kmoe/core/bfloat16.hpp"
#include "kmoe/core/error.hpp"
#include "kmoe/io/atomic_write.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <optional>
#include <set>

namespace kmoe::io {

namespace {

using nlohmann::json;

constexpr const char* metadata_key = "__metadata__";
constexpr std::uint64_t header_length_size = 8;

template <class... Parts>
[[noreturn]] void corrupt(const std::string& path, const Parts&... parts) {
  fail(Status::corrupt_file, path, ": ", parts...);
}

template <class... Parts>
void check(bool condition, const std::string& path, const Parts&... parts) {
  if (!condition) corrupt(path, parts...);
}

std::vector<unsigned char> read_whole_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  require(in.is_open(), Status::io_error, path, ": cannot open: ", std::strerror(errno));
  std::vector<unsigned char> bytes;
  // Chunked reads rather than seekg/tellg: a folder opens fine but its "size" is meaningless;
  // reading it fails, which sets badbit.
  char chunk[1 << 16];
  while (in.read(chunk, sizeof chunk) || in.gcount() > 0) bytes.insert(bytes.end(), chunk, chunk + in.gcount());
  require(!in.bad(), Status::io_error, path, ": read failed: ", std::strerror(errno));
  return bytes;
}

// Strict UTF-8 (RFC 3629): no overlong forms, no surrogates, nothing above U+10FFFF. Returns the
// offset of the first bad byte, if any.
std::optional<std::size_t> find_invalid_utf8(const unsigned char* text, std::size_t size) {
  std::size_t i = 0;
  while (i < size) {
    const unsigned char lead = text[i];
    if (lead < 0x80) {
      ++i;
      continue;
    }
    std::size_t length;
    std::uint32_t code_point, smallest;
    if ((lead & 0xE0) == 0xC0) {
      length = 2, code_point = lead & 0x1Fu, smallest = 0x80;
    } else if ((lead & 0xF0) == 0xE0) {
      length = 3, code_point = lead & 0x0Fu, smallest = 0x800;
    } else if ((lead & 0xF8) == 0xF0) {
      length = 4, code_point = lead & 0x07u, smallest = 0x10000;
    } else {
      return i;  // a stray continuation byte, or 0xF8..0xFF
    }
    if (size - i < length) return i;
    for (std::size_t k = 1; k < length; ++k) {
      if ((text[i + k] & 0xC0) != 0x80) return i;
      code_point = (code_point << 6) | (text[i + k] & 0x3Fu);
    }
    if (code_point < smallest || (code_point >= 0xD800 && code_point <= 0xDFFF) || code_point > 0x10FFFF) return i;
    i += length;
  }
  return std::nullopt;
}

// Parses the header. nlohmann keeps the last of duplicate keys, so a parser callback tracks the
// keys of every open object and records the first duplicate.
json parse_header(const std::string& path, const unsigned char* text, std::size_t size) {
  struct OpenObject {
    std::string owner;  // the key the object is the value of ("" for the root)
    std::set<std::string> keys;
  };
  std::vector<OpenObject> open;
  std::string last_key;
  std::optional<std::string> duplicate;
  const json::parser_callback_t track_keys = [&](int, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::object_start) {
      open.push_back({open.empty() ? std::string() : last_key, {}});
    } else if (event == json::parse_event_t::object_end) {
      open.pop_back();
    } else if (event == json::parse_event_t::key) {
      last_key = parsed.get<std::string>();
      if (!open.back().keys.insert(last_key).second && !duplicate) {
        duplicate = open.size() == 1 ? impl::concat("duplicate tensor name '", last_key, "' in the header")
                                     : impl::concat("'", open.back().owner, "': duplicate key '", last_key, "'");
      }
    }
    return true;
  };
  json header;
  try {
    header = json::parse(text, text + size, track_keys);
  } catch (const json::exception& e) {
    corrupt(path, "header is not valid JSON: ", e.what());
  }
  if (duplicate) corrupt(path, *duplicate);
  check(header.is_object(), path, "header is not a JSON object but ", header.type_name());
  return header;
}

std::optional<SafetensorsDtype> dtype_from_name(const std::string& name) {
  for (const auto dtype : {SafetensorsDtype::f32, SafetensorsDtype::f64, SafetensorsDtype::bf16, SafetensorsDtype::f16})
    if (name == safetensors_dtype_name(dtype)) return dtype;
  return std::nullopt;
}

// The element count of shape, or nothing for a negative dimension or a count that does not fit
// in int64. A zero dimension makes the count zero whatever the others are.
std::optional<std::int64_t> element_count(const std::vector<std::int64_t>& shape) {
  if (std::any_of(shape.begin(), shape.end(), [](std::int64_t dim) { return dim < 0; })) return std::nullopt;
  if (std::find(shape.begin(), shape.end(), 0) != shape.end()) return 0;
  std::int64_t count = 1;
  for (const std::int64_t dim : shape) {
    if (count > std::numeric_limits<std::int64_t>::max() / dim) return std::nullopt;
    count *= dim;
  }
  return count;
}

SafetensorsEntry parse_entry(const std::string& path, const std::string& name, const json& value) {
  const std::string where = "tensor '" + name + "': ";
  check(value.is_object(), path, where, "entry is not a JSON object but ", value.type_name());
  for (const auto& field : value.items()) {
    const std::string& key = field.key();
    check(key == "dtype" || key == "shape" || key == "data_offsets", path, where, "unexpected field '", key, "'");
  }
  for (const char* field : {"dtype", "shape", "data_offsets"})
    check(value.contains(field), path, where, "missing \"", field, "\"");

  SafetensorsEntry entry;
  entry.name = name;

  const json& dtype = value["dtype"];
  check(dtype.is_string(), path, where, "\"dtype\" is not a string");
  const auto parsed_dtype = dtype_from_name(dtype.get<std::string>());
  check(parsed_dtype.has_value(), path, where, "unsupported dtype '", dtype.get<std::string>(),
        "' (kmoe reads F32, F64, BF16 and F16)");
  entry.dtype = *parsed_dtype;

  const json& shape = value["shape"];
  check(shape.is_array(), path, where, "\"shape\" is not an array");
  for (const json& dim : shape) {
    check(dim.is_number_integer(), path, where, "shape dimension ", dim.dump(), " is not an integer");
    check(dim.is_number_unsigned(), path, where, "shape dimension ", dim.dump(), " is negative");
    const auto size = dim.get<std::uint64_t>();
    check(size <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()), path, where,
          "shape dimension ", size, " is too large");
    entry.shape.push_back(static_cast<std::int64_t>(size));
  }

  const json& offsets = value["data_offsets"];
  check(offsets.is_array() && offsets.size() == 2, path, where, "\"data_offsets\" is not an array [begin, end]");
  for (const json& offset : offsets)
    check(offset.is_number_unsigned(), path, where, "data offset ", offset.dump(), " is not an integer >= 0");
  entry.begin = offsets[0].get<std::uint64_t>();
  entry.end = offsets[1].get<std::uint64_t>();
  check(entry.begin <= entry.end, path, where, "data_offsets begin ", entry.begin, " > end ", entry.end);

  const auto count = element_count(entry.shape);
  const std::uint64_t element_size = safetensors_dtype_size(entry.dtype);
  check(count.has_value() && static_cast<std::uint64_t>(*count) <= std::numeric_limits<std::uint64_t>::max() / element_size,
        path, where, "element count times dtype size overflows");
  const std::uint64_t bytes = static_cast<std::uint64_t>(*count) * element_size;
  check(bytes == entry.end - entry.begin, path, where, "shape and dtype ", safetensors_dtype_name(entry.dtype), " need ",
        bytes, " bytes but data_offsets [", entry.begin, ", ", entry.end, "] hold ", entry.end - entry.begin);
  return entry;
}

// The ranges, sorted by offset, must tile the data section exactly, as the real library requires.
void check_ranges_tile(const std::string& path, std::vector<const SafetensorsEntry*> entries, std::uint64_t data_size) {
  std::sort(entries.begin(), entries.end(), [](const SafetensorsEntry* a, const SafetensorsEntry* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  std::uint64_t covered = 0;
  const SafetensorsEntry* previous = nullptr;
  for (const SafetensorsEntry* entry : entries) {
    check(entry->end <= data_size, path, "tensor '", entry->name, "': data_offsets end ", entry->end,
          " is past the end of the data section (", data_size, " bytes)");
    if (entry->begin < covered)  // covered > 0, so there is a previous tensor
      corrupt(path, "tensor '", entry->name, "': bytes [", entry->begin, ", ", entry->end, ") overlap tensor '",
              previous->name, "'");
    check(entry->begin == covered, path, "tensor '", entry->name, "': hole of ", entry->begin - covered,
          " bytes before it in the data section");
    covered = entry->end;
    previous = entry;
  }
  check(covered == data_size, path, "data section has ", data_size - covered, " bytes after the last tensor");
}

std::uint64_t load_le(const unsigned char* bytes, std::size_t size) {
  std::uint64_t value = 0;
  for (std::size_t i = 0; i < size; ++i) value |= static_cast<std::uint64_t>(bytes[i]) << (8 * i);
  return value;
}

void store_le(std::uint64_t value, std::size_t size, std::vector<unsigned char>& out) {
  for (std::size_t i = 0; i < size; ++i) out.push_back(static_cast<unsigned char>(value >> (8 * i)));
}

// value rounded to float with round-to-odd: an inexact result gets an odd last bit. Rounding that
// (24 bits) to bfloat16 or half (at most 11 bits) to nearest even then equals rounding value
// directly, which double -> float -> 16 bits with two round-to-nearest steps does not.
float to_float_round_to_odd(double value) {
  const float rounded = static_cast<float>(value);
  if (std::isnan(value) || static_cast<double>(rounded) == value) return rounded;
  std::uint32_t bits;
  std::memcpy(&bits, &rounded, sizeof bits);
  if ((bits & 1u) != 0) return rounded;
  return std::nextafter(rounded, value > rounded ? std::numeric_limits<float>::infinity()
                                                 : -std::numeric_limits<float>::infinity());
}

std::uint64_t encode(double value, SafetensorsDtype dtype) {
  switch (dtype) {
    case SafetensorsDtype::f32: {
      const float narrowed = static_cast<float>(value);
      std::uint32_t bits;
      std::memcpy(&bits, &narrowed, sizeof bits);
      return bits;
    }
    case SafetensorsDtype::f64: {
      std::uint64_t bits;
      std::memcpy(&bits, &value, sizeof bits);
      return bits;
    }
    case SafetensorsDtype::bf16: return float_to_bfloat16_bits(to_float_round_to_odd(value));
    case SafetensorsDtype::f16: return float_to_half_bits(to_float_round_to_odd(value));
  }
  fail(Status::internal, "unknown safetensors dtype");
}

double decode(std::uint64_t bits, SafetensorsDtype dtype) {
  switch (dtype) {
    case SafetensorsDtype::f32: {
      const auto narrow = static_cast<std::uint32_t>(bits);
      float value;
      std::memcpy(&value, &narrow, sizeof value);
      return value;
    }
    case SafetensorsDtype::f64: {
      double value;
      std::memcpy(&value, &bits, sizeof value);
      return value;
    }
    case SafetensorsDtype::bf16: return bfloat16_bits_to_float(static_cast<std::uint16_t>(bits));
    case SafetensorsDtype::f16: return half_bits_to_float(static_cast<std::uint16_t>(bits));
  }
  fail(Status::internal, "unknown safetensors dtype");
}

}  // namespace

const char* safetensors_dtype_name(SafetensorsDtype dtype) {
  switch (dtype) {
    case SafetensorsDtype::f32: return "F32";
    case SafetensorsDtype::f64: return "F64";
    case SafetensorsDtype::bf16: return "BF16";
    case SafetensorsDtype::f16: return "F16";
  }
  return "unknown";
}

std::size_t safetensors_dtype_size(SafetensorsDtype dtype) {
  switch (dtype) {
    case SafetensorsDtype::f32: return 4;
    case SafetensorsDtype::f64: return 8;
    case SafetensorsDtype::bf16:
    case SafetensorsDtype::f16: return 2;
  }
  fail(Status::internal, "unknown safetensors dtype");
}

std::int64_t SafetensorsEntry::elements() const {
  const auto count = element_count(shape);
  require(count.has_value(), Status::invalid_argument, "tensor '", name, "': element count overflows");
  return *count;
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  std::vector<unsigned char> bytes = read_whole_file(path);
  const std::uint64_t file_size = bytes.size();
  check(file_size >= header_length_size, path, "file is ", file_size, " bytes long, shorter than the 8-byte header length");
  const std::uint64_t header_size = load_le(bytes.data(), header_length_size);
  // Compared against what is left after the length field, so that a huge N cannot overflow.
  check(header_size <= file_size - header_length_size, path, "header length ", header_size,
        " is past the end of the file (", file_size, " bytes)");
  const unsigned char* header_text = bytes.data() + header_length_size;
  const auto bad_byte = find_invalid_utf8(header_text, header_size);
  check(!bad_byte.has_value(), path, "header is not valid UTF-8 (byte ", bad_byte.value_or(0), " of the header)");
  // nlohmann's lexer takes a NUL outside a string for the end of the input, which would accept
  // "{}\0<anything>"; JSON text can hold no raw NUL anywhere.
  const void* nul = std::memchr(header_text, 0, header_size);
  check(nul == nullptr, path, "header holds a NUL byte (byte ",
        static_cast<const unsigned char*>(nul) - header_text, " of the header)");
  const json header = parse_header(path, header_text, header_size);

  for (const auto& item : header.items()) {
    if (item.key() == metadata_key) {
      check(item.value().is_object(), path, "__metadata__ is not a JSON object");
      for (const auto& field : item.value().items()) {
        check(field.value().is_string(), path, "__metadata__ value of '", field.key(), "' is not a string");
        metadata_.emplace(field.key(), field.value().get<std::string>());
      }
    } else {
      entries_.push_back(parse_entry(path, item.key(), item.value()));
    }
  }
  std::sort(entries_.begin(), entries_.end(),
            [](const SafetensorsEntry& a, const SafetensorsEntry& b) { return a.name < b.name; });

  const std::uint64_t data_start = header_length_size + header_size;
  std::vector<const SafetensorsEntry*> by_offset;
  for (const auto& entry : entries_) by_offset.push_back(&entry);
  check_ranges_tile(path, by_offset, file_size - data_start);

  bytes.erase(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(data_start));
  data_ = std::move(bytes);
}

const SafetensorsEntry* SafetensorsFile::find(const std::string& name) const {
  const auto it = std::lower_bound(entries_.begin(), entries_.end(), name,
                                   [](const SafetensorsEntry& entry, const std::string& key) { return entry.name < key; });
  return it != entries_.end() && it->name == name ? &*it : nullptr;
}

std::vector<unsigned char> SafetensorsFile::read_raw(const std::string& name) const {
  const SafetensorsEntry* entry = find(name);
  require(entry != nullptr, Status::invalid_argument, path_, ": no tensor named '", name, "'");
  // The constructor checked that [begin, end) lies inside data_.
  return std::vector<unsigned char>(data_.begin() + static_cast<std::ptrdiff_t>(entry->begin),
                                    data_.begin() + static_cast<std::ptrdiff_t>(entry->end));
}

std::vector<double> SafetensorsFile::read_double(const std::string& name) const {
  const SafetensorsEntry* entry = find(name);
  require(entry != nullptr, Status::invalid_argument, path_, ": no tensor named '", name, "'");
  const std::size_t element_size = safetensors_dtype_size(entry->dtype);
  const unsigned char* bytes = data_.data() + entry->begin;
  const std::size_t count = (entry->end - entry->begin) / element_size;
  std::vector<double> values(count);
  for (std::size_t i = 0; i < count; ++i) values[i] = decode(load_le(bytes + i * element_size, element_size), entry->dtype);
  return values;
}

void write_safetensors(const std::string& path, const std::vector<SafetensorsTensor>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::vector<const SafetensorsTensor*> sorted;
  for (const auto& tensor : tensors) sorted.push_back(&tensor);
  std::sort(sorted.begin(), sorted.end(),
            [](const SafetensorsTensor* a, const SafetensorsTensor* b) { return a->name < b->name; });

  json header = json::object();
  std::uint64_t offset = 0;
  for (std::size_t i = 0; i < sorted.size(); ++i) {
    const SafetensorsTensor& tensor = *sorted[i];
    require(tensor.name != metadata_key, Status::invalid_argument, path, ": a tensor cannot be named __metadata__");
    require(i == 0 || sorted[i - 1]->name != tensor.name, Status::invalid_argument, path, ": duplicate tensor name '",
            tensor.name, "'");
    const auto count = element_count(tensor.shape);
    require(count.has_value() && static_cast<std::uint64_t>(*count) == tensor.values.size(),
            Status::invalid_argument, path, ": tensor '", tensor.name, "': shape does not match its ",
            tensor.values.size(), " values");
    const std::uint64_t end = offset + tensor.values.size() * safetensors_dtype_size(tensor.dtype);
    header[tensor.name] = {{"dtype", safetensors_dtype_name(tensor.dtype)},
                           {"shape", tensor.shape},
                           {"data_offsets", {offset, end}}};
    offset = end;
  }
  if (!metadata.empty()) header[metadata_key] = metadata;

  std::string header_text;
  try {
    header_text = header.dump();
  } catch (const json::exception& e) {
    fail(Status::invalid_argument, path, ": tensor names and metadata must be valid UTF-8: ", e.what());
  }
  // The real library pads with spaces so that the data section starts 8-byte aligned.
  header_text.append((8 - header_text.size() % 8) % 8, ' ');

  write_atomically(path, [&](const std::string& temporary) {
    std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
    require(out.is_open(), Status::io_error, path, ": cannot create ", temporary, ": ", std::strerror(errno));
    std::vector<unsigned char> bytes;
    const auto flush = [&] {
      out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
      bytes.clear();
    };
    store_le(header_text.size(), header_length_size, bytes);
    bytes.insert(bytes.end(), header_text.begin(), header_text.end());
    flush();
    // One tensor at a time, so a large model never needs a second full copy in memory.
    for (const SafetensorsTensor* tensor : sorted) {
      const std::size_t element_size = safetensors_dtype_size(tensor->dtype);
      for (const double value : tensor->values) store_le(encode(value, tensor->dtype), element_size, bytes);
      flush();
    }
    out.close();
    require(!out.fail(), Status::io_error, path, ": writing ", temporary, " failed: ", std::strerror(errno));
  });
}

}  // namespace kmoe::io
