// kmoe-bench section "st_moe": the ST-MoE layer (st-moe-pytorch v0.1.8 defaults: GEGLU experts with
// hidden_mult 4, top-2 gating, capacity factor 1.25, straight-through dispatch) at dim 512, 16
// experts, 4 sequences of 1024 tokens by default, in training mode: forward, and forward+backward
// with the auxiliary losses, with time and peak memory. Rates count the experts' GEGLU MLP FLOPs of
// the pairs that were routed and kept (6 · pairs · dim · h forward, twice that backward); the
// baseline is one dense KokkosBlas::gemm with those forward FLOPs ([pairs, dim] · [dim, 3h]),
// measured in the same run, so routing, dispatch and combine work lower the layer's ratio.
#include "sections.hpp"

#include "expert_mlp.hpp"

#include "kmoe/layers/st_moe.hpp"

#include <cstdio>

namespace kmoe::apps {

BenchTable bench_st_moe(const Options& options, int repeats) {
  const char* app = "kmoe-bench st_moe";
  const index_t batch = positive_option(options, "--batch", 4, app), seq = positive_option(options, "--seq", 1024, app);
  layers::StMoEConfig config;
  config.dim = positive_option(options, "--dim", 512, app);
  config.num_experts = static_cast<int>(positive_option(options, "--experts", 16, app));
  config.gating_top_n = static_cast<int>(positive_option(options, "--top-n", 2, app));
  config.precision = precision_option(options);
  const index_t D = config.dim, h = config.expert_hidden(), tokens = batch * seq;

  layers::StMoE<float> layer(config, 5);
  std::mt19937_64 gen(11);
  const auto x = Tensor<float>::from_host("x", {batch, seq, D}, random_vector<float>(tokens * D, gen, 1.0));
  const auto dy = Tensor<float>::from_host("dy", {batch, seq, D}, random_vector<float>(tokens * D, gen, 1.0));
  Generator rng(7);
  const auto train_step = [&] {
    const auto forward = layer.forward(x, true, rng);
    layer.backward(forward, dy, 1.0f);
  };
  // The routed pairs of one training forward (the routing draws change from call to call; the
  // count varies by well under a percent at this size).
  const index_t pairs = layer.forward(x, true, rng).stage.plan.n_routed_pairs();
  train_step();
  const double forward_flops = 6.0 * static_cast<double>(pairs) * static_cast<double>(D) * static_cast<double>(h);

  BenchTable table;
  char title[256];
  std::snprintf(title, sizeof title,
                "ST-MoE (batch %lld x %lld tokens, dim %lld, %d experts, top-%d, GEGLU hidden %lld, capacity factor "
                "%.2f), %s, training",
                static_cast<long long>(batch), static_cast<long long>(seq), static_cast<long long>(D),
                config.num_experts, config.gating_top_n, static_cast<long long>(h), config.capacity_factor_train,
                precision_title(config.precision));
  table.title = title;
  table.baseline =
      dense_gemm_row("GEMM, routed pairs' expert FLOPs (baseline)", pairs, D, 3 * h, repeats, config.precision);
  PeakMemory memory;
  table.rows.push_back(timed_row("ST-MoE forward (training)", forward_flops, repeats, memory,
                                 [&] { layer.forward(x, true, rng); }));
  table.rows.push_back(timed_row("ST-MoE forward+backward (training)", 3 * forward_flops, repeats, memory, train_step));
  char note[256];
  std::snprintf(note, sizeof note,
                "Routed and kept (token, choice) pairs: %lld of %lld (%.1f%%); FLOPs count only their expert MLPs.",
                static_cast<long long>(pairs), static_cast<long long>(tokens * config.gating_top_n),
                100.0 * static_cast<double>(pairs) / static_cast<double>(tokens * config.gating_top_n));
  table.notes.push_back(note);
  table.notes.push_back("Peak memory: above what the section held before the case (inputs and parameters), "
                        "reusable scratch included once allocated.");
  return table;
}

}  // namespace kmoe::apps
