/* The C ABI from C (this file is compiled as C99): every function's good call and its bad calls,
 * each with the status and a message naming the problem; the last error per thread; row-major and
 * column-major arrays alike; a checkpoint round trip. Exit 0 when every check passed. */
#include "kmoe.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int failures = 0;

#define CHECK(cond)                                                        \
  do {                                                                     \
    if (!(cond)) {                                                         \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                          \
    }                                                                      \
  } while (0)

/* call must return `status` and, when it fails, leave a message containing `needle`. */
#define EXPECT(call, status, needle) expect_status((call), (status), (needle), #call, __LINE__)

static void expect_status(kmoe_status got, kmoe_status want, const char* needle, const char* text, int line) {
  const char* message = kmoe_last_error();
  if (got != want) {
    fprintf(stderr, "line %d: %s\n  returned %s, expected %s; message: %s\n", line, text, kmoe_status_name(got),
            kmoe_status_name(want), message);
    ++failures;
    return;
  }
  if (want == KMOE_OK && message[0] != '\0') {
    fprintf(stderr, "line %d: %s succeeded but left the message '%s'\n", line, text, message);
    ++failures;
  }
  if (want != KMOE_OK && needle != NULL && strstr(message, needle) == NULL) {
    fprintf(stderr, "line %d: %s\n  message '%s' does not name '%s'\n", line, text, message, needle);
    ++failures;
  }
}

static const char* sigma_config = "{\"dmodel\": 8, \"n_experts\": 4, \"expert_size\": 6, \"k\": 2, \"dropout\": 0.0}";

/* A row-major descriptor of data. */
static kmoe_tensor described(void* data, kmoe_dtype dtype, int rank, const int64_t* shape) {
  kmoe_tensor t;
  memset(&t, 0, sizeof t);
  t.struct_size = sizeof t;
  t.dtype = dtype;
  t.rank = rank;
  for (int i = 0; i < rank; ++i) t.shape[i] = shape[i];
  t.data = data;
  t.memory = KMOE_HOST;
  return t;
}

static kmoe_layer* new_sigma(uint64_t seed, kmoe_dtype dtype) {
  kmoe_layer_options options;
  kmoe_layer* layer = NULL;
  EXPECT(kmoe_layer_options_init(&options), KMOE_OK, NULL);
  options.seed = seed;
  options.dtype = dtype;
  EXPECT(kmoe_layer_create("sigma_moe", sigma_config, &options, &layer), KMOE_OK, NULL);
  return layer;
}

enum { B = 2, T = 3, D = 8, N = B * T * D };

static void fill(float* x, int n, float scale) {
  for (int i = 0; i < n; ++i) x[i] = scale * sinf(0.37f * (float)i + 0.1f);
}

static void test_version_and_runtime(void) {
  CHECK(strcmp(kmoe_version(), "0.1.0") == 0);
  CHECK(kmoe_version_major() == 0 && kmoe_version_minor() == 1 && kmoe_version_patch() == 0);
  CHECK(kmoe_abi_version() == KMOE_ABI_VERSION);
  CHECK(strcmp(kmoe_status_name(KMOE_SHAPE_MISMATCH), "shape_mismatch") == 0);
  CHECK(strcmp(kmoe_status_name((kmoe_status)99), "unknown") == 0);
  kmoe_layer* layer = NULL;
  EXPECT(kmoe_layer_create("sigma_moe", sigma_config, NULL, &layer), KMOE_INVALID_ARGUMENT, "kmoe_initialize");
  EXPECT(kmoe_finalize(), KMOE_INVALID_ARGUMENT, "without kmoe_initialize");
  EXPECT(kmoe_initialize(), KMOE_OK, NULL);
}

