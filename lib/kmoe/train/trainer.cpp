#include "kmoe/train/trainer.hpp"

#include "kmoe/core/random.hpp"
#include "kmoe/dist/gradients.hpp"
#include "kmoe/dist/parameter_blocks.hpp"
#include "kmoe/dist/placement.hpp"
#include "kmoe/io/checkpoint.hpp"
#include "kmoe/io/matrix_dataset.hpp"
#include "kmoe/io/token_dataset.hpp"
#include "kmoe/layers/moeut.hpp"
#include "kmoe/model/builder.hpp"
#include "kmoe/model/optimizer.hpp"
#include "kmoe/ops/cross_entropy.hpp"

#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <map>
#include <sstream>
#include <tuple>
#include <vector>

namespace kmoe::train {

namespace {

volatile std::sig_atomic_t stop_flag = 0;

using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

// The model's config: the profile's (if any), the config's keys over it, n_tokens from the data.
nlohmann::json model_config_for(const TrainConfig& c, int vocabulary) {
  nlohmann::json config = nlohmann::json::object();
  if (!c.profile.empty()) {
    require(c.model == "moeut_lm", Status::invalid_argument, "profile = '", c.profile, "' names a MoEUT profile; model ",
            c.model, " takes its sizes from model_config");
    config = model::write_fields(layers::moeut_fields(true), layers::moeut_profile(c.profile, vocabulary));
  }
  for (const auto& [key, value] : c.model_config.items()) config[key] = value;
  if (!config.contains("n_tokens")) config["n_tokens"] = vocabulary;
  require(config["n_tokens"].is_number_integer() && config["n_tokens"].get<std::int64_t>() >= vocabulary,
          Status::invalid_argument, "model_config: n_tokens = ", config["n_tokens"].dump(), " is smaller than the ",
          "data's vocabulary of ", vocabulary, " tokens");
  if (c.model == "moe_lm") {
    if (!config.contains("max_seq_len")) config["max_seq_len"] = c.seq_len;
    require(config["max_seq_len"].is_number_integer() && config["max_seq_len"].get<std::int64_t>() >= c.seq_len,
            Status::invalid_argument, "model_config: max_seq_len = ", config["max_seq_len"].dump(),
            " is shorter than seq_len = ", c.seq_len);
  }
  return config;
}

// The first token of sequence g (global index over the ranks) of batch `index`: keyed by the
// batch and the sequence, so any world size reads the same windows.
std::int64_t window_start(std::uint64_t seed, std::uint64_t stream, std::int64_t index, std::int64_t g,
                          std::int64_t tokens, std::int64_t length) {
  std::uint32_t r[4];
  impl::philox4x32(seed ^ stream, (static_cast<std::uint64_t>(index) << 24) + static_cast<std::uint64_t>(g), r);
  const std::uint64_t draw = (static_cast<std::uint64_t>(r[0]) << 32) | r[1];
  return static_cast<std::int64_t>(draw % static_cast<std::uint64_t>(tokens - length));
}

struct Batch {
  Tensor<int> inputs, targets;  // [b, T] and [b·T]
};

Batch read_batch(const io::TokenDataset& data, std::uint64_t seed, std::uint64_t stream, std::int64_t index,
                 std::int64_t first_sequence, std::int64_t b, std::int64_t T) {
  std::vector<int> inputs, targets;
  for (std::int64_t i = 0; i < b; ++i) {
    const std::int64_t start = window_start(seed, stream, index, first_sequence + i, data.size(), T + 1);
    const std::vector<int> window = data.read(start, T + 1);
    inputs.insert(inputs.end(), window.begin(), window.end() - 1);
    targets.insert(targets.end(), window.begin() + 1, window.end());
  }
  return {Tensor<int>::from_host("train::inputs", {b, T}, inputs), Tensor<int>::from_host("train::targets", {b * T}, targets)};
}

// The mean next-token cross-entropy over every rank's tokens of these logits; with dlogits, also
// its gradient (this rank's share of the global mean).
double global_cross_entropy(const dist::Communicator& comm, const Tensor<float>& logits, const Tensor<int>& targets,
                            Tensor<float>* dlogits) {
  const index_t N = targets.size(), V = logits.dim(logits.rank() - 1);
  const Tensor<float> rows = logits.reshape({N, V});
  const auto row_lse = Tensor<float>::uninitialized("train::row_lse", {N});
  const double local_mean = ops::cross_entropy_forward<float>(rows.as_matrix(), targets.flat(), -100, row_lse.flat());
  double sums[2] = {local_mean * static_cast<double>(N), static_cast<double>(N)};
  comm.all_reduce_sum(sums, 2);
  if (dlogits != nullptr) {
    *dlogits = Tensor<float>::uninitialized("train::dlogits", logits.shape());
    ops::cross_entropy_backward<float>(rows.as_matrix(), targets.flat(), -100, row_lse.flat(),
                                       static_cast<float>(static_cast<double>(N) / sums[1]),
                                       dlogits->reshape({N, V}).as_matrix());
  }
  return sums[0] / sums[1];
}

// Entropy (nats) of the token frequencies of a split, read in blocks.
// [first, first + count) of n items: this rank's contiguous share.
std::pair<index_t, index_t> share_of(const dist::Communicator& comm, index_t n) {
  return dist::piece(n, comm.size(), comm.rank());
}

// Entropy (nats) of the token frequencies of a split: each rank counts its share, in blocks.
double unigram_entropy(const dist::Communicator& comm, const io::TokenDataset& data) {
  std::vector<double> counts(static_cast<std::size_t>(data.vocabulary()), 0);
  const auto [first, count] = share_of(comm, data.size());
  const std::int64_t block = std::int64_t(1) << 20;
  for (std::int64_t at = first; at < first + count; at += block)
    for (const int t : data.read(at, std::min(block, first + count - at))) counts[static_cast<std::size_t>(t)] += 1;
  comm.all_reduce_sum(counts.data(), counts.size());
  double h = 0;
  for (const double n : counts)
    if (n > 0) h -= n / static_cast<double>(data.size()) * std::log(n / static_cast<double>(data.size()));
  return h;
}

// The experts' load of a forward (LayerForward::expert_counts): max over the experts of the
// (token, expert) pairs routed to each, over their mean, summed over every rank (1 = even; 0 for
// a model that routes no tokens).
double expert_load_imbalance(const dist::Communicator& comm, const model::LayerForward<float>& forward) {
  std::vector<std::int64_t> counts = forward.expert_counts.to_host();
  comm.all_reduce_sum(counts.data(), counts.size());
  std::int64_t total = 0, most = 0;
  for (const std::int64_t c : counts) {
    total += c;
    most = std::max(most, c);
  }
  return total > 0 ? static_cast<double>(most) * static_cast<double>(counts.size()) / static_cast<double>(total) : 0;
}

// What differs between the tasks: the data, the model's config fitted to it, and a batch's loss.
class Task {
 public:
  struct Result {
    model::LayerForward<float> forward;
    double loss = 0;
    Tensor<float> dout;  // the loss's gradient with respect to the output (training batches)
  };
  virtual ~Task() = default;
  virtual nlohmann::json model_config(const TrainConfig& c) const = 0;
  // Forward of batch `index` of the training split (or the eval split), its loss over every
  // rank's rows and, when asked, its gradient. The batch's rows: this rank's sequences
  // first_sequence + [0, batch_size) of the global batch.
  virtual Result run(model::Layer<float>& layer, bool eval_split, std::int64_t index, bool training, Generator& rng,
                     bool gradient) const = 0;
  virtual std::int64_t units_per_row() const = 0;  // tokens of a sequence (1 for a regression row)
  virtual double baseline_loss() const = 0;       // unigram entropy / the targets' variance
  double data_seconds() const { return data_seconds_; }  // spent reading batches so far

