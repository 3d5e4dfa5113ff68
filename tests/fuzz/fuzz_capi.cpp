// libFuzzer harness: the C ABI (capi/include/kmoe.h) driven by random call sequences. The input
// picks a layer (four families, float32 and float64, token ids for moeut_lm) and then up to 12
// calls with random descriptors: dtype, rank, shape, strides, memory kind, struct_size, NULL
// pointers and handles, parameter names, buffer capacities. Every buffer the harness passes covers
// exactly what its descriptor promises (for any strides), so a read or write outside it is kmoe's
// bug. The rule: every call returns a status; KMOE_INTERNAL (a broken invariant) is a finding.
#include "kmoe.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "fuzz_input.hpp"

namespace {

struct Fixture {
  const char* kind;
  const char* config;
  kmoe_dtype dtype;
  std::vector<std::int64_t> input;  // a well-formed input shape
};

const Fixture fixtures[] = {
    {"sigma_moe", R"({"dmodel": 8, "n_experts": 4, "expert_size": 6, "k": 2, "dropout": 0.1})", KMOE_FLOAT32, {2, 3, 8}},
    {"sigma_moe", R"({"dmodel": 8, "n_experts": 4, "expert_size": 6, "k": 2})", KMOE_FLOAT64, {5, 8}},
    {"st_moe", R"({"dim": 8, "num_experts": 4, "expert_hidden_mult": 2})", KMOE_FLOAT32, {2, 6, 8}},
    {"soft_moe_lite", R"({"d_model": 8, "num_experts": 3, "num_slots": 2})", KMOE_FLOAT32, {2, 5, 8}},
    {"moeut_lm", R"({"n_tokens": 17, "d_model": 16, "n_layers": 2, "n_heads": 2, "att_n_experts": 2,
                     "ff_n_experts": 4, "ff_expert_size": 4, "ff_k": 2, "group_size": 1})", KMOE_INT32, {2, 6}},
};

void check(kmoe_status status, const char* call) {
  if (status == KMOE_INTERNAL) {
    std::fprintf(stderr, "%s returned KMOE_INTERNAL: %s\n", call, kmoe_last_error());
    std::abort();
  }
  if (status != KMOE_OK && std::strlen(kmoe_last_error()) == 0) {
    std::fprintf(stderr, "%s failed (%s) without a message\n", call, kmoe_status_name(status));
    std::abort();
  }
}

std::size_t element_size(int dtype) { return dtype == KMOE_FLOAT64 ? 8 : 4; }

// A random descriptor and the memory behind it.
struct Descriptor {
  kmoe_tensor tensor{};
  std::vector<std::uint8_t> memory;
  bool null = false;  // pass NULL instead of &tensor
};

