// kmoe-bench section "dist" (run it under mpirun; cmake/kmoe bench runs it on 4 ranks): a σ-MoE
// training step with a fixed batch per rank at world sizes 1, 2 and 4 (sub-communicators of the
// ranks mpirun started; ranks outside one wait), each against the one-rank step measured in the
// same run. Besides the time: the bytes each rank sends per step, against
//   the routing's minimum: each token row once per other rank holding one of its experts, in
//     each of the step's six exchanges (x, gates and dy out; y, dx and gate gradients back), and
//   a naive all-gather (what st-moe-pytorch does): every rank sends all its tokens' x to every
//     other rank, and their outputs, dy and dx likewise.
// On a machine with fewer cores than ranks the times mostly measure the sharing of the cores;
// the bytes hold at any size.
#include "sections.hpp"

#include "kmoe/dist/communicator.hpp"
#include "kmoe/dist/gradients.hpp"
#include "kmoe/layers/sigma_moe.hpp"

#include <mpi.h>

#include <cstdio>
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
  double gather_bytes = 0;   // a naive all-gather's, per rank
};

WorldResult measure(const dist::Communicator& comm, const layers::SigmaMoEConfig& c, index_t tokens, int repeats) {
  layers::SigmaMoE<float> layer(c, 1, ParameterInit::drawn, comm);
  std::mt19937 gen(static_cast<unsigned>(17 + comm.rank()));
  std::normal_distribution<float> normal;
  std::vector<float> values(static_cast<std::size_t>(tokens * c.dmodel));
  for (float& v : values) v = normal(gen);
  const auto x = Tensor<float>::from_host("bench::x", {tokens, c.dmodel}, values);
  const auto dy = Tensor<float>::from_host("bench::dy", {tokens, c.value_dim()}, values);
  const auto step = [&] {
    Generator rng(3);
    const auto f = layer.forward(x, true, rng);
    (void)layer.backward(f, dy, 0.01f);
    dist::all_reduce_dense_gradients(comm, model::collect_parameters(layer));
    Kokkos::fence();
    return f.exchange.rows_sent();
  };
  (void)step();  // warm-up (allocations, BLAS threads)
  comm.reset_bytes_sent();
  std::uint64_t rows = 0;
  std::vector<double> times;
  for (int r = 0; r < repeats; ++r) {
    MPI_Barrier(comm.comm());
    const double start = MPI_Wtime();
    rows = step();
    MPI_Barrier(comm.comm());
    times.push_back(MPI_Wtime() - start);
  }
  std::sort(times.begin(), times.end());
  WorldResult w;
  w.world = comm.size();
  w.seconds = times[times.size() / 2];
  std::int64_t sent = static_cast<std::int64_t>(comm.bytes_sent() / static_cast<std::uint64_t>(repeats));
  std::int64_t minimum = static_cast<std::int64_t>(
      rows * static_cast<std::uint64_t>(2 * c.dmodel + 2 * c.value_dim() + 2 * c.k) * sizeof(float));
  comm.all_reduce_sum(&sent, 1);
  comm.all_reduce_sum(&minimum, 1);
  w.bytes_sent = static_cast<double>(sent) / comm.size();
  w.routing_bytes = static_cast<double>(minimum) / comm.size();
  w.gather_bytes = static_cast<double>(comm.size() - 1) * static_cast<double>(tokens) *
                   static_cast<double>(2 * c.dmodel + 2 * c.value_dim()) * sizeof(float);
  return w;
}

}  // namespace

BenchTable bench_dist(const Options& options, int repeats) {
  int initialised = 0;
  MPI_Initialized(&initialised);
  require(initialised != 0, Status::invalid_argument, app, ": run kmoe-bench dist under mpirun (e.g. mpirun -n 4)");
  layers::SigmaMoEConfig c;
  c.dmodel = positive_option(options, "--dmodel", 512, app);
  c.n_experts = static_cast<int>(positive_option(options, "--experts", 16, app));
  c.expert_size = positive_option(options, "--expert-size", 128, app);
  c.k = static_cast<int>(positive_option(options, "--k", 4, app));
  const index_t tokens = positive_option(options, "--tokens", 2048, app);
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
      if (rank == 0) std::fprintf(stderr, "dist: W = %d, %d steps ...\n", w, repeats);
      result = measure(dist::Communicator(sub), c, tokens, repeats);
      MPI_Comm_free(&sub);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    results.push_back(result);
  }

  BenchTable table;
  char line[512];
  std::snprintf(line, sizeof line,
                "dist: sigma-MoE training step (dmodel %ld, %d experts x %ld, k %d), %ld tokens per rank, float, "
                "mpirun -n %d",
                static_cast<long>(c.dmodel), c.n_experts, static_cast<long>(c.expert_size), c.k,
                static_cast<long>(tokens), world);
  table.title = line;
  const double flops_per_token = 3.0 * 2.0 * 2.0 * static_cast<double>(c.k * c.dmodel * c.expert_size);
  for (const WorldResult& r : results) {
    std::snprintf(line, sizeof line, "W = %d: sent %.2f MB/rank (routing minimum %.2f, all-gather %.2f)", r.world,
                  r.bytes_sent * 1e-6, r.routing_bytes * 1e-6, r.gather_bytes * 1e-6);
    BenchRow row{line, r.seconds, flops_per_token * static_cast<double>(tokens) * r.world, std::nullopt};
    if (r.world == 1) {
      table.baseline = row;
      table.baseline.name = "W = 1 (baseline: no exchange)";
    } else {
      table.rows.push_back(row);
    }
  }
  table.notes = {"GFLOP/s: the experts' forward and backward FLOPs of all ranks' tokens; the ratio is the speed-up "
                 "over one rank doing its own batch (1.0 = perfect weak scaling).",
                 "Bytes: per rank per step, mean over the ranks. The routing minimum counts each token row once per "
                 "other rank holding one of its experts in each of the six exchanges; the remainder sent is "
                 "routing metadata (global token ids and expert ids, once per step). All-gather: every rank "
                 "sending x, y, dy and dx of all its tokens to every other rank."};
  return table;
}

}  // namespace kmoe::apps