 protected:
  mutable double data_seconds_ = 0;
};

class LanguageModelling final : public Task {
 public:
  LanguageModelling(const TrainConfig& c, const dist::Communicator& comm, std::int64_t first_sequence)
      : c_(c), comm_(comm), first_(first_sequence), train_(c.data, "train"), eval_(c.data, "eval") {
    for (const io::TokenDataset* d : {&train_, &eval_})
      require(d->size() > c.seq_len + 1, Status::invalid_argument, c.data, ": a split holds ", d->size(),
              " tokens, too few for seq_len = ", c.seq_len);
  }
  nlohmann::json model_config(const TrainConfig& c) const override { return model_config_for(c, train_.vocabulary()); }
  Result run(model::Layer<float>& layer, bool eval_split, std::int64_t index, bool training, Generator& rng,
             bool gradient) const override {
    const auto start = Clock::now();
    const Batch batch = read_batch(eval_split ? eval_ : train_, static_cast<std::uint64_t>(c_.seed),
                                   eval_split ? 0xe7a1 : 0x7a1e, index, first_, c_.batch_size, c_.seq_len);
    if (!eval_split) data_seconds_ += std::chrono::duration<double>(Clock::now() - start).count();
    model::LayerInputs<float> in;
    in.tokens = batch.inputs;
    Result r;
    r.forward = layer.forward(in, training, rng);
    r.loss = global_cross_entropy(comm_, r.forward.out, batch.targets, gradient ? &r.dout : nullptr);
    return r;
  }
  std::int64_t units_per_row() const override { return c_.seq_len; }
  double baseline_loss() const override { return unigram_entropy(comm_, train_); }

