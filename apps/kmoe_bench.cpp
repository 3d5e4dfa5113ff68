// kmoe-bench: speed (and peak memory) of kmoe's layers against baselines measured in the same
// run, one table per section (bench/sections.hpp).
//   kmoe-bench [SECTION ...] [--repeats N] [--key value ...]
// runs the named sections (all but dist by default); other options go to the sections that read
// them. mpirun -n 4 kmoe-bench dist runs the MPI section.
#include "bench/sections.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/dist/communicator.hpp"
#include "kmoe/dist/rank_runtime.hpp"

#include <mpi.h>

#include <cstdio>
#include <string>

using namespace kmoe;

namespace {
int run(int argc, char** argv);
}  // namespace

int main(int argc, char** argv) {
  // The dist section runs under mpirun: MPI before Kokkos, and only rank 0 prints.
  bool dist = false;
  for (int i = 1; i < argc; ++i) dist = dist || std::string(argv[i]).rfind("dist", 0) == 0;
  if (!dist) return run(argc, argv);
  MPI_Init(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank != 0 && std::freopen("/dev/null", "w", stdout) == nullptr) return 2;
  const int status = run(argc, argv);
  MPI_Finalize();
  return status;
}

namespace {

int run(int argc, char** argv) {
  const dist::RankRuntime runtime(argc, argv);  // under mpirun: each rank on its GPU
  if (dist::mpi_running()) std::fputs(dist::rank_report(MPI_COMM_WORLD).c_str(), stderr);
  try {
    const auto& sections = apps::bench_sections();
    std::vector<const apps::BenchSection*> chosen;
    int first_option = 1;
    for (; first_option < argc && std::string(argv[first_option]).rfind("--", 0) != 0; ++first_option) {
      const std::string name = argv[first_option];
      const apps::BenchSection* found = nullptr;
      std::string known;
      for (const auto& section : sections) {
        if (name == section.name) found = &section;
        known += std::string(known.empty() ? "" : ", ") + section.name;
      }
      require(found != nullptr, Status::invalid_argument, "kmoe-bench: unknown section '", name, "' (known: ", known, ")");
      chosen.push_back(found);
    }
    if (chosen.empty()) {  // every section but the dist ones, which need mpirun
      for (const auto& section : sections)
        if (std::string(section.name).rfind("dist", 0) != 0) chosen.push_back(&section);
    }
    apps::Options options = apps::parse_options(argc, argv, first_option, "kmoe-bench");
    const int repeats = static_cast<int>(apps::positive_option(options, "--repeats", 3, "kmoe-bench"));
    options.erase("--repeats");

    // Each section gets only the options it names; an option no chosen section reads is an error,
    // not a silent default.
    const auto reads = [](const apps::BenchSection& section, const std::string& key) {
      return (std::string(" ") + section.options + " ").find(" " + key + " ") != std::string::npos;
    };
    for (const auto& entry : options) {
      bool used = false;
      for (const apps::BenchSection* section : chosen) used |= reads(*section, entry.first);
      require(used, Status::invalid_argument, "kmoe-bench: no chosen section reads option ", entry.first);
    }

    std::printf("kmoe bench: execution space %s, concurrency %d, median of %d runs\n\n", ExecSpace::name(),
                ExecSpace().concurrency(), repeats);
    for (const apps::BenchSection* section : chosen) {
      apps::Options own;
      for (const auto& entry : options) {
        if (reads(*section, entry.first)) own.insert(entry);
      }
      section->run(own, repeats).print();
      std::fflush(stdout);
    }
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "kmoe-bench: %s: %s\n", status_name(e.status()), e.what());
    return 2;
  }
}

}  // namespace
