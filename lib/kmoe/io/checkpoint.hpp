// kmoe checkpoints, format v1 (HDF5; README.md "Checkpoint format" documents it for h5ls/h5py
// readers): the one checkpoint writer and reader.
//
//   /                      attributes kmoe_format (1), model (layer kind), config (JSON), dtype
//                          ("float32" | "float64"), kmoe_version, created (UTC, ISO 8601), step,
//                          optional source (JSON: where the weights came from, e.g. a safetensors
//                          file's __metadata__)
//   /params/<name>         one dataset per registry entry (buffers excluded: the config determines
//                          them), row-major, kmoe's shape; attribute kind = "dense" | "expert";
//                          expert tensors also expert_axis, experts (global indices, in order) and,
//                          where the original keeps one tensor per expert, torch_names (the
//                          per-expert state_dict names) and torch_transposed
//   /optimizer             optional: attributes name ("AdamW"), step, lr, beta1, beta2, eps,
//                          weight_decay; /optimizer/exp_avg/<name>, /optimizer/exp_avg_sq/<name>
//   /rng                   optional: dataset state = [seed, position] (uint64) of the Generator
//   /train                 optional: attribute json, whatever a driver needs to resume
//
// Every dataset is chunked (expert tensors one expert per chunk, so a reader can take a hyperslab
// of some experts) with the Fletcher32 checksum filter; metadata use HDF5's v2 object headers,
// which carry checksums too. A flipped byte or a truncated file is Status::corrupt_file naming
// the dataset, and nothing of it is loaded. Writes are crash-safe (io/atomic_write.hpp).
#pragma once

#include "kmoe/core/random.hpp"
#include "kmoe/model/layer.hpp"
#include "kmoe/model/optimizer.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace kmoe::io {

inline constexpr int checkpoint_format_version = 1;

// The root attributes.
struct CheckpointInfo {
  int format = 0;
  std::string model;
  nlohmann::json config;
  std::string dtype;
  std::string kmoe_version;
  std::string created;
  std::int64_t step = 0;
  nlohmann::json source;     // null when absent
  nlohmann::json placement;  // null when written by one rank
};

// What a checkpoint holds besides the parameters; null / empty parts are not written.
template <class T>
struct CheckpointExtras {
  const model::AdamW<T>* optimizer = nullptr;
  const Generator* rng = nullptr;
  std::int64_t step = 0;
  nlohmann::json train;   // null: no /train
  nlohmann::json source;  // null: no source attribute
};

// A layer whose experts are placed over several ranks (model::Layer::communicator()) is saved and
// loaded collectively, in the same format: the file holds the whole tensors with every global
// expert index, as one rank writes them, and a root attribute placement (JSON: world size, and per
// rank its experts and hidden units) records how it was written. Saving opens one file with
// parallel HDF5 (MPI-IO) on every rank; each rank writes the hyperslabs of its experts or shards
// (dist::hyperslab_of) and rank 0 the dense tensors, in collective writes. Loading: every rank
// reads the hyperslabs of its own block under its own placement, so a checkpoint written at any
// world size loads at any other (re-sharding is part of loading). An error on any rank is an error
// on every rank (dist::Communicator::collectively).

// Writes the layer (kind, config, every trainable parameter) and the extras to path, crash-safely.
// The disk it needs (checkpoint_size_bound) is reserved before anything is written, so a full disk,
// a quota or a file size limit is found up front. Status::io_error when the folder is missing or
// unwritable, the space cannot be reserved or a write fails (the old file stays either way).
template <class T>
void save_checkpoint(const std::string& path, model::Layer<T>& layer, const CheckpointExtras<T>& extras = {});

// An upper bound on the bytes save_checkpoint writes for the layer and extras (the values, HDF5's
// chunk and metadata overheads, generously): what it reserves, and what a driver can check free
// disk against before it trains.
template <class T>
std::uint64_t checkpoint_size_bound(model::Layer<T>& layer, const CheckpointExtras<T>& extras = {});

struct CheckpointLoadOptions {
  bool convert_dtype = false;  // allow float32 data into a float64 layer and back
};

// Where load_checkpoint puts the extras it finds (null members: not wanted).
template <class T>
struct CheckpointRestore {
  model::AdamW<T>* optimizer = nullptr;  // its moments and step count (the checkpoint must have /optimizer)
  Generator* rng = nullptr;               // the checkpoint must have /rng
  nlohmann::json* train = nullptr;        // /train's JSON (null JSON when absent)
  std::int64_t* step = nullptr;
};

// Loads the checkpoint into layer: the stored model kind and config must equal the layer's, and
// every trainable parameter must be there with the layer's shape and dtype (or any float dtype
// with convert_dtype); a missing, extra or mis-shaped dataset is an error naming it. Nothing is
// changed unless everything checks and reads (the file is read completely before the layer is
// written). Status::io_error: missing, unreadable or not HDF5; Status::corrupt_file: a checksum
// mismatch, a truncated or damaged file; Status::invalid_argument: an HDF5 file that is not a kmoe
// checkpoint, or a checkpoint of another model (shape_mismatch: of other shapes);
// Status::unsupported: a format version this kmoe does not read.
template <class T>
void load_checkpoint(const std::string& path, model::Layer<T>& layer, const CheckpointLoadOptions& options = {},
                     const CheckpointRestore<T>& restore = {});

// Builds the checkpoint's layer (model/builder.hpp) and loads it.
template <class T>
std::unique_ptr<model::Layer<T>> load_layer(const std::string& path, const CheckpointLoadOptions& options = {});

// One stored tensor, as kmoe-inspect lists it.
struct StoredTensor {
  std::string path;  // "/params/keys"
  std::string name;  // "keys"
  Shape shape;
  std::string dtype;  // "float32", "float64"
  std::string kind;   // "dense", "expert"
  std::vector<int> experts;  // global expert indices (expert tensors)
  std::vector<std::string> torch_names;
  bool torch_transposed = false;
};

// Read access to a checkpoint's contents for tools (kmoe-inspect): the root attributes, the
// stored tensors and their values. Opening checks that the file is HDF5 (else Status::io_error;
// Status::corrupt_file when it starts with HDF5's signature but does not open: truncated or
// damaged), a kmoe checkpoint (else Status::invalid_argument) of a known format (else
// Status::unsupported).
class CheckpointReader {
 public:
  explicit CheckpointReader(const std::string& path);
  ~CheckpointReader();
  CheckpointReader(const CheckpointReader&) = delete;
  CheckpointReader& operator=(const CheckpointReader&) = delete;

  const std::string& path() const { return path_; }
  const CheckpointInfo& info() const { return info_; }
  // Every dataset under /params (then /optimizer, /rng when present), sorted by path.
  const std::vector<StoredTensor>& tensors() const { return tensors_; }
  bool has_optimizer() const;
  bool has_rng() const;
  std::int64_t optimizer_step() const;  // /optimizer's step attribute
  nlohmann::json train() const;  // null when absent
  // The dataset's values (checksums verified). Status::corrupt_file naming it when they fail.
  std::vector<double> read(const std::string& dataset_path) const;
  template <class T>
  std::vector<T> read_as(const std::string& dataset_path) const;
  // The dataset's values (float or double) in order, a block at a time (one chunk: memory for one
  // chunk, not the dataset), each block's checksum verified before it is visited.
  template <class T>
  void visit(const std::string& dataset_path, const std::function<void(const T* values, std::size_t n)>& visitor) const;

 private:
  std::string path_;
  std::int64_t file_ = -1;
  CheckpointInfo info_;
  std::vector<StoredTensor> tensors_;
};

}  // namespace kmoe::io
