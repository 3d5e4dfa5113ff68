// The rank's runtime: which GPU it takes, how MPI reaches kmoe's device memory, and the device-memory
// exchanges (all_to_all with known counts, all_reduce_sum of a View) through that transport. Run by
// ctest with the detected transport and with KMOE_MPI_DEVICE_BUFFERS=0 (staging) at W = 3.
#include "dist/dist_util.hpp"

#include "kmoe/core/tensor.hpp"
#include "kmoe/dist/mpi_memory.hpp"
#include "kmoe/dist/rank_runtime.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <numeric>
#include <string>

namespace kmoe {
namespace {

using test::world;

TEST(RankRuntime, RanksOfOneMachineAreOneNodeAndTakeItsGpusRoundRobin) {
  const dist::NodePlacement node = dist::node_placement(MPI_COMM_WORLD);
  EXPECT_EQ(node.nodes, 1);  // mpirun on this machine
  EXPECT_EQ(node.local_size, world().size());
  // Every node-local rank once.
  std::vector<std::int64_t> locals = world().all_gather(static_cast<std::int64_t>(node.local_rank));
  std::sort(locals.begin(), locals.end());
  for (int r = 0; r < world().size(); ++r) EXPECT_EQ(locals[static_cast<std::size_t>(r)], r);
  const int device = dist::device_for_rank(node);
#if defined(KOKKOS_ENABLE_CUDA)
  ASSERT_GE(device, 0);
  EXPECT_EQ(device, Kokkos::Cuda().cuda_device()) << "Kokkos runs on another GPU than the rank's";
#else
  EXPECT_EQ(device, -1);
#endif
}

TEST(RankRuntime, TransportFollowsTheBuildAndTheVariable) {
  const char* forced = std::getenv("KMOE_MPI_DEVICE_BUFFERS");
  const dist::MpiTransport transport = dist::mpi_transport();
  if (forced != nullptr && std::string(forced) == "0") {
    EXPECT_EQ(transport, dist::MpiTransport::pinned_host);
  } else if (Kokkos::SpaceAccessibility<HostSpace, MemSpace>::accessible) {
    EXPECT_EQ(transport, dist::MpiTransport::host_memory);
  } else {
    EXPECT_NE(transport, dist::MpiTransport::host_memory);
  }
  EXPECT_NE(dist::describe(transport).find('('), std::string::npos) << "the reason is missing";
}

// Rank 0 gets a line per rank and the transport.
TEST(RankRuntime, ReportNamesEveryRankAndTheTransport) {
  const std::string text = dist::rank_report(MPI_COMM_WORLD);
  if (world().rank() != 0) {
    EXPECT_TRUE(text.empty());
    return;
  }
  EXPECT_NE(text.find(std::to_string(world().size()) + (world().size() == 1 ? " rank" : " ranks")), std::string::npos)
      << text;
  EXPECT_NE(text.find(dist::describe(dist::mpi_transport())), std::string::npos) << text;
  for (int r = 0; r < world().size(); ++r)
    EXPECT_NE(text.find("rank " + std::to_string(r) + ": "), std::string::npos) << text;
}

// Rank r sends (r + 1)(q + 1) + q + 3 values to rank q, each naming its sender, receiver and place.
void check_all_to_all(std::size_t message_bytes) {
  const int W = world().size(), me = world().rank();
  const auto count = [](int from, int to) { return static_cast<std::size_t>((from + 1) * (to + 1) + to + 3); };
  const auto value = [](int from, int to, std::size_t i) { return from * 1000000.0 + to * 10000.0 + double(i); };
  std::vector<double> send;
  std::vector<std::size_t> send_bytes, recv_bytes;
  std::size_t received = 0;
  for (int q = 0; q < W; ++q) {
    for (std::size_t i = 0; i < count(me, q); ++i) send.push_back(value(me, q, i));
    send_bytes.push_back(count(me, q) * sizeof(double));
    recv_bytes.push_back(count(q, me) * sizeof(double));
    received += count(q, me);
  }
  const auto out = Tensor<double>::from_host("test::send", {static_cast<index_t>(send.size())}, send);
  const auto in = Tensor<double>("test::recv", {static_cast<index_t>(received)});
  const dist::Communicator comm(MPI_COMM_WORLD);
  comm.set_round_bytes(message_bytes);
  dist::all_to_all(comm, out.data(), send_bytes, in.data(), recv_bytes);
  const std::vector<double> got = in.to_host();
  std::size_t at = 0;
  for (int q = 0; q < W; ++q)
    for (std::size_t i = 0; i < count(q, me); ++i, ++at)
      ASSERT_EQ(got[at], value(q, me, i)) << "from rank " << q << ", value " << i << ", messages of " << message_bytes;
}

TEST(RankRuntime, AllToAllOfDeviceRowsLandsInRankOrder) {
  check_all_to_all(std::size_t(1) << 29);  // one MPI_Alltoallv
  check_all_to_all(24);                     // point-to-point messages of 3 values
}

TEST(RankRuntime, AllReduceSumOfADeviceView) {
  const int W = world().size();
  std::vector<double> mine(37);
  std::iota(mine.begin(), mine.end(), 1.0 + world().rank());
  const auto values = Tensor<double>::from_host("test::values", {37}, mine);
  dist::all_reduce_sum(world(), values.flat());
  const std::vector<double> got = values.to_host();
  for (std::size_t i = 0; i < got.size(); ++i)
    EXPECT_EQ(got[i], W * (1.0 + static_cast<double>(i)) + W * (W - 1) / 2.0) << i;
}

}  // namespace
}  // namespace kmoe
