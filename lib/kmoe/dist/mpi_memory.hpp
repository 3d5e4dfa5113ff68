// How MPI reaches the rows and gradients kmoe keeps in device memory. Decided once per process:
//   host_memory     a host build (OpenMP): kmoe's memory is host memory, MPI reads it directly.
//   device_buffers  a CUDA-aware MPI (Open MPI built with CUDA says so at run time through
//                   MPIX_Query_cuda_support): device pointers go to MPI, no host round trip.
//   pinned_host     any other MPI on a GPU build: data goes through page-locked host buffers, kept
//                   and grown across calls (a cudaHostAlloc per exchange would cost more than the
//                   copy), so the copies run at the link's DMA rate.
// KMOE_MPI_DEVICE_BUFFERS=0 forces pinned_host (on a host build too: plain host buffers then, so
// that tests run the staging without a GPU); =1 asks for device_buffers on an MPI that cannot
// say (MPICH or MVAPICH2 built for CUDA) and is refused by an Open MPI that says it has no CUDA
// support (device pointers would crash it).
#pragma once

#include "kmoe/core/config.hpp"
#include "kmoe/dist/communicator.hpp"

#include <cstddef>
#include <string>
#include <vector>

namespace kmoe::dist {

enum class MpiTransport { host_memory, device_buffers, pinned_host };

// The transport of this process (MPI must be initialised; throws Status::invalid_argument for a
// KMOE_MPI_DEVICE_BUFFERS this MPI cannot honour).
MpiTransport mpi_transport();
// "pinned host buffers (this MPI cannot read GPU memory: Open MPI without CUDA support)", ...
std::string describe(MpiTransport transport);

// values (kmoe's device memory) replaced by their sum over comm's ranks, as
// Communicator::all_reduce_sum, moving through mpi_transport(). Collective; float or double.
template <class T>
void all_reduce_sum(const Communicator& comm, const View1<T>& values);

// send_counts[r] bytes of kmoe's device memory at send for rank r (in rank order), recv_counts[r]
// bytes from rank r into recv (in rank order): Communicator::all_to_all with known counts, moving
// through mpi_transport(). Collective.
void all_to_all(const Communicator& comm, const void* send, const std::vector<std::size_t>& send_counts, void* recv,
                const std::vector<std::size_t>& recv_counts);

namespace impl {

// `bytes` bytes of kmoe's device memory as MPI may address them: the memory itself for
// host_memory and device_buffers, else one of the kept pinned buffers (slot 0 or 1: a send and a
// receive buffer can be staged at once; a slot is reused by the next stage of that slot).
class MpiStage {
 public:
  MpiStage(void* device, std::size_t bytes, int slot);
  void* data() const { return mpi_; }
  // Before MPI reads: waits for the kernels that wrote the memory and copies it to the stage.
  void to_mpi() const;
  // After MPI wrote the stage: copies it to the device memory.
  void from_mpi() const;

 private:
  void* device_;
  void* mpi_;
  std::size_t bytes_;
};

}  // namespace impl

}  // namespace kmoe::dist
