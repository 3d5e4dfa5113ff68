/* kmoe — the C ABI (C99). Mixture-of-experts layers (σ-MoE, ST-MoE, Soft MoE, MoEUT) for C, C++
 * and Fortran codes (capi/fortran/kmoe.F90 is a Fortran module over this header).
 *
 * Conventions
 * - Every function returns a kmoe_status; on failure kmoe_last_error() is the message (it names
 *   the argument, parameter, dataset or rank at fault), per thread, until the thread's next call.
 *   No exception, abort or exit crosses this boundary; a null handle or pointer is
 *   KMOE_INVALID_ARGUMENT.
 * - Handles are opaque. kmoe_*_destroy(NULL) is a no-op. A function that creates a handle sets
 *   *handle to NULL first, so on failure it is NULL (pass a fresh variable, not one holding a
 *   live handle).
 * - Every struct passed in starts with size_t struct_size (set it to sizeof the struct, or call
 *   the struct's _init function): a caller built against an older, smaller struct keeps working;
 *   a struct_size below the oldest known size is KMOE_INVALID_ARGUMENT.
 * - Enum values are fixed forever.
 * - Threads: calls may come from any host thread; they are serialised inside kmoe (one at a time:
 *   Kokkos 3.4's OpenMP backend runs one parallel dispatch at a time).
 * - MPI: a communicator is handed over as its Fortran handle (MPI_Comm_c2f(comm) in C, the
 *   integer itself in Fortran), so C and Fortran pass the same thing. kmoe works on its own
 *   duplicate. Calls on a distributed layer are collective over it.
 */
#ifndef KMOE_H
#define KMOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define KMOE_API
#else
#define KMOE_API __attribute__((visibility("default")))
#endif

/* Incremented on every incompatible change (the library's SONAME carries it). */
#define KMOE_ABI_VERSION 1
#define KMOE_MAX_RANK 8

typedef enum kmoe_status {
  KMOE_OK = 0,
  KMOE_INVALID_ARGUMENT = 1,
  KMOE_SHAPE_MISMATCH = 2,
  KMOE_NON_FINITE = 3,
  KMOE_IO_ERROR = 4,
  KMOE_OUT_OF_MEMORY = 5,
  KMOE_INTERNAL = 6,
  KMOE_CORRUPT_FILE = 7,
  KMOE_UNSUPPORTED = 8,
  KMOE_MPI_ERROR = 9
} kmoe_status;

typedef enum kmoe_dtype {
  KMOE_FLOAT32 = 1,
  KMOE_FLOAT64 = 2,
  KMOE_INT32 = 3 /* token ids (MoEUTLM) */
} kmoe_dtype;

typedef enum kmoe_memory {
  KMOE_HOST = 0,
  KMOE_DEVICE = 1 /* CUDA device memory on a CUDA build; on a CPU build the same as KMOE_HOST */
} kmoe_memory;

/* An array in the caller's memory. strides are in elements; all zero means row-major contiguous
 * (C). Column-major (Fortran) arrays give strides {1, shape[0], shape[0]·shape[1], ...}. kmoe
 * reads and writes row-major contiguous arrays in its own memory space in place; others are
 * copied. */
typedef struct kmoe_tensor {
  size_t struct_size;
  kmoe_dtype dtype;
  int32_t rank;
  int64_t shape[KMOE_MAX_RANK];
  int64_t strides[KMOE_MAX_RANK];
  void* data;
  kmoe_memory memory;
} kmoe_tensor;

typedef struct kmoe_layer kmoe_layer;         /* a layer or model of any family */
typedef struct kmoe_forward kmoe_forward;     /* one forward call's output and saved state */
typedef struct kmoe_optimizer kmoe_optimizer; /* AdamW over a layer's parameters */

/* ---- version, errors, runtime -------------------------------------------------------------- */

KMOE_API const char* kmoe_version(void); /* "0.1.0" */
KMOE_API int kmoe_version_major(void);
KMOE_API int kmoe_version_minor(void);
KMOE_API int kmoe_version_patch(void);
KMOE_API int kmoe_abi_version(void); /* KMOE_ABI_VERSION of the library */
/* This thread's last error message ("" when its last call succeeded). */
KMOE_API const char* kmoe_last_error(void);
KMOE_API const char* kmoe_status_name(kmoe_status status); /* "ok", "invalid_argument", ... */

