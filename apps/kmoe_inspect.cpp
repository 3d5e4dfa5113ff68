// kmoe-inspect: shows what a kmoe checkpoint (io/checkpoint.hpp, format v1) holds, verifies it,
// and compares two of them.
//
//   kmoe-inspect [--json] [--verify] CHECKPOINT.h5
//       The root attributes (model, config, format, dtype, kmoe version, created, step), one row
//       per parameter (name, shape, dtype, dense / expert range, min, max, mean, std, L2 norm,
//       NaN and Inf counts), totals and the optional parts (/optimizer, /rng, /train).
//       --verify also reads /optimizer and /rng (Fletcher32 checksums are checked on every read)
//       and checks the parameters against the config: the layer the config builds must have
//       exactly the stored parameters, with their shapes; non-finite values are findings too.
//   kmoe-inspect [--json] --diff A.h5 B.h5
//       Per dataset present in both, the max abs and relative L2 difference; datasets in only one
//       or with different shapes; differing model / config / dtype attributes.
//
// Every dataset is read once, and its statistics come from the same pass over the values
// (blocks in cache, merged by Chan et al.'s update of Welford's mean and M2).
//
// Exit status: 0 good (--diff: identical); 1 corrupt or inconsistent (--diff: some difference);
// 2 not a kmoe checkpoint, unreadable, or a usage error.
#include "kmoe/core/error.hpp"
#include "kmoe/io/checkpoint.hpp"
#include "kmoe/model/builder.hpp"
#include "options.hpp"

#include <Kokkos_Core.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <iostream>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

using namespace kmoe;
using nlohmann::json;

namespace {

constexpr int exit_good = 0;
constexpr int exit_bad = 1;       // corrupt, inconsistent; --diff: different
constexpr int exit_unusable = 2;  // not a kmoe checkpoint, unreadable, usage

const char* const app = "kmoe-inspect";

void print_usage(std::FILE* to) {
  std::fprintf(to,
               "usage: kmoe-inspect [--json] [--verify] CHECKPOINT.h5\n"
               "       kmoe-inspect [--json] --diff A.h5 B.h5\n"
               "Shows a kmoe checkpoint (format v1): model, config, format version, dtype, kmoe version,\n"
               "created, step; per parameter its shape, dtype, dense or expert range, min, max, mean, std,\n"
               "L2 norm and NaN / Inf counts; totals; whether /optimizer, /rng and /train exist.\n"
               "  --verify  also read every dataset under /optimizer and /rng (checksums are verified on\n"
               "            every read) and check the parameters against the config: the layer the config\n"
               "            builds must have exactly the stored parameters with their shapes, and every\n"
               "            value must be finite\n"
               "  --diff    compare two checkpoints: max abs and relative L2 difference\n"
               "            (|A-B| / max(|A|, |B|)) of every dataset in both, datasets in only one or\n"
               "            with different shapes, and differing model / config / dtype\n"
               "  --json    the same information as one JSON object on stdout\n"
               "Exit status: 0 good (--diff: identical), 1 corrupt or inconsistent (--diff: different),\n"
               "2 not a kmoe checkpoint, unreadable, or a usage error.\n");
}

void print_error(const std::string& message) {
  std::fflush(stdout);  // keep the order of the lines when stdout and stderr are one stream
  std::fprintf(stderr, "%s: %s\n", app, message.c_str());
}

// ---- statistics -------------------------------------------------------------------------

// Count, min, max, mean and M2 of the finite values, and the NaN / Inf counts.
struct Stats {
  std::uint64_t count = 0;   // every value
  std::uint64_t finite = 0;  // the values min ... l2 describe
  std::uint64_t nan = 0;
  std::uint64_t inf = 0;
  double min = std::numeric_limits<double>::quiet_NaN();
  double max = std::numeric_limits<double>::quiet_NaN();
  double mean = std::numeric_limits<double>::quiet_NaN();
  double m2 = 0;  // sum of squared deviations from the mean

  double std_dev() const { return finite > 0 ? std::sqrt(m2 / static_cast<double>(finite)) : std::nan(""); }
  // sum x^2 = M2 + n mean^2: two non-negative terms, no cancellation.
  double l2() const { return finite > 0 ? std::sqrt(m2 + static_cast<double>(finite) * mean * mean) : 0.0; }
  bool all_finite() const { return nan == 0 && inf == 0; }

  // Another part's counts and summary.
  void absorb(const Stats& other) {
    count += other.count;
    nan += other.nan;
    inf += other.inf;
    merge(other.finite, other.min, other.max, other.mean, other.m2);
  }

