// kmoe-bench section "moeut": one MoEUTLM training step (forward in training mode with the
// regulariser, cross-entropy, backward through every layer), split into forward and backward, with
// tokens/s and peak memory. --profile picks the model: "tiny" (default, sized for a CPU) or a
// published profile (MoEUT_244M, …; --vocab, default 8000, as the originals were measured);
// --precision bfloat16 runs the expert GEMMs in mixed precision. The baseline is the rate of one
// dense GEMM [tokens, d_model]·[d_model, n] in the same precision, measured in the same run, with n
// giving the step's matmul FLOPs (forward + backward ≈ 3× forward) but at most 4 · d_model (a
// transformer FFN's width: at MoEUT-244M the step's FLOPs would need a 10 GB operand, filled by the
// host's random generator for minutes), so the ratio says how close the whole step (routing,
// attention, norms, CVMM) comes to a plain GEMM's rate. Progress goes to stderr: a large profile's
// set-up and warm-up step take a while.
#include "sections.hpp"

#include "expert_mlp.hpp"

#include "kmoe/layers/moeut.hpp"
#include "kmoe/ops/cross_entropy.hpp"

#include <algorithm>
#include <cstdio>
#include <string>

namespace kmoe::apps {

// A MoEUT-shaped model small enough for a two-core CPU (the published profiles start at 44M).
layers::MoEUTConfig moeut_tiny_profile() {
  layers::MoEUTConfig c;
  c.n_tokens = 1024;
  c.d_model = 128;
  c.n_layers = 4;
  c.group_size = 2;
  c.n_heads = 4;
  c.d_head = 32;
  c.att_n_experts = 4;
  c.att_k = 2;
  c.ff_n_experts = 32;
  c.ff_k = 4;
  c.ff_expert_size = 64;
  return c;
}

// Full attention rows, as computed.
double moeut_forward_flops(const layers::MoEUTConfig& c, index_t batch, index_t seq) {
  const double D = c.d_model, H = c.n_heads, P = c.head_dim(), Ea = c.att_n_experts, ka = c.att_k;
  const double E = c.ff_n_experts, K = c.ff_k, es = c.ff_expert_size, V = c.n_tokens, T = seq;
  const double attention = 2 * (2 * D * H * P)                           // q, k
                           + (Ea > 1 ? 2 * (2 * D * H * Ea) + 2 * (H * ka * 2 * D * P)  // routers, V/O experts
                                     : 2 * (2 * D * H * P) + 2 * D * H)  // V, O, output gate
                           + 2 * (2 * T * P * H);                        // scores and weighted values
  const double ffn = 2 * D * E + K * 2 * (2 * D * es);
  return static_cast<double>(batch * seq) * (c.n_layers * (attention + ffn) + 2 * D * V);
}

BenchTable bench_moeut(const Options& options, int repeats) {
  const char* app = "kmoe-bench moeut";
  const index_t batch = positive_option(options, "--batch", 4, app);
  const index_t seq = positive_option(options, "--seq", 128, app);
  const auto profile_option = options.find("--profile");
  const std::string profile = profile_option == options.end() ? "tiny" : profile_option->second;
  layers::MoEUTConfig c =
      profile == "tiny" ? moeut_tiny_profile() : layers::moeut_profile(profile, positive_option(options, "--vocab", 8000, app));
  if (profile == "tiny") c.n_tokens = positive_option(options, "--vocab", c.n_tokens, app);
  c.precision = precision_option(options);
  const index_t N = batch * seq;
  char title[320];
  std::snprintf(title, sizeof title,
                "MoEUT LM training step (%s profile: d_model %ld, %d layers in groups of %d, %d heads x %ld, "
                "%d att experts k %d, %d ff experts x %ld k %d, vocab %ld; batch %ld x seq %ld), %s",
                profile.c_str(), static_cast<long>(c.d_model), c.n_layers, c.group_size, c.n_heads,
                static_cast<long>(c.head_dim()), c.att_n_experts, c.att_k, c.ff_n_experts,
                static_cast<long>(c.ff_expert_size), c.ff_k, static_cast<long>(c.n_tokens), static_cast<long>(batch),
                static_cast<long>(seq), precision_title(c.precision));
  BenchTable table;
  table.title = title;
  const double fwd = moeut_forward_flops(c, batch, seq), step = 3 * fwd;
  const index_t n = std::max<index_t>(1, std::min<index_t>(static_cast<index_t>(step / (2.0 * N * c.d_model)),
                                                           4 * c.d_model));
  const std::string baseline = "GEMM [" + std::to_string(N) + ", " + std::to_string(c.d_model) + "]·[" +
                               std::to_string(c.d_model) + ", " + std::to_string(n) + "] (baseline)";
  const auto progress = [&](const std::string& what) {
    std::fprintf(stderr, "[kmoe-bench] moeut (%s, %s): %s ...\n", profile.c_str(), precision_title(c.precision),
                 what.c_str());
  };
  progress("dense baseline");
  table.baseline = dense_gemm_row(baseline, N, c.d_model, n, repeats, c.precision);
  PeakMemory memory;
  progress("building the model");
  layers::MoEUTLM<float> model(c, 5);
  std::mt19937_64 gen(11);
  std::vector<int> ids(N + batch);
  for (auto& id : ids) id = static_cast<int>(gen() % static_cast<std::uint64_t>(c.n_tokens));
  std::vector<int> inputs, targets;
  for (index_t b = 0; b < batch; ++b)
    for (index_t t = 0; t < seq; ++t) {
      inputs.push_back(ids[b * (seq + 1) + t]);
      targets.push_back(ids[b * (seq + 1) + t + 1]);
    }
  const auto x = Tensor<int>::from_host("x", {batch, seq}, inputs);
  const auto y = Tensor<int>::from_host("targets", {N}, targets);
  Generator rng(7);
  const auto row_lse = Tensor<float>::uninitialized("row_lse", {N});
  const auto dlogits = Tensor<float>::uninitialized("dlogits", {N, c.n_tokens});
  const auto loss_gradient = [&](const layers::MoEUTLMForward<float>& f) {
    const auto logits = f.logits.reshape({N, c.n_tokens});
    ops::cross_entropy_forward<float>(logits.as_matrix(), y.flat(), -100, row_lse.flat());
    ops::cross_entropy_backward<float>(logits.as_matrix(), y.flat(), -100, row_lse.flat(), 1.f, dlogits.as_matrix());
  };
  const auto train_step = [&] {
    const auto f = model.forward(x, std::nullopt, true, rng);
    loss_gradient(f);
    model.backward(f, dlogits.reshape(f.logits.shape()), 1.f);
  };
  progress("warm-up step (" + std::to_string(model.parameter_count()) + " parameters)");
  train_step();  // warm-up: scratch buffers
  progress("forward");
  table.rows.push_back(timed_row("forward (training, with regulariser)", fwd, repeats, memory,
                                 [&] { model.forward(x, std::nullopt, true, rng); }));
  {
    progress("backward");
    const auto f = model.forward(x, std::nullopt, true, rng);
    loss_gradient(f);
    table.rows.push_back(timed_row("backward (cross-entropy gradient given)", 2 * fwd, repeats, memory,
                                   [&] { model.backward(f, dlogits.reshape(f.logits.shape()), 1.f); }));
  }
  progress("training step");
  table.rows.push_back(timed_row("training step (forward + loss + backward)", step, repeats, memory, train_step));
  progress("eval forward");
  table.rows.push_back(timed_row("eval forward", fwd, repeats, memory,
                                 [&] { model.forward(x, std::nullopt, false, rng); }));
  const double step_seconds = table.rows[2].seconds;
  char note[256];
  std::snprintf(note, sizeof note, "Training throughput: %.0f tokens/s (step), forward %.0f tokens/s; %ld parameters.",
                N / step_seconds, N / table.rows[0].seconds, static_cast<long>(model.parameter_count()));
  table.notes.push_back(note);
  table.notes.push_back("FLOPs count the matmuls only (backward = 2x forward); peak memory: above what the section "
                        "held before the case (model, parameters and gradients excluded; backward: its forward's saved tensors excluded), "
                        "scratch and the caching allocator's blocks included.");
  return table;
}

}  // namespace kmoe::apps