 private:
  const TrainConfig& c_;
  const dist::Communicator& comm_;
  std::int64_t first_;
  io::TokenDataset train_, eval_;
};

// MSE regression of the targets on the inputs (rows of two HDF5 matrices); the last
// eval_fraction of the rows are held out.
class Regression final : public Task {
 public:
  Regression(const TrainConfig& c, const dist::Communicator& comm, std::int64_t first_sequence)
      : c_(c), comm_(comm), first_(first_sequence), inputs_(c.data, c.inputs), targets_(c.data, c.targets) {
    require(inputs_.rows() == targets_.rows(), Status::invalid_argument, c.data, ": /", c.inputs, " has ",
            inputs_.rows(), " rows but /", c.targets, " has ", targets_.rows());
    eval_rows_ = static_cast<std::int64_t>(static_cast<double>(inputs_.rows()) * c.eval_fraction);
    require(eval_rows_ >= 1 && eval_rows_ < inputs_.rows(), Status::invalid_argument, c.data, ": ", inputs_.rows(),
            " rows are too few to hold out eval_fraction = ", c.eval_fraction);
  }
  nlohmann::json model_config(const TrainConfig& c) const override {
    nlohmann::json config = c.model_config;
    for (const auto& [key, cols, what] : {std::tuple{"d_in", inputs_.cols(), c.inputs}, {"d_out", targets_.cols(), c.targets}}) {
      if (!config.contains(key)) config[key] = cols;
      require(config[key] == cols, Status::invalid_argument, "model_config: ", key, " = ", config[key].dump(),
              ", but /", what, " of ", c.data, " has ", cols, " columns");
    }
    return config;
  }
  Result run(model::Layer<float>& layer, bool eval_split, std::int64_t index, bool training, Generator& rng,
             bool gradient) const override {
    const auto start = Clock::now();
    const std::int64_t b = c_.batch_size, train_rows = inputs_.rows() - eval_rows_;
    std::vector<std::int64_t> rows;
    for (std::int64_t i = 0; i < b; ++i)
      rows.push_back((eval_split ? train_rows : 0) + window_start(static_cast<std::uint64_t>(c_.seed),
                                                                  eval_split ? 0xe7a1 : 0x7a1e, index, first_ + i,
                                                                  eval_split ? eval_rows_ : train_rows, 0));
    const std::vector<double> x = inputs_.read_row_set(rows), t = targets_.read_row_set(rows);
    if (!eval_split) data_seconds_ += std::chrono::duration<double>(Clock::now() - start).count();
    model::LayerInputs<float> in;
    in.x = Tensor<float>::from_host("train::x", {b, inputs_.cols()}, std::vector<float>(x.begin(), x.end()));
    require_finite(in.x, c_.data + ": /" + c_.inputs);
    Result r;
    r.forward = layer.forward(in, training, rng);
    const std::vector<float> y = r.forward.out.to_host();
    double sums[2] = {0, static_cast<double>(y.size())};
    for (std::size_t i = 0; i < y.size(); ++i) sums[0] += (y[i] - t[i]) * (y[i] - t[i]);
    comm_.all_reduce_sum(sums, 2);
    r.loss = sums[0] / sums[1];
    if (gradient) {
      std::vector<float> dy(y.size());
      for (std::size_t i = 0; i < y.size(); ++i) dy[i] = static_cast<float>(2 * (y[i] - t[i]) / sums[1]);
      r.dout = Tensor<float>::from_host("train::dy", r.forward.out.shape(), dy);
    }
    return r;
  }
  std::int64_t units_per_row() const override { return 1; }
  double baseline_loss() const override {
    // The targets' variance over the training rows (the MSE of predicting their mean): each rank
    // sums its share of the rows.
    const auto [first, count] = share_of(comm_, inputs_.rows() - eval_rows_);
    const std::vector<double> mine = targets_.read_rows(first, count);
    double sums[3] = {0, 0, static_cast<double>(mine.size())};
    for (const double v : mine) {
      sums[0] += v;
      sums[1] += v * v;
    }
    comm_.all_reduce_sum(sums, 3);
    const double mean = sums[0] / sums[2];
    return sums[1] / sums[2] - mean * mean;
  }

