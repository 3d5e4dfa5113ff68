// kmoe-bench section "sigma_moe": the expert MLP (CVMM) and the whole σ-MoE layer at the
// MoEUT-244M feed-forward shape by default (dmodel 1024, 387 experts, expert_size 128, k 16;
// 16384 tokens), forward and forward+backward, in float32 or (--precision bfloat16) mixed
// precision. Rates count only the active experts' FLOPs. The baseline is the dense GEMM chain of
// the same FLOPs ([tokens·k, dmodel]·[dmodel, expert_size]·[expert_size, dmodel], forward and
// backward) on the machine's fastest GEMM, with a large square GEMM beside it so that the
// baseline's own distance from peak shows; router and selection work lower the layer's ratio.
#include "sections.hpp"

#include "expert_mlp.hpp"

#include "kmoe/layers/sigma_moe.hpp"

#include <cstdio>

namespace kmoe::apps {

namespace {

// The MoEUT-244M feed-forward shape (profile MoEUT_244M of
// RobertCsordas/moeut@87f04973d3db3ad7cb4ca67a0750241e40210d3c profiles.py), 16384 tokens.
ExpertMlpShape moeut_244m_ffn() {
  ExpertMlpShape s;
  s.tokens = 16384;
  s.dmodel = 1024;
  s.experts = 387;
  s.expert_size = 128;
  s.k = 16;
  return s;
}

template <class W>
void expert_mlp_rows(const ExpertMlpShape& s, int repeats, PeakMemory& memory, BenchTable& table) {
  ExpertMlp<float, W> mlp(s, 3);
  mlp.route();
  mlp.forward();
  mlp.backward();
  table.rows.push_back(timed_row("expert MLP forward (CVMM)", s.forward_flops(), repeats, memory, [&] { mlp.forward(); }));
  table.rows.push_back(timed_row("expert MLP forward+backward (CVMM)", s.forward_flops() + s.backward_flops(), repeats,
                                 memory, [&] {
                                   mlp.forward();
                                   mlp.backward();
                                 }));
}

}  // namespace

BenchTable bench_sigma_moe(const Options& options, int repeats) {
  const Precision precision = precision_option(options);
  Options shape_options = options;
  shape_options.erase("--precision");
  const ExpertMlpShape s = shape_from_options(shape_options, moeut_244m_ffn(), "kmoe-bench sigma_moe");
  const bool bf16 = precision == Precision::bfloat16;
  std::fprintf(stderr, "[kmoe-bench] sigma_moe (%s): dense baselines ...\n", precision_title(precision));
  BenchTable table;
  table.title = "sigma-MoE (" + s.str() + "), " + precision_title(precision);
  const DenseChainRows chain = dense_chain_rows(s.tokens * s.k, s.dmodel, s.expert_size, precision, repeats);
  table.baseline = chain.forward_backward;
  table.rows.push_back(chain.forward);
  const BenchRow square = square_gemm_row(4096, precision, repeats);
  table.rows.push_back(square);
  PeakMemory memory;
  std::fprintf(stderr, "[kmoe-bench] sigma_moe: expert MLP ...\n");
  if (bf16) expert_mlp_rows<bfloat16>(s, repeats, memory, table);
  else expert_mlp_rows<float>(s, repeats, memory, table);
  {
    std::fprintf(stderr, "[kmoe-bench] sigma_moe: layer ...\n");
    layers::SigmaMoEConfig config;
    config.dmodel = s.dmodel;
    config.n_experts = s.experts;
    config.expert_size = s.expert_size;
    config.k = s.k;
    config.precision = precision;
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
  char peak_note[160];
  std::snprintf(peak_note, sizeof peak_note, "The baseline runs at %.2f of the square GEMM's rate (%.1f TFLOP/s).",
                (table.baseline.flops / table.baseline.seconds) / (square.flops / square.seconds),
                square.flops / square.seconds * 1e-12);
  table.notes.push_back(peak_note);
  if (bf16 && !native_bfloat16_gemm())
    table.notes.push_back("This build has no native bfloat16 GEMM: bfloat16 is emulated in float (no speed gain).");
  table.notes.push_back("Peak memory: above what the section held before the case (inputs and parameters), "
                        "reusable scratch included once allocated.");
  return table;
}

}  // namespace kmoe::apps
