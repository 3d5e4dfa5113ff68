// Checkpoints of a σ-MoE whose experts are placed over the ranks: written collectively in the
// one-rank format (whole tensors, global expert indices, a placement attribute), loadable by one
// rank and by any other world size with the same parameters, AdamW moments and outputs.
// Resharding across world sizes: tests/dist/reshard.cmake runs WriteForResharding at W = 4 and
// ReshardAndResave at W = 1, 3, 6 and 20 (KMOE_RESHARD_IN / KMOE_RESHARD_OUT name the files).
#include "kmoe/dist/communicator.hpp"
#include "kmoe/dist/gradients.hpp"
#include "kmoe/dist/parameter_blocks.hpp"
#include "kmoe/io/checkpoint.hpp"
#include "kmoe/model/builder.hpp"
#include "kmoe/model/optimizer.hpp"
#include "dist/dist_util.hpp"
#include "test_util.hpp"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>

using namespace kmoe;
using namespace kmoe::test;

namespace {

const char* const config = R"({"dmodel": 8, "n_experts": 6, "expert_size": 10, "k": 2, "bias": true})";
constexpr index_t batch_tokens = 23;

// This rank's contiguous share of a global batch of batch_tokens tokens.
std::pair<index_t, index_t> my_tokens() {
  const index_t w = world().size(), r = world().rank(), base = batch_tokens / w, extra = batch_tokens % w;
  return {r * base + std::min(r, extra), base + (r < extra ? 1 : 0)};
}

Tensor<float> my_rows(std::uint64_t seed) {
  const auto [first, count] = my_tokens();
  const std::vector<double> all = random_values(batch_tokens * 8, seed);
  return make_tensor<float>({count, 8}, std::vector<double>(all.begin() + first * 8, all.begin() + (first + count) * 8));
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
  if (whole_batch) {
    in.x = make_tensor<float>({batch_tokens, 8}, random_values(batch_tokens * 8, 33));
  } else {
    const auto [first, count] = my_tokens();
    const std::vector<double> all = random_values(batch_tokens * 8, 33);
    in.x = make_tensor<float>({count, 8}, std::vector<double>(all.begin() + first * 8, all.begin() + (first + count) * 8));
  }
  Generator rng(0);
  std::vector<float> out = layer.forward(in, false, rng).out.to_host();
  if (!whole_batch) return out;
  const auto [first, count] = my_tokens();
  return std::vector<float>(out.begin() + first * 8, out.begin() + (first + count) * 8);
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

TEST(SigmaMoEDistCheckpoint, RoundTripsAndLoadsAtOneRank) {
  auto layer = model::build_layer<float>("sigma_moe", std::string(config), 3, ParameterInit::drawn, world());
  model::AdamW<float> opt(layer->parameters(), ops::AdamWConfig{});
  train_step(*layer, opt);
  const std::string path = shared_path("round_trip.h5");
  io::CheckpointExtras<float> extras;
  extras.optimizer = &opt;
  extras.step = 1;
  io::save_checkpoint(path, *layer, extras);

  // A fresh distributed layer and optimizer get exactly this rank's parameters and moments.
  auto again = model::build_layer<float>("sigma_moe", std::string(config), 99, ParameterInit::drawn, world());
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
TEST(SigmaMoEDistCheckpoint, MoEUTLMRoundTripsThroughOneRank) {
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

TEST(SigmaMoEDistCheckpoint, CorruptFileIsAnErrorOnEveryRank) {
  auto layer = model::build_layer<float>("sigma_moe", std::string(config), 3, ParameterInit::drawn, world());
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

TEST(SigmaMoEDistCheckpoint, WriteForResharding) {
  const char* out = std::getenv("KMOE_RESHARD_IN");
  if (out == nullptr) GTEST_SKIP() << "run by tests/dist/reshard.cmake";
  auto layer = model::build_layer<float>("sigma_moe", std::string(config), 7, ParameterInit::drawn, world());
  model::AdamW<float> opt(layer->parameters(), ops::AdamWConfig{});
  train_step(*layer, opt);
  io::CheckpointExtras<float> extras;
  extras.optimizer = &opt;
  extras.step = 1;
  io::save_checkpoint(out, *layer, extras);
}

TEST(SigmaMoEDistCheckpoint, ReshardAndResave) {
  const char* in = std::getenv("KMOE_RESHARD_IN");
  const char* out = std::getenv("KMOE_RESHARD_OUT");
  if (in == nullptr || out == nullptr) GTEST_SKIP() << "run by tests/dist/reshard.cmake";
  auto layer = model::build_layer<float>("sigma_moe", std::string(config), 1, ParameterInit::zeros, world());
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
