// σ-MoE over MPI ranks (run by ctest under mpirun at several world sizes W): every rank brings an
// uneven share of one global batch; outputs, input gradients, the regulariser and every parameter
// gradient must equal a single-rank layer (the same seed, no MPI) run on the whole batch, for
// expert counts below, at and above W (hidden-unit shards); repeated runs are bitwise equal; the
// exchange sends each token once per destination rank; bad input on one rank and configs that
// differ between ranks are errors on every rank.
#include "kmoe/dist/communicator.hpp"
#include "kmoe/dist/gradients.hpp"
#include "kmoe/layers/sigma_moe.hpp"
#include "dist/dist_util.hpp"
#include "test_util.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <set>

using namespace kmoe;
using namespace kmoe::test;
using kmoe::layers::SigmaMoE;
using kmoe::layers::SigmaMoEConfig;

namespace {

// Rank r's sequences of a batch of `sequences`: contiguous, the first ones one more; with
// empty_rank ≥ 0 that rank brings none and the others share them.
std::pair<index_t, index_t> my_sequences(index_t sequences, int empty_rank) {
  const bool skip = empty_rank >= 0 && empty_rank < world().size() && world().size() > 1;
  const index_t w = world().size() - (skip ? 1 : 0);
  if (skip && world().rank() == empty_rank) {
    index_t before = 0;
    for (index_t q = 0; q < empty_rank; ++q) before += sequences / w + (q < sequences % w ? 1 : 0);
    return {before, 0};
  }
  const index_t r = world().rank() - (skip && world().rank() > empty_rank ? 1 : 0);
  const index_t base = sequences / w, extra = sequences % w;
  const index_t first = r * base + std::min(r, extra);
  return {first, base + (r < extra ? 1 : 0)};
}

template <class T>
std::vector<T> rows_of(const std::vector<T>& all, index_t first_row, index_t rows, index_t width) {
  return std::vector<T>(all.begin() + first_row * width, all.begin() + (first_row + rows) * width);
}

// The block [e0, e0 + El) × [h0, h0 + hl) of a [E, A, B] expert tensor whose hidden axis is 1 or 2.
template <class T>
std::vector<T> expert_block(const std::vector<T>& all, const Shape& shape, int hidden_axis, index_t e0, index_t El,
                            index_t h0, index_t hl) {
  std::vector<T> out;
  const index_t A = shape[1], B = shape.rank() > 2 ? shape[2] : 1;
  for (index_t e = e0; e < e0 + El; ++e)
    for (index_t a = 0; a < A; ++a)
      for (index_t b = 0; b < B; ++b) {
        const index_t h = hidden_axis == 1 ? a : b;
        if (h >= h0 && h < h0 + hl) out.push_back(all[(e * A + a) * B + b]);
      }
  return out;
}

struct Case {
  int experts;
  int k;
  bool bias;
  bool training;
  int empty_rank = -1;  // a rank that brings no tokens
};

template <class T>
void matches_one_rank(const Case& cs) {
  const double tol = std::is_same_v<T, float> ? 1e-6 : 1e-12;
  SigmaMoEConfig c;
  c.dmodel = 8;
  c.n_experts = cs.experts;
  c.expert_size = 6;
  c.k = cs.k;
  c.bias = cs.bias;
  c.dropout = cs.training ? 0.2 : 0.0;
  // With fewer than k experts left a token's gates are −inf (as in the original): only with many.
  c.expert_dropout = cs.training && cs.experts >= 8 ? 0.2 : 0.0;
  const index_t D = c.dmodel, L = 5;
  const index_t sequences = 2 * world().size() + 1;
  const index_t N = sequences * L;
  const std::vector<double> x_all = random_values(static_cast<std::size_t>(N * D), 17);
  const std::vector<double> r_all = random_values(static_cast<std::size_t>(N * D), 18);
  const T reg_coef = T(0.3);

  SigmaMoE<T> reference(c, 5);
  Generator ref_rng(9);
  const auto rf = reference.forward(make_tensor<T>({sequences, L, D}, x_all), cs.training, ref_rng);
  const auto ref_dx = reference.backward(rf, make_tensor<T>({sequences, L, D}, r_all), reg_coef).to_host();

  const auto [first, count] = my_sequences(sequences, cs.empty_rank);
  SigmaMoE<T> layer(c, 5, ParameterInit::drawn, world());
  const auto x = make_tensor<T>({count, L, D}, rows_of(x_all, first * L, count * L, D));
  const auto dy = make_tensor<T>({count, L, D}, rows_of(r_all, first * L, count * L, D));
  const auto run = [&] {
    layer.zero_grad();
    Generator rng(9);
    auto f = layer.forward(x, cs.training, rng);
    auto dx = layer.backward(f, dy, reg_coef);
    dist::all_reduce_dense_gradients(world(), model::collect_parameters(layer));
    return std::make_pair(std::move(f), dx.to_host());
  };
  const auto [f, dx] = run();
  const std::string where = "W " + std::to_string(world().size()) + " rank " + std::to_string(world().rank()) +
                            " E " + std::to_string(cs.experts) + " k " + std::to_string(cs.k) +
                            (cs.training ? " train" : " eval") + (cs.bias ? " bias" : "") +
                            (cs.empty_rank >= 0 ? " rank " + std::to_string(cs.empty_rank) + " without tokens" : "");
  EXPECT_LE(rel_l2(f.y.to_host(), rows_of(rf.y.to_host(), first * L, count * L, D)), tol) << where << ": y";
  EXPECT_LE(rel_l2(dx, rows_of(ref_dx, first * L, count * L, D)), tol) << where << ": dx";
  EXPECT_NEAR(static_cast<double>(f.reg_loss), static_cast<double>(rf.reg_loss), tol * std::max(1.0, std::abs(static_cast<double>(rf.reg_loss))))
      << where << ": reg_loss";

  // Every gradient: the dense ones whole, the expert ones as this rank's block of the reference's.
  const dist::Placement& p = layer.placement();
  const int rank = world().rank();
  auto mine = model::collect_parameters(layer);
  for (auto& want : model::collect_parameters(reference)) {
    const auto& got = model::find_parameter(mine, want.name);
    std::vector<T> expected = want.grad->to_host();
    if (want.kind == model::ParameterKind::expert) {
      expected = expert_block(expected, want.grad->shape(), want.hidden_axis, p.first_expert(rank),
                              p.local_experts(rank), p.hidden_begin(rank), p.local_hidden(rank));
    }
    ASSERT_EQ(got.grad->size(), static_cast<index_t>(expected.size())) << where << ": " << want.name;
    EXPECT_LE(rel_l2(got.grad->to_host(), expected), tol) << where << ": gradient of " << want.name;
    std::vector<T> value = want.tensor->to_host();
    if (want.kind == model::ParameterKind::expert)
      value = expert_block(value, want.tensor->shape(), want.hidden_axis, p.first_expert(rank), p.local_experts(rank),
                           p.hidden_begin(rank), p.local_hidden(rank));
    EXPECT_EQ(got.tensor->to_host(), value) << where << ": initial " << want.name << " is not the one-rank block";
  }

  // Twice the same: bitwise.
  const auto again = run();
  EXPECT_EQ(again.first.y.to_host(), f.y.to_host()) << where;
  EXPECT_EQ(again.second, dx) << where;

  // Each token goes once to each other rank holding one of its experts.
  const std::vector<int> index = f.expert_index.to_host();
  std::uint64_t expected_rows = 0;
  for (index_t t = 0; t < count * L; ++t) {
    std::set<int> destinations;
    for (int j = 0; j < c.k; ++j) {
      const int e = index[static_cast<std::size_t>(t * c.k + j)];
      for (int r = p.owner_begin(e); r < p.owner_end(e); ++r)
        if (r != rank) destinations.insert(r);
    }
    expected_rows += destinations.size();
  }
  EXPECT_EQ(f.exchange.rows_sent(), expected_rows) << where;
  world().reset_bytes_sent();
  (void)f.exchange.dispatch(x.reshape({count * L, D}));
  EXPECT_EQ(world().bytes_sent(), expected_rows * D * sizeof(T)) << where << ": bytes of one dispatch";

  // The global gradient norm (each dense entry once, each expert block once over the ranks) is the
  // one-rank model's; clipping to a quarter of it scales every local gradient by max_norm / norm.
  double squared = 0;
  for (const auto& want : model::collect_parameters(reference))
    for (const T g : want.grad->to_host()) squared += static_cast<double>(g) * g;
  const double norm = dist::clip_gradients_by_global_norm(world(), mine, 0.0);
  EXPECT_NEAR(norm, std::sqrt(squared), tol * std::sqrt(squared)) << where << ": gradient norm";
  std::vector<std::vector<T>> unclipped;
  for (const auto& got : mine) unclipped.push_back(got.grad->to_host());
  EXPECT_EQ(dist::clip_gradients_by_global_norm(world(), mine, norm / 4), norm) << where << ": norm before clipping";
  const double scale = (norm / 4) / (norm + 1e-6);
  for (std::size_t i = 0; i < mine.size(); ++i) {
    std::vector<T> expected = unclipped[i];
    for (T& g : expected) g = static_cast<T>(g * static_cast<T>(scale));
    EXPECT_EQ(mine[i].grad->to_host(), expected) << where << ": clipped gradient of " << mine[i].name;
  }
}

}  // namespace