/* Starts Kokkos unless the host code already did (then kmoe uses it and kmoe_finalize leaves it).
 * Call once before anything else; further calls are counted. On a GPU build under mpirun or srun,
 * the ranks of a node take its GPUs round robin by local rank (Open MPI's, MVAPICH2's or Slurm's
 * variable; not collective); KOKKOS_DEVICE_ID picks one instead. */
KMOE_API kmoe_status kmoe_initialize(void);
/* Balances kmoe_initialize; the last one finalises Kokkos if kmoe started it. Every handle must be
 * destroyed before. */
KMOE_API kmoe_status kmoe_finalize(void);

/* ---- layers -------------------------------------------------------------------------------- */

typedef struct kmoe_layer_options {
  size_t struct_size;
  kmoe_dtype dtype;  /* KMOE_FLOAT32 (default) or KMOE_FLOAT64 */
  uint64_t seed;     /* parameter initialisation and the layer's random draws (dropout, routing) */
  int32_t use_comm;  /* nonzero: place the experts over the ranks of comm */
  int32_t comm;      /* MPI_Fint of the communicator (MPI_Comm_c2f); MPI_COMM_NULL: one rank */
} kmoe_layer_options;
KMOE_API kmoe_status kmoe_layer_options_init(kmoe_layer_options* options);

/* A layer of `kind` ("sigma_moe", "st_moe", "soft_moe_lite", "moeut_lm", ...: kmoe-parity --help
 * lists them) from a JSON config (the original's argument names), its parameters initialised as
 * the original's from options->seed. options may be NULL (defaults). */
KMOE_API kmoe_status kmoe_layer_create(const char* kind, const char* config_json, const kmoe_layer_options* options,
                                       kmoe_layer** layer);
/* The same with the config read from a JSON file. */
KMOE_API kmoe_status kmoe_layer_create_from_file(const char* kind, const char* config_path,
                                                 const kmoe_layer_options* options, kmoe_layer** layer);
/* The layer a kmoe checkpoint holds (its kind and config), loaded; dtype must be the checkpoint's. */
KMOE_API kmoe_status kmoe_layer_open_checkpoint(const char* path, const kmoe_layer_options* options,
                                                kmoe_layer** layer);
KMOE_API kmoe_status kmoe_layer_destroy(kmoe_layer* layer);

/* Loads a checkpoint of the same kind and config into layer (and optimizer's moments when not
 * NULL); nothing changes on failure. Writes one crash-safely (a collective parallel-HDF5 file
 * when distributed). */
KMOE_API kmoe_status kmoe_layer_load(kmoe_layer* layer, kmoe_optimizer* optimizer, const char* path);
KMOE_API kmoe_status kmoe_layer_save(kmoe_layer* layer, const kmoe_optimizer* optimizer, const char* path);

/* The layer's kind (valid while the layer lives) and its complete config as JSON: copied into
 * buffer (capacity bytes, NUL included); *length gets the length without the NUL. A buffer too
 * small (or NULL) copies nothing and is KMOE_INVALID_ARGUMENT unless buffer is NULL (a size query). */
KMOE_API kmoe_status kmoe_layer_kind(const kmoe_layer* layer, const char** kind);
KMOE_API kmoe_status kmoe_layer_config(const kmoe_layer* layer, char* buffer, size_t capacity, size_t* length);
KMOE_API kmoe_status kmoe_layer_dtype(const kmoe_layer* layer, kmoe_dtype* dtype);

/* ---- parameters ---------------------------------------------------------------------------- */

typedef struct kmoe_parameter_info {
  size_t struct_size;
  const char* name;                    /* the state_dict name; valid while the layer lives */
  int32_t rank;
  int64_t shape[KMOE_MAX_RANK];        /* this rank's block */
  int64_t global_shape[KMOE_MAX_RANK]; /* the whole tensor over every rank */
  int32_t is_expert;                   /* 1: experts stacked on axis 0; 0: dense */
  int32_t first_expert;                /* this rank's first global expert (expert entries) */
} kmoe_parameter_info;

