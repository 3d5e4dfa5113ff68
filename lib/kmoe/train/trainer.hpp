// The training loop behind kmoe-train: a model from the config, each rank's batches read from the
// token dataset (its own windows only), AdamW with warm-up + cosine and clipping by the global
// gradient norm, a held-out evaluation, metrics (CSV), checkpoints kept crash-safely, resuming
// (also at another world size), a clean stop on request (SIGINT / SIGTERM) and an error naming
// the step on a non-finite loss. Collective over comm.
#pragma once

#include "kmoe/dist/communicator.hpp"
#include "kmoe/train/train_config.hpp"

#include <cstdint>
#include <ostream>
#include <string>

namespace kmoe::train {

struct TrainOptions {
  bool resume = false;        // continue from the newest checkpoint in out_dir (if there is one)
  std::ostream* log = nullptr;  // progress lines (rank 0; null: none)
  bool progress_bar = false;  // a live bar between the lines (a terminal)
  std::int64_t stop_after = 0;  // > 0: stop after this step as on request_stop()
};

struct TrainSummary {
  std::int64_t first_step = 0, last_step = 0;  // the steps this run took (first_step - 1 was resumed)
  double initial_loss = 0, final_loss = 0, final_eval_loss = 0;
  double tokens_per_second = 0;   // of all ranks, over this run
  // What a model that learned nothing scores: the unigram entropy of the training tokens (nats;
  // lm), the variance of the training targets (regression).
  double baseline_loss = 0;
  std::string last_checkpoint, metrics_path;
  bool stopped = false;           // ended early by request_stop()
  std::string placement;          // how the experts sit on the ranks (kmoe-inspect's words)
  // Wall time of this run (rank 0), and of it what the driver spent outside the steps' compute:
  // reading batches, evaluating, writing checkpoints, logging (and the metrics file).
  double seconds = 0, data_seconds = 0, eval_seconds = 0, checkpoint_seconds = 0, log_seconds = 0;
};

TrainSummary run_training(const TrainConfig& config, const dist::Communicator& comm, const TrainOptions& options);

// Asks the running training to stop after its current step, write a checkpoint and return
// (async-signal-safe: for SIGINT / SIGTERM handlers).
void request_stop();

// The newest checkpoint of a run's folder ("" when there is none).
std::string newest_checkpoint(const std::string& out_dir);

}  // namespace kmoe::train
