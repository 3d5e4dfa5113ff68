// kmoe-train's config (JSON): every key, its default and its check in one field table
// (model/config_fields.hpp), so unknown keys are errors naming the key and README's reference is
// this table. task "lm": next-token cross-entropy over a byte-level token dataset (kmoe-data);
// task "regression": the mean squared error of a moe_stack's outputs against HDF5 targets.
#pragma once

#include "kmoe/model/config_fields.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>

namespace kmoe::train {

struct TrainConfig {
  std::string task = "lm";           // "lm" (language modelling on token ids) | "regression"
  std::string model = "moeut_lm";    // the layer kind: moeut_lm or moe_lm (lm), moe_stack (regression)
  std::string profile;               // a MoEUT profile ("MoEUT_44M", ...) as the base config, or none
  nlohmann::json model_config = nlohmann::json::object();  // the model's config, over the profile's
  std::string data;                  // lm: token dataset (kmoe-data); regression: HDF5 with the matrices
  std::string inputs = "inputs";     // regression: the inputs' dataset [rows, d_in]
  std::string targets = "targets";   // regression: the targets' dataset [rows, d_out]
  double eval_fraction = 0.1;        // regression: the last rows held out
  std::int64_t seq_len = 64;         // tokens per sequence
  std::int64_t batch_size = 8;       // sequences per rank per step
  std::int64_t steps = 100;          // optimizer steps in all
  double lr = 3e-3;                  // peak learning rate, after warm-up
  double min_lr = 3e-4;              // the cosine's floor at the last step
  std::int64_t warmup_steps = 10;    // linear warm-up from 0
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.01;  // AdamW
  double clip_norm = 1.0;            // gradient clipping by global norm (0: none)
  double aux_weight = 1.0;           // weight of the model's auxiliary loss (MoEUT's reg_loss)
  std::int64_t log_every = 10;       // a progress line and a metrics row every this many steps
  std::int64_t eval_every = 50;      // held-out loss every this many steps (and at the end)
  std::int64_t eval_batches = 4;     // batches of batch_size sequences per evaluation and rank
  std::string out_dir = "kmoe-run";  // checkpoints, metrics.csv, loss.png
  std::int64_t checkpoint_every = 50;  // a checkpoint every this many steps (and at the end)
  std::int64_t keep_checkpoints = 3;   // the newest this many are kept
  std::int64_t seed = 1;             // parameters, dropout and the batches' positions
};

const model::FieldTable<TrainConfig>& train_config_fields();

// The config from JSON text (Status::invalid_argument naming a bad key, type or value); `where`
// names the file in messages.
TrainConfig parse_train_config(const std::string& text, const std::string& where);

// The learning rate of step s (1-based): linear warm-up to lr over warmup_steps, then a cosine to
// min_lr at the last step.
double learning_rate(const TrainConfig& c, std::int64_t step);

}  // namespace kmoe::train