static void test_create(void) {
  kmoe_layer* layer = NULL;
  kmoe_layer_options options;
  EXPECT(kmoe_layer_options_init(NULL), KMOE_INVALID_ARGUMENT, "options");
  EXPECT(kmoe_layer_options_init(&options), KMOE_OK, NULL);
  CHECK(options.struct_size == sizeof options && options.dtype == KMOE_FLOAT32);
  EXPECT(kmoe_layer_create(NULL, sigma_config, NULL, &layer), KMOE_INVALID_ARGUMENT, "kind");
  EXPECT(kmoe_layer_create("sigma_moe", NULL, NULL, &layer), KMOE_INVALID_ARGUMENT, "config_json");
  EXPECT(kmoe_layer_create("sigma_moe", sigma_config, NULL, NULL), KMOE_INVALID_ARGUMENT, "layer");
  EXPECT(kmoe_layer_create("sigma_moe", "{\"dmodel\": 8,", NULL, &layer), KMOE_INVALID_ARGUMENT, "JSON");
  CHECK(layer == NULL);
  EXPECT(kmoe_layer_create("no_such_layer", sigma_config, NULL, &layer), KMOE_INVALID_ARGUMENT, "no_such_layer");
  EXPECT(kmoe_layer_create("sigma_moe", "{\"dmodel\": 8, \"n_experts\": 4, \"expert_size\": 6, \"k\": 2, \"colour\": 1}",
                           NULL, &layer),
         KMOE_INVALID_ARGUMENT, "colour");
  options.struct_size = 4; /* older than the oldest ABI's struct */
  EXPECT(kmoe_layer_create("sigma_moe", sigma_config, &options, &layer), KMOE_INVALID_ARGUMENT, "struct_size");
  options.struct_size = sizeof options;
  options.dtype = (kmoe_dtype)7;
  EXPECT(kmoe_layer_create("sigma_moe", sigma_config, &options, &layer), KMOE_INVALID_ARGUMENT, "dtype");
  /* 4e11 bytes of keys: more than any machine here has. */
  EXPECT(kmoe_layer_create("sigma_moe", "{\"dmodel\": 100000, \"n_experts\": 1000, \"expert_size\": 1000, \"k\": 2}",
                           NULL, &layer),
         KMOE_OUT_OF_MEMORY, "out of memory");
  EXPECT(kmoe_layer_create_from_file("sigma_moe", "/no/such/config.json", NULL, &layer), KMOE_IO_ERROR,
         "/no/such/config.json");

  char path[256];
  snprintf(path, sizeof path, "/tmp/kmoe_capi_config_%d.json", (int)getpid());
  FILE* f = fopen(path, "w");
  fputs(sigma_config, f);
  fclose(f);
  EXPECT(kmoe_layer_create_from_file("sigma_moe", path, NULL, &layer), KMOE_OK, NULL);
  const char* kind = NULL;
  EXPECT(kmoe_layer_kind(layer, &kind), KMOE_OK, NULL);
  CHECK(kind != NULL && strcmp(kind, "sigma_moe") == 0);
  EXPECT(kmoe_layer_kind(NULL, &kind), KMOE_INVALID_ARGUMENT, "layer");
  EXPECT(kmoe_layer_kind(layer, NULL), KMOE_INVALID_ARGUMENT, "kind");
  size_t length = 0;
  EXPECT(kmoe_layer_config(layer, NULL, 0, &length), KMOE_OK, NULL);
  CHECK(length > 10);
  char small[4];
  EXPECT(kmoe_layer_config(layer, small, sizeof small, &length), KMOE_INVALID_ARGUMENT, "buffer");
  char* config = malloc(length + 1);
  EXPECT(kmoe_layer_config(layer, config, length + 1, &length), KMOE_OK, NULL);
  CHECK(strstr(config, "\"n_experts\":4") != NULL);
  free(config);
  kmoe_dtype dtype = KMOE_INT32;
  EXPECT(kmoe_layer_dtype(layer, &dtype), KMOE_OK, NULL);
  CHECK(dtype == KMOE_FLOAT32);
  EXPECT(kmoe_layer_destroy(layer), KMOE_OK, NULL);
  EXPECT(kmoe_layer_destroy(NULL), KMOE_OK, NULL);
  remove(path);
}

