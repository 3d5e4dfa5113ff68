#include "kmoe/dist/mpi_memory.hpp"

#include "kmoe/core/error.hpp"

#include <mpi.h>
#if defined(OPEN_MPI) && OPEN_MPI
#include <mpi-ext.h>
#endif

#include <cstdlib>
#include <mutex>

namespace kmoe::dist {

namespace {

#if defined(KOKKOS_ENABLE_CUDA)
using PinnedSpace = Kokkos::CudaHostPinnedSpace;
#else
using PinnedSpace = HostSpace;
#endif
using Bytes = Kokkos::View<unsigned char*, MemSpace, Kokkos::MemoryUnmanaged>;
using PinnedBytes = Kokkos::View<unsigned char*, PinnedSpace>;
using PinnedRange = Kokkos::View<unsigned char*, PinnedSpace, Kokkos::MemoryUnmanaged>;

constexpr bool device_is_host = Kokkos::SpaceAccessibility<HostSpace, MemSpace>::accessible;

// 1: the MPI says it reads CUDA memory, 0: it says it does not, -1: it cannot say.
int mpi_reads_cuda_memory() {
#if defined(OMPI_HAVE_MPI_EXT_CUDA) && OMPI_HAVE_MPI_EXT_CUDA
  return MPIX_Query_cuda_support() != 0 ? 1 : 0;
#else
  return -1;
#endif
}

struct Decision {
  MpiTransport transport = MpiTransport::host_memory;
  std::string why;
};

Decision decide() {
  const char* variable = std::getenv("KMOE_MPI_DEVICE_BUFFERS");
  const std::string forced = variable != nullptr ? variable : "";
  require(forced.empty() || forced == "0" || forced == "1", Status::invalid_argument,
          "kmoe: KMOE_MPI_DEVICE_BUFFERS is '", forced, "', expected 0 or 1");
  // Staging also on a host build: how the tests run the staging path without a GPU.
  if (forced == "0") return {MpiTransport::pinned_host, "KMOE_MPI_DEVICE_BUFFERS=0"};
  if (device_is_host) return {MpiTransport::host_memory, "kmoe's memory is host memory"};
  const int says = mpi_reads_cuda_memory();
  if (forced == "1") {
    require(says != 0, Status::invalid_argument,
            "kmoe: KMOE_MPI_DEVICE_BUFFERS=1, but this Open MPI says it cannot read GPU memory "
            "(MPIX_Query_cuda_support() is 0): unset it, or use an Open MPI built with CUDA");
    return {MpiTransport::device_buffers, "KMOE_MPI_DEVICE_BUFFERS=1"};
  }
  if (says == 1) return {MpiTransport::device_buffers, "CUDA-aware MPI: MPIX_Query_cuda_support() is 1"};
  if (says == 0)
    return {MpiTransport::pinned_host, "this Open MPI has no CUDA support: MPIX_Query_cuda_support() is 0"};
  return {MpiTransport::pinned_host,
          "this MPI cannot say whether it reads GPU memory; KMOE_MPI_DEVICE_BUFFERS=1 if it does"};
}

const Decision& decision() {
  static std::once_flag once;
  static Decision decided;
  std::call_once(once, [] { decided = decide(); });
  return decided;
}

// The kept pinned buffers, released at Kokkos::finalize (a View may not outlive Kokkos).
std::mutex stage_mutex;
PinnedBytes stages[2];
bool release_registered = false;

void* pinned_stage(std::size_t bytes, int slot) {
  require(slot == 0 || slot == 1, Status::internal, "MpiStage: slot ", slot);
  const std::lock_guard<std::mutex> lock(stage_mutex);
  if (!release_registered) {
    Kokkos::push_finalize_hook([] {
      const std::lock_guard<std::mutex> held(stage_mutex);
      stages[0] = stages[1] = PinnedBytes();
      release_registered = false;
    });
    release_registered = true;
  }
  PinnedBytes& stage = stages[slot];
  if (stage.extent(0) < bytes) {
    stage = PinnedBytes();  // free before allocating the larger one
    // Grown by half again, so that a slowly growing exchange does not reallocate every step.
    stage = PinnedBytes(Kokkos::view_alloc(Kokkos::WithoutInitializing, "kmoe::mpi_stage"), bytes + bytes / 2);
  }
  return stage.data();
}

}  // namespace

MpiTransport mpi_transport() { return decision().transport; }

std::string describe(MpiTransport transport) {
  const std::string why = transport == mpi_transport() ? " (" + decision().why + ")" : "";
  switch (transport) {
    case MpiTransport::host_memory: return "host memory" + why;
    case MpiTransport::device_buffers: return "GPU memory directly" + why;
    case MpiTransport::pinned_host: return "pinned host buffers" + why;
  }
  return "unknown";
}

template <class T>
void all_reduce_sum(const Communicator& comm, const View1<T>& values) {
  if (!comm.distributed()) return;
  const impl::MpiStage stage(values.data(), values.extent(0) * sizeof(T), 0);
  stage.to_mpi();
  comm.all_reduce_sum(static_cast<T*>(stage.data()), values.extent(0));
  stage.from_mpi();
}

void all_to_all(const Communicator& comm, const void* send, const std::vector<std::size_t>& send_counts, void* recv,
                const std::vector<std::size_t>& recv_counts) {
  std::size_t send_total = 0, recv_total = 0;
  for (const std::size_t n : send_counts) send_total += n;
  for (const std::size_t n : recv_counts) recv_total += n;
  const impl::MpiStage out(const_cast<void*>(send), send_total, 0), in(recv, recv_total, 1);
  out.to_mpi();
  comm.all_to_all(out.data(), send_counts, in.data(), recv_counts);
  in.from_mpi();
}

template void all_reduce_sum<float>(const Communicator&, const View1<float>&);
template void all_reduce_sum<double>(const Communicator&, const View1<double>&);

namespace impl {

MpiStage::MpiStage(void* device, std::size_t bytes, int slot) : device_(device), mpi_(device), bytes_(bytes) {
  if (mpi_transport() == MpiTransport::pinned_host && bytes > 0) mpi_ = pinned_stage(bytes, slot);
}

void MpiStage::to_mpi() const {
  if (mpi_ == device_ || bytes_ == 0) {
    Kokkos::fence();  // MPI reads the memory itself: the kernels that wrote it must be done
    return;
  }
  Kokkos::deep_copy(PinnedRange(static_cast<unsigned char*>(mpi_), bytes_),
                    Bytes(static_cast<unsigned char*>(device_), bytes_));
}

void MpiStage::from_mpi() const {
  if (mpi_ == device_ || bytes_ == 0) return;
  Kokkos::deep_copy(Bytes(static_cast<unsigned char*>(device_), bytes_),
                    PinnedRange(static_cast<unsigned char*>(mpi_), bytes_));
}

}  // namespace impl

}  // namespace kmoe::dist
