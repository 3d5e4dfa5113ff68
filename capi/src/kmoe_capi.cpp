// The C ABI (capi/include/kmoe.h) over kmoe's C++ API: handles own C++ objects, every entry point
// runs through `call`, which serialises calls, turns every exception into a status and this
// thread's message, and (CUDA) puts the caller's current device back.
#include "kmoe.h"

#include "descriptor.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/dist/gradients.hpp"
#include "kmoe/io/checkpoint.hpp"
#include "kmoe/model/builder.hpp"
#include "kmoe/model/optimizer.hpp"

#include <Kokkos_Core.hpp>
#include <mpi.h>

#if defined(KOKKOS_ENABLE_CUDA)
#include <cuda_runtime_api.h>
#endif

#include <algorithm>
#include <cstring>
#include <fstream>
#include <memory>
#include <mutex>
#include <new>
#include <sstream>
#include <string>
#include <vector>

using kmoe::Error;
using kmoe::Status;
using kmoe::capi::read_tensor;
using kmoe::capi::write_tensor;

namespace {

// The handles kmoe.h declares incomplete. They are not defined under their C names (whose
// definitions would bring their C++ insides into the ABI description abidw reads from the debug
// information): kmoe_layer* is a Layer*, and so on.
struct Layer {
  std::unique_ptr<kmoe::model::Layer<float>> f32;
  std::unique_ptr<kmoe::model::Layer<double>> f64;
  kmoe::Generator rng;
  std::string kind;
  std::vector<std::string> names;             // the trainable parameters', for kmoe_parameter_info
  std::shared_ptr<const bool> alive = std::make_shared<const bool>(true);  // forward states check it
};

struct Forward {
  const Layer* layer = nullptr;
  std::weak_ptr<const bool> layer_alive;
  kmoe::model::LayerForward<float> f32;
  kmoe::model::LayerForward<double> f64;
  bool tokens = false;  // the input was token ids: no input gradient
};

struct Optimizer {
  Layer* layer = nullptr;
  std::weak_ptr<const bool> layer_alive;
  std::unique_ptr<kmoe::model::AdamW<float>> f32;
  std::unique_ptr<kmoe::model::AdamW<double>> f64;
};

Layer* from_c(kmoe_layer* p) { return reinterpret_cast<Layer*>(p); }
const Layer* from_c(const kmoe_layer* p) { return reinterpret_cast<const Layer*>(p); }
Forward* from_c(kmoe_forward* p) { return reinterpret_cast<Forward*>(p); }
const Forward* from_c(const kmoe_forward* p) { return reinterpret_cast<const Forward*>(p); }
Optimizer* from_c(kmoe_optimizer* p) { return reinterpret_cast<Optimizer*>(p); }
const Optimizer* from_c(const kmoe_optimizer* p) { return reinterpret_cast<const Optimizer*>(p); }
kmoe_layer* to_c(Layer* p) { return reinterpret_cast<kmoe_layer*>(p); }
kmoe_forward* to_c(Forward* p) { return reinterpret_cast<kmoe_forward*>(p); }
kmoe_optimizer* to_c(Optimizer* p) { return reinterpret_cast<kmoe_optimizer*>(p); }

// This thread's last error. Trivially destructible: a program may call kmoe from an atexit handler,
// which runs after thread_local destructors (a std::string here was used after its destruction:
// found by tests/fuzz/fuzz_capi). Longer messages are cut, ending in "...".
class LastError {
 public:
  void clear() { text_[0] = '\0'; }
  LastError& operator=(const std::string& message) {
    const std::size_t n = std::min(message.size(), sizeof(text_) - 1);
    std::memcpy(text_, message.data(), n);
    text_[n] = '\0';
    if (n < message.size()) std::memcpy(text_ + sizeof(text_) - 4, "...", 4);
    return *this;
  }
  const char* c_str() const { return text_; }

 private:
  char text_[4096];
};
thread_local LastError last_error;
std::recursive_mutex calls;  // one call at a time (kmoe_layer_* may nest through helpers)
int initialised = 0;
bool kokkos_is_ours = false;

kmoe_status to_status(Status s) { return static_cast<kmoe_status>(static_cast<int>(s)); }

#if defined(KOKKOS_ENABLE_CUDA)
// The caller's current CUDA device, put back when the call returns.
class KeepDevice {
 public:
  KeepDevice() { have_ = cudaGetDevice(&device_) == cudaSuccess; }
  ~KeepDevice() {
    if (have_) cudaSetDevice(device_);
  }

