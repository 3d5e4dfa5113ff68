// bfloat16 / half conversions and the safetensors reader and writer. Host-only: no Kokkos here.
#include "kmoe/core/bfloat16.hpp"
#include "kmoe/core/error.hpp"
#include "kmoe/io/safetensors.hpp"

#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <optional>
#include <stdexcept>

using namespace kmoe;
using io::SafetensorsDtype;
using io::SafetensorsEntry;
using io::SafetensorsFile;
using io::SafetensorsTensor;

namespace {

namespace fs = std::filesystem;

float float_of(std::uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

std::uint32_t bits_of(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

// A fresh directory under the system's temporary folder, removed with everything in it when the
// test ends.
class TempDir {
 public:
  TempDir() {
    std::string name = (fs::temp_directory_path() / "kmoe_test_safetensors_XXXXXX").string();
    if (mkdtemp(name.data()) == nullptr) throw std::runtime_error("mkdtemp failed for " + name);
    path_ = name;
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const fs::path& path() const { return path_; }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  fs::path path_;
};

// Runs call, which must throw kmoe::Error with the given status and a message containing part.
template <class Call>
void expect_error(Call&& call, Status status, const std::string& part) {
  try {
    call();
    ADD_FAILURE() << "no error; expected " << status_name(status) << " with '" << part << "'";
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_EQ(e.status(), status) << message;
    EXPECT_NE(message.find(part), std::string::npos) << "'" << part << "' in: " << message;
  }
}

std::string little_endian(std::uint64_t value) {
  std::string bytes;
  for (int i = 0; i < 8; ++i) bytes.push_back(static_cast<char>(value >> (8 * i)));
  return bytes;
}

// A safetensors file by hand: the header length (that of header unless given), header, data.
std::string file_bytes(const std::string& header, const std::string& data = "",
                       std::optional<std::uint64_t> header_length = std::nullopt) {
  return little_endian(header_length.value_or(header.size())) + header + data;
}

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// The file under $KMOE_TEST_DATA/safetensors (set by ctest); empty, with a test failure, when unset.
std::string data_file(const std::string& name) {
  const char* root = std::getenv("KMOE_TEST_DATA");
  if (root == nullptr) {
    ADD_FAILURE() << "KMOE_TEST_DATA is not set: run through ctest, or export KMOE_TEST_DATA=<kmoe checkout>/data";
    return "";
  }
  return std::string(root) + "/safetensors/" + name;
}

}  // namespace

TEST(Bfloat16, RoundsToNearestEvenLikeTorch) {
  EXPECT_EQ(float_to_bfloat16_bits(1.0f), 0x3F80);
  EXPECT_EQ(float_to_bfloat16_bits(-2.0f), 0xC000);
  // Halfway cases go to the even neighbour; anything past halfway rounds up.
  EXPECT_EQ(float_to_bfloat16_bits(float_of(0x3F808000)), 0x3F80);
  EXPECT_EQ(float_to_bfloat16_bits(float_of(0x3F818000)), 0x3F82);
  EXPECT_EQ(float_to_bfloat16_bits(float_of(0x3F808001)), 0x3F81);
  EXPECT_EQ(float_to_bfloat16_bits(float_of(0x3F807FFF)), 0x3F80);
  // A carry out of the mantissa bumps the exponent.
  EXPECT_EQ(float_to_bfloat16_bits(float_of(0x3FFFFFFF)), 0x4000);
  // FLT_MAX lies past the halfway point between bf16's largest finite value (0x7F7F) and 2^128,
  // so it rounds to infinity; so does the halfway point itself (0x7F80 is even).
  EXPECT_EQ(float_to_bfloat16_bits(FLT_MAX), 0x7F80);
  EXPECT_EQ(float_to_bfloat16_bits(-FLT_MAX), 0xFF80);
  EXPECT_EQ(float_to_bfloat16_bits(float_of(0x7F7F8000)), 0x7F80);
  EXPECT_EQ(float_to_bfloat16_bits(float_of(0x7F7F7FFF)), 0x7F7F);
  EXPECT_EQ(float_to_bfloat16_bits(std::numeric_limits<float>::infinity()), 0x7F80);
  // bfloat16 shares float's exponent range: float subnormals round like any other value.
  EXPECT_EQ(float_to_bfloat16_bits(float_of(0x00008000)), 0x0000);
  EXPECT_EQ(float_to_bfloat16_bits(float_of(0x00018000)), 0x0002);
  EXPECT_EQ(float_to_bfloat16_bits(-0.0f), 0x8000);

  // NaN stays a quiet NaN with its sign, even one whose payload sits only in the dropped bits.
  for (const std::uint32_t nan : {0x7FC00000u, 0xFFC00000u, 0x7F800001u, 0xFF800001u, 0x7FFFFFFFu}) {
    const std::uint16_t bits = float_to_bfloat16_bits(float_of(nan));
    EXPECT_TRUE(std::isnan(bfloat16_bits_to_float(bits))) << std::hex << nan;
    EXPECT_NE(bits & 0x0040, 0) << std::hex << nan;
    EXPECT_EQ(bits >> 15, nan >> 31) << std::hex << nan;
  }

  // 16 bits -> float is exact, and every non-NaN bfloat16 survives the round trip.
  EXPECT_EQ(bfloat16_bits_to_float(0x3F81), 1.0f + 0x1p-7f);
  for (std::uint32_t bits = 0; bits <= 0xFFFF; ++bits) {
    const float value = bfloat16_bits_to_float(static_cast<std::uint16_t>(bits));
    EXPECT_EQ(bits_of(value), bits << 16);
    if (!std::isnan(value)) {
      EXPECT_EQ(float_to_bfloat16_bits(value), bits);
    }
  }
  EXPECT_EQ(round_to_bfloat16(float_of(0x3F808001)), 1.0f + 0x1p-7f);
}

TEST(Half, RoundsToNearestEvenWithSubnormalsInfAndNan) {
  EXPECT_EQ(float_to_half_bits(1.0f), 0x3C00);
  EXPECT_EQ(float_to_half_bits(-0.0f), 0x8000);
  EXPECT_EQ(float_to_half_bits(1.0f + 0x1p-11f), 0x3C00);      // tie, to even
  EXPECT_EQ(float_to_half_bits(1.0f + 3 * 0x1p-11f), 0x3C02);  // tie, to even
  EXPECT_EQ(float_to_half_bits(65504.0f), 0x7BFF);              // the largest half
  EXPECT_EQ(float_to_half_bits(65519.0f), 0x7BFF);
  EXPECT_EQ(float_to_half_bits(65520.0f), 0x7C00);  // halfway to 65536: to even, infinity
  EXPECT_EQ(float_to_half_bits(-1e10f), 0xFC00);
  EXPECT_EQ(float_to_half_bits(std::numeric_limits<float>::infinity()), 0x7C00);
  // Subnormals count units of 2^-24.
  EXPECT_EQ(float_to_half_bits(0x1p-14f), 0x0400);           // the smallest normal
  EXPECT_EQ(float_to_half_bits(1023 * 0x1p-24f), 0x03FF);    // the largest subnormal
  EXPECT_EQ(float_to_half_bits(1023.5f * 0x1p-24f), 0x0400); // tie, to even: the smallest normal
  EXPECT_EQ(float_to_half_bits(0x1p-24f), 0x0001);
  EXPECT_EQ(float_to_half_bits(-0x1p-24f), 0x8001);
  EXPECT_EQ(float_to_half_bits(0x1p-25f), 0x0000);           // tie, to even: zero
  EXPECT_EQ(float_to_half_bits(float_of(0x33000001)), 0x0001);  // just past the tie
  EXPECT_EQ(float_to_half_bits(3 * 0x1p-25f), 0x0002);       // tie between 1 and 2 units
  EXPECT_EQ(float_to_half_bits(5 * 0x1p-25f), 0x0002);       // tie between 2 and 3 units
  EXPECT_EQ(float_to_half_bits(0x1p-30f), 0x0000);
  EXPECT_EQ(float_to_half_bits(float_of(0x00000001)), 0x0000);  // a float subnormal
  for (const std::uint32_t nan : {0x7FC00000u, 0xFFC00000u, 0x7F800001u}) {
    const std::uint16_t bits = float_to_half_bits(float_of(nan));
    EXPECT_TRUE(std::isnan(half_bits_to_float(bits))) << std::hex << nan;
    EXPECT_EQ(bits >> 15, nan >> 31) << std::hex << nan;
  }

  // half -> float is exact: subnormals are mantissa * 2^-24, normals (1 + m/1024) * 2^(e-15).
  for (std::uint32_t bits = 0; bits <= 0xFFFF; ++bits) {
    const auto half = static_cast<std::uint16_t>(bits);
    const float value = half_bits_to_float(half);
    const std::uint32_t exponent = (bits >> 10) & 0x1F, mantissa = bits & 0x3FF;
    const float sign = (bits & 0x8000) != 0 ? -1.0f : 1.0f;
    if (exponent == 0x1F) {
      EXPECT_EQ(std::isnan(value), mantissa != 0) << std::hex << bits;
      continue;
    }
    const float expected = exponent == 0 ? sign * std::ldexp(static_cast<float>(mantissa), -24)
                                         : sign * std::ldexp(1.0f + mantissa / 1024.0f, static_cast<int>(exponent) - 15);
    EXPECT_EQ(bits_of(value), bits_of(expected)) << std::hex << bits;
    EXPECT_EQ(float_to_half_bits(value), half) << std::hex << bits;
  }
}

TEST(Safetensors, RoundTripsEveryDtype) {
  const TempDir dir;
  const std::string path = dir.file("all.safetensors");
  const std::vector<SafetensorsTensor> tensors = {
      // Out of name order on purpose: the writer sorts.
      {"w32", SafetensorsDtype::f32, {2, 3}, {1.5, -2.25, 0.1f, 3e38, -0.0, 7}},
      {"scalar64", SafetensorsDtype::f64, {}, {0.1}},
      // 1 + 2^-8 is a tie (to 1); 1 + 2^-8 + 2^-40 is past it, which rounding to float first
      // would hide.
      {"b16", SafetensorsDtype::bf16, {4}, {1.0 + 0x1p-8, 1.0 + 0x1p-8 + 0x1p-40, -3.0, 1e39}},
      {"h16", SafetensorsDtype::f16, {5}, {0x1p-24, 0x1p-25, 65520.0, -1.0 - 0x1p-10, 0x1p-25 + 0x1p-50}},
      {"empty", SafetensorsDtype::f16, {3, 0}, {}},
  };
  const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"note", "ünïcode ✓"}};
  io::write_safetensors(path, tensors, metadata);

  // The data section starts 8-byte aligned, as the real library writes it.
  const std::string bytes = read_file(path);
  ASSERT_GE(bytes.size(), 8u);
  std::uint64_t header_length = 0;
  for (int i = 0; i < 8; ++i) header_length |= static_cast<std::uint64_t>(static_cast<unsigned char>(bytes[i])) << (8 * i);
  EXPECT_EQ((8 + header_length) % 8, 0u);
  EXPECT_EQ(bytes.size(), 8 + header_length + 6 * 4 + 8 + 4 * 2 + 5 * 2);

  const SafetensorsFile file(path);
  EXPECT_EQ(file.path(), path);
  EXPECT_EQ(file.metadata(), metadata);
  std::vector<std::string> names;
  for (const SafetensorsEntry& entry : file.entries()) names.push_back(entry.name);
  EXPECT_EQ(names, (std::vector<std::string>{"b16", "empty", "h16", "scalar64", "w32"}));
  // Contiguous ranges in name order.
  std::uint64_t offset = 0;
  for (const SafetensorsEntry& entry : file.entries()) {
    EXPECT_EQ(entry.begin, offset) << entry.name;
    offset = entry.end;
  }

  const SafetensorsEntry* w32 = file.find("w32");
  ASSERT_NE(w32, nullptr);
  EXPECT_EQ(w32->dtype, SafetensorsDtype::f32);
  EXPECT_EQ(w32->shape, (std::vector<std::int64_t>{2, 3}));
  EXPECT_EQ(w32->elements(), 6);
  const auto w = file.read_double("w32");
  EXPECT_EQ(w, (std::vector<double>{1.5, -2.25, 0.1f, static_cast<float>(3e38), -0.0, 7}));
  EXPECT_TRUE(std::signbit(w[4]));
  const auto raw = file.read_raw("w32");
  ASSERT_EQ(raw.size(), 24u);
  EXPECT_EQ(raw[0] | raw[1] << 8 | raw[2] << 16 | static_cast<std::uint32_t>(raw[3]) << 24, bits_of(1.5f));  // little-endian

  const SafetensorsEntry* scalar = file.find("scalar64");
  ASSERT_NE(scalar, nullptr);
  EXPECT_TRUE(scalar->shape.empty());
  EXPECT_EQ(scalar->elements(), 1);
  EXPECT_EQ(file.read_double("scalar64"), std::vector<double>{0.1});

  EXPECT_EQ(file.find("b16")->dtype, SafetensorsDtype::bf16);
  EXPECT_EQ(file.read_double("b16"),
            (std::vector<double>{1.0, 1.0 + 0x1p-7, -3.0, std::numeric_limits<double>::infinity()}));
  EXPECT_EQ(file.find("h16")->dtype, SafetensorsDtype::f16);
  EXPECT_EQ(file.read_double("h16"),
            (std::vector<double>{0x1p-24, 0.0, std::numeric_limits<double>::infinity(), -1.0 - 0x1p-10, 0x1p-24}));

  const SafetensorsEntry* empty = file.find("empty");
  ASSERT_NE(empty, nullptr);
  EXPECT_EQ(empty->shape, (std::vector<std::int64_t>{3, 0}));
  EXPECT_EQ(empty->elements(), 0);
  EXPECT_EQ(empty->begin, empty->end);
  EXPECT_TRUE(file.read_double("empty").empty());
  EXPECT_TRUE(file.read_raw("empty").empty());

  // NaN survives every dtype.
  const std::string nan_path = dir.file("nan.safetensors");
  const double nan = std::numeric_limits<double>::quiet_NaN();
  io::write_safetensors(nan_path, {{"a", SafetensorsDtype::f32, {1}, {nan}},
                                   {"b", SafetensorsDtype::f64, {1}, {-nan}},
                                   {"c", SafetensorsDtype::bf16, {1}, {nan}},
                                   {"d", SafetensorsDtype::f16, {1}, {-nan}}});
  const SafetensorsFile nans(nan_path);
  for (const char* name : {"a", "b", "c", "d"}) EXPECT_TRUE(std::isnan(nans.read_double(name)[0])) << name;
}

TEST(Safetensors, WritesNoMetadataWhenThereIsNone) {
  const TempDir dir;
  const std::string path = dir.file("plain.safetensors");
  io::write_safetensors(path, {{"x", SafetensorsDtype::f32, {1}, {2.0}}});
  EXPECT_EQ(read_file(path).find("__metadata__"), std::string::npos);
  EXPECT_TRUE(SafetensorsFile(path).metadata().empty());

  // No tensors at all is a valid file too; rewriting replaces the old one.
  io::write_safetensors(path, {});
  const SafetensorsFile empty(path);
  EXPECT_TRUE(empty.entries().empty());
  EXPECT_EQ(empty.find("x"), nullptr);
}

TEST(Safetensors, WriterRejectsBadTensors) {
  const TempDir dir;
  const std::string path = dir.file("bad.safetensors");
  expect_error([&] { io::write_safetensors(path, {{"x", SafetensorsDtype::f32, {2, 2}, {1, 2, 3}}}); },
               Status::invalid_argument, "'x'");
  expect_error([&] { io::write_safetensors(path, {{"x", SafetensorsDtype::f32, {-1}, {}}}); },
               Status::invalid_argument, "'x'");
  expect_error([&] {
    io::write_safetensors(path, {{"x", SafetensorsDtype::f32, {1}, {1}}, {"x", SafetensorsDtype::f16, {1}, {1}}});
  }, Status::invalid_argument, "duplicate tensor name 'x'");
  expect_error([&] { io::write_safetensors(path, {{"__metadata__", SafetensorsDtype::f32, {1}, {1}}}); },
               Status::invalid_argument, "__metadata__");
  expect_error([&] { io::write_safetensors(path, {{"bad\xff", SafetensorsDtype::f32, {1}, {1}}}); },
               Status::invalid_argument, "UTF-8");
  EXPECT_FALSE(fs::exists(path));
  // Nothing but the error: no temporary file is left behind.
  EXPECT_TRUE(fs::is_empty(dir.path()));

  expect_error([&] { io::write_safetensors(dir.file("missing/x.safetensors"), {}); }, Status::io_error, "missing");
}

TEST(Safetensors, UnreadableFileIsIoError) {
  const TempDir dir;
  expect_error([&] { SafetensorsFile(dir.file("absent.safetensors")); }, Status::io_error, "absent.safetensors");
  expect_error([&] { SafetensorsFile(dir.path().string()); }, Status::io_error, dir.path().string());
}

TEST(Safetensors, LooksUpNamesExactly) {
  const TempDir dir;
  const std::string path = dir.file("names.safetensors");
  io::write_safetensors(path, {{"a", SafetensorsDtype::f32, {1}, {1}}, {"ab", SafetensorsDtype::f32, {1}, {2}}});
  const SafetensorsFile file(path);
  EXPECT_EQ(file.find("a")->name, "a");
  EXPECT_EQ(file.find("ab")->name, "ab");
  EXPECT_EQ(file.find("b"), nullptr);
  EXPECT_EQ(file.find(""), nullptr);
  expect_error([&] { file.read_double("b"); }, Status::invalid_argument, "'b'");
  expect_error([&] { file.read_raw("b"); }, Status::invalid_argument, "'b'");
}

TEST(Safetensors, AcceptsValidHandWrittenFiles) {
  const TempDir dir;
  const std::string path = dir.file("ok.safetensors");
  const auto read = [&](const std::string& bytes) {
    write_file(path, bytes);
    return SafetensorsFile(path);
  };

  // An unpadded header, whitespace around it, and zero-size tensors sharing an offset with their
  // neighbours.
  const SafetensorsFile file = read(file_bytes(
      R"(  {"z0":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},)"
      R"("a":{"shape":[1],"dtype":"F16","data_offsets":[0,2]},)"
      R"("z1":{"dtype":"BF16","shape":[2,0],"data_offsets":[2,2]},)"
      R"("b":{"dtype":"F32","shape":[],"data_offsets":[2,6]}} )",
      std::string("\x00\x3C", 2) + std::string("\x00\x00\xC0\x3F", 4)));
  EXPECT_EQ(file.entries().size(), 4u);
  EXPECT_EQ(file.read_double("a"), std::vector<double>{1.0});
  EXPECT_EQ(file.read_double("b"), std::vector<double>{1.5});
  EXPECT_TRUE(file.read_double("z1").empty());

  // No tensors at all.
  EXPECT_TRUE(read(file_bytes("{}")).entries().empty());
  EXPECT_EQ(read(file_bytes(R"({"__metadata__":{"k":"v"}})")).metadata().at("k"), "v");
  // Huge dimensions are fine when another one is zero.
  const SafetensorsFile huge = read(file_bytes(
      R"({"z":{"dtype":"F64","shape":[4611686018427387904,4611686018427387904,0],"data_offsets":[0,0]}})"));
  EXPECT_EQ(huge.find("z")->elements(), 0);
}

TEST(Safetensors, RejectsMalformedFiles) {
  const TempDir dir;
  const std::string path = dir.file("bad.safetensors");
  const std::string f32x2 = R"("dtype":"F32","shape":[2])";
  const std::string eight(8, '\0');
  struct Case {
    const char* what;
    std::string bytes;
    std::string message_part;
  };
  const std::vector<Case> cases = {
      {"empty file", "", "shorter than the 8-byte header length"},
      {"short file", std::string("\x02\x00\x00", 3), "shorter than the 8-byte header length"},
      {"header length past the end", file_bytes("{}", "", 3), "header length 3"},
      {"huge header length", file_bytes("{}", "", 1ull << 63), "header length 9223372036854775808"},
      {"largest header length", file_bytes("{}", "", ~0ull), "header length 18446744073709551615"},
      {"stray continuation byte", file_bytes("{\"\x80\":1}"), "UTF-8"},
      {"overlong encoding", file_bytes("{\"\xC0\xAF\":1}"), "UTF-8"},
      {"overlong three-byte encoding", file_bytes("{\"\xE0\x80\xAF\":1}"), "UTF-8"},
      {"surrogate", file_bytes("{\"\xED\xA0\x80\":1}"), "UTF-8"},
      {"above U+10FFFF", file_bytes("{\"\xF4\x90\x80\x80\":1}"), "UTF-8"},
      {"truncated sequence", file_bytes("{}\xE2\x82"), "UTF-8"},
      {"invalid JSON", file_bytes(R"({"a": )"), "not valid JSON"},
      {"trailing garbage", file_bytes("{} x"), "not valid JSON"},
      {"NUL padding", file_bytes(std::string("{}\0\0", 4)), "NUL byte (byte 2 of the header)"},
      {"NUL before garbage", file_bytes(std::string("{}\0 x", 4)), "NUL byte"},
      {"NUL in a string", file_bytes(std::string("{\"a\0\":1}", 8)), "NUL byte"},
      {"not an object", file_bytes("[]"), "not a JSON object"},
      {"entry not an object", file_bytes(R"({"w":3})"), "tensor 'w': entry is not a JSON object"},
      {"missing dtype", file_bytes(R"({"w":{"shape":[2],"data_offsets":[0,8]}})", eight), "tensor 'w': missing \"dtype\""},
      {"missing shape", file_bytes(R"({"w":{"dtype":"F32","data_offsets":[0,8]}})", eight), "tensor 'w': missing \"shape\""},
      {"missing offsets", file_bytes(R"({"w":{)" + f32x2 + "}}", eight), "tensor 'w': missing \"data_offsets\""},
      {"extra field", file_bytes(R"({"w":{)" + f32x2 + R"(,"data_offsets":[0,8],"foo":1}})", eight),
       "tensor 'w': unexpected field 'foo'"},
      {"dtype not a string", file_bytes(R"({"w":{"dtype":4,"shape":[2],"data_offsets":[0,8]}})", eight),
       "tensor 'w': \"dtype\" is not a string"},
      {"unknown dtype", file_bytes(R"({"w":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}})", eight),
       "tensor 'w': unsupported dtype 'I64'"},
      {"shape not an array", file_bytes(R"({"w":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", eight),
       "tensor 'w': \"shape\" is not an array"},
      {"negative dimension", file_bytes(R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", eight),
       "tensor 'w': shape dimension -2 is negative"},
      {"fractional dimension", file_bytes(R"({"w":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}})", eight),
       "tensor 'w': shape dimension 2.5 is not an integer"},
      {"string dimension", file_bytes(R"({"w":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}})", eight),
       "is not an integer"},
      {"dimension past int64", file_bytes(R"({"w":{"dtype":"F32","shape":[9223372036854775808],"data_offsets":[0,8]}})", eight),
       "tensor 'w': shape dimension 9223372036854775808 is too large"},
      {"element count overflow",
       file_bytes(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})"),
       "tensor 'w': element count times dtype size overflows"},
      {"byte count overflow", file_bytes(R"({"w":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,0]}})"),
       "tensor 'w': element count times dtype size overflows"},
      {"offsets not a pair", file_bytes(R"({"w":{)" + f32x2 + R"(,"data_offsets":[0]}})", eight), "[begin, end]"},
      {"negative offset", file_bytes(R"({"w":{)" + f32x2 + R"(,"data_offsets":[-8,0]}})", eight),
       "tensor 'w': data offset -8"},
      {"fractional offset", file_bytes(R"({"w":{)" + f32x2 + R"(,"data_offsets":[0,8.0]}})", eight),
       "tensor 'w': data offset"},
      {"size mismatch", file_bytes(R"({"w":{)" + f32x2 + R"(,"data_offsets":[0,4]}})", eight.substr(4)),
       "tensor 'w': shape and dtype F32 need 8 bytes"},
      {"begin after end", file_bytes(R"({"w":{)" + f32x2 + R"(,"data_offsets":[8,0]}})", eight),
       "tensor 'w': data_offsets begin 8 > end 0"},
      {"end past the data", file_bytes(R"({"w":{)" + f32x2 + R"(,"data_offsets":[0,8]}})", eight.substr(4)),
       "tensor 'w': data_offsets end 8 is past the end of the data section (4 bytes)"},
      {"overlap", file_bytes(R"({"a":{)" + f32x2 + R"(,"data_offsets":[0,8]},"b":{)" + f32x2 + R"(,"data_offsets":[4,12]}})",
                             eight + eight.substr(4)),
       "tensor 'b': bytes [4, 12) overlap tensor 'a'"},
      {"zero-size tensor inside another",
       file_bytes(R"({"a":{)" + f32x2 + R"(,"data_offsets":[0,8]},"z":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}})",
                  eight),
       "tensor 'z': bytes [4, 4) overlap tensor 'a'"},
      {"hole between tensors",
       file_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                  eight + eight.substr(4)),
       "tensor 'b': hole of 4 bytes before it"},
      {"hole at the start", file_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", eight),
       "tensor 'a': hole of 4 bytes before it"},
      {"bytes after the last tensor", file_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", eight),
       "data section has 4 bytes after the last tensor"},
      {"data but no tensors", file_bytes("{}", eight), "data section has 8 bytes after the last tensor"},
      {"duplicate tensor", file_bytes(R"({"w":{)" + f32x2 + R"(,"data_offsets":[0,8]},"w":{)" + f32x2 + R"(,"data_offsets":[0,8]}})", eight),
       "duplicate tensor name 'w'"},
      {"duplicate field", file_bytes(R"({"w":{"dtype":"F64",)" + f32x2 + R"(,"data_offsets":[0,8]}})", eight),
       "'w': duplicate key 'dtype'"},
      {"duplicate metadata key", file_bytes(R"({"__metadata__":{"k":"a","k":"b"}})"), "'__metadata__': duplicate key 'k'"},
      {"metadata not an object", file_bytes(R"({"__metadata__":"k"})"), "__metadata__ is not a JSON object"},
      {"metadata value not a string", file_bytes(R"({"__metadata__":{"k":1}})"), "__metadata__ value of 'k' is not a string"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    write_file(path, c.bytes);
    try {
      SafetensorsFile file(path);
      ADD_FAILURE() << "accepted";
    } catch (const Error& e) {
      const std::string message = e.what();
      EXPECT_EQ(e.status(), Status::corrupt_file) << message;
      EXPECT_EQ(message.rfind(path + ": ", 0), 0u) << message;
      EXPECT_NE(message.find(c.message_part), std::string::npos) << "'" << c.message_part << "' in: " << message;
    }
  }
}

// Files written by the real safetensors library (data/safetensors/README.md).
TEST(Safetensors, ReadsFilesOfTheRealLibrary) {
  const std::string f32_path = data_file("sigma_moe_sigmoid_gelu_eval.safetensors");
  const std::string bf16_path = data_file("sigma_moe_sigmoid_gelu_eval.bf16.safetensors");
  ASSERT_FALSE(f32_path.empty());
  const SafetensorsFile f32(f32_path);
  const SafetensorsFile bf16(bf16_path);

  for (const SafetensorsFile* file : {&f32, &bf16})
    for (const char* key : {"fixture", "layer", "config", "dtype"})
      EXPECT_EQ(file->metadata().count(key), 1u) << file->path() << " " << key;
  EXPECT_EQ(f32.metadata().at("layer"), "sigma_moe");
  EXPECT_EQ(f32.metadata().at("fixture"), "sigma_moe_sigmoid_gelu_eval.h5");
  EXPECT_EQ(f32.metadata().at("dtype"), "float32");
  EXPECT_EQ(bf16.metadata().at("dtype"), "bfloat16");
  EXPECT_EQ(f32.metadata().at("config"), bf16.metadata().at("config"));

  // σ-MoE with d_model 64, 12 experts of size 24.
  ASSERT_NE(f32.find("keys"), nullptr);
  EXPECT_EQ(f32.find("keys")->shape, (std::vector<std::int64_t>{12, 64, 24}));
  ASSERT_EQ(f32.entries().size(), bf16.entries().size());
  ASSERT_EQ(f32.entries().size(), 3u);

  const TempDir dir;
  std::vector<SafetensorsTensor> as_bf16;
  for (std::size_t i = 0; i < f32.entries().size(); ++i) {
    const SafetensorsEntry& a = f32.entries()[i];
    const SafetensorsEntry& b = bf16.entries()[i];
    SCOPED_TRACE(a.name);
    EXPECT_EQ(a.name, b.name);
    EXPECT_EQ(a.shape, b.shape);
    EXPECT_EQ(a.dtype, SafetensorsDtype::f32);
    EXPECT_EQ(b.dtype, SafetensorsDtype::bf16);
    const auto values = f32.read_double(a.name);
    const auto rounded = bf16.read_double(b.name);
    ASSERT_EQ(values.size(), static_cast<std::size_t>(a.elements()));
    ASSERT_EQ(rounded.size(), values.size());
    std::size_t mismatches = 0;
    for (std::size_t k = 0; k < values.size(); ++k)
      mismatches += rounded[k] != round_to_bfloat16(static_cast<float>(values[k]));
    EXPECT_EQ(mismatches, 0u);
    as_bf16.push_back({a.name, SafetensorsDtype::bf16, a.shape, values});
  }

  // Written back, the data sections are the real library's bytes (the headers differ in key order).
  std::vector<SafetensorsTensor> as_f32;
  for (const SafetensorsEntry& entry : f32.entries())
    as_f32.push_back({entry.name, SafetensorsDtype::f32, entry.shape, f32.read_double(entry.name)});
  io::write_safetensors(dir.file("f32.safetensors"), as_f32, f32.metadata());
  io::write_safetensors(dir.file("bf16.safetensors"), as_bf16, bf16.metadata());
  const SafetensorsFile f32_again(dir.file("f32.safetensors"));
  const SafetensorsFile bf16_again(dir.file("bf16.safetensors"));
  EXPECT_EQ(f32_again.metadata(), f32.metadata());
  for (const SafetensorsEntry& entry : f32.entries()) {
    EXPECT_EQ(f32_again.read_raw(entry.name), f32.read_raw(entry.name)) << entry.name;
    EXPECT_EQ(bf16_again.read_raw(entry.name), bf16.read_raw(entry.name)) << entry.name;
    EXPECT_EQ(f32_again.find(entry.name)->begin, entry.begin) << entry.name;
  }
}