static void test_parameters(void) {
  kmoe_layer* layer = new_sigma(1, KMOE_FLOAT32);
  int64_t count = 0;
  EXPECT(kmoe_layer_parameter_count(layer, &count), KMOE_OK, NULL);
  CHECK(count >= 3);
  EXPECT(kmoe_layer_parameter_count(NULL, &count), KMOE_INVALID_ARGUMENT, "layer");
  EXPECT(kmoe_layer_parameter_count(layer, NULL), KMOE_INVALID_ARGUMENT, "count");
  kmoe_parameter_info info;
  memset(&info, 0, sizeof info);
  info.struct_size = sizeof info;
  int found_keys = 0;
  for (int64_t i = 0; i < count; ++i) {
    EXPECT(kmoe_layer_parameter_info(layer, i, &info), KMOE_OK, NULL);
    if (strcmp(info.name, "keys") == 0) {
      found_keys = 1;
      CHECK(info.is_expert == 1 && info.rank == 3 && info.shape[0] == 4 && info.shape[1] == 8 && info.shape[2] == 6);
      CHECK(info.global_shape[0] == 4 && info.first_expert == 0);
    }
  }
  CHECK(found_keys);
  EXPECT(kmoe_layer_parameter_info(layer, count, &info), KMOE_INVALID_ARGUMENT, "index");
  EXPECT(kmoe_layer_parameter_info(layer, -1, &info), KMOE_INVALID_ARGUMENT, "index");
  EXPECT(kmoe_layer_parameter_info(layer, 0, NULL), KMOE_INVALID_ARGUMENT, "info");
  info.struct_size = 8;
  EXPECT(kmoe_layer_parameter_info(layer, 0, &info), KMOE_INVALID_ARGUMENT, "struct_size");

  float keys[4 * 8 * 6], back[4 * 8 * 6];
  const int64_t shape[3] = {4, 8, 6};
  kmoe_tensor t = described(keys, KMOE_FLOAT32, 3, shape);
  EXPECT(kmoe_layer_get_parameter(layer, "keys", &t), KMOE_OK, NULL);
  for (int i = 0; i < 4 * 8 * 6; ++i) keys[i] = 0.5f * keys[i] + 0.01f;
  EXPECT(kmoe_layer_set_parameter(layer, "keys", &t), KMOE_OK, NULL);
  kmoe_tensor b = described(back, KMOE_FLOAT32, 3, shape);
  EXPECT(kmoe_layer_get_parameter(layer, "keys", &b), KMOE_OK, NULL);
  CHECK(memcmp(keys, back, sizeof keys) == 0);
  EXPECT(kmoe_layer_get_parameter(layer, "no_such_parameter", &t), KMOE_INVALID_ARGUMENT, "no_such_parameter");
  EXPECT(kmoe_layer_get_parameter(layer, NULL, &t), KMOE_INVALID_ARGUMENT, "name");
  EXPECT(kmoe_layer_get_parameter(layer, "keys", NULL), KMOE_INVALID_ARGUMENT, "into");
  const int64_t wrong[3] = {4, 6, 8};
  kmoe_tensor w = described(keys, KMOE_FLOAT32, 3, wrong);
  EXPECT(kmoe_layer_get_parameter(layer, "keys", &w), KMOE_SHAPE_MISMATCH, "[4, 8, 6]");
  EXPECT(kmoe_layer_set_parameter(layer, "keys", &w), KMOE_SHAPE_MISMATCH, "keys");
  kmoe_tensor d = described(keys, KMOE_FLOAT64, 3, shape);
  EXPECT(kmoe_layer_get_parameter(layer, "keys", &d), KMOE_INVALID_ARGUMENT, "KMOE_FLOAT64");
  kmoe_tensor n = described(NULL, KMOE_FLOAT32, 3, shape);
  EXPECT(kmoe_layer_set_parameter(layer, "keys", &n), KMOE_INVALID_ARGUMENT, "data");
  const int64_t five[5] = {1, 1, 4, 8, 6};
  kmoe_tensor r = described(keys, KMOE_FLOAT32, 5, five);
  EXPECT(kmoe_layer_set_parameter(layer, "keys", &r), KMOE_SHAPE_MISMATCH, "rank 5");
  kmoe_tensor old = t;
  old.struct_size = 16;
  EXPECT(kmoe_layer_get_parameter(layer, "keys", &old), KMOE_INVALID_ARGUMENT, "struct_size");
  keys[7] = NAN;
  EXPECT(kmoe_layer_set_parameter(layer, "keys", &t), KMOE_NON_FINITE, "keys");
  EXPECT(kmoe_layer_get_parameter(layer, "keys", &b), KMOE_OK, NULL);
  CHECK(!isnan(back[7])); /* the failed set changed nothing */
  EXPECT(kmoe_layer_get_gradient(layer, "keys", &b), KMOE_OK, NULL);
  EXPECT(kmoe_layer_get_gradient(layer, "nope", &b), KMOE_INVALID_ARGUMENT, "nope");
  EXPECT(kmoe_layer_zero_grad(layer), KMOE_OK, NULL);
  EXPECT(kmoe_layer_zero_grad(NULL), KMOE_INVALID_ARGUMENT, "layer");
  EXPECT(kmoe_layer_all_reduce_gradients(layer), KMOE_OK, NULL);
  kmoe_layer_destroy(layer);
}

