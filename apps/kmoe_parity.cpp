// kmoe-parity FILE.h5 [FILE.h5 ...]: checks kmoe against reference dumps in the golden-fixture
// format (data/golden/README.md). For each file it builds the layer named by the `layer`
// attribute from `config`, loads /params, runs forward (and, when /grad exists, backward of the
// stated loss) in the stated mode, and prints one line per /output and /grad tensor: name, shape,
// max abs error, relative L2 error, ok/FAIL. Exit status: 0 when every tensor of every file is
// within tolerance, 1 when some tensor is not, 2 when some file cannot be used (the worst wins).
#include "parity/fixture.hpp"
#include "parity/registry.hpp"
#include "options.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/dist/communicator.hpp"
#include "kmoe/dist/rank_runtime.hpp"

#include <Kokkos_Core.hpp>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

using namespace kmoe;
using namespace kmoe::parity;

namespace {

enum Outcome { pass = 0, mismatch = 1, unusable = 2 };

void print_usage(std::FILE* to) {
  std::string layers;
  for (const LayerRunner& runner : layer_runners()) layers += std::string(layers.empty() ? "" : ", ") + runner.layer;
  std::fprintf(to,
               "usage: kmoe-parity [--tolerance REL] [--params CHECKPOINT.h5] [--distributed] FILE.h5 [FILE.h5 ...]\n"
               "Checks kmoe against reference dumps (format: data/golden/README.md); layers: %s.\n"
               "  --tolerance REL  pass when relative L2 error <= REL (default 1e-4 for float32 dumps,\n"
               "                   1e-10 for float64). A scalar loss that sums many terms is judged\n"
               "                   against the magnitude of its terms: |computed - expected| /\n"
               "                   max(|expected|, sum of |terms|) <= REL, so heavy cancellation in\n"
               "                   sum(out * grad_out) does not fail a loss whose terms all match.\n"
               "  --params FILE    take the parameters from this kmoe checkpoint (e.g. made by\n"
               "                   kmoe-convert from a .safetensors file) instead of the dump's /params;\n"
               "                   its model and config must be the dump's\n"
               "  --distributed    under mpirun: split the dump's batch over the ranks (contiguous along\n"
               "                   axis 0, uneven; ranks with none when there are more ranks than\n"
               "                   sequences), place the experts over them, run, gather and compare as\n"
               "                   one rank does (rank 0 prints; every rank exits with its status)\n"
               "Exit status: 0 all tensors within tolerance, 1 some tensor out of tolerance,\n"
               "2 a file that cannot be used (unknown layer, missing dataset, shape mismatch, ...).\n",
               layers.c_str());
}

// Errors from the HDF5 reader start with the file's path, which the caller prints already.
std::string without_path_prefix(const std::string& message, const std::string& path) {
  const std::string prefix = path + ": ";
  return message.compare(0, prefix.size(), prefix) == 0 ? message.substr(prefix.size()) : message;
}

Outcome check_file(const std::string& path, const std::optional<double>& tolerance, const std::string& params,
                   const dist::Communicator& ranks) {
  try {
    require(std::filesystem::exists(path), Status::io_error, "no such file");
    Fixture fixture(path);
    if (!params.empty()) fixture.use_parameters_from(params);
    fixture.distribute_over(ranks);
    Report report(fixture, tolerance.value_or(default_tolerance(fixture.dtype())), std::cout);
    std::printf("%s: layer %s, mode %s, %s, tolerance rel_l2 <= %.1e%s\n", path.c_str(), fixture.layer().c_str(),
                fixture.training() ? "train" : "eval", io::dtype_name(fixture.dtype()), report.tolerance(),
                ranks.distributed() ? (", over " + std::to_string(ranks.size()) + " MPI ranks").c_str() : "");
    run_layer(fixture, report);
    if (report.all_ok()) {
      std::cout << "PASS " << path << ": " << report.compared() << " tensors within tolerance\n";
      return pass;
    }
    std::string failed;
    for (const std::string& name : report.failed()) failed += (failed.empty() ? "" : ", ") + name;
    std::cout << "FAIL " << path << ": " << report.failed().size() << " of " << report.compared()
              << " tensors out of tolerance: " << failed << '\n';
    return mismatch;
  } catch (const std::exception& e) {  // kmoe::Error, or nlohmann::json's on a malformed config
    std::fflush(stdout);  // keep the order of the lines when stdout and stderr are one stream
    std::cerr << "ERROR " << path << ": cannot use this file: " << without_path_prefix(e.what(), path) << '\n';
    return unusable;
  }
}

int run(int argc, char** argv, bool distributed);

}  // namespace

int main(int argc, char** argv) {
  if (apps::asks_for_help(argc, argv)) {
    print_usage(stdout);
    return pass;
  }
  // --distributed needs MPI before anything else (and Kokkos after it).
  bool distributed = false;
  for (int i = 1; i < argc; ++i) distributed = distributed || std::string(argv[i]) == "--distributed";
  if (distributed) MPI_Init(&argc, &argv);
  const int status = run(argc, argv, distributed);
  if (distributed) MPI_Finalize();
  return status;
}

namespace {

int run(int argc, char** argv, bool distributed) {
  const dist::RankRuntime runtime(argc, argv);  // under mpirun: each rank on its GPU
  if (dist::mpi_running()) std::fputs(dist::rank_report(MPI_COMM_WORLD).c_str(), stderr);
  const dist::Communicator ranks(distributed ? MPI_COMM_WORLD : MPI_COMM_NULL);
  // Rank 0 speaks for all: the others' lines would repeat its own.
  if (ranks.rank() != 0 && std::freopen("/dev/null", "w", stdout) == nullptr) return unusable;
  std::optional<double> tolerance;
  std::string params;
  std::vector<std::string> files;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--tolerance") {
      char* end = nullptr;
      const char* value = i + 1 < argc ? argv[++i] : "";
      tolerance = std::strtod(value, &end);
      if (*value == '\0' || *end != '\0' || !(*tolerance > 0)) {
        std::fprintf(stderr, "kmoe-parity: --tolerance needs a positive number, got '%s'\n", value);
        return unusable;
      }
    } else if (arg == "--params") {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "kmoe-parity: --params needs a checkpoint file\n");
        return unusable;
      }
      params = argv[++i];
    } else if (arg == "--distributed") {
      continue;
    } else if (arg.rfind("--", 0) == 0) {
      std::fprintf(stderr, "kmoe-parity: unknown option '%s'\n", arg.c_str());
      print_usage(stderr);
      return unusable;
    } else {
      files.push_back(arg);
    }
  }
  if (files.empty()) {
    print_usage(stderr);
    return unusable;
  }

  int worst = pass;
  int counts[3] = {0, 0, 0};
  for (const std::string& file : files) {
    Outcome outcome = check_file(file, tolerance, params, ranks);
    // Rank 0's report decides (the other ranks do not hold the assembled expert gradients).
    outcome = static_cast<Outcome>(ranks.all_gather(static_cast<std::int64_t>(outcome))[0]);
    ++counts[outcome];
    worst = std::max(worst, static_cast<int>(outcome));
  }
  if (files.size() > 1) {
    std::printf("kmoe-parity: %zu files: %d passed, %d failed, %d unusable\n", files.size(), counts[pass],
                counts[mismatch], counts[unusable]);
  }
  return worst;
}

}  // namespace