Descriptor draw_descriptor(kmoe::fuzz::Draws& draws, kmoe_dtype dtype, const std::vector<std::int64_t>& shape_hint) {
  Descriptor d;
  d.null = draws.byte() % 16 == 0;
  kmoe_tensor& t = d.tensor;
  const std::uint8_t size_choice = draws.byte() % 8;
  t.struct_size = size_choice == 0 ? 0 : size_choice == 1 ? sizeof(kmoe_tensor) - 8 : size_choice == 2 ? sizeof(kmoe_tensor) + 16 : sizeof(kmoe_tensor);
  // Any int, as a C caller may store (a C++ enum variable may not hold it: memcpy, not assignment).
  const int dtype_value = draws.byte() % 6 == 0 ? static_cast<int>(draws.integer(-1, 5)) : dtype;
  std::memcpy(&t.dtype, &dtype_value, sizeof(int));
  t.rank = draws.byte() % 6 == 0 ? static_cast<std::int32_t>(draws.integer(-1, KMOE_MAX_RANK + 1))
                                   : static_cast<std::int32_t>(shape_hint.size());
  const int dims = std::max(0, std::min<int>(t.rank, KMOE_MAX_RANK));
  for (int i = 0; i < dims; ++i) {
    const bool hinted = i < static_cast<int>(shape_hint.size()) && draws.byte() % 5 != 0;
    t.shape[i] = hinted ? shape_hint[static_cast<std::size_t>(i)] : draws.integer(-2, 9);
    if (draws.byte() % 64 == 0) t.shape[i] = std::numeric_limits<std::int64_t>::max() / draws.integer(1, 4);
  }
  bool strided = draws.byte() % 4 == 0;
  for (int i = 0; i < dims; ++i) t.strides[i] = strided ? draws.integer(-6, 40) : 0;
  strided = std::any_of(t.strides, t.strides + dims, [](std::int64_t s) { return s != 0; });  // all zero: row-major
  const int memory_value = draws.byte() % 8 == 0 ? static_cast<int>(draws.integer(-1, 3)) : 0;
  std::memcpy(&t.memory, &memory_value, sizeof(int));
  // The memory the descriptor promises: elements at offsets sum_i index_i * stride_i (row-major
  // strides when they are all zero), for every index in the shape.
  std::int64_t lowest = 0, highest = 0, count = 1, row_major = 1;
  bool representable = true;
  for (int i = dims - 1; i >= 0 && representable; --i) {
    if (t.shape[i] <= 0) { count = 0; break; }
    const std::int64_t stride = strided ? t.strides[i] : row_major;
    if (t.shape[i] > (1 << 20) || (count = count * t.shape[i]) > (1 << 20)) representable = false;
    if (!representable) break;
    row_major *= t.shape[i];
    const std::int64_t reach = (t.shape[i] - 1) * stride;
    (reach < 0 ? lowest : highest) += reach;
  }
  if (!representable || draws.byte() % 32 == 0) {
    t.data = nullptr;  // nothing behind it: kmoe must not touch it
    return d;
  }
  const std::size_t bytes = count == 0 ? 0 : static_cast<std::size_t>(highest - lowest + 1) * element_size(dtype_value);
  d.memory.resize(bytes + 1);  // +1: a zero-size buffer still has an address
  for (std::size_t i = 0; i < bytes; ++i) d.memory[i] = draws.byte();
  if (dtype_value == KMOE_INT32 && draws.byte() % 4 != 0)
    for (std::size_t i = 0; i + 4 <= bytes; i += 4) d.memory[i + 1] = d.memory[i + 2] = d.memory[i + 3] = 0;
  t.data = d.memory.data() + static_cast<std::size_t>(-lowest) * element_size(dtype_value);
  return d;
}