/* forward + backward of x through a fresh layer of seed 3; out, dx and the keys' gradient. */
static void run_step(const kmoe_tensor* x, float* out, float* dx, float* dkeys) {
  kmoe_layer* layer = new_sigma(3, KMOE_FLOAT32);
  kmoe_forward* f = NULL;
  EXPECT(kmoe_layer_forward(layer, x, 1, &f), KMOE_OK, NULL);
  const int64_t shape[3] = {B, T, D}, kshape[3] = {4, 8, 6};
  kmoe_tensor o = described(out, KMOE_FLOAT32, 3, shape);
  EXPECT(kmoe_forward_output(f, &o), KMOE_OK, NULL);
  float grad[N];
  fill(grad, N, 0.3f);
  kmoe_tensor g = described(grad, KMOE_FLOAT32, 3, shape), gx = described(dx, KMOE_FLOAT32, 3, shape);
  EXPECT(kmoe_layer_backward(layer, f, &g, 1.0, &gx), KMOE_OK, NULL);
  kmoe_tensor k = described(dkeys, KMOE_FLOAT32, 3, kshape);
  EXPECT(kmoe_layer_get_gradient(layer, "keys", &k), KMOE_OK, NULL);
  kmoe_forward_destroy(f);
  kmoe_layer_destroy(layer);
}

