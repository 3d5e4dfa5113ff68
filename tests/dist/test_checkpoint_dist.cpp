// Checkpoints of a layer whose experts are placed over the ranks: written collectively in the
// one-rank format (whole tensors, global expert indices, a placement attribute), loadable by one
// rank and by any other world size with the same parameters, AdamW moments and outputs.
// Resharding across world sizes: tests/dist/reshard.cmake runs WriteForResharding at W = 4 and
// ReshardAndResave at W = 1, 3, 6 and 20 (KMOE_RESHARD_IN / KMOE_RESHARD_OUT name the files,
// KMOE_RESHARD_MODEL the model: sigma_moe by default, st_moe, hier_moe_v0014, soft_moe_lite).
#include "kmoe/dist/communicator.hpp"
#include "kmoe/dist/gradients.hpp"
#include "kmoe/dist/parameter_blocks.hpp"
#include "kmoe/io/checkpoint.hpp"
#include "kmoe/model/builder.hpp"
#include "kmoe/model/optimizer.hpp"
#include "dist/dist_util.hpp"
#include "test_util.hpp"

#include <gtest/gtest.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>

using namespace kmoe;
using namespace kmoe::test;

namespace {

// A model, its config and the shape of one row of its batch (a token, or a sequence of them).
struct Model {
  std::string kind, config;
  std::vector<index_t> row;
};

const Model& model_under_test() {
  static const std::map<std::string, Model> models = {
      {"sigma_moe", {"sigma_moe", R"({"dmodel": 8, "n_experts": 6, "expert_size": 10, "k": 2, "bias": true})", {8}}},
      {"st_moe", {"st_moe", R"({"dim": 8, "num_experts": 6, "expert_hidden_mult": 2})", {4, 8}}},
      {"hier_moe_v0014", {"hier_moe_v0014", R"({"dim": 8, "num_experts": [2, 3], "expert_hidden_mult": 2})", {4, 8}}},
      {"soft_moe_lite", {"soft_moe_lite", R"({"d_model": 8, "num_experts": 6, "num_slots": 2})", {4, 8}}},
  };
  const char* chosen = std::getenv("KMOE_RESHARD_MODEL");
  return models.at(chosen != nullptr ? chosen : "sigma_moe");
}

std::unique_ptr<model::Layer<float>> build(std::uint64_t seed, ParameterInit init = ParameterInit::drawn) {
  return model::build_layer<float>(model_under_test().kind, model_under_test().config, seed, init, world());
}

constexpr index_t batch_rows = 23;

index_t row_size() {
  index_t size = 1;
  for (const index_t d : model_under_test().row) size *= d;
  return size;
}

// This rank's contiguous share of a global batch of batch_rows rows.
std::pair<index_t, index_t> my_share() {
  const index_t w = world().size(), r = world().rank(), base = batch_rows / w, extra = batch_rows % w;
  return {r * base + std::min(r, extra), base + (r < extra ? 1 : 0)};
}

// Rows [first, first + count) of the global batch drawn from seed.
Tensor<float> batch_rows_of(std::uint64_t seed, index_t first, index_t count) {
  const index_t size = row_size();
  const std::vector<double> all = random_values(static_cast<std::size_t>(batch_rows * size), seed);
  std::vector<index_t> dims = {count};
  dims.insert(dims.end(), model_under_test().row.begin(), model_under_test().row.end());
  return make_tensor<float>(Shape(dims), std::vector<double>(all.begin() + first * size, all.begin() + (first + count) * size));
}

Tensor<float> my_rows(std::uint64_t seed) {
  const auto [first, count] = my_share();
  return batch_rows_of(seed, first, count);
}

// One AdamW step on this rank's share (dense gradients all-reduced), so that moments are not zero.
void train_step(model::Layer<float>& layer, model::AdamW<float>& opt) {
  model::LayerInputs<float> in;
  in.x = my_rows(31);
  Generator rng(4);
  layer.zero_grad();
  const auto f = layer.forward(in, true, rng);
  (void)layer.backward(f, my_rows(32), 0.1f);
  dist::all_reduce_dense_gradients(world(), layer.parameters());
  opt.step();
}

// The rows of this rank of the whole batch's output (on every rank: a one-rank layer's output).
std::vector<float> my_outputs(model::Layer<float>& layer, bool whole_batch) {
  model::LayerInputs<float> in;
  const auto [first, count] = my_share();
  in.x = whole_batch ? batch_rows_of(33, 0, batch_rows) : batch_rows_of(33, first, count);
  Generator rng(0);
  const Tensor<float> out = layer.forward(in, false, rng).out;
  std::vector<float> values = out.size() > 0 ? out.to_host() : std::vector<float>();
  if (!whole_batch) return values;
  const index_t size = row_size();
  return std::vector<float>(values.begin() + first * size, values.begin() + (first + count) * size);
}

std::string shared_path(const std::string& name) {
  // The same path on every rank (rank 0's process id).
  const std::int64_t pid = world().all_gather(static_cast<std::int64_t>(::getpid()))[0];
  return (std::filesystem::temp_directory_path() / ("kmoe_dist_" + std::to_string(pid) + "_" + name)).string();
}

void expect_close(const std::vector<float>& got, const std::vector<float>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (std::size_t i = 0; i < want.size(); ++i)
    ASSERT_NEAR(got[i], want[i], 1e-6f * (1 + std::abs(want[i]))) << what << " [" << i << "]";
}

}  // namespace

