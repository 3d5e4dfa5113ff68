// kmoe-convert: PyTorch weights in .safetensors ↔ kmoe checkpoints.
//   kmoe-convert FILE.safetensors [--layer LAYER] [--config CONFIG.json|JSON] [--dtype float32|float64] -o OUT.h5
//   kmoe-convert CHECKPOINT.h5 -o OUT.safetensors
// Import reads a state_dict of any supported family (F32, F64, BF16, F16) and writes a kmoe
// checkpoint (format v1) whose parameters are the file's, converted to the dtype; the file's
// __metadata__ is kept in the checkpoint's `source` attribute. --layer and --config default to
// the __metadata__ keys "layer" and "config" when the file has them. Export writes the checkpoint's
// parameters under the original's state_dict names and layouts.
// Exit status: 0 written, 1 a conversion error (shapes, names, values), 2 bad usage or unreadable input.
#include "kmoe/core/error.hpp"
#include "kmoe/io/checkpoint.hpp"
#include "kmoe/io/safetensors.hpp"
#include "kmoe/io/safetensors_import.hpp"
#include "kmoe/model/builder.hpp"
#include "options.hpp"

#include <Kokkos_Core.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

using namespace kmoe;

namespace {

void usage(std::FILE* to) {
  std::fprintf(to,
               "usage: kmoe-convert FILE.safetensors [--layer LAYER] [--config CONFIG.json|JSON]\n"
               "                    [--dtype float32|float64] -o CHECKPOINT.h5\n"
               "       kmoe-convert CHECKPOINT.h5 -o FILE.safetensors\n"
               "Converts a PyTorch state_dict (safetensors.torch.save_file(model.state_dict(), ...)) of\n"
               "any kmoe layer family into a kmoe checkpoint, or a checkpoint back into safetensors.\n"
               "  --layer   the layer kind (default: the file's __metadata__ 'layer'); kinds: ");
  std::string kinds;
  for (const std::string& kind : model::layer_kinds()) kinds += (kinds.empty() ? "" : ", ") + kind;
  std::fprintf(to, "%s\n", kinds.c_str());
  std::fprintf(to,
               "  --config  the layer's constructor arguments as JSON, a file or inline text\n"
               "            (default: the file's __metadata__ 'config')\n"
               "  --dtype   the checkpoint's dtype (default float32; BF16/F16 widen exactly)\n");
}

std::string config_text(const std::string& argument) {
  if (!argument.empty() && argument.front() == '{') return argument;
  std::ifstream in(argument);
  require(in.good(), Status::io_error, "cannot read the config file ", argument);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

template <class T>
void import_file(const io::SafetensorsFile& file, const std::string& kind, const nlohmann::json& config,
                 const std::string& out) {
  // Zeros, not draws: load_safetensors requires every parameter.
  const auto layer = model::build_layer<T>(kind, config, 0, ParameterInit::zeros);
  io::load_safetensors(file, *layer);
  io::CheckpointExtras<T> extras;
  extras.source = nlohmann::json(file.metadata());
  extras.source["file"] = std::filesystem::path(file.path()).filename().string();
  io::save_checkpoint(out, *layer, extras);
  std::printf("kmoe-convert: wrote %s (%s, %s, %zu state_dict tensors from %s)\n", out.c_str(), kind.c_str(),
              model::dtype_name(model::dtype_of<T>()), file.entries().size(), file.path().c_str());
}

template <class T>
void export_file(const std::string& checkpoint, const std::string& out) {
  const auto layer = io::load_layer<T>(checkpoint);
  io::save_safetensors(out, *layer, {{"source", std::filesystem::path(checkpoint).filename().string()}});
  std::printf("kmoe-convert: wrote %s (%s state_dict of %s)\n", out.c_str(), layer->kind().c_str(), checkpoint.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  if (apps::asks_for_help(argc, argv)) {
    usage(stdout);
    return 0;
  }
  Kokkos::ScopeGuard kokkos(argc, argv);
  std::string input, output, kind, config, dtype = "float32";
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "kmoe-convert: %s needs a value\n", arg.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (arg == "-o" || arg == "--output") {
      output = value();
    } else if (arg == "--layer") {
      kind = value();
    } else if (arg == "--config") {
      config = value();
    } else if (arg == "--dtype") {
      dtype = value();
    } else if (arg.rfind("-", 0) == 0) {
      std::fprintf(stderr, "kmoe-convert: unknown option '%s'\n", arg.c_str());
      usage(stderr);
      return 2;
    } else if (input.empty()) {
      input = arg;
    } else {
      std::fprintf(stderr, "kmoe-convert: one input file only (got '%s' and '%s')\n", input.c_str(), arg.c_str());
      return 2;
    }
  }
  if (input.empty() || output.empty()) {
    usage(stderr);
    return 2;
  }
  int stage = 2;  // failures before the conversion starts are usage or input errors
  try {
    if (ends_with(input, ".h5")) {
      require(kind.empty() && config.empty(), Status::invalid_argument,
              "--layer and --config apply to safetensors input only (a checkpoint names its own)");
      const io::CheckpointReader reader(input);
      stage = 1;
      if (reader.info().dtype == "float64") {
        export_file<double>(input, output);
      } else {
        export_file<float>(input, output);
      }
      return 0;
    }
    const io::SafetensorsFile file(input);
    const auto metadata = [&](const char* key) -> std::string {
      const auto found = file.metadata().find(key);
      require(found != file.metadata().end(), Status::invalid_argument, input, " has no __metadata__ '", key,
              "': give --", key);
      return found->second;
    };
    if (kind.empty()) kind = metadata("layer");
    const nlohmann::json config_json = model::parse_config_text(config.empty() ? metadata("config") : config_text(config));
    const model::Dtype target = model::parse_dtype(dtype);
    stage = 1;
    if (target == model::Dtype::float64) {
      import_file<double>(file, kind, config_json, output);
    } else {
      import_file<float>(file, kind, config_json, output);
    }
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "kmoe-convert: %s: %s\n", status_name(e.status()), e.what());
    return stage;
  }
}
