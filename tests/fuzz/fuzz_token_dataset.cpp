// libFuzzer harness: the token-dataset reader (io/token_dataset.cpp) on mutated HDF5 files (the
// seeds are datasets kmoe-data wrote). Both splits are opened and read in windows, as kmoe-train
// reads them.
#include "fuzz_util.hpp"
#include "kmoe/io/token_dataset.hpp"

#include <algorithm>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string& path = kmoe::fuzz::input_file(data, size);
  if (kmoe::fuzz::parsed_on_trust_by_hdf5(path)) return -1;  // not added to the corpus
  for (const char* split : {"train", "eval"}) {
    kmoe::fuzz::expect_only_kmoe_errors([&] {
      const kmoe::io::TokenDataset dataset(path, split);
      const std::int64_t window = 97;
      for (std::int64_t first = 0; first < std::min<std::int64_t>(dataset.size(), 1 << 16); first += window) {
        const auto tokens = dataset.read(first, std::min(window, dataset.size() - first));
        for (const int token : tokens)
          if (token < 0 || token >= dataset.vocabulary()) std::abort();  // a token the model cannot embed
      }
    });
  }
  return 0;
}
