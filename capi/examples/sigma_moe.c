/* kmoe from C: build a σ-MoE from JSON, load a checkpoint (when given), run forward and backward
 * and one AdamW step, save. Runs alone or under mpirun (the experts are placed over the ranks,
 * each rank brings its own tokens).
 *
 *   sigma_moe_c [IN.h5] OUT.h5 */
#include <kmoe.h>
#include <mpi.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#define TRY(call)                                                                           \
  do {                                                                                      \
    const kmoe_status status_ = (call);                                                     \
    if (status_ != KMOE_OK) {                                                               \
      fprintf(stderr, "%s failed: %s: %s\n", #call, kmoe_status_name(status_), kmoe_last_error()); \
      MPI_Abort(MPI_COMM_WORLD, 1);                                                         \
    }                                                                                       \
  } while (0)

enum { TOKENS = 32, DMODEL = 16 };

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, ranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  if (argc < 2 || argc > 3) {
    if (rank == 0) fprintf(stderr, "usage: %s [IN.h5] OUT.h5\n", argv[0]);
    MPI_Finalize();
    return 2;
  }
  const char* in = argc == 3 ? argv[1] : NULL;
  const char* out = argv[argc - 1];

  TRY(kmoe_initialize());
  kmoe_layer_options options;
  TRY(kmoe_layer_options_init(&options));
  options.seed = 42;
  options.use_comm = 1;
  options.comm = (int32_t)MPI_Comm_c2f(MPI_COMM_WORLD);
  kmoe_layer* layer = NULL;
  TRY(kmoe_layer_create("sigma_moe", "{\"dmodel\": 16, \"n_experts\": 4, \"expert_size\": 8, \"k\": 2}", &options,
                        &layer));
  kmoe_optimizer* optimizer = NULL;
  kmoe_adamw_options adamw;
  TRY(kmoe_adamw_options_init(&adamw));
  adamw.lr = 1e-2;
  TRY(kmoe_optimizer_create(layer, &adamw, &optimizer));
  if (in != NULL) TRY(kmoe_layer_load(layer, optimizer, in));

  /* This rank's tokens, row-major [TOKENS, DMODEL]. */
  static float x[TOKENS * DMODEL], y[TOKENS * DMODEL], dy[TOKENS * DMODEL], dx[TOKENS * DMODEL];
  for (int i = 0; i < TOKENS * DMODEL; ++i) {
    x[i] = sinf(0.05f * (float)(i + rank * TOKENS * DMODEL));
    dy[i] = 0.1f * cosf(0.03f * (float)i);
  }
  kmoe_tensor tx = {sizeof(kmoe_tensor), KMOE_FLOAT32, 2, {TOKENS, DMODEL}, {0}, x, KMOE_HOST};
  kmoe_tensor ty = tx, tdy = tx, tdx = tx;
  ty.data = y;
  tdy.data = dy;
  tdx.data = dx;

  kmoe_forward* state = NULL;
  TRY(kmoe_layer_forward(layer, &tx, 1, &state));
  TRY(kmoe_forward_output(state, &ty));
  double reg_loss = 0;
  TRY(kmoe_forward_loss(state, "reg_loss", &reg_loss));
  TRY(kmoe_layer_backward(layer, state, &tdy, 1.0, &tdx));
  TRY(kmoe_forward_destroy(state));
  TRY(kmoe_optimizer_step(optimizer));
  TRY(kmoe_layer_save(layer, optimizer, out));

  double sum = 0;
  for (int i = 0; i < TOKENS * DMODEL; ++i) sum += y[i] * dy[i];
  double total = 0;
  MPI_Allreduce(&sum, &total, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  if (rank == 0)
    printf("sigma_moe (C, %d rank%s): loaded %s, sum(y*dy) = %.6f, reg_loss = %.6f, one AdamW step, saved %s\n",
           ranks, ranks == 1 ? "" : "s", in != NULL ? in : "nothing", total, reg_loss, out);

  TRY(kmoe_optimizer_destroy(optimizer));
  TRY(kmoe_layer_destroy(layer));
  TRY(kmoe_finalize());
  MPI_Finalize();
  return 0;
}