TEST(SigmaMoEDist, MatchesOneRankInFloat) {
  for (const int experts : {1, 3, 4, 6, 8, 16})
    for (const bool training : {false, true})
      matches_one_rank<float>({experts, std::min(experts, 2), training, training, training ? 1 : -1});
}

TEST(SigmaMoEDist, MatchesOneRankInDouble) {
  for (const int experts : {1, 3, 4, 6, 8, 16})
    for (const bool training : {false, true})
      matches_one_rank<double>({experts, std::min(experts, 3), !training, training});
}

TEST(SigmaMoEDist, NonFiniteInputOnOneRankIsAnErrorOnEveryRank) {
  SigmaMoEConfig c;
  c.dmodel = 4;
  c.n_experts = 3;
  c.expert_size = 4;
  c.k = 2;
  SigmaMoE<float> layer(c, 1, ParameterInit::drawn, world());
  std::vector<double> values = random_values(3 * 4, 3);
  const int bad = world().size() - 1;
  if (world().rank() == bad) values[5] = std::nan("");
  Generator rng(1);
  try {
    (void)layer.forward(make_tensor<float>({3, 4}, values), false, rng);
    ADD_FAILURE() << "rank " << world().rank() << ": forward accepted a NaN on rank " << bad;
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::non_finite) << e.what();
    EXPECT_NE(std::string(e.what()).find("rank " + std::to_string(bad) + ": "), std::string::npos) << e.what();
  }
}

