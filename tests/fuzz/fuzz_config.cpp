// libFuzzer harness: the JSON configs kmoe reads. The first byte picks a layer kind of the layer
// builder (model/builder.cpp, which the C ABI, kmoe-train and the parity tool share) or kmoe-train's
// run config (train/train_config.cpp); the rest is the config text. A layer config the builder
// accepts must describe itself completely: building again from layer.config() gives the same
// config (a key read under one name and written under another would differ).
#include "fuzz_util.hpp"
#include "kmoe/model/builder.hpp"
#include "kmoe/train/train_config.hpp"

#include <nlohmann/json.hpp>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  kmoe::fuzz::Draws draws(data, size);
  const auto& kinds = kmoe::model::layer_kinds();
  const std::size_t choice = draws.byte() % (kinds.size() + 1);
  const std::string text = draws.rest();
  if (choice == kinds.size()) {
    kmoe::fuzz::expect_only_kmoe_errors([&] { (void)kmoe::train::parse_train_config(text, "fuzz.json"); });
    return 0;
  }
  const std::string& kind = kinds[choice];
  kmoe::fuzz::expect_only_kmoe_errors([&] {
    const auto layer = kmoe::model::build_layer<float>(kind, text, 1, kmoe::ParameterInit::zeros);
    const nlohmann::json config = layer->config();
    const auto again = kmoe::model::build_layer<float>(kind, config, 1, kmoe::ParameterInit::zeros);
    if (again->config() != config) {
      std::fprintf(stderr, "%s: config does not round-trip:\n%s\n%s\n", kind.c_str(), config.dump().c_str(),
                   again->config().dump().c_str());
      std::abort();
    }
  });
  return 0;
}