 private:
  const TrainConfig& c_;
  const dist::Communicator& comm_;
  std::int64_t first_, eval_rows_ = 0;
  io::MatrixDataset inputs_, targets_;
};

std::string checkpoint_path(const std::string& out_dir, std::int64_t step) {
  char name[64];
  std::snprintf(name, sizeof name, "checkpoint-%08lld.h5", static_cast<long long>(step));
  return (fs::path(out_dir) / name).string();
}

std::string format_seconds(double s) {
  std::ostringstream out;
  const auto total = static_cast<long long>(s + 0.5);
  if (total >= 3600) out << total / 3600 << "h" << std::setw(2) << std::setfill('0') << (total / 60) % 60 << "m";
  else if (total >= 60) out << total / 60 << "m" << std::setw(2) << std::setfill('0') << total % 60 << "s";
  else out << std::fixed << std::setprecision(1) << s << "s";
  return out.str();
}

// "rank 0: experts [0, 8) · rank 1: experts [8, 16)" of the placement a checkpoint records.
std::string describe_placement(const nlohmann::json& placement) {
  if (placement["world"].get<int>() == 1) return "every expert on rank 0";
  std::string text;
  for (std::size_t r = 0; r < placement["ranks"].size(); ++r) {
    const auto& p = placement["ranks"][r];
    text += (text.empty() ? "" : " · ") + std::string("rank ") + std::to_string(r) + ": experts [" +
            p["experts"][0].dump() + ", " + p["experts"][1].dump() + ")";
  }
  return text;
}

// The metrics file, one row per logged step; a resumed run keeps the rows up to its first step.
class Metrics {
 public:
  static constexpr const char* header = "step,loss,eval_loss,reg_loss,lr,grad_norm,tokens_per_s,elapsed_s,expert_load";
  Metrics(const std::string& path, std::int64_t resumed_step, bool writer) : path_(path), writer_(writer) {
    if (!writer_) return;
    std::vector<std::string> kept;
    std::ifstream old(path);
    std::string line;
    while (resumed_step > 0 && std::getline(old, line))
      if (!line.empty() && line.rfind("step", 0) != 0 && std::stoll(line) <= resumed_step) kept.push_back(line);
    out_.open(path, std::ios::trunc);
    require(out_.good(), Status::io_error, path, ": cannot write the metrics file");
    out_ << header << '\n';
    for (const std::string& k : kept) out_ << k << '\n';
    out_.flush();
  }
  void row(std::int64_t step, double loss, double eval_loss, double reg, double lr, double norm, double tps,
           double elapsed, double load) {
    if (!writer_) return;
    out_ << step << ',' << std::setprecision(9) << loss << ',';
    if (std::isfinite(eval_loss)) out_ << eval_loss;
    out_ << ',' << reg << ',' << lr << ',' << norm << ',' << tps << ',' << elapsed << ',' << load << '\n';
    out_.flush();
  }