TEST(DistCheckpoint, RoundTripsAndLoadsAtOneRank) {
  auto layer = build(3);
  model::AdamW<float> opt(layer->parameters(), ops::AdamWConfig{});
  train_step(*layer, opt);
  const std::string path = shared_path("round_trip.h5");
  io::CheckpointExtras<float> extras;
  extras.optimizer = &opt;
  extras.step = 1;
  io::save_checkpoint(path, *layer, extras);

  // A fresh distributed layer and optimizer get exactly this rank's parameters and moments.
  auto again = build(99);
  model::AdamW<float> opt_again(again->parameters(), ops::AdamWConfig{});
  io::CheckpointRestore<float> restore;
  restore.optimizer = &opt_again;
  io::load_checkpoint(path, *again, {}, restore);
  const auto mine = layer->parameters(), loaded = again->parameters();
  for (std::size_t i = 0; i < mine.size(); ++i) {
    EXPECT_EQ(loaded[i].tensor->to_host(), mine[i].tensor->to_host()) << mine[i].name;
    if (mine[i].kind == model::ParameterKind::buffer) continue;
    EXPECT_EQ(opt_again.moments().at(mine[i].name).exp_avg.to_host(), opt.moments().at(mine[i].name).exp_avg.to_host())
        << mine[i].name;
    EXPECT_EQ(opt_again.moments().at(mine[i].name).exp_avg_sq.to_host(),
              opt.moments().at(mine[i].name).exp_avg_sq.to_host())
        << mine[i].name;
  }
  EXPECT_EQ(opt_again.steps(), 1);

  // One rank reads the same file as a whole layer: its outputs on the whole batch are this rank's.
  const auto whole = io::load_layer<float>(path);
  expect_close(my_outputs(*layer, false), my_outputs(*whole, true), "outputs of the one-rank load");
  const io::CheckpointReader reader(path);
  if (world().size() > 1) {
    EXPECT_EQ(reader.info().placement.value("world", 0), world().size());
    EXPECT_EQ(reader.info().placement["ranks"].size(), static_cast<std::size_t>(world().size()));
  } else {
    EXPECT_TRUE(reader.info().placement.is_null()) << "one rank writes no placement";
  }
  for (const io::StoredTensor& t : reader.tensors())
    if (t.kind == "expert") EXPECT_EQ(t.experts, (std::vector<int>{0, 1, 2, 3, 4, 5})) << t.path;

  // And a checkpoint written by one rank loads into the distributed layer.
  const std::string single = shared_path("single.h5");
  world().collectively([&] {
    if (world().rank() == 0) io::save_checkpoint(single, *whole);
  });
  io::load_checkpoint(single, *again);
  expect_close(my_outputs(*again, false), my_outputs(*whole, true), "outputs after loading a one-rank checkpoint");
  world().collectively([&] {
    if (world().rank() == 0) {
      std::filesystem::remove(path);
      std::filesystem::remove(single);
    }
  });
}

// A MoEUTLM's placed FFN experts and its replicated rest round-trip the same way: a one-rank
// load holds exactly the distributed layer's blocks.
TEST(DistCheckpoint, MoEUTLMRoundTripsThroughOneRank) {
  const std::string lm = R"({"n_tokens": 20, "d_model": 16, "n_layers": 2, "n_heads": 2, "ff_n_experts": 5,
                             "att_n_experts": 2, "ff_k": 2, "att_k": 1, "ff_expert_size": 8})";
  auto layer = model::build_layer<float>("moeut_lm", lm, 4, ParameterInit::drawn, world());
  const std::string path = shared_path("moeut_lm.h5");
  io::save_checkpoint(path, *layer);
  const auto whole = io::load_layer<float>(path);
  const auto mine = layer->parameters(), all = whole->parameters();
  ASSERT_EQ(mine.size(), all.size());
  for (std::size_t i = 0; i < mine.size(); ++i) {
    Tensor<float> block(mine[i].name, mine[i].tensor->shape());
    dist::take_block(mine[i], *all[i].tensor, block);
    EXPECT_EQ(block.to_host(), mine[i].tensor->to_host()) << mine[i].name;
  }
  auto again = model::build_layer<float>("moeut_lm", lm, 9, ParameterInit::zeros, world());
  io::load_checkpoint(path, *again);
  const auto loaded = again->parameters();
  for (std::size_t i = 0; i < mine.size(); ++i)
    EXPECT_EQ(loaded[i].tensor->to_host(), mine[i].tensor->to_host()) << mine[i].name;
  world().collectively([&] {
    if (world().rank() == 0) std::filesystem::remove(path);
  });
}

