// kmoe from C++ through the C ABI (libkmoe.so): build a σ-MoE from JSON, load a checkpoint, run
// forward and backward and one AdamW step, save. Errors come back as exceptions made from the
// status and kmoe_last_error().
//
//   sigma_moe_cpp IN.h5 OUT.h5
#include <kmoe.h>

#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

void check(kmoe_status status, const char* what) {
  if (status != KMOE_OK) throw std::runtime_error(std::string(what) + ": " + kmoe_last_error());
}

kmoe_tensor matrix(std::vector<float>& values, int64_t rows, int64_t cols) {
  kmoe_tensor t{};
  t.struct_size = sizeof t;
  t.dtype = KMOE_FLOAT32;
  t.rank = 2;
  t.shape[0] = rows;
  t.shape[1] = cols;
  t.data = values.data();
  t.memory = KMOE_HOST;
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN.h5 OUT.h5\n", argv[0]);
    return 2;
  }
  try {
    check(kmoe_initialize(), "kmoe_initialize");
    kmoe_layer* layer = nullptr;
    check(kmoe_layer_create("sigma_moe", R"({"dmodel": 16, "n_experts": 4, "expert_size": 8, "k": 2})", nullptr,
                            &layer),
          "kmoe_layer_create");
    kmoe_optimizer* optimizer = nullptr;
    check(kmoe_optimizer_create(layer, nullptr, &optimizer), "kmoe_optimizer_create");
    check(kmoe_layer_load(layer, optimizer, argv[1]), "kmoe_layer_load");
    const int64_t tokens = 32, dmodel = 16;
    std::vector<float> x(tokens * dmodel), y(x.size()), dy(x.size()), dx(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) {
      x[i] = std::sin(0.05f * static_cast<float>(i));
      dy[i] = 0.1f * std::cos(0.03f * static_cast<float>(i));
    }
    kmoe_tensor tx = matrix(x, tokens, dmodel), ty = matrix(y, tokens, dmodel), tdy = matrix(dy, tokens, dmodel),
                tdx = matrix(dx, tokens, dmodel);
    kmoe_forward* state = nullptr;
    check(kmoe_layer_forward(layer, &tx, 1, &state), "kmoe_layer_forward");
    check(kmoe_forward_output(state, &ty), "kmoe_forward_output");
    check(kmoe_layer_backward(layer, state, &tdy, 1.0, &tdx), "kmoe_layer_backward");
    check(kmoe_forward_destroy(state), "kmoe_forward_destroy");
    check(kmoe_optimizer_step(optimizer), "kmoe_optimizer_step");
    check(kmoe_layer_save(layer, optimizer, argv[2]), "kmoe_layer_save");
    double sum = 0;
    for (std::size_t i = 0; i < y.size(); ++i) sum += y[i] * dy[i];
    std::printf("sigma_moe (C++): loaded %s, sum(y*dy) = %.6f, one AdamW step, saved %s\n", argv[1], sum, argv[2]);
    check(kmoe_optimizer_destroy(optimizer), "kmoe_optimizer_destroy");
    check(kmoe_layer_destroy(layer), "kmoe_layer_destroy");
    check(kmoe_finalize(), "kmoe_finalize");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
