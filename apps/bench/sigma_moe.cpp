// kmoe-bench section "sigma_moe": the expert MLP (CVMM) and the whole σ-MoE layer at the
// MoEUT-244M feed-forward shape by default (dmodel 1024, 387 experts, expert_size 128, k 16;
// 8192 tokens), forward and forward+backward. Rates count only the active experts' FLOPs; the
// baseline is one dense KokkosBlas::gemm with the forward's FLOPs ([tokens·k, dmodel] ·
// [dmodel, 2·expert_size]), so router and selection work lowers the layer's ratio.
#include "sections.hpp"

#include "expert_mlp.hpp"

#include "kmoe/layers/sigma_moe.hpp"

namespace kmoe::apps {

namespace {

// The MoEUT-244M feed-forward shape (profile MoEUT_244M of
// RobertCsordas/moeut@87f04973d3db3ad7cb4ca67a0750241e40210d3c profiles.py), 8192 tokens.
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

BenchTable bench_sigma_moe(const Options& options, int repeats) {
  const ExpertMlpShape s = shape_from_options(options, moeut_244m_ffn(), "kmoe-bench sigma_moe");
  BenchTable table;
  table.title = "sigma-MoE (" + s.str() + "), float32";
  table.baseline = dense_gemm_row("dense gemm, same FLOPs (baseline)", s.tokens * s.k, s.dmodel, 2 * s.expert_size,
                                  repeats);
  PeakMemory memory;
  {
    ExpertMlp<float> mlp(s, 3);
    mlp.route();
    mlp.forward();
    mlp.backward();
    table.rows.push_back(
        timed_row("expert MLP forward (CVMM)", s.forward_flops(), repeats, memory, [&] { mlp.forward(); }));
    table.rows.push_back(timed_row("expert MLP forward+backward (CVMM)", s.forward_flops() + s.backward_flops(),
                                   repeats, memory, [&] {
                                     mlp.forward();
                                     mlp.backward();
                                   }));
  }
  {
    layers::SigmaMoEConfig config;
    config.dmodel = s.dmodel;
    config.n_experts = s.experts;
    config.expert_size = s.expert_size;
    config.k = s.k;
    layers::SigmaMoE<float> layer(config, 5);
    std::mt19937_64 gen(11);
    const auto x = Tensor<float>::from_host("x", {s.tokens, s.dmodel}, random_vector<float>(s.tokens * s.dmodel, gen, 1.0));
    const auto dy = Tensor<float>::from_host("dy", {s.tokens, s.dmodel}, random_vector<float>(s.tokens * s.dmodel, gen, 1.0));
    Generator rng(7);
    const auto train_step = [&] {
      const auto forward = layer.forward(x, true, rng);
      layer.backward(forward, dy, 0.01f);
    };
    train_step();
    table.rows.push_back(timed_row("sigma-MoE layer forward (training)", s.forward_flops(), repeats, memory,
                                   [&] { layer.forward(x, true, rng); }));
    table.rows.push_back(
        timed_row("sigma-MoE layer forward+backward", s.forward_flops() + s.backward_flops(), repeats, memory, train_step));
  }
  table.notes.push_back("Peak memory: above what the section held before the case (inputs and parameters), "
                        "reusable scratch included once allocated.");
  return table;
}

}  // namespace kmoe::apps