 private:
  int device_ = 0;
  bool have_ = false;
};
#else
struct KeepDevice {};
#endif

// Runs body under the call lock; every failure becomes a status and this thread's message.
template <class Body>
kmoe_status call(const char* function, Body&& body, bool needs_kokkos = true) {
  const std::lock_guard<std::recursive_mutex> lock(calls);
  const KeepDevice keep;
  last_error.clear();
  try {
    if (needs_kokkos)
      kmoe::require(initialised > 0 && Kokkos::is_initialized(), Status::invalid_argument, function,
                    ": kmoe_initialize has not been called");
    body();
    return KMOE_OK;
  } catch (const Error& e) {
    last_error = std::string(function) + ": " + e.what();
    return to_status(e.status());
  } catch (const std::bad_alloc&) {
    last_error = std::string(function) + ": out of memory";
    return KMOE_OUT_OF_MEMORY;
  } catch (const std::exception& e) {
    last_error = std::string(function) + ": " + e.what();
    return KMOE_INTERNAL;
  } catch (...) {
    last_error = std::string(function) + ": an unknown exception";
    return KMOE_INTERNAL;
  }
}

template <class P>
P& non_null(P* p, const char* what) {
  kmoe::require(p != nullptr, Status::invalid_argument, what, " is NULL");
  return *p;
}

// The handle behind a C pointer; NULL is Status::invalid_argument naming it.
template <class C>
auto& handle_of(C* p, const char* what) {
  kmoe::require(p != nullptr, Status::invalid_argument, what, " is NULL");
  return *from_c(p);
}

std::string text(const char* s, const char* what) {
  kmoe::require(s != nullptr, Status::invalid_argument, what, " is NULL");
  return s;
}

// A struct from the caller: not NULL and at least as large as the oldest version of it.
template <class S>
const S& versioned(const S* s, std::size_t oldest_size, const char* what) {
  non_null(s, what);
  kmoe::require(s->struct_size >= oldest_size, Status::invalid_argument, what, "->struct_size is ", s->struct_size,
                ", below the oldest known size ", oldest_size, " (set it to sizeof(", what, "))");
  return *s;
}

kmoe_layer_options default_layer_options() {
  kmoe_layer_options o{};
  o.struct_size = sizeof o;
  o.dtype = KMOE_FLOAT32;
  o.seed = 0;
  o.use_comm = 0;
  o.comm = 0;
  return o;
}

kmoe_layer_options options_or_default(const kmoe_layer_options* options) {
  if (options == nullptr) return default_layer_options();
  kmoe_layer_options o = default_layer_options();
  const kmoe_layer_options& given = versioned(options, sizeof(kmoe_layer_options), "options");
  const int dtype = kmoe::capi::raw_enum(given.dtype);
  kmoe::require(dtype == KMOE_FLOAT32 || dtype == KMOE_FLOAT64, Status::invalid_argument, "options->dtype is ", dtype,
                "; layers are KMOE_FLOAT32 (1) or KMOE_FLOAT64 (2)");
  o.dtype = static_cast<kmoe_dtype>(dtype);
  o.seed = given.seed;
  o.use_comm = given.use_comm;
  o.comm = given.comm;
  return o;
}

kmoe::dist::Communicator communicator_of(const kmoe_layer_options& o) {
  if (o.use_comm == 0) return {};
  int mpi_up = 0;
  MPI_Initialized(&mpi_up);
  kmoe::require(mpi_up != 0, Status::invalid_argument, "options->use_comm is set but MPI is not initialised");
  return kmoe::dist::Communicator(MPI_Comm_f2c(static_cast<MPI_Fint>(o.comm)));
}

// Calls f(layer) with the handle's typed layer.
template <class F>
decltype(auto) with_layer(const Layer& handle, F&& f) {
  if (handle.f32) return f(*handle.f32);
  return f(*handle.f64);
}

void finish_layer(Layer& handle) {
  with_layer(handle, [&](auto& layer) {
    handle.kind = layer.kind();
    for (const auto& p : kmoe::model::trainable(layer.parameters())) handle.names.push_back(p.name);
  });
}

Layer* new_layer(const std::string& kind, const std::string& config, const kmoe_layer_options& o,
                      kmoe::ParameterInit init) {
  auto handle = std::make_unique<Layer>();
  const kmoe::dist::Communicator comm = communicator_of(o);
  if (o.dtype == KMOE_FLOAT32) {
    handle->f32 = kmoe::model::build_layer<float>(kind, config, o.seed, init, comm);
  } else {
    handle->f64 = kmoe::model::build_layer<double>(kind, config, o.seed, init, comm);
  }
  handle->rng = kmoe::Generator(o.seed);
  finish_layer(*handle);
  return handle.release();
}

template <class T>
const kmoe::model::Parameter<T>& parameter_named(const kmoe::model::ParameterList<T>& all, const char* name,
                                                 const std::string& kind) {
  const std::string wanted = text(name, "name");
  for (const auto& p : all)
    if (p.name == wanted) return p;
  std::string known;
  for (const auto& p : all) known += (known.empty() ? "" : ", ") + p.name;
  kmoe::fail(Status::invalid_argument, "the ", kind, " layer has no trainable parameter '", wanted, "' (it has: ", known,
             ")");
}

// The optimizer's AdamW of the layer's dtype (null for no optimizer); one of another layer is
// Status::invalid_argument.
template <class T>
kmoe::model::AdamW<T>* adamw_of(const kmoe_optimizer* optimizer, const Layer& layer) {
  if (optimizer == nullptr) return nullptr;
  const Optimizer& o = *from_c(optimizer);
  kmoe::require(o.layer == &layer, Status::invalid_argument, "optimizer belongs to another layer");
  if constexpr (std::is_same_v<T, float>) {
    return o.f32.get();
  } else {
    return o.f64.get();
  }
}

template <class T>
kmoe::model::LayerForward<T>& forward_of(Forward& f);
template <>
kmoe::model::LayerForward<float>& forward_of<float>(Forward& f) { return f.f32; }
template <>
kmoe::model::LayerForward<double>& forward_of<double>(Forward& f) { return f.f64; }

template <class T>
const kmoe::model::LayerForward<T>& forward_of(const Forward& f) {
  return forward_of<T>(const_cast<Forward&>(f));
}

// A forward's inputs from the caller's tensor: token ids for moeut_lm, else the family's x.
template <class T>
kmoe::model::LayerInputs<T> layer_inputs(const Layer& handle, const kmoe_tensor& in) {
  kmoe::model::LayerInputs<T> inputs;
  if (handle.kind == "moeut_lm") {
    inputs.tokens = read_tensor<int>(&in, "input", true);
  } else {
    inputs.x = read_tensor<T>(&in, "input", true);
    kmoe::require_finite(inputs.x, "input");
  }
  return inputs;
}

}  // namespace