KMOE_API kmoe_status kmoe_layer_parameter_count(const kmoe_layer* layer, int64_t* count);
/* The trainable parameter at index (0 ≤ index < count, registry order). */
KMOE_API kmoe_status kmoe_layer_parameter_info(const kmoe_layer* layer, int64_t index, kmoe_parameter_info* info);
/* This rank's block of parameter `name` into / from caller memory of its shape and the layer's dtype. */
KMOE_API kmoe_status kmoe_layer_get_parameter(kmoe_layer* layer, const char* name, const kmoe_tensor* into);
KMOE_API kmoe_status kmoe_layer_set_parameter(kmoe_layer* layer, const char* name, const kmoe_tensor* from);
KMOE_API kmoe_status kmoe_layer_get_gradient(kmoe_layer* layer, const char* name, const kmoe_tensor* into);
KMOE_API kmoe_status kmoe_layer_zero_grad(kmoe_layer* layer);
/* Sums the dense parameters' gradients over the ranks (kmoe_optimizer_step does it itself). */
KMOE_API kmoe_status kmoe_layer_all_reduce_gradients(kmoe_layer* layer);

/* ---- compute ------------------------------------------------------------------------------- */

/* Forward of input (the family's x in the layer's dtype, or [B, T] KMOE_INT32 token ids for
 * moeut_lm); training enables dropout and the training losses. *state holds the output and what
 * backward needs; several may be alive at once. An input that kmoe reads in place must stay
 * unchanged while the state lives. */
KMOE_API kmoe_status kmoe_layer_forward(kmoe_layer* layer, const kmoe_tensor* input, int32_t training,
                                        kmoe_forward** state);
/* Inference: an eval forward (no dropout, no training losses) that keeps nothing for backward, its
 * output written to output (the input's shape; [B, T, vocab] for moeut_lm). Uses less device
 * memory than kmoe_layer_forward + kmoe_forward_output: MoEUT keeps one layer's activations, not
 * the stack's. */
KMOE_API kmoe_status kmoe_layer_infer(kmoe_layer* layer, const kmoe_tensor* input, const kmoe_tensor* output);
KMOE_API kmoe_status kmoe_forward_output_shape(const kmoe_forward* state, int32_t* rank, int64_t* shape);
KMOE_API kmoe_status kmoe_forward_output(const kmoe_forward* state, const kmoe_tensor* into);
/* An auxiliary loss by name: "reg_loss" (σ-MoE, MoEUT), "balance_loss", "router_z_loss",
 * "total_aux_loss" (ST-MoE); "aux_loss" is the one that backward's aux_weight multiplies (0 for
 * Soft MoE). A name the family does not report is KMOE_INVALID_ARGUMENT. */
KMOE_API kmoe_status kmoe_forward_loss(const kmoe_forward* state, const char* name, double* value);
/* Backward of grad_output (the output's shape); grad_input (may be NULL; must be NULL for token
 * inputs) gets the input gradient. Parameter gradients accumulate. */
KMOE_API kmoe_status kmoe_layer_backward(kmoe_layer* layer, const kmoe_forward* state, const kmoe_tensor* grad_output,
                                         double aux_weight, const kmoe_tensor* grad_input);
KMOE_API kmoe_status kmoe_forward_destroy(kmoe_forward* state);

/* ---- optimizer ----------------------------------------------------------------------------- */

typedef struct kmoe_adamw_options {
  size_t struct_size;
  double lr, beta1, beta2, eps, weight_decay; /* defaults: 1e-3, 0.9, 0.999, 1e-8, 0.01 (PyTorch's) */
} kmoe_adamw_options;
KMOE_API kmoe_status kmoe_adamw_options_init(kmoe_adamw_options* options);

KMOE_API kmoe_status kmoe_optimizer_create(kmoe_layer* layer, const kmoe_adamw_options* options,
                                           kmoe_optimizer** optimizer);
/* One AdamW step over the layer's gradients (dense gradients summed over the ranks first). */
KMOE_API kmoe_status kmoe_optimizer_step(kmoe_optimizer* optimizer);
KMOE_API kmoe_status kmoe_optimizer_destroy(kmoe_optimizer* optimizer);

#ifdef __cplusplus
}
#endif

#endif /* KMOE_H */