static void test_compute(void) {
  kmoe_layer* layer = new_sigma(3, KMOE_FLOAT32);
  float x[N], out[N], dx[N], grad[N];
  fill(x, N, 1.0f);
  fill(grad, N, 0.3f);
  const int64_t shape[3] = {B, T, D};
  kmoe_tensor in = described(x, KMOE_FLOAT32, 3, shape);
  kmoe_forward *f = NULL, *second = NULL;
  EXPECT(kmoe_layer_forward(layer, &in, 1, &f), KMOE_OK, NULL);
  EXPECT(kmoe_layer_forward(layer, &in, 0, &second), KMOE_OK, NULL); /* two states alive */
  int32_t rank = 0;
  int64_t out_shape[KMOE_MAX_RANK];
  EXPECT(kmoe_forward_output_shape(f, &rank, out_shape), KMOE_OK, NULL);
  CHECK(rank == 3 && out_shape[0] == B && out_shape[1] == T && out_shape[2] == D);
  EXPECT(kmoe_forward_output_shape(NULL, &rank, out_shape), KMOE_INVALID_ARGUMENT, "state");
  kmoe_tensor o = described(out, KMOE_FLOAT32, 3, shape);
  EXPECT(kmoe_forward_output(f, &o), KMOE_OK, NULL);
  const int64_t flat[2] = {B * T, D};
  kmoe_tensor of = described(out, KMOE_FLOAT32, 2, flat);
  EXPECT(kmoe_forward_output(f, &of), KMOE_SHAPE_MISMATCH, "[2, 3, 8]");
  /* Inference gives the eval forward's output (no dropout), bit for bit. */
  kmoe_layer* dropping = NULL;
  kmoe_layer_options options;
  EXPECT(kmoe_layer_options_init(&options), KMOE_OK, NULL);
  EXPECT(kmoe_layer_create("sigma_moe", "{\"dmodel\": 8, \"n_experts\": 4, \"expert_size\": 6, \"k\": 2, \"dropout\": 0.5}",
                           &options, &dropping), KMOE_OK, NULL);
  float eval_out[N], train_out[N], inferred[N];
  kmoe_tensor eo = described(eval_out, KMOE_FLOAT32, 3, shape), to = described(train_out, KMOE_FLOAT32, 3, shape);
  kmoe_tensor io = described(inferred, KMOE_FLOAT32, 3, shape);
  kmoe_forward *evaluated = NULL, *trained = NULL;
  EXPECT(kmoe_layer_forward(dropping, &in, 0, &evaluated), KMOE_OK, NULL);
  EXPECT(kmoe_layer_forward(dropping, &in, 1, &trained), KMOE_OK, NULL);
  EXPECT(kmoe_forward_output(evaluated, &eo), KMOE_OK, NULL);
  EXPECT(kmoe_forward_output(trained, &to), KMOE_OK, NULL);
  EXPECT(kmoe_layer_infer(dropping, &in, &io), KMOE_OK, NULL);
  CHECK(memcmp(eval_out, inferred, sizeof inferred) == 0);
  CHECK(memcmp(train_out, inferred, sizeof inferred) != 0);
  kmoe_forward_destroy(evaluated);
  kmoe_forward_destroy(trained);
  kmoe_layer_destroy(dropping);
  kmoe_tensor io_flat = described(inferred, KMOE_FLOAT32, 2, flat);
  EXPECT(kmoe_layer_infer(layer, &in, &io_flat), KMOE_SHAPE_MISMATCH, "output is [6, 8], expected [2, 3, 8]");
  EXPECT(kmoe_layer_infer(layer, &in, NULL), KMOE_INVALID_ARGUMENT, "output");
  EXPECT(kmoe_layer_infer(layer, NULL, &io), KMOE_INVALID_ARGUMENT, "input");
  EXPECT(kmoe_layer_infer(NULL, &in, &io), KMOE_INVALID_ARGUMENT, "layer");
  double reg = -1;
  EXPECT(kmoe_forward_loss(f, "reg_loss", &reg), KMOE_OK, NULL);
  CHECK(isfinite(reg));
  EXPECT(kmoe_forward_loss(f, "balance_loss", &reg), KMOE_INVALID_ARGUMENT, "reg_loss");
  EXPECT(kmoe_forward_loss(f, NULL, &reg), KMOE_INVALID_ARGUMENT, "name");
  EXPECT(kmoe_forward_loss(f, "aux_loss", &reg), KMOE_OK, NULL);

  kmoe_tensor g = described(grad, KMOE_FLOAT32, 3, shape), gx = described(dx, KMOE_FLOAT32, 3, shape);
  kmoe_tensor gwrong = described(grad, KMOE_FLOAT32, 2, flat);
  EXPECT(kmoe_layer_backward(layer, f, &gwrong, 1.0, &gx), KMOE_SHAPE_MISMATCH, "grad_output");
  EXPECT(kmoe_layer_backward(layer, NULL, &g, 1.0, &gx), KMOE_INVALID_ARGUMENT, "state");
  EXPECT(kmoe_layer_backward(layer, f, NULL, 1.0, &gx), KMOE_INVALID_ARGUMENT, "grad_output");
  kmoe_layer* other = new_sigma(4, KMOE_FLOAT32);
  EXPECT(kmoe_layer_backward(other, f, &g, 1.0, &gx), KMOE_INVALID_ARGUMENT, "another layer");
  EXPECT(kmoe_layer_backward(layer, f, &g, 1.0, &gx), KMOE_OK, NULL);
  EXPECT(kmoe_layer_backward(layer, f, &g, 1.0, NULL), KMOE_OK, NULL); /* no input gradient wanted */

  /* Bad inputs. (A failed call sets its state argument to NULL: passing &f here would lose f, as
   * the asan flavour's leak check found.) */
  kmoe_forward* bad = NULL;
  EXPECT(kmoe_layer_forward(layer, NULL, 1, &bad), KMOE_INVALID_ARGUMENT, "input");
  EXPECT(kmoe_layer_forward(NULL, &in, 1, &bad), KMOE_INVALID_ARGUMENT, "layer");
  x[5] = NAN;
  EXPECT(kmoe_layer_forward(layer, &in, 1, &bad), KMOE_NON_FINITE, "input");
  CHECK(bad == NULL);
  EXPECT(kmoe_layer_infer(layer, &in, &io), KMOE_NON_FINITE, "input");
  fill(x, N, 1.0f);
  const int64_t narrow[3] = {B, T, D / 2};
  kmoe_tensor in_narrow = described(x, KMOE_FLOAT32, 3, narrow);
  EXPECT(kmoe_layer_forward(layer, &in_narrow, 1, &bad), KMOE_SHAPE_MISMATCH, "dmodel");
  kmoe_tensor in_double = described(x, KMOE_FLOAT64, 3, shape);
  EXPECT(kmoe_layer_forward(layer, &in_double, 1, &bad), KMOE_INVALID_ARGUMENT, "KMOE_FLOAT32");
  kmoe_tensor in_memory = in;
  in_memory.memory = (kmoe_memory)5;
  EXPECT(kmoe_layer_forward(layer, &in_memory, 1, &bad), KMOE_INVALID_ARGUMENT, "memory");

  /* The layer goes first: its states then refuse to be used. */
  kmoe_layer_destroy(layer);
  EXPECT(kmoe_forward_output(second, &o), KMOE_INVALID_ARGUMENT, "destroyed");
  kmoe_forward_destroy(second);
  kmoe_forward_destroy(f);
  EXPECT(kmoe_forward_destroy(NULL), KMOE_OK, NULL);
  kmoe_layer_destroy(other);
}