  // Chan, Golub & LeVeque's combination of two partial results.
  void merge(std::uint64_t n, double block_min, double block_max, double block_mean, double block_m2) {
    if (n == 0) return;
    if (finite == 0) {
      finite = n;
      min = block_min;
      max = block_max;
      mean = block_mean;
      m2 = block_m2;
      return;
    }
    const double na = static_cast<double>(finite), nb = static_cast<double>(n), total = na + nb;
    const double delta = block_mean - mean;
    mean += delta * (nb / total);
    m2 += block_m2 + delta * delta * (na * nb / total);
    min = std::min(min, block_min);
    max = std::max(max, block_max);
    finite += n;
  }
};

// Adds `size` values to stats in one pass: blocks small enough to stay in L1 are summarised
// exactly (their mean, then M2 about it) and merged into the running result.
template <class V>
void add_span(Stats& stats, const V* data, std::size_t size) {
  constexpr std::size_t block = 2048;
  stats.count += size;
  for (std::size_t begin = 0; begin < size; begin += block) {
    const std::size_t n = std::min(block, size - begin);
    const V* x = data + begin;
    // Four independent accumulators: the additions do not wait on each other.
    double s[4] = {0, 0, 0, 0};
    double lo[4], hi[4];
    for (int l = 0; l < 4; ++l) lo[l] = hi[l] = static_cast<double>(x[0]);
    std::size_t i = 0;
    for (; i + 4 <= n; i += 4) {
      for (int l = 0; l < 4; ++l) {
        const double v = static_cast<double>(x[i + l]);
        s[l] += v;
        lo[l] = v < lo[l] ? v : lo[l];
        hi[l] = v > hi[l] ? v : hi[l];
      }
    }
    for (; i < n; ++i) {
      const double v = static_cast<double>(x[i]);
      s[0] += v;
      lo[0] = v < lo[0] ? v : lo[0];
      hi[0] = v > hi[0] ? v : hi[0];
    }
    const double sum = (s[0] + s[1]) + (s[2] + s[3]);
    if (std::isfinite(sum)) {  // no NaN or Inf in the block (they would make the sum non-finite)
      const double block_mean = sum / static_cast<double>(n);
      double q[4] = {0, 0, 0, 0};
      i = 0;
      for (; i + 4 <= n; i += 4) {
        for (int l = 0; l < 4; ++l) {
          const double d = static_cast<double>(x[i + l]) - block_mean;
          q[l] += d * d;
        }
      }
      for (; i < n; ++i) {
        const double d = static_cast<double>(x[i]) - block_mean;
        q[0] += d * d;
      }
      stats.merge(n, std::min(std::min(lo[0], lo[1]), std::min(lo[2], lo[3])),
                  std::max(std::max(hi[0], hi[1]), std::max(hi[2], hi[3])), block_mean, (q[0] + q[1]) + (q[2] + q[3]));
    } else {  // rare: the block holds NaN / Inf (or finite values whose sum overflows)
      std::uint64_t m = 0;
      double b_sum = 0, b_lo = std::numeric_limits<double>::infinity(), b_hi = -b_lo;
      for (std::size_t j = 0; j < n; ++j) {
        const double v = static_cast<double>(x[j]);
        if (std::isnan(v)) {
          ++stats.nan;
        } else if (std::isinf(v)) {
          ++stats.inf;
        } else {
          ++m;
          b_sum += v;
          b_lo = std::min(b_lo, v);
          b_hi = std::max(b_hi, v);
        }
      }
      if (m == 0) continue;
      const double block_mean = b_sum / static_cast<double>(m);
      double b_m2 = 0;
      for (std::size_t j = 0; j < n; ++j) {
        const double v = static_cast<double>(x[j]);
        if (std::isfinite(v)) b_m2 += (v - block_mean) * (v - block_mean);
      }
      stats.merge(m, b_lo, b_hi, block_mean, b_m2);
    }
  }
}

// add_span over spans of 64 Ki values in parallel on the host threads; the spans are fixed and
// merged in order, so the result does not depend on the thread count.
template <class V>
void add_values(Stats& stats, const V* data, std::size_t size) {
  constexpr std::size_t span = 65536;
  const std::size_t spans = (size + span - 1) / span;
  if (spans <= 1) return add_span(stats, data, size);
  std::vector<Stats> parts(spans);
  Kokkos::parallel_for(
      "kmoe-inspect::stats", Kokkos::RangePolicy<Kokkos::DefaultHostExecutionSpace>(0, spans), [&](const std::size_t i) {
        add_span(parts[i], data + i * span, std::min(span, size - i * span));
      });
  for (const Stats& part : parts) stats.absorb(part);
}

json stats_json(const Stats& s) {
  // nlohmann writes NaN / Inf as null.
  return {{"count", s.count}, {"min", s.min}, {"max", s.max}, {"mean", s.mean}, {"std", s.std_dev()},
          {"l2", s.l2()},     {"nan", s.nan}, {"inf", s.inf}};
}

// ---- formatting -------------------------------------------------------------------------

std::string format_number(double v) {
  char text[32];
  std::snprintf(text, sizeof text, "%.6g", v);
  return text;
}

// "0-3", "0-3,8-11", "5".
std::string expert_ranges(const std::vector<int>& experts) {
  std::string text;
  for (std::size_t i = 0; i < experts.size();) {
    std::size_t j = i;
    while (j + 1 < experts.size() && experts[j + 1] == experts[j] + 1) ++j;
    if (!text.empty()) text += ",";
    text += std::to_string(experts[i]);
    if (j > i) text += "-" + std::to_string(experts[j]);
    i = j + 1;
  }
  return text;
}

std::string kind_text(const io::StoredTensor& t) {
  if (t.kind == "expert") return t.experts.empty() ? "expert" : "expert " + expert_ranges(t.experts);
  return t.kind.empty() ? "-" : t.kind;
}

std::size_t element_bytes(const std::string& dtype) {
  if (dtype == "float32" || dtype == "int32" || dtype == "uint32") return 4;
  if (dtype == "float64" || dtype == "int64" || dtype == "uint64") return 8;
  if (dtype == "int16" || dtype == "uint16") return 2;
  if (dtype == "int8" || dtype == "uint8") return 1;
  return 0;
}

// Opens the checkpoint, or prints why it cannot be used and returns null with `failure` set to the
// exit status: 1 for a damaged (truncated) file, 2 for a missing, foreign or unreadable one.
std::unique_ptr<io::CheckpointReader> open_checkpoint(const std::string& path, int& failure) {
  failure = exit_unusable;
  try {
    if (!std::filesystem::exists(path)) {
      print_error(path + ": no such file");
      return nullptr;
    }
    return std::make_unique<io::CheckpointReader>(path);
  } catch (const Error& e) {
    if (e.status() == Status::corrupt_file) failure = exit_bad;
    print_error(e.what());
  } catch (const std::exception& e) {
    print_error(e.what());
  }
  return nullptr;
}

// Errors from the reader start with the file's path; messages here name it once.
std::string without_path_prefix(const std::string& message, const std::string& path) {
  const std::string prefix = path + ": ";
  return message.compare(0, prefix.size(), prefix) == 0 ? message.substr(prefix.size()) : message;
}

struct Table {
  std::vector<std::vector<std::string>> rows;  // rows[0]: the header
  std::vector<bool> right;                     // right-aligned columns