TEST(SigmaMoEDist, ConfigThatDiffersBetweenRanksIsAnErrorOnEveryRank) {
  if (world().size() == 1) GTEST_SKIP() << "needs two ranks";
  SigmaMoEConfig c;
  c.dmodel = 4;
  c.n_experts = 4;
  c.expert_size = 4;
  c.k = world().rank() == 1 ? 3 : 2;
  try {
    SigmaMoE<float> layer(c, 1, ParameterInit::drawn, world());
    ADD_FAILURE() << "rank " << world().rank() << ": configs differing between ranks were accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::invalid_argument) << e.what();
    EXPECT_NE(std::string(e.what()).find("differs between the ranks"), std::string::npos) << e.what();
  }
}

// Exchanges with a pair larger than a message go as point-to-point messages (what keeps counts of
// large exchanges in int): forced with messages of 40 bytes, the step's numbers are the same bits.
TEST(SigmaMoEDist, ExchangesInManyRoundsGiveTheSameBits) {
  SigmaMoEConfig c;
  c.dmodel = 8;
  c.n_experts = 5;
  c.expert_size = 6;
  c.k = 2;
  const auto x = make_tensor<float>({7, 8}, random_values(7 * 8, 40 + world().rank()));
  const auto step = [&](std::size_t round_bytes) {
    const dist::Communicator comm(MPI_COMM_WORLD);
    comm.set_round_bytes(round_bytes);
    SigmaMoE<float> layer(c, 2, ParameterInit::drawn, comm);
    Generator rng(1);
    const auto f = layer.forward(x, true, rng);
    const auto dx = layer.backward(f, x, 0.1f).to_host();
    return std::make_pair(f.y.to_host(), dx);
  };
  const auto one_round = step(std::size_t(1) << 29), many = step(40);
  EXPECT_EQ(many.first, one_round.first);
  EXPECT_EQ(many.second, one_round.second);
}