TEST(DistCheckpoint, CorruptFileIsAnErrorOnEveryRank) {
  auto layer = build(3);
  const std::string path = shared_path("corrupt.h5");
  io::save_checkpoint(path, *layer);
  world().collectively([&] {
    if (world().rank() == 0) std::filesystem::resize_file(path, std::filesystem::file_size(path) / 2);
  });
  try {
    io::load_checkpoint(path, *layer);
    ADD_FAILURE() << "rank " << world().rank() << ": a truncated checkpoint loaded";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::corrupt_file) << e.what();
  }
  world().collectively([&] {
    if (world().rank() == 0) std::filesystem::remove(path);
  });
}

// A collective save that cannot be written fails on every rank, leaves the old file as it was and
// no temporary file behind.
TEST(DistCheckpoint, FailedCollectiveSaveIsAnErrorOnEveryRankAndKeepsTheOldFile) {
  auto layer = build(3);
  const std::string missing = shared_path("no_such_folder") + "/layer.h5";
  try {
    io::save_checkpoint(missing, *layer);
    ADD_FAILURE() << "rank " << world().rank() << ": saved into a missing folder";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::io_error) << e.what();
  }
  const std::string path = shared_path("kept.h5");
  io::save_checkpoint(path, *layer);
  const std::string folder = std::filesystem::path(path).parent_path().string();
  auto other = build(4);
  // A file size limit below the checkpoint's size: the reservation fails before anything is written.
  rlimit old{};
  ::getrlimit(RLIMIT_FSIZE, &old);
  rlimit small = old;
  small.rlim_cur = 4096;
  ::setrlimit(RLIMIT_FSIZE, &small);
  try {
    io::save_checkpoint(path, *other);
    ADD_FAILURE() << "rank " << world().rank() << ": saved over a file size limit";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::io_error) << e.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &old);
  io::load_checkpoint(path, *other);
  EXPECT_EQ(my_outputs(*other, false), my_outputs(*layer, false)) << "the old checkpoint changed";
  world().collectively([&] {
    if (world().rank() != 0) return;
    for (const auto& entry : std::filesystem::directory_iterator(folder))
      EXPECT_EQ(entry.path().filename().string().find(".kmoe_dist_" + std::to_string(::getpid()) + "_kept.h5.tmp"),
                std::string::npos)
          << "left behind: " << entry.path();
    std::filesystem::remove(path);
  });
}

TEST(DistCheckpoint, WriteForResharding) {
  const char* out = std::getenv("KMOE_RESHARD_IN");
  if (out == nullptr) GTEST_SKIP() << "run by tests/dist/reshard.cmake";
  auto layer = build(7);
  model::AdamW<float> opt(layer->parameters(), ops::AdamWConfig{});
  train_step(*layer, opt);
  io::CheckpointExtras<float> extras;
  extras.optimizer = &opt;
  extras.step = 1;
  io::save_checkpoint(out, *layer, extras);
}

TEST(DistCheckpoint, ReshardAndResave) {
  const char* in = std::getenv("KMOE_RESHARD_IN");
  const char* out = std::getenv("KMOE_RESHARD_OUT");
  if (in == nullptr || out == nullptr) GTEST_SKIP() << "run by tests/dist/reshard.cmake";
  auto layer = build(1, ParameterInit::zeros);
  model::AdamW<float> opt(layer->parameters(), ops::AdamWConfig{});
  io::CheckpointRestore<float> restore;
  restore.optimizer = &opt;
  std::int64_t step = 0;
  restore.step = &step;
  io::load_checkpoint(in, *layer, {}, restore);
  EXPECT_EQ(step, 1);
  const auto whole = io::load_layer<float>(in);
  expect_close(my_outputs(*layer, false), my_outputs(*whole, true), "outputs at this world size");
  io::CheckpointExtras<float> extras;
  extras.optimizer = &opt;
  extras.step = step;
  io::save_checkpoint(out, *layer, extras);
}
