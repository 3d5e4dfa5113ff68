// Results through the C ABI (libkmoe.so) equal the C++ API's bitwise: for several families, a
// training forward, backward and one AdamW step through both, with the same config and seed. The
// program holds two kmoe's — its own (kmoe_core, the C++ API) and libkmoe.so's hidden one — each
// with its own Kokkos, as a C++ code using both would.
#include "kmoe.h"

#include "kmoe/model/builder.hpp"
#include "kmoe/model/optimizer.hpp"

#include <Kokkos_Core.hpp>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  if (ok) return;
  std::fprintf(stderr, "FAILED: %s\n", what.c_str());
  ++failures;
}

void check_status(kmoe_status s, const std::string& what) {
  check(s == KMOE_OK, what + ": " + kmoe_status_name(s) + " " + kmoe_last_error());
}

kmoe_tensor describe(void* data, kmoe_dtype dtype, const kmoe::Shape& shape) {
  kmoe_tensor t{};
  t.struct_size = sizeof t;
  t.dtype = dtype;
  t.rank = shape.rank();
  for (int i = 0; i < shape.rank(); ++i) t.shape[i] = shape[i];
  t.data = data;
  t.memory = KMOE_HOST;
  return t;
}

struct Case {
  std::string kind, config;
  std::vector<kmoe::index_t> input;  // x's shape, or [B, T] of token ids (vocabulary > 0)
  int vocabulary = 0;
};

