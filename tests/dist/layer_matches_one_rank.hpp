// The check every family's MPI suite makes: a layer built from a JSON config and placed over
// mpirun's ranks, each rank bringing an uneven share of the sequences (the last rank none when
// asked), gives what a one-rank layer gives on the whole batch — outputs, input gradients, the
// losses and every parameter gradient (expert entries compared block by block, dense ones after
// the all-reduce) — and a second run at the same world size gives the same bits.
#pragma once

#include "kmoe/dist/gradients.hpp"
#include "kmoe/dist/parameter_blocks.hpp"
#include "kmoe/model/builder.hpp"
#include "dist/dist_util.hpp"
#include "test_util.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace kmoe::test {

struct DistCase {
  std::string kind, config;
  std::vector<index_t> sequence;  // the shape of one sequence's input (x), or {T} of token ids
  int vocabulary = 0;             // > 0: the input is token ids below it, the output [.., vocabulary]
  index_t out_width = 0;          // the output's last extent (x's when 0)
  bool training = false;
  bool idle_rank = false;         // fewer sequences than ranks: the last rank brings none
  double aux_weight = 0.2;
};

template <class T>
void expect_layer_matches_one_rank(const DistCase& c, double tolerance) {
  const dist::Communicator& comm = world();
  const index_t W = comm.size(), rank = comm.rank();
  const index_t B = c.idle_rank && W > 1 ? W - 1 : W + 2;
  const index_t base = B / W, extra = B % W, first = rank * base + std::min(rank, extra), count = base + (rank < extra);
  index_t row = 1;
  for (const index_t d : c.sequence) row *= d;
  const bool tokens = c.vocabulary > 0;
  const auto input = [&](index_t from, index_t n) {
    model::LayerInputs<T> in;
    std::vector<index_t> dims = {n};
    dims.insert(dims.end(), c.sequence.begin(), c.sequence.end());
    if (tokens) {
      const std::vector<int> all = random_index(static_cast<std::size_t>(B * row), c.vocabulary, 5);
      in.tokens = Tensor<int>::from_host("tokens", Shape(dims),
                                         std::vector<int>(all.begin() + from * row, all.begin() + (from + n) * row));
    } else {
      const std::vector<double> all = random_values(static_cast<std::size_t>(B * row), 5);
      in.x = make_tensor<T>(Shape(dims), std::vector<double>(all.begin() + from * row, all.begin() + (from + n) * row));
    }
    return in;
  };
  const index_t out_width = c.out_width > 0 ? c.out_width : c.sequence.back();
  const index_t out_row = row / (tokens ? 1 : c.sequence.back()) * out_width;
  const std::vector<double> dout_all = random_values(static_cast<std::size_t>(B * out_row), 6);
  const auto dout = [&](const Shape& shape, index_t from) {
    return make_tensor<T>(shape, std::vector<double>(dout_all.begin() + from * out_row,
                                                     dout_all.begin() + from * out_row + shape.size()));
  };

  const auto reference = model::build_layer<T>(c.kind, c.config, 3);
  Generator ref_rng(8);
  const auto rf = reference->forward(input(0, B), c.training, ref_rng);
  const Tensor<T> ref_dx = reference->backward(rf, dout(rf.out.shape(), 0), static_cast<T>(c.aux_weight));

  // Two runs of fresh placed layers: the second must repeat the first's bits.
  struct Run {
    std::vector<T> out, dx;
    std::map<std::string, double> losses;
    std::vector<std::vector<T>> grads;
    std::uint64_t rng_position = 0;  // where the forward left the generator
  };
  std::vector<Run> runs;
  std::unique_ptr<model::Layer<T>> layer;
  for (int repeat = 0; repeat < 2; ++repeat) {
    layer = model::build_layer<T>(c.kind, c.config, 3, ParameterInit::drawn, comm);
    Generator rng(8);
    const auto f = layer->forward(input(first, count), c.training, rng);
    const Tensor<T> dx = layer->backward(f, dout(f.out.shape(), first), static_cast<T>(c.aux_weight));
    dist::all_reduce_dense_gradients(comm, layer->parameters());
    Run run{f.out.size() > 0 ? f.out.to_host() : std::vector<T>(), dx.size() > 0 ? dx.to_host() : std::vector<T>(),
            f.losses, {}, rng.position()};
    for (const auto& p : layer->parameters())
      if (p.grad != nullptr) run.grads.push_back(p.grad->size() > 0 ? p.grad->to_host() : std::vector<T>());
    runs.push_back(std::move(run));
  }

  const std::string where = c.kind + " " + c.config + (c.training ? " train" : " eval") +
                            (c.idle_rank ? " idle rank" : "") + " W " + std::to_string(W) + " rank " +
                            std::to_string(rank);
  const Run& got = runs[0];
  // Every draw is batch-wide: the generator ends where the one-rank layer's does, on every rank
  // (the next layer's or step's draws depend on it).
  EXPECT_EQ(got.rng_position, ref_rng.position()) << where << ": generator position after forward";
  const std::vector<T> out_all = rf.out.to_host();
  EXPECT_LE(rel_l2(got.out, std::vector<T>(out_all.begin() + first * out_row, out_all.begin() + (first + count) * out_row)),
            tolerance)
      << where << ": out";
  if (!tokens) {
    const std::vector<T> dx_all = ref_dx.to_host();
    EXPECT_LE(rel_l2(got.dx, std::vector<T>(dx_all.begin() + first * row, dx_all.begin() + (first + count) * row)),
              tolerance)
        << where << ": dx";
  }
  for (const auto& [name, value] : rf.losses)
    EXPECT_NEAR(got.losses.at(name), value, tolerance * std::max(1.0, std::abs(value))) << where << ": " << name;
  const auto mine = layer->parameters(), want = reference->parameters();
  ASSERT_EQ(mine.size(), want.size());
  std::size_t g = 0;
  for (std::size_t i = 0; i < mine.size(); ++i) {
    if (mine[i].grad == nullptr) continue;
    Tensor<T> expected(mine[i].name, mine[i].grad->shape());
    dist::take_block(mine[i], *want[i].grad, expected);
    // A shard past an expert's first trains no copy of the entries without hidden units.
    const bool unused_copy = mine[i].hidden_axis < 0 && mine[i].hidden_begin > 0;
    if (!unused_copy && expected.size() > 0)
      EXPECT_LE(rel_l2(got.grads[g], expected.to_host()), tolerance) << where << ": gradient of " << mine[i].name;
    EXPECT_EQ(runs[1].grads[g], got.grads[g]) << where << ": a second run changed the gradient of " << mine[i].name;
    ++g;
  }
  EXPECT_EQ(runs[1].out, got.out) << where << ": a second run changed the output";
  EXPECT_EQ(runs[1].dx, got.dx) << where << ": a second run changed the input gradient";
}

// A NaN in the last rank's input x (of shape x_shape) makes forward fail on every rank with
// Status::non_finite, naming that rank.
inline void expect_nan_on_one_rank_fails_everywhere(const std::string& kind, const std::string& config,
                                                    const Shape& x_shape) {
  const auto layer = model::build_layer<float>(kind, config, 1, ParameterInit::drawn, world());
  std::vector<double> values = random_values(static_cast<std::size_t>(x_shape.size()), 3);
  const int bad = world().size() - 1;
  if (world().rank() == bad) values[values.size() / 2] = std::nan("");
  model::LayerInputs<float> in;
  in.x = make_tensor<float>(x_shape, values);
  Generator rng(1);
  try {
    (void)layer->forward(in, true, rng);
    ADD_FAILURE() << kind << " rank " << world().rank() << ": forward accepted a NaN on rank " << bad;
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::non_finite) << e.what();
    EXPECT_NE(std::string(e.what()).find("rank " + std::to_string(bad) + ": "), std::string::npos) << e.what();
  }
}

}  // namespace kmoe::test
