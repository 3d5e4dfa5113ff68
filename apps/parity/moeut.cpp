// kmoe-parity runners for layers "moeut" (MoEUT on [B, T, d_model] inputs) and "moeut_lm"
// (MoEUTLM, tokens → logits): RobertCsordas/moeut@87f0497, the dump format of
// data/golden/moeut/README.md.
//
// KV-cache dumps (with /input/chunk_sizes) feed the chunks through kmoe's cache and require the
// chunked logits to equal the full-sequence /output/logits and the dump's diagnostic
// /debug/logits_chunk<i>_rope_offset_fixed, and the final cache to equal /debug/kv_cache. The
// reference's own /output/logits_chunk<i> for i > 0 carry its RoPE-offset bug (queries rotated
// from position 0); they are reported as information, not required.
#include "distributed.hpp"
#include "registry.hpp"

#include "kmoe/layers/moeut.hpp"
#include "kmoe/ops/cross_entropy.hpp"

#include <cmath>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

namespace kmoe::parity {

namespace {

using BoolMatrix = Kokkos::View<bool**, Layout, MemSpace>;

// The loss attribute must be one of the forms this runner computes.
void require_loss(const Fixture& fixture, const std::vector<std::string>& accepted) {
  for (const std::string& form : accepted)
    if (fixture.loss() == form) return;
  fail(Status::io_error, "attribute 'loss' is '", fixture.loss(), "'; the ", fixture.layer(), " runner knows only '",
       accepted.front(), "'");
}

// A uint8 dataset (1 = masked out) as a device bool matrix.
BoolMatrix read_mask(const Fixture& fixture, const std::string& dataset) {
  const Tensor<int> stored = fixture.read_indices(dataset);
  require(stored.rank() == 2, Status::io_error, dataset, " is ", stored.shape().str(), ", expected a matrix");
  BoolMatrix mask("parity::mask", stored.dim(0), stored.dim(1));
  const auto host = Kokkos::create_mirror_view(mask);
  const std::vector<int> values = stored.to_host();
  for (index_t r = 0; r < stored.dim(0); ++r)
    for (index_t c = 0; c < stored.dim(1); ++c) host(r, c) = values[r * stored.dim(1) + c] != 0;
  Kokkos::deep_copy(mask, host);
  return mask;
}

// Columns [start, start + len) of a [B, T] token matrix.
Tensor<int> token_columns(const std::vector<int>& tokens, index_t B, index_t T, index_t start, index_t len) {
  std::vector<int> out;
  for (index_t b = 0; b < B; ++b)
    out.insert(out.end(), tokens.begin() + b * T + start, tokens.begin() + b * T + start + len);
  return Tensor<int>::from_host("parity::chunk", {B, len}, out);
}

// Every rank's share of a [B, ...] tensor (this rank's rows under --distributed) put back together.
template <class T>
Tensor<T> all_rows(const dist::Communicator& ranks, const Tensor<T>& share, index_t B) {
  if (!ranks.distributed()) return share;
  std::vector<index_t> dims = share.shape().dims();
  dims[0] = B;
  return whole_batch(ranks, share, Shape(dims));
}

// The KV-cache check: chunked decoding against the full sequence (see the file comment). model
// is the fixture's layer, or under --distributed this rank's placed part, which decodes its share
// of the sequences with a cache of its own; the chunks' logits and the final cache are compared
// put back together.
template <class T>
void run_kv_chunks(const Fixture& fixture, Report& report, const layers::MoEUTLM<T>& model, const Tensor<int>& x) {
  const Tensor<int> sizes = fixture.read_indices("/input/chunk_sizes");
  const dist::Communicator& ranks = fixture.ranks();
  const index_t B = x.dim(0), T_len = x.dim(1), V = model.config().n_tokens;
  const Tensor<int> my_x = ranks.distributed() ? my_share(ranks, x) : x;
  const index_t my_B = my_x.dim(0);
  const std::vector<int> tokens = my_x.size() > 0 ? my_x.to_host() : std::vector<int>();
  std::vector<T> assembled(static_cast<std::size_t>(B * T_len * V));
  layers::MoEUTCache<T> cache;
  Generator rng(fixture.seed());
  index_t start = 0;
  int chunk = 0;
  for (const int size : sizes.to_host()) {
    const auto len = static_cast<index_t>(size);
    require(len >= 1 && start + len <= T_len, Status::io_error, "/input/chunk_sizes do not split T = ", T_len);
    const auto f = model.forward(token_columns(tokens, my_B, T_len, start, len), std::nullopt, fixture.training(),
                                 rng, &cache);
    const Tensor<T> chunk_logits = all_rows(ranks, f.logits, B);
    const std::string index = std::to_string(chunk);
    report.compare("/debug/logits_chunk" + index + "_rope_offset_fixed", chunk_logits);
    report.compare_scalar("/output/reg_loss_chunk" + index, f.reg_loss);
    // The reference's own chunk output: equal for the first chunk, off by its RoPE bug after.
    const std::string reference = "/output/logits_chunk" + index;
    if (chunk == 0) {
      report.compare(reference, chunk_logits);
    } else {
      const std::vector<double> expected = fixture.read<double>(reference, chunk_logits.shape()).to_host();
      const std::vector<T> computed = chunk_logits.to_host();
      double max_abs = 0;
      for (std::size_t i = 0; i < expected.size(); ++i)
        max_abs = std::max(max_abs, std::abs(static_cast<double>(computed[i]) - expected[i]));
      std::printf("  %-28s info: max_abs %9.3e from the reference's RoPE-offset bug (reported, not required)\n",
                  reference.c_str(), max_abs);
    }
    const std::vector<T> logits = chunk_logits.to_host();
    for (index_t b = 0; b < B; ++b)
      std::copy(logits.begin() + b * len * V, logits.begin() + (b + 1) * len * V,
                assembled.begin() + (b * T_len + start) * V);
    start += len;
    ++chunk;
  }
  require(start == T_len, Status::io_error, "/input/chunk_sizes sum to ", start, ", not T = ", T_len);
  std::printf("  chunked logits vs the full-sequence /output/logits:\n");
  report.compare("/output/logits", Tensor<T>::from_host("parity::chunked_logits", {B, T_len, V}, assembled));
  // The reference's final cache: layer 0 depends on the embeddings only and must match; deeper
  // layers' later positions come from its RoPE-bugged chunks (reported only).
  for (std::size_t l = 0; l < cache.layers.size(); ++l) {
    const std::string prefix = "/debug/kv_cache/" + std::to_string(l);
    if (!fixture.has(prefix)) continue;
    const std::pair<const char*, Tensor<T>> cached[] = {{"/k", all_rows(ranks, cache.layers[l].k, B)},
                                                         {"/v", all_rows(ranks, cache.layers[l].v, B)}};
    for (const auto& [name, computed] : cached) {
      if (l == 0) {
        report.compare(prefix + name, computed);
        continue;
      }
      const std::vector<double> expected = fixture.read<double>(prefix + name, computed.shape()).to_host();
      const std::vector<T> values = computed.to_host();
      double max_abs = 0;
      for (std::size_t i = 0; i < expected.size(); ++i)
        max_abs = std::max(max_abs, std::abs(static_cast<double>(values[i]) - expected[i]));
      std::printf("  %-28s info: max_abs %9.3e (reference cache downstream of its RoPE-offset bug)\n",
                  (prefix + name).c_str(), max_abs);
    }
  }
}

}  // namespace

template <class T>
void run_moeut(const Fixture& fixture, Report& report) {
  require_loss(fixture, {"sum(out * grad_out) + reg_loss[0]"});
  const auto layer = build_fixture_layer<T>(fixture);
  load_fixture_parameters(fixture, *layer);
  model::LayerInputs<T> inputs;
  inputs.x = fixture.read<T>("/input/x");
  ops::AttentionMask mask;  // the original's AttentionMask(src_length_mask, position_mask)
  BoolMatrix position, src_length;
  if (fixture.has("/input/position_mask")) mask.position_mask = position = read_mask(fixture, "/input/position_mask");
  if (fixture.has("/input/src_length_mask"))
    mask.src_length_mask = src_length = read_mask(fixture, "/input/src_length_mask");
  inputs.attention_mask = mask;
  FixtureRun<T> run = fixture_forward(fixture, *layer, inputs);
  const Tensor<T> out = run.out;
  const double reg_loss = run.forward.losses.at("reg_loss");
  report.compare("/output/out", out);
  report.compare_scalar("/output/reg_loss", reg_loss);
  const Tensor<T> grad_out = fixture.read<T>("/input/grad_out", out.shape());
  const Dot d = dot(out, grad_out);
  report.compare_scalar("/output/loss", d.sum + reg_loss, d.magnitude + std::abs(reg_loss));
  if (!fixture.has("/grad")) return;
  layer->zero_grad();
  report.compare("/grad/input/x", fixture_backward(fixture, run, *layer, grad_out, T(1)));
  report.compare_gradients(*layer);
}

template <class T>
void run_moeut_lm(const Fixture& fixture, Report& report) {
  const auto layer = build_fixture_layer<T>(fixture);
  load_fixture_parameters(fixture, *layer);
  const layers::MoEUTLM<T>& model = *layer->template as<layers::MoEUTLM<T>>();
  model::LayerInputs<T> inputs;
  inputs.tokens = fixture.read_indices("/input/x");
  const Tensor<int>& x = inputs.tokens;
  require(x.rank() == 2, Status::io_error, "/input/x is ", x.shape().str(), ", expected [B, T] token ids");
  fixture.read_indices("/input/tokens");  // x and targets are its two shifted views
  const Tensor<int> targets = fixture.read_indices("/input/targets");
  FixtureRun<T> run = fixture_forward(fixture, *layer, inputs);
  const Tensor<T> out = run.out;
  const double reg_loss = run.forward.losses.at("reg_loss");
  report.compare("/output/logits", out);
  report.compare_scalar("/output/reg_loss", reg_loss);

  if (fixture.has("/input/chunk_sizes")) {
    require_loss(fixture, {"none (forward only; no /grad)"});
    run_kv_chunks(fixture, report, run.layer ? *run.layer->template as<layers::MoEUTLM<T>>() : model, x);
    return;
  }
  require_loss(fixture, {"cross_entropy(logits.view(-1, n_tokens), targets.flatten(), reduction='mean') + reg_loss[0]"});
  const index_t N = x.size(), V = model.config().n_tokens;
  const Tensor<T> logits = out.reshape({N, V});
  const Tensor<int> target_rows = targets.reshape({N});
  const auto row_lse = Tensor<T>::uninitialized("parity::row_lse", {N});
  const T ce = ops::cross_entropy_forward<T>(logits.as_matrix(), target_rows.flat(), -100, row_lse.flat());
  report.compare_scalar("/output/ce_loss", ce);
  report.compare_scalar("/output/loss", static_cast<double>(ce) + reg_loss,
                        std::abs(static_cast<double>(ce)) + std::abs(reg_loss));
  if (!fixture.has("/grad")) return;
  const auto dlogits = Tensor<T>::uninitialized("parity::dlogits", {N, V});
  ops::cross_entropy_backward<T>(logits.as_matrix(), target_rows.flat(), -100, row_lse.flat(), T(1),
                                 dlogits.as_matrix());
  layer->zero_grad();
  fixture_backward(fixture, run, *layer, dlogits.reshape(out.shape()), T(1));
  report.compare_gradients(*layer);
}

template void run_moeut<float>(const Fixture&, Report&);
template void run_moeut<double>(const Fixture&, Report&);
template void run_moeut_lm<float>(const Fixture&, Report&);
template void run_moeut_lm<double>(const Fixture&, Report&);

}  // namespace kmoe::parity