  void print(const std::string& indent) const {
    std::vector<std::size_t> width(rows.empty() ? 0 : rows[0].size(), 0);
    for (const auto& row : rows)
      for (std::size_t c = 0; c < row.size() && c < width.size(); ++c) width[c] = std::max(width[c], row[c].size());
    for (const auto& row : rows) {
      std::string line = indent;
      for (std::size_t c = 0; c < row.size(); ++c) {
        const std::size_t pad = c < width.size() ? width[c] - std::min(width[c], row[c].size()) : 0;
        const bool r = c < right.size() && right[c];
        if (c > 0) line += "  ";
        if (r) line += std::string(pad, ' ');
        line += row[c];
        if (!r && c + 1 < row.size()) line += std::string(pad, ' ');
      }
      std::printf("%s\n", line.c_str());
    }
  }
};

// ---- reading one dataset ------------------------------------------------------------------

// Reads the dataset once, a chunk at a time (float32 data as float, to halve the memory traffic;
// everything else as double), and summarises it in the same pass. A failed read returns false
// with the reader's message (which names the dataset).
bool read_stats(const io::CheckpointReader& reader, const io::StoredTensor& t, Stats& stats, std::string& error) {
  try {
    stats = Stats{};
    if (t.dtype == "float32") {
      reader.visit<float>(t.path, [&](const float* values, std::size_t n) { add_values(stats, values, n); });
    } else {
      reader.visit<double>(t.path, [&](const double* values, std::size_t n) { add_values(stats, values, n); });
    }
    return true;
  } catch (const std::exception& e) {
    error = e.what();
    return false;
  }
}

// ---- inspect / verify -------------------------------------------------------------------

struct Finding {
  std::string kind;     // "corrupt", "inconsistent", "non_finite"
  std::string dataset;  // the dataset or parameter it concerns ("" for the whole file)
  std::string message;
};

bool is_param(const io::StoredTensor& t) { return t.path.rfind("/params/", 0) == 0; }

// The layer the config builds against the stored /params (and the optimizer moments). Names and
// shapes do not depend on the dtype, so the layer is built in float: half the memory and time of
// double, and without drawing its initial values (the draws took 6 s for 268M parameters on 2 cores,
// against 0.9 s to read their 1 GB).
void check_consistency(const io::CheckpointReader& reader, std::vector<Finding>& findings) {
  const io::CheckpointInfo& info = reader.info();
  std::unique_ptr<model::Layer<float>> layer;
  try {
    layer = model::build_layer<float>(info.model, info.config, 0, ParameterInit::zeros);
  } catch (const std::exception& e) {
    findings.push_back({"inconsistent", "", "the model '" + info.model + "' with its config does not build: " + e.what()});
    return;
  }
  std::map<std::string, const io::StoredTensor*> stored, avg, avg_sq;
  for (const io::StoredTensor& t : reader.tensors()) {
    if (is_param(t)) stored[t.name] = &t;
    if (t.path.rfind("/optimizer/exp_avg/", 0) == 0) avg[t.name] = &t;
    if (t.path.rfind("/optimizer/exp_avg_sq/", 0) == 0) avg_sq[t.name] = &t;
    if (t.path == "/rng/state" && t.shape != Shape{2})
      findings.push_back({"inconsistent", t.path, "/rng/state has shape " + t.shape.str() + ", expected [2] (seed, position)"});
  }
  const bool optimizer = reader.has_optimizer();
  const model::ParameterList<float> parameters = model::trainable(layer->parameters());
  for (const model::Parameter<float>& p : parameters) {
    const Shape& shape = p.tensor->shape();
    const auto found = stored.find(p.name);
    // The moments go with the stored parameter (a mis-shaped parameter is one finding, not three).
    const Shape moment_shape = found != stored.end() ? found->second->shape : shape;
    if (found == stored.end()) {
      findings.push_back({"inconsistent", "/params/" + p.name,
                          "parameter '" + p.name + "' " + shape.str() + " of the " + info.model +
                              " config is missing from /params"});
    } else {
      const io::StoredTensor& t = *found->second;
      if (t.shape != shape) {
        findings.push_back({"inconsistent", t.path,
                            "parameter '" + p.name + "' has shape " + t.shape.str() + ", the config gives " + shape.str()});
      } else if (p.kind == model::ParameterKind::expert && t.kind == "expert" &&
                 static_cast<index_t>(t.experts.size()) != p.tensor->dim(p.expert_axis)) {
        findings.push_back({"inconsistent", t.path,
                            "parameter '" + p.name + "' lists " + std::to_string(t.experts.size()) + " experts, its shape " +
                                std::to_string(p.tensor->dim(p.expert_axis))});
      }
      const std::string kind = model::parameter_kind_name(p.kind);
      if (t.kind != kind)
        findings.push_back({"inconsistent", t.path,
                            "parameter '" + p.name + "' is stored as '" + t.kind + "', the config makes it '" + kind + "'"});
      if (t.dtype != info.dtype)
        findings.push_back({"inconsistent", t.path,
                            "parameter '" + p.name + "' is " + t.dtype + ", the checkpoint's dtype " + info.dtype});
      stored.erase(found);
    }
    if (!optimizer) continue;
    for (auto* moments : {&avg, &avg_sq}) {
      const std::string group = moments == &avg ? "/optimizer/exp_avg/" : "/optimizer/exp_avg_sq/";
      const auto m = moments->find(p.name);
      if (m == moments->end()) {
        findings.push_back({"inconsistent", group + p.name, "optimizer state " + group + p.name + " is missing"});
        continue;
      }
      if (m->second->shape != moment_shape)
        findings.push_back({"inconsistent", m->second->path,
                            "optimizer state " + m->second->path + " has shape " + m->second->shape.str() +
                                ", the parameter " + moment_shape.str()});
      moments->erase(m);
    }
  }
  for (const auto& item : stored)
    findings.push_back({"inconsistent", item.second->path,
                        "dataset " + item.second->path + " is not a parameter of the " + info.model + " config"});
  for (auto* moments : {&avg, &avg_sq})
    for (const auto& item : *moments)
      findings.push_back({"inconsistent", item.second->path,
                          "optimizer state " + item.second->path + " belongs to no parameter of the config"});
}

int inspect(const std::string& path, bool verify, bool as_json) {
  int failure = exit_unusable;
  const std::unique_ptr<io::CheckpointReader> reader_ptr = open_checkpoint(path, failure);
  if (reader_ptr == nullptr) return failure;
  const io::CheckpointReader& reader = *reader_ptr;
  const io::CheckpointInfo& info = reader.info();
  std::vector<Finding> findings;

  std::uintmax_t file_size = 0;
  {
    std::error_code ec;
    file_size = std::filesystem::file_size(path, ec);
  }

  // Everything below may fail on a damaged file: a finding (exit 1), not an unusable file.
  bool has_optimizer = false, has_rng = false;
  std::int64_t optimizer_step = 0;
  json train = nullptr, rng = nullptr;
  try {
    has_optimizer = reader.has_optimizer();
    has_rng = reader.has_rng();
    if (has_optimizer) optimizer_step = reader.optimizer_step();
    train = reader.train();
  } catch (const std::exception& e) {
    findings.push_back({"corrupt", "", without_path_prefix(e.what(), path)});
  }

  // One read per dataset: /params always, /optimizer and /rng under --verify.
  struct Row {
    const io::StoredTensor* tensor;
    bool ok = false;
    Stats stats;
  };
  std::vector<Row> rows;
  for (const io::StoredTensor& t : reader.tensors()) {
    const bool wanted = is_param(t) || verify || t.path == "/rng/state";
    if (!wanted) continue;
    Row row{&t, false, {}};
    std::string error;
    row.ok = read_stats(reader, t, row.stats, error);
    if (!row.ok) {
      findings.push_back({"corrupt", t.path, without_path_prefix(error, path)});
    } else if (!row.stats.all_finite() && t.path != "/rng/state") {
      findings.push_back({"non_finite", t.path,
                          t.path + " holds " + std::to_string(row.stats.nan) + " NaN and " +
                              std::to_string(row.stats.inf) + " Inf values"});
    }
    if (t.path == "/rng/state" && row.ok) {
      const std::vector<std::uint64_t> state = reader.read_as<std::uint64_t>(t.path);  // 2 values
      if (state.size() == 2) rng = {{"seed", state[0]}, {"position", state[1]}};
    }
    rows.push_back(row);
  }
  if (verify) check_consistency(reader, findings);

  std::uint64_t param_count = 0, param_values = 0, param_bytes = 0;
  for (const Row& row : rows) {
    if (!is_param(*row.tensor)) continue;
    ++param_count;
    const std::uint64_t n = static_cast<std::uint64_t>(row.tensor->shape.size());
    param_values += n;
    param_bytes += n * element_bytes(row.tensor->dtype);
  }
  std::size_t optimizer_datasets = 0;
  for (const io::StoredTensor& t : reader.tensors())
    if (t.path.rfind("/optimizer/", 0) == 0) ++optimizer_datasets;
  std::size_t verified = 0;
  for (const Row& row : rows) verified += row.ok ? 1 : 0;
  // Without --verify, only damage counts against the file (non-finite values are shown).
  bool bad = false;
  for (const Finding& f : findings) bad = bad || verify || f.kind == "corrupt";

  if (as_json) {
    json out;
    out["path"] = path;
    out["file_size"] = file_size;
    out["format"] = info.format;
    out["model"] = info.model;
    out["config"] = info.config;
    out["dtype"] = info.dtype;
    out["kmoe_version"] = info.kmoe_version;
    out["created"] = info.created;
    out["step"] = info.step;
    out["placement"] = info.placement;
    auto tensor_json = [](const Row& row) {
      const io::StoredTensor& t = *row.tensor;
      json j = {{"name", t.name}, {"path", t.path}, {"shape", t.shape.dims()}, {"dtype", t.dtype}, {"kind", t.kind}};
      if (t.kind == "expert") {
        j["experts"] = t.experts;
        j["expert_range"] = expert_ranges(t.experts);
      }
      if (!t.torch_names.empty()) {
        j["torch_names"] = t.torch_names;
        j["torch_transposed"] = t.torch_transposed;
      }
      j["stats"] = row.ok ? stats_json(row.stats) : json(nullptr);
      return j;
    };
    json params = json::array(), others = json::array();
    for (const Row& row : rows) (is_param(*row.tensor) ? params : others).push_back(tensor_json(row));
    out["parameters"] = params;
    out["totals"] = {{"parameters", param_count}, {"values", param_values}, {"bytes", param_bytes}, {"file_size", file_size}};
    out["optimizer"] = has_optimizer ? json{{"step", optimizer_step}, {"datasets", optimizer_datasets}} : json(nullptr);
    out["rng"] = has_rng ? (rng.is_null() ? json::object() : rng) : json(nullptr);
    out["train"] = train;
    if (verify) {
      out["other_datasets"] = others;
      json list = json::array();
      for (const Finding& f : findings) list.push_back({{"kind", f.kind}, {"dataset", f.dataset}, {"message", f.message}});
      out["verify"] = {{"ok", !bad}, {"datasets_verified", verified}, {"findings", list}};
    } else {
      json list = json::array();
      for (const Finding& f : findings) list.push_back({{"kind", f.kind}, {"dataset", f.dataset}, {"message", f.message}});
      out["findings"] = list;
    }
    std::printf("%s\n", out.dump(2).c_str());
  } else {
    std::printf("%s: kmoe checkpoint\n", path.c_str());
    std::printf("  model         %s\n", info.model.c_str());
    std::printf("  config        %s\n", info.config.dump().c_str());
    std::printf("  format        %d\n", info.format);
    std::printf("  dtype         %s\n", info.dtype.c_str());
    std::printf("  kmoe version  %s\n", info.kmoe_version.c_str());
    std::printf("  created       %s\n", info.created.c_str());
    std::printf("  step          %lld\n", static_cast<long long>(info.step));
    if (!info.placement.is_null()) {
      // Written by several ranks: each one's experts [begin, end) and hidden units [begin, end).
      std::printf("  placement     %s ranks:", info.placement.value("world", json(0)).dump().c_str());
      for (const json& r : info.placement.value("ranks", json::array()))
        std::printf(" experts %s hidden %s;", r.value("experts", json()).dump().c_str(), r.value("hidden", json()).dump().c_str());
      std::printf("\n");
    }
    auto print_rows = [&](bool params) {
      Table table;
      table.rows.push_back({"name", "shape", "dtype", "kind", "min", "max", "mean", "std", "l2", "nan", "inf"});
      table.right = {false, false, false, false, true, true, true, true, true, true, true};
      for (const Row& row : rows) {
        if (is_param(*row.tensor) != params) continue;
        const io::StoredTensor& t = *row.tensor;
        std::vector<std::string> cells = {params ? t.name : t.path, t.shape.str(), t.dtype, kind_text(t)};
        if (row.ok) {
          const Stats& s = row.stats;
          for (double v : {s.min, s.max, s.mean, s.std_dev(), s.l2()}) cells.push_back(format_number(v));
          cells.push_back(std::to_string(s.nan));
          cells.push_back(std::to_string(s.inf));
        } else {
          cells.push_back("UNREADABLE");
        }
        table.rows.push_back(cells);
      }
      table.print("  ");
    };
    std::printf("parameters (%llu):\n", static_cast<unsigned long long>(param_count));
    print_rows(true);
    std::printf("totals: %llu parameter tensors, %llu values, %llu bytes; file size %llu bytes\n",
                static_cast<unsigned long long>(param_count), static_cast<unsigned long long>(param_values),
                static_cast<unsigned long long>(param_bytes), static_cast<unsigned long long>(file_size));
    if (has_optimizer) {
      std::printf("optimizer: yes (step %lld, %zu moment datasets)\n", static_cast<long long>(optimizer_step),
                  optimizer_datasets);
    } else {
      std::printf("optimizer: no\n");
    }
    if (!has_rng) {
      std::printf("rng: no\n");
    } else if (rng.is_null()) {
      std::printf("rng: yes (unreadable)\n");
    } else {
      std::printf("rng: yes (seed %llu, position %llu)\n", static_cast<unsigned long long>(rng["seed"].get<std::uint64_t>()),
                  static_cast<unsigned long long>(rng["position"].get<std::uint64_t>()));
    }
    std::printf("train: %s\n", train.is_null() ? "no" : ("yes " + train.dump()).c_str());
    if (verify) {
      bool any = false;
      for (const Row& row : rows) any = any || !is_param(*row.tensor);
      if (any) {
        std::printf("other datasets:\n");
        print_rows(false);
      }
    }
  }

  for (const Finding& f : findings) print_error(path + ": " + f.message);
  if (verify) {
    if (!bad) {
      std::fflush(stdout);
      if (as_json) {
        std::fprintf(stderr, "OK: %s: %zu datasets verified, checksums and config consistent\n", path.c_str(), verified);
      } else {
        std::printf("OK: %s: %zu datasets verified, checksums and config consistent\n", path.c_str(), verified);
      }
    } else {
      std::size_t corrupt = 0, inconsistent = 0;
      for (const Finding& f : findings) (f.kind == "corrupt" ? corrupt : inconsistent) += 1;
      print_error(path + ": verification FAILED: " + std::to_string(corrupt) + " corrupt, " + std::to_string(inconsistent) +
                  " inconsistent (" + std::to_string(verified) + " datasets read)");
    }
  }
  return bad ? exit_bad : exit_good;
}

// ---- diff ---------------------------------------------------------------------------------

struct Difference {
  std::uint64_t count = 0;
  std::uint64_t differing = 0;  // values that are not equal (NaN equals NaN here)
  double max_abs = 0;
  double rel_l2 = 0;
};

template <class V>
Difference compare_values(const std::vector<V>& a, const std::vector<V>& b) {
  Difference d;
  d.count = a.size();
  double sq = 0, sa = 0, sb = 0;
  bool nan_mismatch = false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double x = static_cast<double>(a[i]), y = static_cast<double>(b[i]);
    if (x == y) {
      sa += x * x;
      sb += y * y;
      continue;
    }
    const bool x_nan = std::isnan(x), y_nan = std::isnan(y);
    if (x_nan && y_nan) continue;
    ++d.differing;
    if (x_nan || y_nan) {
      nan_mismatch = true;
      continue;
    }
    const double e = std::fabs(x - y);
    d.max_abs = std::max(d.max_abs, e);
    sq += e * e;
    sa += x * x;
    sb += y * y;
  }
  const double denominator = std::sqrt(std::max(sa, sb));
  d.rel_l2 = sq == 0 ? 0.0 : denominator > 0 ? std::sqrt(sq) / denominator : std::numeric_limits<double>::infinity();
  if (nan_mismatch) d.max_abs = d.rel_l2 = std::numeric_limits<double>::quiet_NaN();
  return d;
}

