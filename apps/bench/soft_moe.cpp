// kmoe-bench section "soft_moe": lucidrains' Soft MoE (RMSNorm, GELU experts with expert_mult 4)
// in training mode at dim 512, 64 experts with one slot each, 4 sequences of 1024 tokens by
// default: the whole layer forward, forward+backward, and the experts alone (one CVMM per
// Linear over all slot rows). Rates count the experts' matmuls plus the dispatch/combine products
// (logits, slots, combine); the baseline is one dense KokkosBlas::gemm [tokens, dim] · [dim, n]
// with the layer's forward FLOPs, measured in the same run.
#include "kmoe/layers/soft_moe.hpp"

#include <cstdio>

#include "expert_mlp.hpp"
#include "sections.hpp"

namespace kmoe::apps {

namespace {

struct SoftMoEShape {
  index_t batch = 4, seq = 1024, dim = 512, slots = 1;
  int experts = 64;
  index_t hidden() const { return 4 * dim; }  // expert_mult 4
  index_t tokens() const { return batch * seq; }
  index_t slot_rows() const { return batch * experts * slots; }
  // Two expert Linears per slot row.
  double expert_flops() const { return 4.0 * static_cast<double>(slot_rows()) * dim * hidden(); }
  // logits [N, D]·[D, Z], slots [Z, n]·[n, D] and combine [n, Z]·[Z, D] per sequence.
  double dispatch_combine_flops() const { return 6.0 * static_cast<double>(tokens()) * experts * slots * dim; }
  double forward_flops() const { return expert_flops() + dispatch_combine_flops(); }
  // Every product has an input and a weight/other-operand gradient.
  double backward_flops() const { return 2.0 * forward_flops(); }
};

}  // namespace

BenchTable bench_soft_moe(const Options& options, int repeats) {
  const char* app = "kmoe-bench soft_moe";
  SoftMoEShape s;
  s.batch = positive_option(options, "--batch", s.batch, app);
  s.seq = positive_option(options, "--seq", s.seq, app);
  s.dim = positive_option(options, "--dim", s.dim, app);
  s.experts = static_cast<int>(positive_option(options, "--experts", s.experts, app));
  s.slots = positive_option(options, "--slots", s.slots, app);
  const Precision precision = precision_option(options);

  BenchTable table;
  char title[256];
  std::snprintf(title, sizeof title,
                "Soft MoE, lucidrains (batch %lld x %lld tokens, dim %lld, %d experts x %lld slots, hidden %lld), "
                "%s, training",
                static_cast<long long>(s.batch), static_cast<long long>(s.seq), static_cast<long long>(s.dim),
                s.experts, static_cast<long long>(s.slots), static_cast<long long>(s.hidden()), precision_title(precision));
  table.title = title;
  const index_t baseline_n = static_cast<index_t>(s.forward_flops() / (2.0 * s.tokens() * s.dim) + 0.5);
  table.baseline = dense_gemm_row("GEMM, forward FLOPs (baseline)", s.tokens(), s.dim, baseline_n, repeats, precision);

  layers::LucidrainsSoftMoEOptions o;
  o.num_experts = s.experts;
  o.num_slots = s.slots;
  layers::SoftMoEConfig config = layers::SoftMoEConfig::lucidrains(s.dim, o);
  config.experts.precision = precision;
  layers::SoftMoE<float> layer(config, 5);
  std::mt19937_64 gen(11);
  const index_t n = s.tokens() * s.dim;
  const auto x = Tensor<float>::from_host("x", {s.batch, s.seq, s.dim}, random_vector<float>(n, gen, 1.0));
  const auto dy = Tensor<float>::from_host("dy", {s.batch, s.seq, s.dim}, random_vector<float>(n, gen, 1.0));
  Generator rng(7);
  const auto train_step = [&] { layer.backward(layer.forward(x, true, rng), dy); };
  train_step();  // warm-up: scratch buffers and the BLAS

  // Each case starts from an empty tensor cache (PeakMemory::reset), so its peak is its own working set.
  PeakMemory memory;
  table.rows.push_back(timed_row("Soft MoE forward (training)", s.forward_flops(), repeats, memory,
                                 [&] { layer.forward(x, true, rng); }));
  table.rows.push_back(
      timed_row("Soft MoE forward+backward", s.forward_flops() + s.backward_flops(), repeats, memory, train_step));

  // The experts alone on the slots of one forward: the grouped CVMM computation.
  const auto forward = layer.forward(x, true, rng);
  const auto dslots =
      Tensor<float>::from_host("dslots", forward.slots.shape(), random_vector<float>(forward.slots.size(), gen, 1.0));
  auto& grads = layer.grads().experts;
  table.rows.push_back(timed_row("experts only forward+backward (CVMM)", 3.0 * s.expert_flops(), repeats, memory, [&] {
    const auto f = layers::slot_experts_forward<float>(config.experts, layer.params().experts, forward.plan,
                                                       forward.slots, true, rng);
    layers::slot_experts_backward<float>(config.experts, layer.params().experts, forward.plan, f, dslots, grads);
  }));
  table.notes.push_back(
      "FLOPs: experts 4·rows·dim·hidden (rows = batch·experts·slots) plus dispatch/combine "
      "6·tokens·slots·dim per forward; backward counted as 2x forward.");
  table.notes.push_back(
      "Peak memory: above what the section held before the case (inputs, parameters and "
      "gradients; the experts-only case also holds one forward's saved tensors).");
  return table;
}

}  // namespace kmoe::apps
