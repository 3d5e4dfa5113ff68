// kmoe-bench: speed of kmoe's MoE pieces against a baseline measured in the same run.
//
// Expert MLP (CVMM) at the MoEUT-244M feed-forward shape by default (dmodel 1024, 387 experts,
// expert_size 128, k 16; 8192 tokens): forward and forward+backward, GFLOP/s counting only the
// active experts' FLOPs, against dense KokkosBlas::gemm calls doing the same FLOPs (the
// [tokens·k, dmodel]·[dmodel, expert_size] and [tokens·k, expert_size]·[expert_size, dmodel]
// products, as one [tokens·k, dmodel]·[dmodel, 2·expert_size] GEMM), with the ratio; then the
// whole σ-MoE layer (training mode) at the same shape, its rate also counting only the active
// experts' FLOPs.
#include "expert_mlp.hpp"
#include "timing.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/layers/sigma_moe.hpp"

#include <KokkosBlas3_gemm.hpp>

#include <cstdio>
#include <string>

using namespace kmoe;
using kmoe::apps::ExpertMlp;
using kmoe::apps::ExpertMlpShape;

namespace {

struct Row {
  std::string name;
  double seconds;
  double flops;
};

void print_table(const std::vector<Row>& rows, const Row& baseline) {
  const double base_rate = baseline.flops / baseline.seconds;
  std::printf("| %-38s | %10s | %8s | %13s |\n", "case", "time [ms]", "GFLOP/s", "ratio vs dense");
  std::printf("|----------------------------------------|------------|----------|----------------|\n");
  for (const Row& r : rows) {
    const double rate = r.flops / r.seconds;
    std::printf("| %-38s | %10.2f | %8.1f | %13.2f |\n", r.name.c_str(), r.seconds * 1e3, rate * 1e-9,
                rate / base_rate);
  }
}

// The MoEUT-244M feed-forward shape (seeds-spec §2 profiles), 8192 tokens.
ExpertMlpShape moeut_244m_ffn() {
  ExpertMlpShape s;
  s.tokens = 8192;
  s.dmodel = 1024;
  s.experts = 387;
  s.expert_size = 128;
  s.k = 16;
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  Kokkos::ScopeGuard kokkos(argc, argv);
  try {
    const ExpertMlpShape s = apps::parse_shape(argc, argv, moeut_244m_ffn(), "kmoe-bench");
    const int repeats = 3;
    std::printf("kmoe bench: execution space %s, concurrency %d\n", ExecSpace::name(), ExecSpace().concurrency());
    std::printf("expert MLP shape: %s\n\n", s.str().c_str());

    // Baseline: one dense GEMM with the forward's FLOPs, [tokens·k, dmodel] · [dmodel, 2·expert_size].
    const index_t rows = s.tokens * s.k;
    Tensor<float> a("a", {rows, s.dmodel}), b("b", {s.dmodel, 2 * s.expert_size}), c("c", {rows, 2 * s.expert_size});
    a.fill(0.5f);
    b.fill(0.25f);
    // Straight KokkosBlas::gemm (no thread-count-independent blocking): the library's best rate.
    const auto dense = [&] { KokkosBlas::gemm("N", "N", 1.f, a.view<2>(), b.view<2>(), 0.f, c.view<2>()); };
    dense();
    const Row baseline{"dense gemm, same FLOPs (baseline)", apps::median_seconds(repeats, dense), s.forward_flops()};
    a = Tensor<float>();  // free the baseline's buffers before the layer allocates its own
    c = Tensor<float>();

    std::vector<Row> rows_out{baseline};
    {
      ExpertMlp<float> mlp(s, 3);
      mlp.route();
      mlp.forward();
      mlp.backward();
      rows_out.push_back(
          {"expert MLP forward (CVMM)", apps::median_seconds(repeats, [&] { mlp.forward(); }), s.forward_flops()});
      rows_out.push_back({"expert MLP forward+backward (CVMM)", apps::median_seconds(repeats, [&] {
                            mlp.forward();
                            mlp.backward();
                          }),
                          s.forward_flops() + s.backward_flops()});
    }
    {
      // The whole σ-MoE layer (router, entropy regulariser, top-k, experts), training mode. Only
      // the active experts' FLOPs are counted, so router and selection work lowers its rate.
      layers::SigmaMoEConfig config;
      config.dmodel = s.dmodel;
      config.n_experts = s.experts;
      config.expert_size = s.expert_size;
      config.k = s.k;
      layers::SigmaMoE<float> layer(config, 5);
      std::mt19937_64 gen(11);
      const auto x = Tensor<float>::from_host("x", {s.tokens, s.dmodel},
                                              apps::random_vector<float>(s.tokens * s.dmodel, gen, 1.0));
      const auto dy = Tensor<float>::from_host("dy", {s.tokens, s.dmodel},
                                               apps::random_vector<float>(s.tokens * s.dmodel, gen, 1.0));
      Generator rng(7);
      const auto train_step = [&] {
        const auto f = layer.forward(x, true, rng);
        layer.backward(f, dy, 0.01f);
      };
      train_step();
      rows_out.push_back({"sigma-MoE layer forward", apps::median_seconds(repeats, [&] { layer.forward(x, true, rng); }),
                          s.forward_flops()});
      rows_out.push_back({"sigma-MoE layer forward+backward", apps::median_seconds(repeats, train_step),
                          s.forward_flops() + s.backward_flops()});
    }
    print_table(rows_out, baseline);
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "kmoe-bench: %s: %s\n", status_name(e.status()), e.what());
    return 2;
  }
}