extern "C" {

const char* kmoe_version(void) { return "0.1.0"; }
int kmoe_version_major(void) { return 0; }
int kmoe_version_minor(void) { return 1; }
int kmoe_version_patch(void) { return 0; }
int kmoe_abi_version(void) { return KMOE_ABI_VERSION; }
const char* kmoe_last_error(void) { return last_error.c_str(); }

const char* kmoe_status_name(kmoe_status status) {
  switch (kmoe::capi::raw_enum(status)) {
    case KMOE_OK: return "ok";
    case KMOE_INVALID_ARGUMENT: return "invalid_argument";
    case KMOE_SHAPE_MISMATCH: return "shape_mismatch";
    case KMOE_NON_FINITE: return "non_finite";
    case KMOE_IO_ERROR: return "io_error";
    case KMOE_OUT_OF_MEMORY: return "out_of_memory";
    case KMOE_INTERNAL: return "internal";
    case KMOE_CORRUPT_FILE: return "corrupt_file";
    case KMOE_UNSUPPORTED: return "unsupported";
    case KMOE_MPI_ERROR: return "mpi_error";
  }
  return "unknown";
}

kmoe_status kmoe_initialize(void) {
  return call(
      "kmoe_initialize",
      [] {
        if (initialised++ > 0) return;
        if (Kokkos::is_initialized()) return;
        Kokkos::InitArguments arguments;
        arguments.disable_warnings = true;
        Kokkos::initialize(arguments);
        kokkos_is_ours = true;
      },
      false);
}

kmoe_status kmoe_finalize(void) {
  return call(
      "kmoe_finalize",
      [] {
        kmoe::require(initialised > 0, Status::invalid_argument, "kmoe_finalize without kmoe_initialize");
        if (--initialised > 0 || !kokkos_is_ours) return;
        Kokkos::finalize();
        kokkos_is_ours = false;
      },
      false);
}

kmoe_status kmoe_layer_options_init(kmoe_layer_options* options) {
  return call(
      "kmoe_layer_options_init", [&] { non_null(options, "options") = default_layer_options(); }, false);
}

kmoe_status kmoe_layer_create(const char* kind, const char* config_json, const kmoe_layer_options* options,
                              kmoe_layer** layer) {
  return call("kmoe_layer_create", [&] {
    non_null(layer, "layer") = nullptr;
    *layer = to_c(new_layer(text(kind, "kind"), text(config_json, "config_json"), options_or_default(options),
                            kmoe::ParameterInit::drawn));
  });
}

kmoe_status kmoe_layer_create_from_file(const char* kind, const char* config_path, const kmoe_layer_options* options,
                                        kmoe_layer** layer) {
  return call("kmoe_layer_create_from_file", [&] {
    non_null(layer, "layer") = nullptr;
    const std::string path = text(config_path, "config_path");
    std::ifstream in(path);
    kmoe::require(in.good(), Status::io_error, path, ": cannot open the config file");
    std::ostringstream contents;
    contents << in.rdbuf();
    try {
      *layer = to_c(new_layer(text(kind, "kind"), contents.str(), options_or_default(options), kmoe::ParameterInit::drawn));
    } catch (const Error& e) {
      throw Error(e.status(), path + ": " + e.what());
    }
  });
}

kmoe_status kmoe_layer_open_checkpoint(const char* path, const kmoe_layer_options* options, kmoe_layer** layer) {
  return call("kmoe_layer_open_checkpoint", [&] {
    non_null(layer, "layer") = nullptr;
    const std::string file = text(path, "path");
    kmoe_layer_options o = options_or_default(options);
    const kmoe::io::CheckpointReader reader(file);
    std::unique_ptr<Layer> handle(
        new_layer(reader.info().model, reader.info().config.dump(), o, kmoe::ParameterInit::zeros));
    with_layer(*handle, [&](auto& l) { kmoe::io::load_checkpoint(file, l); });
    *layer = to_c(handle.release());
  });
}

kmoe_status kmoe_layer_destroy(kmoe_layer* layer) {
  return call(
      "kmoe_layer_destroy", [&] { delete from_c(layer); }, false);
}

kmoe_status kmoe_layer_load(kmoe_layer* layer, kmoe_optimizer* optimizer, const char* path) {
  return call("kmoe_layer_load", [&] {
    Layer& handle = handle_of(layer, "layer");
    const std::string file = text(path, "path");
    with_layer(handle, [&](auto& l) {
      using T = typename std::decay_t<decltype(l)>::value_type;
      kmoe::io::CheckpointRestore<T> restore;
      restore.optimizer = adamw_of<T>(optimizer, handle);
      kmoe::io::load_checkpoint(file, l, {}, restore);
    });
  });
}

kmoe_status kmoe_layer_save(kmoe_layer* layer, const kmoe_optimizer* optimizer, const char* path) {
  return call("kmoe_layer_save", [&] {
    Layer& handle = handle_of(layer, "layer");
    const std::string file = text(path, "path");
    with_layer(handle, [&](auto& l) {
      using T = typename std::decay_t<decltype(l)>::value_type;
      kmoe::io::CheckpointExtras<T> extras;
      extras.optimizer = adamw_of<T>(optimizer, handle);
      if (extras.optimizer != nullptr) extras.step = extras.optimizer->steps();
      kmoe::io::save_checkpoint(file, l, extras);
    });
  });
}

kmoe_status kmoe_layer_kind(const kmoe_layer* layer, const char** kind) {
  return call("kmoe_layer_kind", [&] { non_null(kind, "kind") = handle_of(layer, "layer").kind.c_str(); });
}

kmoe_status kmoe_layer_config(const kmoe_layer* layer, char* buffer, size_t capacity, size_t* length) {
  return call("kmoe_layer_config", [&] {
    const std::string config = with_layer(handle_of(layer, "layer"), [](auto& l) { return l.config().dump(); });
    non_null(length, "length") = config.size();
    if (buffer == nullptr) return;
    kmoe::require(capacity > config.size(), Status::invalid_argument, "buffer holds ", capacity,
                  " bytes; the config needs ", config.size() + 1);
    config.copy(buffer, config.size());
    buffer[config.size()] = '\0';
  });
}

kmoe_status kmoe_layer_dtype(const kmoe_layer* layer, kmoe_dtype* dtype) {
  return call("kmoe_layer_dtype", [&] {
    non_null(dtype, "dtype") = handle_of(layer, "layer").f32 ? KMOE_FLOAT32 : KMOE_FLOAT64;
  });
}

kmoe_status kmoe_layer_parameter_count(const kmoe_layer* layer, int64_t* count) {
  return call("kmoe_layer_parameter_count", [&] {
    non_null(count, "count") = static_cast<int64_t>(handle_of(layer, "layer").names.size());
  });
}

kmoe_status kmoe_layer_parameter_info(const kmoe_layer* layer, int64_t index, kmoe_parameter_info* info) {
  return call("kmoe_layer_parameter_info", [&] {
    const Layer& handle = handle_of(layer, "layer");
    versioned(info, sizeof(kmoe_parameter_info), "info");
    kmoe::require(index >= 0 && index < static_cast<int64_t>(handle.names.size()), Status::invalid_argument,
                  "index ", index, " is outside [0, ", handle.names.size(), ")");
    with_layer(handle, [&](auto& l) {
      const auto all = kmoe::model::trainable(l.parameters());
      const auto& p = all[static_cast<std::size_t>(index)];
      const kmoe::Shape local = p.tensor->shape(), global = p.global_shape();
      info->name = handle.names[static_cast<std::size_t>(index)].c_str();
      info->rank = local.rank();
      for (int i = 0; i < KMOE_MAX_RANK; ++i) {
        info->shape[i] = i < local.rank() ? local[i] : 0;
        info->global_shape[i] = i < global.rank() ? global[i] : 0;
      }
      info->is_expert = p.kind == kmoe::model::ParameterKind::expert ? 1 : 0;
      info->first_expert = info->is_expert ? p.first_expert : 0;
    });
  });
}

kmoe_status kmoe_layer_get_parameter(kmoe_layer* layer, const char* name, const kmoe_tensor* into) {
  return call("kmoe_layer_get_parameter", [&] {
    Layer& handle = handle_of(layer, "layer");
    with_layer(handle, [&](auto& l) {
      const auto all = kmoe::model::trainable(l.parameters());
      const auto& p = parameter_named(all, name, handle.kind);
      write_tensor(*p.tensor, into, ("into (parameter " + p.name + ")").c_str());
    });
  });
}

kmoe_status kmoe_layer_set_parameter(kmoe_layer* layer, const char* name, const kmoe_tensor* from) {
  return call("kmoe_layer_set_parameter", [&] {
    Layer& handle = handle_of(layer, "layer");
    with_layer(handle, [&](auto& l) {
      using T = typename std::decay_t<decltype(l)>::value_type;
      const auto all = kmoe::model::trainable(l.parameters());
      const auto& p = parameter_named(all, name, handle.kind);
      const kmoe::Tensor<T> values = read_tensor<T>(from, ("from (parameter " + p.name + ")").c_str(), false);
      values.require_shape(p.tensor->shape(), std::string("from (parameter ") + p.name + ")");
      kmoe::require_finite(values, std::string("from (parameter ") + p.name + ")");
      Kokkos::deep_copy(p.tensor->flat(), values.flat());
    });
  });
}

kmoe_status kmoe_layer_get_gradient(kmoe_layer* layer, const char* name, const kmoe_tensor* into) {
  return call("kmoe_layer_get_gradient", [&] {
    Layer& handle = handle_of(layer, "layer");
    with_layer(handle, [&](auto& l) {
      const auto all = kmoe::model::trainable(l.parameters());
      const auto& p = parameter_named(all, name, handle.kind);
      kmoe::require(p.grad != nullptr, Status::invalid_argument, "parameter ", p.name, " has no gradient");
      write_tensor(*p.grad, into, ("into (gradient of " + p.name + ")").c_str());
    });
  });
}

kmoe_status kmoe_layer_zero_grad(kmoe_layer* layer) {
  return call("kmoe_layer_zero_grad", [&] { with_layer(handle_of(layer, "layer"), [](auto& l) { l.zero_grad(); }); });
}

kmoe_status kmoe_layer_all_reduce_gradients(kmoe_layer* layer) {
  return call("kmoe_layer_all_reduce_gradients", [&] {
    with_layer(handle_of(layer, "layer"),
               [](auto& l) { kmoe::dist::all_reduce_dense_gradients(l.communicator(), l.parameters()); });
  });
}

kmoe_status kmoe_layer_forward(kmoe_layer* layer, const kmoe_tensor* input, int32_t training, kmoe_forward** state) {
  return call("kmoe_layer_forward", [&] {
    Layer& handle = handle_of(layer, "layer");
    non_null(state, "state") = nullptr;
    const kmoe_tensor& in = non_null(input, "input");
    auto f = std::make_unique<Forward>();
    f->layer = &handle;
    f->layer_alive = handle.alive;
    f->tokens = handle.kind == "moeut_lm";
    with_layer(handle, [&](auto& l) {
      using T = typename std::decay_t<decltype(l)>::value_type;
      forward_of<T>(*f) = l.forward(layer_inputs<T>(handle, in), training != 0, handle.rng);
    });
    *state = to_c(f.release());
  });
}

kmoe_status kmoe_layer_infer(kmoe_layer* layer, const kmoe_tensor* input, const kmoe_tensor* output) {
  return call("kmoe_layer_infer", [&] {
    Layer& handle = handle_of(layer, "layer");
    const kmoe_tensor& in = non_null(input, "input");
    non_null(output, "output");
    with_layer(handle, [&](auto& l) {
      using T = typename std::decay_t<decltype(l)>::value_type;
      write_tensor(l.infer(layer_inputs<T>(handle, in), handle.rng), output, "output");
    });
  });
}

kmoe_status kmoe_forward_output_shape(const kmoe_forward* state, int32_t* rank, int64_t* shape) {
  return call("kmoe_forward_output_shape", [&] {
    const Forward& f = handle_of(state, "state");
    non_null(shape, "shape");
    kmoe::require(!f.layer_alive.expired(), Status::invalid_argument, "the state's layer was destroyed");
    const kmoe::Shape s = f.layer->f32 ? f.f32.out.shape() : f.f64.out.shape();
    non_null(rank, "rank") = s.rank();
    for (int i = 0; i < s.rank(); ++i) shape[i] = s[i];
  });
}

kmoe_status kmoe_forward_output(const kmoe_forward* state, const kmoe_tensor* into) {
  return call("kmoe_forward_output", [&] {
    const Forward& f = handle_of(state, "state");
    kmoe::require(!f.layer_alive.expired(), Status::invalid_argument, "the state's layer was destroyed");
    if (f.layer->f32) return write_tensor(f.f32.out, into, "into");
    write_tensor(f.f64.out, into, "into");
  });
}

kmoe_status kmoe_forward_loss(const kmoe_forward* state, const char* name, double* value) {
  return call("kmoe_forward_loss", [&] {
    const Forward& f = handle_of(state, "state");
    const std::string wanted = text(name, "name");
    non_null(value, "value");
    kmoe::require(!f.layer_alive.expired(), Status::invalid_argument, "the state's layer was destroyed");
    const bool f32 = f.layer->f32 != nullptr;
    if (wanted == "aux_loss") {
      *value = f32 ? static_cast<double>(f.f32.aux_loss) : f.f64.aux_loss;
      return;
    }
    const auto& losses = f32 ? f.f32.losses : f.f64.losses;
    const auto found = losses.find(wanted);
    std::string known = "aux_loss";
    for (const auto& item : losses) known += ", " + item.first;
    kmoe::require(found != losses.end(), Status::invalid_argument, "the ", f.layer->kind, " layer reports no loss '",
                  wanted, "' (it reports: ", known, ")");
    *value = found->second;
  });
}

kmoe_status kmoe_layer_backward(kmoe_layer* layer, const kmoe_forward* state, const kmoe_tensor* grad_output,
                                double aux_weight, const kmoe_tensor* grad_input) {
  return call("kmoe_layer_backward", [&] {
    Layer& handle = handle_of(layer, "layer");
    const Forward& f = handle_of(state, "state");
    kmoe::require(f.layer == &handle && !f.layer_alive.expired(), Status::invalid_argument,
                  "state comes from another layer's forward");
    kmoe::require(!(f.tokens && grad_input != nullptr), Status::invalid_argument,
                  "grad_input must be NULL: the input was token ids");
    with_layer(handle, [&](auto& l) {
      using T = typename std::decay_t<decltype(l)>::value_type;
      const kmoe::model::LayerForward<T>& forward = forward_of<T>(f);
      const kmoe::Tensor<T> dout = read_tensor<T>(grad_output, "grad_output", true);
      dout.require_shape(forward.out.shape(), "grad_output (the output's shape)");
      kmoe::require_finite(dout, "grad_output");
      if (grad_input != nullptr) kmoe::capi::check_descriptor<T>(grad_input, "grad_input");
      const kmoe::Tensor<T> dx = l.backward(forward, dout, static_cast<T>(aux_weight));
      if (grad_input != nullptr) write_tensor(dx, grad_input, "grad_input");
    });
  });
}

kmoe_status kmoe_forward_destroy(kmoe_forward* state) {
  return call(
      "kmoe_forward_destroy", [&] { delete from_c(state); }, false);
}

kmoe_status kmoe_adamw_options_init(kmoe_adamw_options* options) {
  return call(
      "kmoe_adamw_options_init",
      [&] {
        kmoe_adamw_options& o = non_null(options, "options");
        const kmoe::ops::AdamWConfig defaults;
        o.struct_size = sizeof o;
        o.lr = defaults.lr;
        o.beta1 = defaults.beta1;
        o.beta2 = defaults.beta2;
        o.eps = defaults.eps;
        o.weight_decay = defaults.weight_decay;
      },
      false);
}

kmoe_status kmoe_optimizer_create(kmoe_layer* layer, const kmoe_adamw_options* options, kmoe_optimizer** optimizer) {
  return call("kmoe_optimizer_create", [&] {
    Layer& handle = handle_of(layer, "layer");
    non_null(optimizer, "optimizer") = nullptr;
    kmoe::ops::AdamWConfig config;
    if (options != nullptr) {
      const kmoe_adamw_options& o = versioned(options, sizeof(kmoe_adamw_options), "options");
      config.lr = o.lr;
      config.beta1 = o.beta1;
      config.beta2 = o.beta2;
      config.eps = o.eps;
      config.weight_decay = o.weight_decay;
    }
    auto opt = std::make_unique<Optimizer>();
    opt->layer = &handle;
    opt->layer_alive = handle.alive;
    if (handle.f32) {
      opt->f32 = std::make_unique<kmoe::model::AdamW<float>>(handle.f32->parameters(), config);
    } else {
      opt->f64 = std::make_unique<kmoe::model::AdamW<double>>(handle.f64->parameters(), config);
    }
    *optimizer = to_c(opt.release());
  });
}

kmoe_status kmoe_optimizer_step(kmoe_optimizer* optimizer) {
  return call("kmoe_optimizer_step", [&] {
    Optimizer& opt = handle_of(optimizer, "optimizer");
    kmoe::require(!opt.layer_alive.expired(), Status::invalid_argument, "the optimizer's layer was destroyed");
    with_layer(*opt.layer, [](auto& l) { kmoe::dist::all_reduce_dense_gradients(l.communicator(), l.parameters()); });
    if (opt.f32) {
      opt.f32->step();
    } else {
      opt.f64->step();
    }
  });
}

kmoe_status kmoe_optimizer_destroy(kmoe_optimizer* optimizer) {
  return call(
      "kmoe_optimizer_destroy", [&] { delete from_c(optimizer); }, false);
}

}  // extern "C"