/* The same values laid out column-major (Fortran's order) give the same bits. */
static void test_layouts(void) {
  float x[N], xc[N];
  fill(x, N, 1.0f);
  const int64_t shape[3] = {B, T, D};
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T; ++t)
      for (int d = 0; d < D; ++d) xc[b + B * (t + T * d)] = x[(b * T + t) * D + d];
  kmoe_tensor row = described(x, KMOE_FLOAT32, 3, shape), col = described(xc, KMOE_FLOAT32, 3, shape);
  col.strides[0] = 1;
  col.strides[1] = B;
  col.strides[2] = B * T;
  float out_r[N], dx_r[N], dk_r[4 * 8 * 6], out_c[N], dx_c[N], dk_c[4 * 8 * 6];
  run_step(&row, out_r, dx_r, dk_r);
  run_step(&col, out_c, dx_c, dk_c);
  CHECK(memcmp(out_r, out_c, sizeof out_r) == 0);
  CHECK(memcmp(dx_r, dx_c, sizeof dx_r) == 0);
  CHECK(memcmp(dk_r, dk_c, sizeof dk_r) == 0);
  /* Explicit row-major strides are row-major too. */
  kmoe_tensor strided = row;
  strided.strides[0] = T * D;
  strided.strides[1] = D;
  strided.strides[2] = 1;
  float out_s[N], dx_s[N], dk_s[4 * 8 * 6];
  run_step(&strided, out_s, dx_s, dk_s);
  CHECK(memcmp(out_r, out_s, sizeof out_r) == 0);
  /* Strides that reach past 2^63 elements describe no array; a shape of 0 elements needs none. */
  kmoe_layer* layer = new_sigma(3, KMOE_FLOAT32);
  kmoe_forward* f = NULL;
  kmoe_tensor wild = row;
  wild.strides[0] = INT64_MAX / 2;
  EXPECT(kmoe_layer_forward(layer, &wild, 1, &f), KMOE_INVALID_ARGUMENT, "strides reach past 2^63");
  const int64_t huge[3] = {INT64_MAX / 2, INT64_MAX / 2, D};
  kmoe_tensor overflowing = described(x, KMOE_FLOAT32, 3, huge);
  EXPECT(kmoe_layer_forward(layer, &overflowing, 1, &f), KMOE_INVALID_ARGUMENT, "more than 2^63 - 1 elements");
  EXPECT(kmoe_layer_destroy(layer), KMOE_OK, NULL);
}

