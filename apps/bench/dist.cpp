// kmoe-bench sections "dist" and "dist-moeut" (run them under mpirun; cmake/kmoe bench runs both
// on 4 ranks): a σ-MoE training step and a MoEUT-tiny LM training step (σ-MoE FFN and SwitchHead
// attention experts placed) with a fixed batch per rank at world sizes 1, 2 and 4
// (sub-communicators of the ranks mpirun started; ranks outside one wait), each against the
// one-rank step measured in the same run. Besides the time: the bytes each rank sends per step,
// against
//   the routing's minimum: each token row once per other rank holding one of its experts, in
//     every exchange of the step (counted by dist::ExpertExchange), and
//   a naive all-gather (what st-moe-pytorch does): every rank's rows of the same exchanges sent
//     to every other rank.
// And the all-to-all rate the step's row exchanges achieved (their bytes over their wall time,
// staging and waiting for the other ranks included), against the transport's peak measured in the
// same run: a plain all-to-all of 64 MiB per rank of device memory through the same path (device
// buffers or pinned staging, as dist::mpi_transport() decides).
// On a machine with fewer cores (or GPUs) than ranks the times mostly measure the sharing; the
// bytes hold at any size.
#include "sections.hpp"

#include "kmoe/dist/communicator.hpp"
#include "kmoe/dist/gradients.hpp"
#include "kmoe/dist/mpi_memory.hpp"
#include "kmoe/layers/moeut.hpp"
#include "kmoe/layers/sigma_moe.hpp"
#include "kmoe/ops/cross_entropy.hpp"

#include <mpi.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <random>
#include <string>