Difference compare_datasets(const io::CheckpointReader& a, const io::CheckpointReader& b, const io::StoredTensor& ta,
                            const io::StoredTensor& tb) {
  if (ta.dtype == "float32" && tb.dtype == "float32")
    return compare_values(a.read_as<float>(ta.path), b.read_as<float>(tb.path));
  if (ta.dtype == "uint64" && tb.dtype == "uint64") {  // /rng/state: exact integers
    const std::vector<std::uint64_t> x = a.read_as<std::uint64_t>(ta.path), y = b.read_as<std::uint64_t>(tb.path);
    Difference d;
    d.count = x.size();
    for (std::size_t i = 0; i < x.size(); ++i) {
      if (x[i] == y[i]) continue;
      ++d.differing;
      d.max_abs = std::max(d.max_abs, static_cast<double>(x[i] > y[i] ? x[i] - y[i] : y[i] - x[i]));
    }
    d.rel_l2 = d.differing > 0 ? std::numeric_limits<double>::quiet_NaN() : 0.0;
    return d;
  }
  return compare_values(a.read(ta.path), b.read(tb.path));
}

int diff(const std::string& path_a, const std::string& path_b, bool as_json) {
  // --diff's 1 means "different": a file it cannot compare is 2 whatever the reason.
  int failure = exit_unusable;
  const std::unique_ptr<io::CheckpointReader> a = open_checkpoint(path_a, failure);
  if (a == nullptr) return exit_unusable;
  const std::unique_ptr<io::CheckpointReader> b = open_checkpoint(path_b, failure);
  if (b == nullptr) return exit_unusable;
  bool different = false;
  std::size_t attributes_differing = 0;  // those that count (not kmoe_version, created)
  json attributes = json::array();
  std::vector<std::string> attribute_lines;
  auto compare_attribute = [&](const char* name, const json& x, const json& y, bool counts) {
    if (x == y) return;
    different = different || counts;
    attributes_differing += counts ? 1 : 0;
    attributes.push_back({{"name", name}, {"a", x}, {"b", y}, {"counts", counts}});
    const auto text = [](const json& v) { return v.is_string() ? v.get<std::string>() : v.dump(); };
    attribute_lines.push_back(std::string(name) + ": " + text(x) + " | " + text(y) + (counts ? "" : " (not counted)"));
  };
  const io::CheckpointInfo &ia = a->info(), &ib = b->info();
  compare_attribute("model", ia.model, ib.model, true);
  compare_attribute("config", ia.config, ib.config, true);
  compare_attribute("dtype", ia.dtype, ib.dtype, true);
  compare_attribute("format", ia.format, ib.format, true);
  compare_attribute("step", ia.step, ib.step, true);
  compare_attribute("kmoe_version", ia.kmoe_version, ib.kmoe_version, false);
  compare_attribute("created", ia.created, ib.created, false);

  std::map<std::string, const io::StoredTensor*> in_a, in_b;
  for (const io::StoredTensor& t : a->tensors()) in_a[t.path] = &t;
  for (const io::StoredTensor& t : b->tensors()) in_b[t.path] = &t;
  std::set<std::string> paths;
  for (const auto& item : in_a) paths.insert(item.first);
  for (const auto& item : in_b) paths.insert(item.first);

  Table table;
  table.rows.push_back({"dataset", "shape", "max_abs", "rel_l2", "differing", "result"});
  table.right = {false, false, true, true, true, false};
  json datasets = json::array();
  std::size_t compared = 0, differing_datasets = 0;
  for (const std::string& p : paths) {
    const auto fa = in_a.find(p), fb = in_b.find(p);
    json j = {{"path", p}};
    if (fa == in_a.end() || fb == in_b.end()) {
      const bool only_a = fb == in_b.end();
      const io::StoredTensor& t = only_a ? *fa->second : *fb->second;
      j["status"] = only_a ? "only_in_a" : "only_in_b";
      j["shape"] = t.shape.dims();
      table.rows.push_back({p, t.shape.str(), "-", "-", "-", only_a ? "only in A" : "only in B"});
    } else if (fa->second->shape != fb->second->shape) {
      j["status"] = "shape_differs";
      j["shape_a"] = fa->second->shape.dims();
      j["shape_b"] = fb->second->shape.dims();
      table.rows.push_back({p, fa->second->shape.str() + " | " + fb->second->shape.str(), "-", "-", "-", "SHAPE DIFFERS"});
    } else {
      Difference d;
      try {
        d = compare_datasets(*a, *b, *fa->second, *fb->second);
      } catch (const std::exception& e) {
        print_error(e.what());
        return exit_unusable;
      }
      ++compared;
      const bool dtype_differs = fa->second->dtype != fb->second->dtype;
      const bool same = d.differing == 0 && !dtype_differs;
      j["status"] = same ? "identical" : "different";
      j["shape"] = fa->second->shape.dims();
      j["max_abs"] = d.max_abs;
      j["rel_l2"] = d.rel_l2;
      j["differing"] = d.differing;
      j["count"] = d.count;
      if (dtype_differs) {
        j["dtype_a"] = fa->second->dtype;
        j["dtype_b"] = fb->second->dtype;
      }
      char max_abs[32], rel[32];
      std::snprintf(max_abs, sizeof max_abs, "%.3e", d.max_abs);
      std::snprintf(rel, sizeof rel, "%.3e", d.rel_l2);
      table.rows.push_back({p, fa->second->shape.str(), max_abs, rel,
                            std::to_string(d.differing) + "/" + std::to_string(d.count),
                            same ? "identical"
                                 : dtype_differs ? "DIFFERENT (" + fa->second->dtype + " | " + fb->second->dtype + ")"
                                                 : "DIFFERENT"});
      if (same) {
        datasets.push_back(j);
        continue;
      }
    }
    ++differing_datasets;
    different = true;
    datasets.push_back(j);
  }

  if (as_json) {
    json out = {{"a", path_a},
                {"b", path_b},
                {"identical", !different},
                {"attributes", attributes},
                {"datasets", datasets},
                {"compared", compared},
                {"attributes_differing", attributes_differing},
                {"differing", differing_datasets}};
    std::printf("%s\n", out.dump(2).c_str());
  } else {
    std::printf("A: %s\nB: %s\n", path_a.c_str(), path_b.c_str());
    if (attribute_lines.empty()) {
      std::printf("attributes: model, config, dtype, format and step equal\n");
    } else {
      std::printf("attributes that differ (A | B):\n");
      for (const std::string& line : attribute_lines) std::printf("  %s\n", line.c_str());
    }
    table.print("  ");
    if (different) {
      std::printf("DIFFERENT: %zu of %zu datasets differ%s\n", differing_datasets, paths.size(),
                  attributes_differing == 0 ? "" : (", and " + std::to_string(attributes_differing) + " attributes").c_str());
    } else {
      std::printf("IDENTICAL: %zu datasets compared\n", compared);
    }
  }
  return different ? exit_bad : exit_good;
}

}  // namespace

