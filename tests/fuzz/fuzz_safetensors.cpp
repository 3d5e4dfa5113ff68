// libFuzzer harness: the safetensors parser (io/safetensors.cpp) on arbitrary bytes. Every tensor
// a file declares is read (as double and raw), so the header's offsets are exercised against the
// data section too.
#include "fuzz_util.hpp"
#include "kmoe/io/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string& path = kmoe::fuzz::input_file(data, size);
  kmoe::fuzz::expect_only_kmoe_errors([&] {
    const kmoe::io::SafetensorsFile file(path);
    for (const auto& entry : file.entries()) {
      const auto values = file.read_double(entry.name);
      const auto raw = file.read_raw(entry.name);
      if (values.size() != static_cast<std::size_t>(entry.elements()) ||
          raw.size() != entry.end - entry.begin)
        std::abort();  // a file accepted with sizes that disagree with its own header
    }
  });
  return 0;
}