const kmoe_tensor* pointer(const Descriptor& d) { return d.null ? nullptr : &d.tensor; }

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (kmoe_initialize() != KMOE_OK) std::abort();
  std::atexit([] { kmoe_finalize(); });
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  kmoe::fuzz::Draws draws(data, size);
  const Fixture& fixture = fixtures[draws.byte() % (sizeof(fixtures) / sizeof(fixtures[0]))];
  const kmoe_dtype value_dtype = fixture.dtype == KMOE_INT32 ? KMOE_FLOAT32 : fixture.dtype;
  kmoe_layer_options options;
  check(kmoe_layer_options_init(&options), "kmoe_layer_options_init");
  options.dtype = value_dtype;
  options.seed = draws.byte();
  kmoe_layer* layer = nullptr;
  check(kmoe_layer_create(fixture.kind, fixture.config, &options, &layer), "kmoe_layer_create");
  if (layer == nullptr) std::abort();
  kmoe_forward* state = nullptr;
  kmoe_optimizer* optimizer = nullptr;
  std::vector<std::int64_t> output_shape;
  for (int call = 0; call < 12 && !draws.empty(); ++call) {
    kmoe_layer* target = draws.byte() % 16 == 0 ? nullptr : layer;
    switch (draws.byte() % 10) {
      case 0: {  // forward
        const Descriptor input = draw_descriptor(draws, fixture.dtype, fixture.input);
        kmoe_forward* next = nullptr;
        const bool want_state = draws.byte() % 16 != 0;
        check(kmoe_layer_forward(target, pointer(input), draws.byte() % 2, want_state ? &next : nullptr),
              "kmoe_layer_forward");
        if (next != nullptr) {
          check(kmoe_forward_destroy(state), "kmoe_forward_destroy");
          state = next;
          std::int32_t rank = 0;
          std::int64_t shape[KMOE_MAX_RANK] = {};
          check(kmoe_forward_output_shape(state, &rank, shape), "kmoe_forward_output_shape");
          output_shape.assign(shape, shape + rank);
        }
        break;
      }
      case 1: {
        std::int32_t rank = 0;
        std::int64_t shape[KMOE_MAX_RANK] = {};
        check(kmoe_forward_output_shape(draws.byte() % 4 ? state : nullptr, draws.byte() % 8 ? &rank : nullptr,
                                        draws.byte() % 8 ? shape : nullptr),
              "kmoe_forward_output_shape");
        break;
      }
      case 2: {
        const Descriptor into = draw_descriptor(draws, value_dtype, output_shape);
        check(kmoe_forward_output(draws.byte() % 8 ? state : nullptr, pointer(into)), "kmoe_forward_output");
        break;
      }
      case 3: {  // backward
        const Descriptor grad_output = draw_descriptor(draws, value_dtype, output_shape);
        const Descriptor grad_input = draw_descriptor(draws, value_dtype, fixture.input);
        const double aux = draws.byte() % 8 == 0 ? std::nan("") : draws.integer(0, 4) * 0.25;
        check(kmoe_layer_backward(target, draws.byte() % 8 ? state : nullptr, pointer(grad_output), aux,
                                  draws.byte() % 3 ? pointer(grad_input) : nullptr),
              "kmoe_layer_backward");
        break;
      }
      case 4:
      case 5:
      case 6: {  // a parameter or gradient by (mostly) a real name
        std::int64_t count = 0;
        check(kmoe_layer_parameter_count(layer, &count), "kmoe_layer_parameter_count");
        kmoe_parameter_info info{};
        info.struct_size = draws.byte() % 8 ? sizeof(info) : draws.integer(0, 2 * sizeof(info));
        const std::int64_t index = draws.byte() % 8 ? draws.integer(0, count > 0 ? count - 1 : 0) : draws.integer(-2, 99);
        const kmoe_status status = kmoe_layer_parameter_info(layer, index, &info);
        check(status, "kmoe_layer_parameter_info");
        std::vector<std::int64_t> shape;
        std::string name = "no.such.parameter";
        if (status == KMOE_OK) {
          shape.assign(info.shape, info.shape + info.rank);
          name = info.name;
          if (draws.byte() % 8 == 0) name.resize(static_cast<std::size_t>(draws.integer(0, name.size())));
        }
        const Descriptor d = draw_descriptor(draws, value_dtype, shape);
        const char* n = draws.byte() % 16 ? name.c_str() : nullptr;
        const int which = draws.byte() % 3;
        if (which == 0) check(kmoe_layer_get_parameter(target, n, pointer(d)), "kmoe_layer_get_parameter");
        if (which == 1) check(kmoe_layer_set_parameter(target, n, pointer(d)), "kmoe_layer_set_parameter");
        if (which == 2) check(kmoe_layer_get_gradient(target, n, pointer(d)), "kmoe_layer_get_gradient");
        break;
      }
      case 7: {
        double value = 0;
        const char* names[] = {"reg_loss", "balance_loss", "router_z_loss", "total_aux_loss", "", nullptr};
        check(kmoe_forward_loss(draws.byte() % 8 ? state : nullptr, names[draws.byte() % 6],
                                draws.byte() % 8 ? &value : nullptr),
              "kmoe_forward_loss");
        break;
      }
      case 8: {  // the config into a buffer of any capacity
        const std::size_t capacity = static_cast<std::size_t>(draws.integer(0, 600));
        std::vector<char> buffer(capacity + 1, '\x7f');
        std::size_t length = 0;
        check(kmoe_layer_config(target, draws.byte() % 8 ? buffer.data() : nullptr, capacity,
                                draws.byte() % 8 ? &length : nullptr),
              "kmoe_layer_config");
        if (buffer[capacity] != '\x7f') std::abort();  // written past the capacity
        break;
      }
      case 9: {  // the optimizer
        if (optimizer == nullptr) {
          kmoe_adamw_options adamw;
          check(kmoe_adamw_options_init(&adamw), "kmoe_adamw_options_init");
          if (draws.byte() % 4 == 0) adamw.struct_size = static_cast<std::size_t>(draws.integer(0, 2 * sizeof(adamw)));
          if (draws.byte() % 4 == 0) adamw.lr = draws.byte() % 2 ? -1.0 : std::nan("");
          check(kmoe_optimizer_create(target, &adamw, &optimizer), "kmoe_optimizer_create");
        } else {
          check(kmoe_optimizer_step(optimizer), "kmoe_optimizer_step");
        }
        if (draws.byte() % 4 == 0) check(kmoe_layer_zero_grad(target), "kmoe_layer_zero_grad");
        break;
      }
    }
  }
  check(kmoe_optimizer_destroy(optimizer), "kmoe_optimizer_destroy");
  check(kmoe_forward_destroy(state), "kmoe_forward_destroy");
  check(kmoe_layer_destroy(layer), "kmoe_layer_destroy");
  return 0;
}