int main(int argc, char** argv) {
  if (apps::asks_for_help(argc, argv)) {
    print_usage(stdout);
    return exit_good;
  }
  Kokkos::ScopeGuard kokkos(argc, argv);
  bool as_json = false, verify = false, diff_mode = false;
  std::vector<std::string> files;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--json") {
      as_json = true;
    } else if (arg == "--verify") {
      verify = true;
    } else if (arg == "--diff") {
      diff_mode = true;
    } else if (arg == "--") {
      for (++i; i < argc; ++i) files.push_back(argv[i]);
    } else if (arg.size() > 1 && arg[0] == '-') {
      print_error("unknown option '" + arg + "'");
      print_usage(stderr);
      return exit_unusable;
    } else {
      files.push_back(arg);
    }
  }
  try {
    if (diff_mode) {
      if (verify || files.size() != 2) {
        print_error(verify ? "--diff and --verify do not combine" : "--diff needs two checkpoints");
        print_usage(stderr);
        return exit_unusable;
      }
      return diff(files[0], files[1], as_json);
    }
    if (files.size() != 1) {
      print_error(files.empty() ? "no checkpoint given" : "one checkpoint at a time (or --diff A B)");
      print_usage(stderr);
      return exit_unusable;
    }
    return inspect(files[0], verify, as_json);
  } catch (const std::exception& e) {  // a failure after the files opened: damaged content
    print_error(e.what());
    return exit_bad;
  }
}