static void test_optimizer_and_checkpoints(void) {
  kmoe_layer* layer = new_sigma(5, KMOE_FLOAT32);
  kmoe_optimizer* opt = NULL;
  kmoe_adamw_options options;
  EXPECT(kmoe_adamw_options_init(&options), KMOE_OK, NULL);
  CHECK(options.lr == 1e-3 && options.weight_decay == 0.01);
  options.lr = 0.01;
  EXPECT(kmoe_optimizer_create(NULL, &options, &opt), KMOE_INVALID_ARGUMENT, "layer");
  options.lr = -1;
  EXPECT(kmoe_optimizer_create(layer, &options, &opt), KMOE_INVALID_ARGUMENT, "lr");
  options.lr = 0.01;
  EXPECT(kmoe_optimizer_create(layer, &options, &opt), KMOE_OK, NULL);
  float x[N], grad[N];
  fill(x, N, 1.0f);
  fill(grad, N, 0.3f);
  const int64_t shape[3] = {B, T, D};
  kmoe_tensor in = described(x, KMOE_FLOAT32, 3, shape), g = described(grad, KMOE_FLOAT32, 3, shape);
  kmoe_forward* f = NULL;
  EXPECT(kmoe_layer_forward(layer, &in, 1, &f), KMOE_OK, NULL);
  EXPECT(kmoe_layer_backward(layer, f, &g, 1.0, NULL), KMOE_OK, NULL);
  kmoe_forward_destroy(f);
  EXPECT(kmoe_optimizer_step(opt), KMOE_OK, NULL);
  EXPECT(kmoe_optimizer_step(NULL), KMOE_INVALID_ARGUMENT, "optimizer");

  char path[256];
  snprintf(path, sizeof path, "/tmp/kmoe_capi_%d.h5", (int)getpid());
  EXPECT(kmoe_layer_save(layer, opt, path), KMOE_OK, NULL);
  EXPECT(kmoe_layer_save(layer, NULL, "/no/such/folder/layer.h5"), KMOE_IO_ERROR, "/no/such/folder");
  EXPECT(kmoe_layer_save(NULL, NULL, path), KMOE_INVALID_ARGUMENT, "layer");

  kmoe_layer* copy = new_sigma(6, KMOE_FLOAT32);
  kmoe_optimizer* copy_opt = NULL;
  EXPECT(kmoe_optimizer_create(copy, &options, &copy_opt), KMOE_OK, NULL);
  EXPECT(kmoe_layer_load(copy, opt, path), KMOE_INVALID_ARGUMENT, "another layer");
  EXPECT(kmoe_layer_load(copy, copy_opt, path), KMOE_OK, NULL);
  float a[4 * 8 * 6], b[4 * 8 * 6];
  const int64_t kshape[3] = {4, 8, 6};
  kmoe_tensor ta = described(a, KMOE_FLOAT32, 3, kshape), tb = described(b, KMOE_FLOAT32, 3, kshape);
  EXPECT(kmoe_layer_get_parameter(layer, "keys", &ta), KMOE_OK, NULL);
  EXPECT(kmoe_layer_get_parameter(copy, "keys", &tb), KMOE_OK, NULL);
  CHECK(memcmp(a, b, sizeof a) == 0);
  kmoe_layer* opened = NULL;
  EXPECT(kmoe_layer_open_checkpoint(path, NULL, &opened), KMOE_OK, NULL);
  EXPECT(kmoe_layer_get_parameter(opened, "keys", &tb), KMOE_OK, NULL);
  CHECK(memcmp(a, b, sizeof a) == 0);

  kmoe_layer_options wide;
  kmoe_layer_options_init(&wide);
  kmoe_layer* other = NULL;
  EXPECT(kmoe_layer_create("sigma_moe", "{\"dmodel\": 8, \"n_experts\": 5, \"expert_size\": 6, \"k\": 2}", &wide, &other),
         KMOE_OK, NULL);
  EXPECT(kmoe_layer_load(other, NULL, path), KMOE_INVALID_ARGUMENT, "config");
  EXPECT(kmoe_layer_load(copy, NULL, "/no/such/file.h5"), KMOE_IO_ERROR, "/no/such/file.h5");

  /* A damaged checkpoint: cut to half its size. */
  FILE* file = fopen(path, "r+b");
  fseek(file, 0, SEEK_END);
  const long size = ftell(file);
  fclose(file);
  CHECK(truncate(path, size / 2) == 0);
  const kmoe_status damaged = kmoe_layer_load(copy, NULL, path);
  CHECK(damaged == KMOE_CORRUPT_FILE);
  CHECK(strstr(kmoe_last_error(), path) != NULL);
  remove(path);

  EXPECT(kmoe_optimizer_destroy(opt), KMOE_OK, NULL);
  EXPECT(kmoe_optimizer_destroy(copy_opt), KMOE_OK, NULL);
  EXPECT(kmoe_optimizer_destroy(NULL), KMOE_OK, NULL);
  kmoe_layer_destroy(layer);
  kmoe_layer_destroy(copy);
  kmoe_layer_destroy(opened);
  kmoe_layer_destroy(other);
}

static void test_float64(void) {
  kmoe_layer* layer = new_sigma(7, KMOE_FLOAT64);
  double x[N], out[N];
  for (int i = 0; i < N; ++i) x[i] = sin(0.37 * i + 0.1);
  const int64_t shape[3] = {B, T, D};
  kmoe_tensor in = described(x, KMOE_FLOAT64, 3, shape), o = described(out, KMOE_FLOAT64, 3, shape);
  kmoe_forward* f = NULL;
  EXPECT(kmoe_layer_forward(layer, &in, 0, &f), KMOE_OK, NULL);
  EXPECT(kmoe_forward_output(f, &o), KMOE_OK, NULL);
  kmoe_tensor of = described(out, KMOE_FLOAT32, 3, shape);
  EXPECT(kmoe_forward_output(f, &of), KMOE_INVALID_ARGUMENT, "KMOE_FLOAT64");
  kmoe_forward_destroy(f);
  kmoe_layer_destroy(layer);
}

/* Mixed precision through the config: "precision": "bfloat16" runs the expert GEMMs on bfloat16
 * operands (the output stays within bfloat16 rounding of the float32 layer's, yet differs from it),
 * is reported back in the config, and needs a KMOE_FLOAT32 layer. */