void compare(const Case& c) {
  const std::uint64_t seed = 11;
  const bool tokens = c.vocabulary > 0;
  const kmoe::Shape in_shape(c.input);
  std::vector<float> x(static_cast<std::size_t>(in_shape.size()));
  std::vector<int> ids(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    x[i] = std::sin(0.61f * static_cast<float>(i) + 0.2f);
    ids[i] = static_cast<int>((i * 7 + 3) % static_cast<std::size_t>(std::max(c.vocabulary, 1)));
  }

  // C++ API.
  auto layer = kmoe::model::build_layer<float>(c.kind, c.config, seed);
  kmoe::model::AdamW<float> opt(layer->parameters(), kmoe::ops::AdamWConfig{});
  kmoe::Generator rng(seed);
  kmoe::model::LayerInputs<float> inputs;
  if (tokens) {
    inputs.tokens = kmoe::Tensor<int>::from_host("tokens", in_shape, ids);
  } else {
    inputs.x = kmoe::Tensor<float>::from_host("x", in_shape, x);
  }
  const auto f = layer->forward(inputs, true, rng);
  const kmoe::Shape out_shape = f.out.shape();
  std::vector<float> dout(static_cast<std::size_t>(out_shape.size()));
  for (std::size_t i = 0; i < dout.size(); ++i) dout[i] = 0.01f * std::cos(0.3f * static_cast<float>(i));
  const kmoe::Tensor<float> dx = layer->backward(f, kmoe::Tensor<float>::from_host("dout", out_shape, dout), 0.5f);
  opt.step();
  const std::vector<float> cpp_out = f.out.to_host();
  const std::vector<float> cpp_dx = tokens ? std::vector<float>() : dx.to_host();

  // C ABI.
  kmoe_layer_options options;
  kmoe_layer_options_init(&options);
  options.seed = seed;
  kmoe_layer* handle = nullptr;
  check_status(kmoe_layer_create(c.kind.c_str(), c.config.c_str(), &options, &handle), c.kind + " create");
  kmoe_optimizer* handle_opt = nullptr;
  check_status(kmoe_optimizer_create(handle, nullptr, &handle_opt), c.kind + " optimizer");
  kmoe_tensor in = tokens ? describe(ids.data(), KMOE_INT32, in_shape) : describe(x.data(), KMOE_FLOAT32, in_shape);
  kmoe_forward* state = nullptr;
  check_status(kmoe_layer_forward(handle, &in, 1, &state), c.kind + " forward");
  std::vector<float> abi_out(cpp_out.size()), abi_dx(x.size());
  kmoe_tensor out = describe(abi_out.data(), KMOE_FLOAT32, out_shape);
  check_status(kmoe_forward_output(state, &out), c.kind + " output");
  kmoe_tensor g = describe(dout.data(), KMOE_FLOAT32, out_shape), gx = describe(abi_dx.data(), KMOE_FLOAT32, in_shape);
  check_status(kmoe_layer_backward(handle, state, &g, 0.5, tokens ? nullptr : &gx), c.kind + " backward");
  check_status(kmoe_optimizer_step(handle_opt), c.kind + " step");
  check(abi_out == cpp_out, c.kind + ": out differs");
  if (!tokens) check(abi_dx == cpp_dx, c.kind + ": dx differs");
  for (const auto& [name, value] : f.losses) {
    double got = 0;
    check_status(kmoe_forward_loss(state, name.c_str(), &got), c.kind + " loss " + name);
    check(std::memcmp(&got, &value, sizeof got) == 0, c.kind + ": loss " + name + " differs");
  }
  // Inference after the step: the C++ infer's output, bitwise.
  const std::vector<float> cpp_inferred = layer->infer(inputs, rng).to_host();
  std::vector<float> abi_inferred(cpp_inferred.size());
  kmoe_tensor inferred = describe(abi_inferred.data(), KMOE_FLOAT32, out_shape);
  check_status(kmoe_layer_infer(handle, &in, &inferred), c.kind + " infer");
  check(abi_inferred == cpp_inferred, c.kind + ": inferred out differs");
  for (const auto& p : kmoe::model::trainable(layer->parameters())) {
    std::vector<float> value(static_cast<std::size_t>(p.tensor->size())), grad(value.size());
    kmoe_tensor tv = describe(value.data(), KMOE_FLOAT32, p.tensor->shape());
    kmoe_tensor tg = describe(grad.data(), KMOE_FLOAT32, p.tensor->shape());
    check_status(kmoe_layer_get_parameter(handle, p.name.c_str(), &tv), c.kind + " get " + p.name);
    check_status(kmoe_layer_get_gradient(handle, p.name.c_str(), &tg), c.kind + " gradient " + p.name);
    check(value == p.tensor->to_host(), c.kind + ": parameter " + p.name + " after the step differs");
    check(grad == p.grad->to_host(), c.kind + ": gradient " + p.name + " differs");
  }
  kmoe_forward_destroy(state);
  kmoe_optimizer_destroy(handle_opt);
  kmoe_layer_destroy(handle);
  std::printf("%-14s C ABI == C++ API (out, dx, losses, %zu parameters and gradients, inferred out)\n", c.kind.c_str(),
              kmoe::model::trainable(layer->parameters()).size());
}

}  // namespace

int main(int argc, char* argv[]) {
  Kokkos::ScopeGuard kokkos(argc, argv);
  if (kmoe_initialize() != KMOE_OK) {
    std::fprintf(stderr, "kmoe_initialize: %s\n", kmoe_last_error());
    return 1;
  }
  compare({"sigma_moe", R"({"dmodel": 8, "n_experts": 4, "expert_size": 6, "k": 2, "dropout": 0.1})", {2, 5, 8}});
  compare({"st_moe", R"({"dim": 8, "num_experts": 4, "expert_hidden_mult": 2})", {2, 6, 8}});
  compare({"soft_moe_lite", R"({"d_model": 8, "num_experts": 3, "num_slots": 2})", {2, 5, 8}});
  compare({"moeut_lm", R"({"n_tokens": 17, "d_model": 16, "n_layers": 2, "n_heads": 2, "att_n_experts": 2,
                          "ff_n_experts": 4, "ff_expert_size": 4, "ff_k": 2, "group_size": 1})",
           {2, 6}, 17});
  kmoe_finalize();
  if (failures > 0) return 1;
  std::printf("test_capi_matches_cpp: every family matched bitwise\n");
  return 0;
}
