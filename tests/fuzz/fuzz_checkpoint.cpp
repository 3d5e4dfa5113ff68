// libFuzzer harness: the HDF5 checkpoint loader (io/checkpoint.cpp) on mutated checkpoints (the
// seeds are small valid ones with optimizer, rng and train state). What kmoe-inspect --verify reads
// (every stored tensor, the train JSON) and what kmoe-infer / kmoe_layer_open_checkpoint do (build
// the stored model and load it, optimizer state included) must end in a value or a kmoe::Error.
#include "fuzz_util.hpp"
#include "kmoe/io/checkpoint.hpp"
#include "kmoe/model/optimizer.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string& path = kmoe::fuzz::input_file(data, size);
  if (kmoe::fuzz::parsed_on_trust_by_hdf5(path)) return -1;  // not added to the corpus
  kmoe::fuzz::expect_only_kmoe_errors([&] {
    const kmoe::io::CheckpointReader reader(path);
    for (const auto& tensor : reader.tensors()) {
      const auto values = reader.read(tensor.path);
      if (static_cast<kmoe::index_t>(values.size()) != tensor.shape.size()) std::abort();
    }
    (void)reader.train();
  });
  kmoe::fuzz::expect_only_kmoe_errors([&] {
    kmoe::io::CheckpointLoadOptions options;
    options.convert_dtype = true;
    const auto layer = kmoe::io::load_layer<float>(path, options);
    kmoe::model::AdamW<float> optimizer(layer->parameters(), {});
    std::int64_t step = 0;
    kmoe::io::CheckpointRestore<float> restore;
    restore.optimizer = &optimizer;
    restore.step = &step;
    kmoe::io::load_checkpoint(path, *layer, options, restore);
  });
  return 0;
}