namespace kmoe::apps {

namespace {

constexpr const char* app = "kmoe-bench dist";

struct WorldResult {
  int world = 0;
  double seconds = 0;
  double bytes_sent = 0;     // per rank per step, mean over the ranks
  double routing_bytes = 0;  // the routing's minimum, mean over the ranks
  double gather_bytes = 0;   // a naive all-gather's, mean over the ranks
  double exchange_rate = 0;  // bytes/s of the step's row exchanges per rank, mean over the ranks
  double peak_rate = 0;      // bytes/s per rank of a plain large all-to-all through the same path
};

// The median wall time of `repeats` runs of f (collective over comm), each between barriers and
// fenced.
double median_seconds(const dist::Communicator& comm, int repeats, const std::function<void()>& f) {
  std::vector<double> times;
  for (int r = 0; r < repeats; ++r) {
    MPI_Barrier(comm.comm());
    const double start = MPI_Wtime();
    f();
    Kokkos::fence();
    MPI_Barrier(comm.comm());
    times.push_back(MPI_Wtime() - start);
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

// Bytes/s per rank (sent to the other ranks, mean over the ranks) of a plain all-to-all of 64 MiB
// per rank of device memory, split evenly over the other ranks; median of five.
double transport_peak(const dist::Communicator& comm) {
  const auto others = static_cast<std::size_t>(comm.size() - 1);
  if (others == 0) return 0;
  const std::size_t per_peer = (std::size_t(64) << 20) / others;
  Kokkos::View<unsigned char*, MemSpace> send("bench::peak_send", per_peer * others),
      recv("bench::peak_recv", per_peer * others);
  std::vector<std::size_t> counts(static_cast<std::size_t>(comm.size()), per_peer);
  counts[static_cast<std::size_t>(comm.rank())] = 0;
  const auto exchange = [&] { dist::all_to_all(comm, send.data(), counts, recv.data(), counts); };
  exchange();  // warm-up (the staging buffers)
  return static_cast<double>(per_peer * others) / median_seconds(comm, 5, exchange);
}

// Times step() (a training step on comm, collective) and reads the step's traffic off comm.
WorldResult measure(const dist::Communicator& comm, int repeats, const std::function<void()>& step) {
  step();  // warm-up (allocations, BLAS threads)
  comm.reset_bytes_sent();
  WorldResult w;
  w.world = comm.size();
  w.seconds = median_seconds(comm, repeats, step);
  const double seconds = comm.exchange_seconds();
  const double rate = seconds > 0 ? static_cast<double>(comm.row_bytes_sent()) / seconds : 0;
  double traffic[4] = {static_cast<double>(comm.bytes_sent()), static_cast<double>(comm.row_bytes_sent()),
                       static_cast<double>(comm.all_gather_bytes()), rate};
  comm.all_reduce_sum(traffic, 4);
  const double per_rank_step = 1.0 / (static_cast<double>(comm.size()) * repeats);
  w.bytes_sent = traffic[0] * per_rank_step;
  w.routing_bytes = traffic[1] * per_rank_step;
  w.gather_bytes = traffic[2] * per_rank_step;
  w.exchange_rate = traffic[3] / comm.size();
  double peak = transport_peak(comm);
  comm.all_reduce_sum(&peak, 1);
  w.peak_rate = peak / comm.size();
  return w;
}

// Runs make_step(comm) at W = 1, 2, 4 (as far as mpirun's ranks go) and tabulates the results.
BenchTable over_world_sizes(const char* app, const std::string& title, double flops_per_rank, int repeats,
                            const std::function<std::function<void()>(const dist::Communicator&)>& make_step) {
  int initialised = 0;
  MPI_Initialized(&initialised);
  require(initialised != 0, Status::invalid_argument, app, ": run it under mpirun (e.g. mpirun -n 4)");
  int world = 0, rank = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  std::vector<WorldResult> results;
  for (const int w : {1, 2, 4}) {
    if (w > world) break;
    MPI_Comm sub = MPI_COMM_NULL;
    MPI_Comm_split(MPI_COMM_WORLD, rank < w ? 0 : MPI_UNDEFINED, rank, &sub);
    WorldResult result;
    if (sub != MPI_COMM_NULL) {
      if (rank == 0) std::fprintf(stderr, "%s: W = %d, %d steps ...\n", app, w, repeats);
      const dist::Communicator comm(sub);
      result = measure(comm, repeats, make_step(comm));
      MPI_Comm_free(&sub);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    results.push_back(result);
  }
  BenchTable table;
  table.title = title + ", mpirun -n " + std::to_string(world);
  char line[512];
  for (const WorldResult& r : results) {
    std::snprintf(line, sizeof line,
                  "W = %d: sent %.2f MB/rank (routing minimum %.2f, all-gather %.2f); all-to-all %.2f GB/s/rank, "
                  "%.0f%% of the transport's %.2f GB/s",
                  r.world, r.bytes_sent * 1e-6, r.routing_bytes * 1e-6, r.gather_bytes * 1e-6, r.exchange_rate * 1e-9,
                  r.peak_rate > 0 ? 100 * r.exchange_rate / r.peak_rate : 0.0, r.peak_rate * 1e-9);
    BenchRow row{line, r.seconds, flops_per_rank * r.world, std::nullopt};
    if (r.world == 1) {
      table.baseline = row;
      table.baseline.name = "W = 1 (baseline: no exchange)";
    } else {
      table.rows.push_back(row);
    }
  }
  table.notes = {"GFLOP/s: the FLOPs of all ranks' tokens; the ratio is the speed-up over one rank doing its own "
                 "batch (1.0 = perfect weak scaling); the weak-scaling efficiency is the ratio over W.",
                 "All-to-all: the step's row exchanges, bytes sent to other ranks over their wall time (staging copies "
                 "and waiting included), per rank; the transport's rate: a plain all-to-all of 64 MiB per rank of "
                 "device memory through the same path (MPI moves device data through " +
                     dist::describe(dist::mpi_transport()) + ").",
                 "Bytes: per rank per step, mean over the ranks. The routing minimum counts each token row once per "
                 "other rank holding one of its experts, in every exchange of the step; the remainder sent is "
                 "routing metadata (global token ids and expert ids, once per exchange plan). All-gather: every "
                 "rank's rows of the same exchanges sent to every other rank."};
  return table;
}

}  // namespace

BenchTable bench_dist(const Options& options, int repeats) {
  const char* app = "kmoe-bench dist";
  layers::SigmaMoEConfig c;
  c.dmodel = positive_option(options, "--dmodel", 512, app);
  c.n_experts = static_cast<int>(positive_option(options, "--experts", 16, app));
  c.expert_size = positive_option(options, "--expert-size", 128, app);
  c.k = static_cast<int>(positive_option(options, "--k", 4, app));
  const index_t tokens = positive_option(options, "--tokens", 2048, app);
  c.precision = precision_option(options);
  char title[256];
  std::snprintf(title, sizeof title, "dist: sigma-MoE training step (dmodel %ld, %d experts x %ld, k %d), %ld tokens "
                "per rank, %s", static_cast<long>(c.dmodel), c.n_experts, static_cast<long>(c.expert_size), c.k,
                static_cast<long>(tokens), precision_title(c.precision));
  const double flops = 3.0 * 2.0 * 2.0 * static_cast<double>(c.k * c.dmodel * c.expert_size) * tokens;
  return over_world_sizes(app, title, flops, repeats, [&](const dist::Communicator& comm) -> std::function<void()> {
    auto layer = std::make_shared<layers::SigmaMoE<float>>(c, 1, ParameterInit::drawn, comm);
    std::mt19937 gen(static_cast<unsigned>(17 + comm.rank()));
    std::normal_distribution<float> normal;
    std::vector<float> values(static_cast<std::size_t>(tokens * c.dmodel));
    for (float& v : values) v = normal(gen);
    const auto x = Tensor<float>::from_host("bench::x", {tokens, c.dmodel}, values);
    const auto dy = Tensor<float>::from_host("bench::dy", {tokens, c.value_dim()}, values);
    return [layer, x, dy, comm] {
      Generator rng(3);
      const auto f = layer->forward(x, true, rng);
      (void)layer->backward(f, dy, 0.01f);
      dist::all_reduce_dense_gradients(comm, model::collect_parameters(*layer));
    };
  });
}

BenchTable bench_dist_moeut(const Options& options, int repeats) {
  const char* app = "kmoe-bench dist-moeut";
  const index_t batch = positive_option(options, "--batch", 2, app);
  const index_t seq = positive_option(options, "--seq", 64, app);
  const layers::MoEUTConfig c = moeut_tiny_profile();
  char title[256];
  std::snprintf(title, sizeof title, "dist-moeut: MoEUT-tiny LM training step (%d ff experts, %d x %d att experts), "
                "batch %ld x seq %ld per rank, float", c.ff_n_experts, c.n_heads, c.att_n_experts,
                static_cast<long>(batch), static_cast<long>(seq));
  const index_t N = batch * seq;
  return over_world_sizes(app, title, 3 * moeut_forward_flops(c, batch, seq), repeats,
                          [&](const dist::Communicator& comm) -> std::function<void()> {
    auto lm = std::make_shared<layers::MoEUTLM<float>>(c, 5, ParameterInit::drawn, comm);
    std::mt19937_64 gen(static_cast<std::uint64_t>(11 + comm.rank()));
    std::vector<int> ids(static_cast<std::size_t>(N)), targets(static_cast<std::size_t>(N));
    for (auto& id : ids) id = static_cast<int>(gen() % static_cast<std::uint64_t>(c.n_tokens));
    for (auto& id : targets) id = static_cast<int>(gen() % static_cast<std::uint64_t>(c.n_tokens));
    const auto x = Tensor<int>::from_host("bench::ids", {batch, seq}, ids);
    const auto y = Tensor<int>::from_host("bench::targets", {N}, targets);
    const auto row_lse = Tensor<float>::uninitialized("bench::row_lse", {N});
    const auto dlogits = Tensor<float>::uninitialized("bench::dlogits", {N, c.n_tokens});
    return [lm, x, y, row_lse, dlogits, comm, N, c] {
      Generator rng(7);
      const auto f = lm->forward(x, std::nullopt, true, rng);
      const auto logits = f.logits.reshape({N, c.n_tokens});
      ops::cross_entropy_forward<float>(logits.as_matrix(), y.flat(), -100, row_lse.flat());
      ops::cross_entropy_backward<float>(logits.as_matrix(), y.flat(), -100, row_lse.flat(), 1.f,
                                         dlogits.as_matrix());
      lm->backward(f, dlogits.reshape(f.logits.shape()), 1.f);
      dist::all_reduce_dense_gradients(comm, model::collect_parameters(*lm));
    };
  });
}

}  // namespace kmoe::apps