 private:
  std::string path_;
  bool writer_;
  std::ofstream out_;
};

}  // namespace

void request_stop() { stop_flag = 1; }

namespace {

// A run's checkpoints (checkpoint-<step>.h5 in out_dir), oldest first (the zero-padded step
// sorts by name).
std::vector<std::string> checkpoints_in(const std::string& out_dir) {
  std::vector<std::string> all;
  if (!fs::is_directory(out_dir)) return all;
  for (const auto& entry : fs::directory_iterator(out_dir)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("checkpoint-", 0) == 0 && entry.path().extension() == ".h5") all.push_back(entry.path().string());
  }
  std::sort(all.begin(), all.end());
  return all;
}

}  // namespace

std::string newest_checkpoint(const std::string& out_dir) {
  const std::vector<std::string> all = checkpoints_in(out_dir);
  return all.empty() ? std::string() : all.back();
}

TrainSummary run_training(const TrainConfig& c, const dist::Communicator& comm, const TrainOptions& options) {
  const bool root = comm.rank() == 0;
  std::ostream* log = root ? options.log : nullptr;
  const auto say = [&](const std::string& text) {
    if (log != nullptr) *log << text << std::endl;
  };
  stop_flag = 0;
  TrainSummary summary;

  // Everything that can be wrong with the config, the data or a checkpoint is found before step 1.
  const bool fits = c.task == "lm" ? (c.model == "moeut_lm" || c.model == "moe_lm") : c.model == "moe_stack";
  require(fits, Status::invalid_argument, "model = '", c.model, "': the ", c.task, " task trains ",
          c.task == "lm" ? "model 'moeut_lm' or 'moe_lm'" : "model 'moe_stack'");
  const std::int64_t first_sequence = comm.exclusive_prefix_sum(c.batch_size);
  const std::int64_t global_batch = comm.sum(c.batch_size);
  std::unique_ptr<Task> task;
  comm.collectively([&] {
    if (c.task == "lm") {
      task = std::make_unique<LanguageModelling>(c, comm, first_sequence);
    } else {
      task = std::make_unique<Regression>(c, comm, first_sequence);
    }
    if (root) fs::create_directories(c.out_dir);
  });
  const nlohmann::json model_json = task->model_config(c);
  std::unique_ptr<model::Layer<float>> layer =
      model::build_layer<float>(c.model, model_json, static_cast<std::uint64_t>(c.seed), ParameterInit::drawn, comm);
  ops::AdamWConfig adamw;
  adamw.lr = c.lr;
  adamw.beta1 = c.beta1;
  adamw.beta2 = c.beta2;
  adamw.eps = c.eps;
  adamw.weight_decay = c.weight_decay;
  model::AdamW<float> optimizer(layer->parameters(), adamw);
  Generator rng(static_cast<std::uint64_t>(c.seed) + 1);
  std::int64_t step = 0;
  if (options.resume) {
    const std::string from = comm.broadcast(root ? newest_checkpoint(c.out_dir) : std::string());
    if (!from.empty()) {
      io::CheckpointRestore<float> restore;
      restore.optimizer = &optimizer;
      restore.rng = &rng;
      restore.step = &step;
      io::load_checkpoint(from, *layer, {}, restore);
      say("kmoe-train: resumed from " + from + " (step " + std::to_string(step) + ")");
    }
  }
  summary.first_step = step + 1;
  summary.baseline_loss = task->baseline_loss();
  const nlohmann::json placement = dist::placement_json(comm, model::trainable(layer->parameters()));
  summary.placement = describe_placement(placement);
  const auto parameters = model::trainable(layer->parameters());
  std::int64_t n_parameters = 0;
  for (const auto& p : parameters) n_parameters += p.global_shape().size();
  say("kmoe-train: " + c.model + " (" + std::to_string(n_parameters) + " parameters) on " +
      std::to_string(comm.size()) + " MPI rank" + (comm.size() > 1 ? "s" : "") + " — " + summary.placement);
  say("kmoe-train: " + std::to_string(global_batch) + " sequences × " + std::to_string(c.seq_len) +
      (c.task == "lm" ? " tokens" : " row") + " a step, steps " + std::to_string(step + 1) + "–" + std::to_string(c.steps) + "; writing to " +
      c.out_dir);

  Metrics metrics((fs::path(c.out_dir) / "metrics.csv").string(), step, root);
  summary.metrics_path = (fs::path(c.out_dir) / "metrics.csv").string();
  const auto evaluate = [&] {
    double total = 0;
    for (std::int64_t j = 0; j < c.eval_batches; ++j) {
      Generator eval_rng(0);
      total += task->run(*layer, true, j, false, eval_rng, false).loss;
    }
    return total / static_cast<double>(c.eval_batches);
  };
  // The newest checkpoint on disk, named when a step fails (a resumed run's until it writes one).
  std::string last_good = newest_checkpoint(c.out_dir);
  const auto save = [&](std::int64_t at) {
    io::CheckpointExtras<float> extras;
    extras.optimizer = &optimizer;
    extras.rng = &rng;
    extras.step = at;
    extras.train = {{"config", model::write_fields(train_config_fields(), c)}, {"world", comm.size()}};
    const std::string path = checkpoint_path(c.out_dir, at);
    io::save_checkpoint(path, *layer, extras);
    summary.last_checkpoint = last_good = path;
    if (!root) return;
    const std::vector<std::string> all = checkpoints_in(c.out_dir);
    for (std::size_t i = 0; i + static_cast<std::size_t>(c.keep_checkpoints) < all.size(); ++i) fs::remove(all[i]);
  };

  const auto start = Clock::now();
  auto interval_start = start;
  // Where the run's time goes: the step's compute, and what the driver adds around it.
  double eval_s = 0, checkpoint_s = 0, log_s = 0;
  const auto seconds_since = [](Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); };
  std::int64_t interval_tokens = 0, run_tokens = 0;
  double last_eval = NAN, reg = 0, norm = 0, loss = 0, load = 0;
  bool have_initial = false;
  while (step < c.steps) {
    ++step;
    const double lr = learning_rate(c, step);
    optimizer.set_learning_rate(lr);
    auto mark = Clock::now();
    layer->zero_grad();
    try {
      const Task::Result r = task->run(*layer, false, step, true, rng, true);
      loss = r.loss;
      reg = r.forward.losses.count("reg_loss") > 0 ? r.forward.losses.at("reg_loss") : r.forward.aux_loss;
      if (step % c.log_every == 0 || step == c.steps) load = expert_load_imbalance(comm, r.forward);
      require(std::isfinite(loss) && std::isfinite(reg), Status::non_finite, "the loss is ", loss, " (aux loss ", reg,
              ")");
      (void)layer->backward(r.forward, r.dout, static_cast<float>(c.aux_weight));
      dist::all_reduce_dense_gradients(comm, layer->parameters());
      norm = dist::clip_gradients_by_global_norm(comm, parameters, c.clip_norm);
      require(std::isfinite(norm), Status::non_finite, "the gradient norm is ", norm);
    } catch (const Error& e) {
      if (e.status() != Status::non_finite) throw;
      fail(Status::non_finite, "step ", step, ": ", e.what(), "; stopped (the last good checkpoint is ",
           last_good.empty() ? std::string("none") : last_good, ")");
    }
    optimizer.step();
    if (!have_initial) {
      summary.initial_loss = loss;
      have_initial = true;
    }
    interval_tokens += global_batch * task->units_per_row();
    run_tokens += global_batch * task->units_per_row();

    const bool stopping = comm.sum(stop_flag != 0 ? 1 : 0) > 0 || (options.stop_after > 0 && step == options.stop_after && step < c.steps);
    const bool last = step == c.steps || stopping;
    mark = Clock::now();
    if (step % c.eval_every == 0 || last) last_eval = evaluate();
    eval_s += seconds_since(mark);
    mark = Clock::now();
    if (step % c.log_every == 0 || last) {
      const double now = std::chrono::duration<double>(Clock::now() - start).count();
      const double span = std::chrono::duration<double>(Clock::now() - interval_start).count();
      const double tps = span > 0 ? static_cast<double>(interval_tokens) / span : 0;
      const double per_step = now / static_cast<double>(step - summary.first_step + 1);
      std::ostringstream line;
      line << "step " << step << "/" << c.steps << " | loss " << std::fixed << std::setprecision(4) << loss
           << " | eval " << (std::isfinite(last_eval) ? std::to_string(last_eval).substr(0, 6) : std::string("-"))
           << " | reg " << std::setprecision(4) << reg << " | lr " << std::scientific << std::setprecision(2) << lr
           << " | |g| " << std::fixed << std::setprecision(3) << norm;
      if (load > 0) line << " | load " << std::setprecision(2) << load;
      line << " | " << std::setprecision(0) << tps
           << (c.task == "lm" ? " tok/s | " : " rows/s | ") << comm.size() << " rank" << (comm.size() > 1 ? "s" : "") << " | "
           << format_seconds(now) << " elapsed, ETA " << format_seconds(per_step * static_cast<double>(c.steps - step));
      if (options.progress_bar && log != nullptr) *log << "\r\033[K";
      say(line.str());
      metrics.row(step, loss, last_eval, reg, lr, norm, tps, now, load);
      interval_start = Clock::now();
      interval_tokens = 0;
    } else if (options.progress_bar && log != nullptr) {
      const int width = 30, done = static_cast<int>(width * step / c.steps);
      *log << "\r[" << std::string(static_cast<std::size_t>(done), '#')
           << std::string(static_cast<std::size_t>(width - done), ' ') << "] step " << step << "/" << c.steps
           << std::flush;
    }
    log_s += seconds_since(mark);
    mark = Clock::now();
    if (step % c.checkpoint_every == 0 || last) save(step);
    checkpoint_s += seconds_since(mark);
    if (stopping) {
      summary.stopped = true;
      say("kmoe-train: stopped on request after step " + std::to_string(step) + "; wrote " + summary.last_checkpoint);
      break;
    }
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  summary.last_step = step;
  summary.final_loss = loss;
  summary.final_eval_loss = last_eval;
  summary.tokens_per_second = seconds > 0 ? static_cast<double>(run_tokens) / seconds : 0;
  summary.seconds = seconds;
  summary.data_seconds = task->data_seconds();
  summary.eval_seconds = eval_s;
  summary.checkpoint_seconds = checkpoint_s;
  summary.log_seconds = log_s;
  return summary;
}

}  // namespace kmoe::train