static void test_precision(void) {
  static const char* mixed_config =
      "{\"dmodel\": 8, \"n_experts\": 4, \"expert_size\": 6, \"k\": 2, \"dropout\": 0.0, \"precision\": \"bfloat16\"}";
  kmoe_layer_options options;
  EXPECT(kmoe_layer_options_init(&options), KMOE_OK, NULL);
  options.seed = 3;
  kmoe_layer* mixed = NULL;
  EXPECT(kmoe_layer_create("sigma_moe", mixed_config, &options, &mixed), KMOE_OK, NULL);
  char config[1024];
  size_t length = 0;
  EXPECT(kmoe_layer_config(mixed, config, sizeof config, &length), KMOE_OK, NULL);
  CHECK(strstr(config, "\"precision\":\"bfloat16\"") != NULL);
  float x[N], native_out[N], mixed_out[N], native_dx[N], native_dkeys[4 * 8 * 6];
  fill(x, N, 1.0f);
  const int64_t shape[3] = {B, T, D};
  kmoe_tensor in = described(x, KMOE_FLOAT32, 3, shape), o = described(mixed_out, KMOE_FLOAT32, 3, shape);
  run_step(&in, native_out, native_dx, native_dkeys);
  kmoe_forward* f = NULL;
  EXPECT(kmoe_layer_forward(mixed, &in, 1, &f), KMOE_OK, NULL);
  EXPECT(kmoe_forward_output(f, &o), KMOE_OK, NULL);
  double diff = 0, norm = 0;
  for (int i = 0; i < N; ++i) {
    diff += (mixed_out[i] - native_out[i]) * (mixed_out[i] - native_out[i]);
    norm += native_out[i] * native_out[i];
  }
  const double u = 1.0 / 512; /* bfloat16's unit roundoff */
  CHECK(diff > 0 && sqrt(diff / norm) < 6 * u);
  kmoe_forward_destroy(f);
  kmoe_layer_destroy(mixed);
  options.dtype = KMOE_FLOAT64;
  EXPECT(kmoe_layer_create("sigma_moe", mixed_config, &options, &mixed), KMOE_UNSUPPORTED, "needs a float32 layer");
  EXPECT(kmoe_layer_create("sigma_moe", "{\"dmodel\": 8, \"n_experts\": 4, \"expert_size\": 6, \"k\": 2, \"precision\": \"fp8\"}",
                           NULL, &mixed),
         KMOE_INVALID_ARGUMENT, "'fp8'");
}

/* Each thread makes its own error; each reads back its own message. */
struct thread_result {
  const char* kind;
  char message[512];
};

static void* make_error(void* arg) {
  struct thread_result* r = (struct thread_result*)arg;
  kmoe_layer* layer = NULL;
  (void)kmoe_layer_create(r->kind, sigma_config, NULL, &layer);
  usleep(20000); /* let the other thread fail in between */
  snprintf(r->message, sizeof r->message, "%s", kmoe_last_error());
  return NULL;
}

static void test_threads(void) {
  struct thread_result a = {"first_unknown_kind", ""}, b = {"second_unknown_kind", ""};
  pthread_t ta, tb;
  pthread_create(&ta, NULL, make_error, &a);
  pthread_create(&tb, NULL, make_error, &b);
  pthread_join(ta, NULL);
  pthread_join(tb, NULL);
  CHECK(strstr(a.message, "first_unknown_kind") != NULL && strstr(a.message, "second") == NULL);
  CHECK(strstr(b.message, "second_unknown_kind") != NULL && strstr(b.message, "first") == NULL);
  EXPECT(kmoe_layer_options_init(NULL), KMOE_INVALID_ARGUMENT, "options");
  kmoe_layer_options options;
  EXPECT(kmoe_layer_options_init(&options), KMOE_OK, NULL);
  CHECK(kmoe_last_error()[0] == '\0'); /* a good call clears it */
}

/* kmoe called from an atexit handler, after the C++ runtime's thread-local destructors ran: the
 * last-error message must still be there to write (the asan flavour saw a use after free). */
static void call_kmoe_at_exit(void) {
  if (kmoe_finalize() != KMOE_INVALID_ARGUMENT || strstr(kmoe_last_error(), "without kmoe_initialize") == NULL) {
    fprintf(stderr, "kmoe_finalize at exit: %s\n", kmoe_last_error());
    _exit(1);
  }
}

int main(void) {
  atexit(call_kmoe_at_exit);
  test_version_and_runtime();
  test_create();
  test_parameters();
  test_compute();
  test_layouts();
  test_optimizer_and_checkpoints();
  test_float64();
  test_precision();
  test_threads();
  EXPECT(kmoe_finalize(), KMOE_OK, NULL);
  if (failures > 0) {
    fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  printf("test_capi: every check passed\n");
  return 0;
}
