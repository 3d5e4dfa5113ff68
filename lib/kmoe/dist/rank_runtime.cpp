#include "kmoe/dist/rank_runtime.hpp"

#include "kmoe/core/config.hpp"
#include "kmoe/core/error.hpp"
#include "kmoe/dist/communicator.hpp"
#include "kmoe/dist/mpi_memory.hpp"

#if defined(KOKKOS_ENABLE_CUDA)
#include <cuda_runtime_api.h>
#endif
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <string>
#include <vector>

namespace kmoe::dist {

namespace {

int visible_gpus() {
#if defined(KOKKOS_ENABLE_CUDA)
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
#else
  return 0;
#endif
}

// Whether the user picked the device: Kokkos' own options and variables.
bool device_chosen_by_user(int argc, char** argv) {
  for (const char* variable : {"KOKKOS_DEVICE_ID", "KOKKOS_NUM_DEVICES", "KOKKOS_RAND_DEVICES"})
    if (std::getenv(variable) != nullptr) return true;
  for (int i = 1; i < argc; ++i)
    for (const char* option : {"--kokkos-device-id", "--device-id", "--kokkos-num-devices", "--num-devices",
                               "--kokkos-ndevices", "--ndevices", "--kokkos-device", "--device="})
      if (std::strncmp(argv[i], option, std::strlen(option)) == 0) return true;
  return false;
}

}  // namespace

NodePlacement node_placement(MPI_Comm comm) {
  // Ranks of one node share its processor name. (Not MPI_Comm_split_type: under clang 14's
  // LeakSanitizer, the Open MPI component it loads at 8 ranks made the leak check crash at exit.)
  int rank = 0, size = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &size);
  char name[MPI_MAX_PROCESSOR_NAME] = {};
  int length = 0;
  MPI_Get_processor_name(name, &length);
  std::vector<char> names(static_cast<std::size_t>(size) * MPI_MAX_PROCESSOR_NAME);
  MPI_Allgather(name, MPI_MAX_PROCESSOR_NAME, MPI_CHAR, names.data(), MPI_MAX_PROCESSOR_NAME, MPI_CHAR, comm);
  const auto name_of = [&](int r) {
    return std::string(names.data() + static_cast<std::size_t>(r) * MPI_MAX_PROCESSOR_NAME);
  };
  NodePlacement p;
  p.local_rank = p.local_size = 0;
  std::set<std::string> nodes;
  for (int r = 0; r < size; ++r) {
    const std::string other = name_of(r);
    nodes.insert(other);
    if (other != name) continue;
    ++p.local_size;
    if (r < rank) ++p.local_rank;
  }
  p.nodes = static_cast<int>(nodes.size());
  return p;
}

int device_for_rank(const NodePlacement& placement) {
  const int gpus = visible_gpus();
  return gpus > 0 ? placement.local_rank % gpus : -1;
}

RankRuntime::RankRuntime(int& argc, char** argv, MPI_Comm world) {
  const int device = mpi_running() ? device_for_rank(node_placement(world)) : -1;
  if (device >= 0 && !device_chosen_by_user(argc, argv)) {
    // Kokkos 3.4 takes a device from its command line or this variable; the variable leaves
    // argv as the user wrote it, and goes again once Kokkos has read it.
    setenv("KOKKOS_DEVICE_ID", std::to_string(device).c_str(), 1);
    Kokkos::initialize(argc, argv);
    unsetenv("KOKKOS_DEVICE_ID");
  } else {
    Kokkos::initialize(argc, argv);
  }
}

RankRuntime::~RankRuntime() { Kokkos::finalize(); }

std::string rank_report(MPI_Comm world) {
  int rank = 0, size = 1;
  if (world != MPI_COMM_NULL) {
    MPI_Comm_rank(world, &rank);
    MPI_Comm_size(world, &size);
  }
  const NodePlacement node = world == MPI_COMM_NULL ? NodePlacement() : node_placement(world);
  char host[128] = {};
  gethostname(host, sizeof host - 1);
  constexpr int line_bytes = 256;
  char line[line_bytes] = {};
#if defined(KOKKOS_ENABLE_CUDA)
  const int gpu = Kokkos::Cuda().cuda_device();
  cudaDeviceProp properties{};
  cudaGetDeviceProperties(&properties, gpu);
  std::snprintf(line, sizeof line, "rank %d: %s, node-local rank %d of %d, GPU %d of %d (%s, PCI %04x:%02x:%02x)", rank,
                host, node.local_rank, node.local_size, gpu, visible_gpus(), properties.name, properties.pciDomainID,
                properties.pciBusID, properties.pciDeviceID);
#else
  std::snprintf(line, sizeof line, "rank %d: %s, node-local rank %d of %d, no GPU (%s)", rank, host, node.local_rank,
                node.local_size, ExecSpace::name());
#endif
  if (world == MPI_COMM_NULL) return "kmoe: one process without MPI\n  " + std::string(line) + "\n";
  std::vector<char> lines(rank == 0 ? static_cast<std::size_t>(size) * line_bytes : 0);
  MPI_Gather(line, line_bytes, MPI_CHAR, lines.data(), line_bytes, MPI_CHAR, 0, world);
  if (rank != 0) return "";
  std::string text = "kmoe: " + std::to_string(size) + (size == 1 ? " rank" : " ranks") + " on " +
                     std::to_string(node.nodes) + (node.nodes == 1 ? " node" : " nodes") +
                     "; MPI moves device data through " + describe(mpi_transport()) + "\n";
  for (int r = 0; r < size; ++r)
    text += "  " + std::string(lines.data() + static_cast<std::size_t>(r) * line_bytes) + "\n";
  return text;
}

}  // namespace kmoe::dist
