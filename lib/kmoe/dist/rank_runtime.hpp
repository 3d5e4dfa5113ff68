// One rank of an MPI job and its GPU. The ranks on a node take the node's visible GPUs round robin
// by node-local rank (ranks with the same MPI_Get_processor_name), under any launcher: Kokkos 3.4
// on its own reads only Open MPI's, MVAPICH2's and Slurm's environment variables for that. A device
// the user chose (--kokkos-device-id or --kokkos-num-devices on the command line, KOKKOS_DEVICE_ID
// or KOKKOS_NUM_DEVICES in the environment) wins. More ranks than GPUs share them (correct, but
// no speed to claim).
#pragma once

#include <mpi.h>

#include <string>

namespace kmoe::dist {

struct NodePlacement {
  int local_rank = 0;  // among the ranks of comm on this node
  int local_size = 1;
  int nodes = 1;
};
// Collective over comm.
NodePlacement node_placement(MPI_Comm comm);

// The GPU the rank takes: its node-local rank modulo the GPUs it sees; -1 on a build without GPUs
// or a machine with none.
int device_for_rank(const NodePlacement& placement);

// Kokkos for this process, in place of Kokkos::ScopeGuard: under MPI (initialised before, finalised
// after) on the rank's GPU of `world`; without MPI as Kokkos picks. argv's Kokkos options are
// applied and removed, as Kokkos::initialize does.
class RankRuntime {
 public:
  RankRuntime(int& argc, char** argv, MPI_Comm world = MPI_COMM_WORLD);
  ~RankRuntime();
  RankRuntime(const RankRuntime&) = delete;
  RankRuntime& operator=(const RankRuntime&) = delete;
};

// Where the ranks of world run (host, node-local rank, GPU) and how MPI moves kmoe's device data
// (mpi_transport()), a few lines for rank 0 to print; "" on the other ranks. Collective over world
// (MPI_COMM_NULL: this process alone, without MPI). Kokkos must be running.
std::string rank_report(MPI_Comm world);

}  // namespace kmoe::dist
