#include "kmoe/train/train_config.hpp"

#include <cmath>

namespace kmoe::train {

namespace {

using model::at_least;
using model::field;
using model::one_of;

std::function<void(const TrainConfig&, const std::string&)> not_empty(std::string TrainConfig::*member) {
  return [member](const TrainConfig& c, const std::string& where) {
    require(!(c.*member).empty(), Status::invalid_argument, where, " must be given");
  };
}

}  // namespace

const model::FieldTable<TrainConfig>& train_config_fields() {
  using C = TrainConfig;
  static const model::FieldTable<C> table = {
      field("task", &C::task, one_of(&C::task, {"lm", "regression"}, "kmoe-train")),
      field("model", &C::model, one_of(&C::model, {"moeut_lm", "moe_lm", "moe_stack"}, "kmoe-train")),
      field("profile", &C::profile),
      model::object_field("model_config", &C::model_config),
      field("data", &C::data, not_empty(&C::data)),
      field("inputs", &C::inputs, not_empty(&C::inputs)),
      field("targets", &C::targets, not_empty(&C::targets)),
      field("eval_fraction", &C::eval_fraction, model::probability(&C::eval_fraction)),
      field("seq_len", &C::seq_len, at_least(&C::seq_len, std::int64_t(1))),
      field("batch_size", &C::batch_size, at_least(&C::batch_size, std::int64_t(1))),
      field("steps", &C::steps, at_least(&C::steps, std::int64_t(1))),
      field("lr", &C::lr, model::finite_positive(&C::lr)),
      field("min_lr", &C::min_lr, model::finite_non_negative(&C::min_lr)),
      field("warmup_steps", &C::warmup_steps, at_least(&C::warmup_steps, std::int64_t(0))),
      field("beta1", &C::beta1, model::probability(&C::beta1)),
      field("beta2", &C::beta2, model::probability(&C::beta2)),
      field("eps", &C::eps, model::finite_positive(&C::eps)),
      field("weight_decay", &C::weight_decay, model::finite_non_negative(&C::weight_decay)),
      field("clip_norm", &C::clip_norm, model::finite_non_negative(&C::clip_norm)),
      field("aux_weight", &C::aux_weight, model::finite_non_negative(&C::aux_weight)),
      field("log_every", &C::log_every, at_least(&C::log_every, std::int64_t(1))),
      field("eval_every", &C::eval_every, at_least(&C::eval_every, std::int64_t(1))),
      field("eval_batches", &C::eval_batches, at_least(&C::eval_batches, std::int64_t(1))),
      field("out_dir", &C::out_dir, not_empty(&C::out_dir)),
      field("checkpoint_every", &C::checkpoint_every, at_least(&C::checkpoint_every, std::int64_t(1))),
      field("keep_checkpoints", &C::keep_checkpoints, at_least(&C::keep_checkpoints, std::int64_t(1))),
      field("seed", &C::seed, at_least(&C::seed, std::int64_t(0))),
  };
  return table;
}

TrainConfig parse_train_config(const std::string& text, const std::string& where) {
  nlohmann::json json;
  try {
    json = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    fail(Status::invalid_argument, where, ": not valid JSON: ", e.what());
  }
  require(json.is_object(), Status::invalid_argument, where, ": the config must be a JSON object");
  return model::read_fields(train_config_fields(), json, where);
}

double learning_rate(const TrainConfig& c, std::int64_t step) {
  if (c.warmup_steps > 0 && step <= c.warmup_steps)
    return c.lr * static_cast<double>(step) / static_cast<double>(c.warmup_steps);
  const double span = static_cast<double>(std::max<std::int64_t>(c.steps - c.warmup_steps, 1));
  const double progress = std::min(1.0, static_cast<double>(step - c.warmup_steps) / span);
  return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1 + std::cos(M_PI * progress));
}

}  // namespace kmoe::train
