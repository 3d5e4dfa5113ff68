#include <cmath>

#include "kmoe/layers/soft_moe_experts.hpp"
#include "test_soft_moe_reference.hpp"
#include "test_util.hpp"

using namespace kmoe;
using namespace kmoe::test;
using layers::SlotExpertConfig;
using layers::SlotExpertParams;
namespace ref = kmoe::test::soft_moe_reference;

namespace {

SlotExpertConfig expert_config(index_t dim, index_t hidden, int experts) {
  SlotExpertConfig c;
  c.dim = dim;
  c.hidden = hidden;
  c.n_experts = experts;
  return c;
}

// Random O(1) parameters (gains around 1) in the stacked layout.
template <class T>
void randomise(SlotExpertParams<T>& p, std::uint64_t seed) {
  for (Tensor<T>* t : p.all()) {
    const bool gain = t == &p.hidden_norm_weight || t == &p.output_norm_weight;
    const double bound = t->rank() == 3 ? 1.5 / std::sqrt(static_cast<double>(t->dim(1))) : 0.3;
    t->copy_from_host(cast_vector<T>(gain ? random_values(t->size(), ++seed, 0.6, 1.4)
                                          : random_values(t->size(), ++seed, -bound, bound)));
  }
}

// Expert e's parameters in torch layouts, through the conversion helpers.
template <class T>
ref::Expert host_expert(const SlotExpertParams<T>& p, int e) {
  const auto row = [&](const Tensor<T>& t) { return t.empty() ? ref::Vec() : to_double(layers::expert_row(t, e)); };
  return {to_double(layers::expert_weight(p.w1, e)), row(p.b1), row(p.hidden_norm_weight), row(p.hidden_norm_bias),
          to_double(layers::expert_weight(p.w2, e)), row(p.b2), row(p.output_norm_weight), row(p.output_norm_bias)};
}

// Every combination of the optional parts that the Soft MoE variants and the lite README use.
std::vector<SlotExpertConfig> option_combinations() {
  std::vector<SlotExpertConfig> configs;
  for (const bool glu : {false, true})
    for (const bool norms : {false, true})
      for (const bool residual : {false, true}) {
        SlotExpertConfig c = expert_config(5, residual ? 5 : 7, 3);
        c.glu = glu;
        c.activation = glu ? ops::Activation::gelu : ops::Activation::relu;
        c.hidden_layer_norm = norms;
        c.output_layer_norm = norms;
        c.output_activation = norms ? ops::Activation::relu : ops::Activation::identity;
        c.residual = residual;
        configs.push_back(c);
      }
  return configs;
}

template <class T>
void expect_forward_matches(const SlotExpertConfig& c, index_t batch, index_t slots, std::uint64_t seed,
                            double tolerance) {
  Generator generator(seed);
  auto p = layers::init_slot_expert_params<T>(c, generator);
  randomise(p, seed);
  const index_t rows = batch * c.n_experts * slots;
  const auto u = random_values(static_cast<std::size_t>(rows * c.dim), seed + 1, -1.5, 1.5);
  const auto plan = layers::slot_dispatch_plan(batch, c.n_experts, slots);
  const auto f = layers::slot_experts_forward<T>(c, p, plan, make_tensor<T>({rows, c.dim}, u), false, generator);
  const auto y = to_double(f.y);
  std::vector<double> expected(y.size());
  for (index_t r = 0; r < rows; ++r) {
    const int e = static_cast<int>((r / slots) % c.n_experts);
    const auto out =
        ref::expert_forward(c, host_expert(p, e), ref::Vec(u.begin() + r * c.dim, u.begin() + (r + 1) * c.dim), 1);
    std::copy(out.begin(), out.end(), expected.begin() + r * c.dim);
  }
  EXPECT_LT(max_rel_error(y, expected), tolerance)
      << "glu " << c.glu << " norms " << c.hidden_layer_norm << " residual " << c.residual;
}

}  // namespace

TEST(SlotExperts, PlanGroupsSlotRowsByExpert) {
  const auto plan = layers::slot_dispatch_plan(3, 4, 2);  // rows (b · 4 + e) · 2 + s
  EXPECT_EQ(plan.n_tokens(), 24);
  EXPECT_EQ(plan.k(), 1);
  const auto expert = host_ints(plan.expert_of_pair());
  for (int r = 0; r < 24; ++r) EXPECT_EQ(expert[r], (r / 2) % 4);
  EXPECT_EQ(plan.expert_offsets_host(), (std::vector<int>{0, 6, 12, 18, 24}));
  expect_status([] { layers::slot_dispatch_plan(2, 3, 0); }, Status::invalid_argument, "slots_per_expert = 0");
}

TEST(SlotExperts, ForwardMatchesReference) {
  for (const SlotExpertConfig& c : option_combinations()) {
    expect_forward_matches<double>(c, 2, 3, 11, 1e-12);
    expect_forward_matches<float>(c, 3, 1, 12, 2e-5);
  }
}

TEST(SlotExperts, GradientsOfEveryOption) {
  int index = 0;
  for (SlotExpertConfig c : option_combinations()) {
    c.dropout = index++ % 3 == 0 ? 0.25 : 0.0;  // dropout together with every other part
    Generator generator(21);
    auto p = layers::init_slot_expert_params<double>(c, generator);
    randomise(p, 22);
    const index_t batch = 2, slots = 2, rows = batch * c.n_experts * slots;
    const auto plan = layers::slot_dispatch_plan(batch, c.n_experts, slots);
    const auto u = random_values(static_cast<std::size_t>(rows * c.dim), 23, -1.5, 1.5);
    const auto run = [&](const std::vector<double>& input) {
      Generator rng(5);  // the same dropout mask in every evaluation
      return layers::slot_experts_forward<double>(c, p, plan, make_tensor<double>({rows, c.dim}, input), true, rng);
    };
    const auto f = run(u);
    const auto weights = random_values(static_cast<std::size_t>(f.y.size()), 24);
    auto grads = layers::zeros_like(p);
    const auto du = to_double(
        layers::slot_experts_backward<double>(c, p, plan, f, make_tensor<double>(f.y.shape(), weights), grads));
    const std::string what = "glu " + std::to_string(c.glu) + " norms " + std::to_string(c.hidden_layer_norm) +
                             " residual " + std::to_string(c.residual) + " dropout " + std::to_string(c.dropout);
    EXPECT_LT(finite_difference_error(
                  u, [&](const std::vector<double>& v) { return dot(to_double(run(v).y), weights); }, du),
              fd_tolerance)
        << what << ": du";
    const auto params = p.all(), grad_tensors = grads.all();
    for (std::size_t i = 0; i < params.size(); ++i) {
      Tensor<double>& param = *params[i];
      const auto original = to_double(param);
      const auto loss = [&](const std::vector<double>& v) {
        param.copy_from_host(v);
        return dot(to_double(run(u).y), weights);
      };
      EXPECT_LT(sampled_fd_error(original, loss, to_double(*grad_tensors[i]), 12), fd_tolerance)
          << what << ": parameter " << param.label();
      param.copy_from_host(original);
    }
  }
}

TEST(SlotExperts, GradientsAccumulate) {
  SlotExpertConfig c = expert_config(4, 6, 2);
  c.hidden_layer_norm = true;
  Generator generator(31);
  auto p = layers::init_slot_expert_params<double>(c, generator);
  randomise(p, 32);
  const auto plan = layers::slot_dispatch_plan(1, 2, 3);
  const auto f = layers::slot_experts_forward<double>(c, p, plan, make_tensor<double>({6, 4}, random_values(24, 33)),
                                                      false, generator);
  const auto dy = make_tensor<double>({6, 4}, random_values(24, 34));
  auto once = layers::zeros_like(p), twice = layers::zeros_like(p);
  layers::slot_experts_backward<double>(c, p, plan, f, dy, once);
  layers::slot_experts_backward<double>(c, p, plan, f, dy, twice);
  layers::slot_experts_backward<double>(c, p, plan, f, dy, twice);
  for (std::size_t i = 0; i < once.all().size(); ++i) {
    auto expected = to_double(*once.all()[i]);
    for (double& v : expected) v *= 2;
    EXPECT_LT(max_rel_error(to_double(*twice.all()[i]), expected), 1e-15);
  }
}

TEST(SlotExperts, OrthogonalInitialisation) {
  // Tall, wide and square torch weights: W has orthonormal columns (out ≥ in) or rows, times 0.01.
  for (const auto& [dim, hidden] : {std::pair<index_t, index_t>{6, 6}, {4, 9}, {9, 4}}) {
    SlotExpertConfig c = expert_config(dim, hidden, 2);
    c.init = layers::ExpertInit::orthogonal_gain_001;
    Generator generator(41);
    const auto p = layers::init_slot_expert_params<double>(c, generator);
    for (const Tensor<double>* stacked : {&p.w1, &p.w2}) {
      for (int e = 0; e < 2; ++e) {
        const auto w = to_double(layers::expert_weight(*stacked, e));  // [out, in]
        const index_t out = stacked->dim(2), in = stacked->dim(1);
        const bool columns = out >= in;
        const index_t k = columns ? in : out, len = columns ? out : in;
        for (index_t i = 0; i < k; ++i)
          for (index_t j = 0; j < k; ++j) {
            double s = 0;
            for (index_t l = 0; l < len; ++l)
              s += columns ? w[l * in + i] * w[l * in + j] : w[i * in + l] * w[j * in + l];
            EXPECT_NEAR(s, i == j ? 1e-4 : 0.0, 1e-15);
          }
      }
    }
    EXPECT_EQ(to_double(p.b1), std::vector<double>(static_cast<std::size_t>(p.b1.size()), 0.0));
  }
}

TEST(SlotExperts, WeightConversionsRoundTrip) {
  const Tensor<float> stacked("stacked", {3, 4, 5});
  const auto w = make_tensor<float>({5, 4}, random_values(20, 51));
  layers::set_expert_weight(stacked, 2, w);
  EXPECT_EQ(to_double(layers::expert_weight(stacked, 2)), to_double(w));
  EXPECT_EQ(to_double(layers::expert_weight(stacked, 0)), std::vector<double>(20, 0.0));
  const Tensor<float> rows("rows", {3, 4});
  const auto row = make_tensor<float>({4}, random_values(4, 52));
  layers::set_expert_row(rows, 1, row);
  EXPECT_EQ(to_double(layers::expert_row(rows, 1)), to_double(row));
  expect_status([&] { layers::expert_weight(stacked, 3); }, Status::invalid_argument, "expert 3 is outside [0, 3)");
  expect_status(
      [&] {
        layers::set_expert_weight(stacked, 0, make_tensor<float>({4, 5}, random_values(20, 1)));
      },
      Status::shape_mismatch, "[out, in]");
  expect_status([&] { layers::expert_row(stacked, 0); }, Status::shape_mismatch, "expected rank 2");
}

TEST(SlotExperts, InvalidConfigsAndShapesAreRejected) {
  Generator generator(1);
  const auto rejects = [&](SlotExpertConfig c, const std::string& needle) {
    expect_status([&] { layers::init_slot_expert_params<float>(c, generator); }, Status::invalid_argument, needle,
                  needle);
  };
  rejects(expert_config(0, 4, 2), "dim = 0");
  rejects(expert_config(4, 0, 2), "hidden = 0");
  rejects(expert_config(4, 4, 0), "n_experts = 0");
  SlotExpertConfig drop = expert_config(4, 4, 2);
  drop.dropout = -0.1;
  rejects(drop, "dropout = -0.1");
  SlotExpertConfig eps = expert_config(4, 4, 2);
  eps.layer_norm_eps = NAN;
  rejects(eps, "layer_norm_eps");

  const SlotExpertConfig c = expert_config(4, 6, 2);
  const auto p = layers::init_slot_expert_params<float>(c, generator);
  const auto plan = layers::slot_dispatch_plan(2, 2, 1);
  expect_status(
      [&] {
        layers::slot_experts_forward<float>(c, p, plan, Tensor<float>("u", {4, 5}), false, generator);
      },
      Status::shape_mismatch, "u is [4, 5]");
  expect_status(
      [&] {
        layers::slot_experts_forward<float>(c, p, plan, Tensor<float>("u", {6, 4}), false, generator);
      },
      Status::shape_mismatch, "the plan has 4 rows");
  SlotExpertParams<float> wrong = p;
  wrong.w2 = Tensor<float>("w2", {2, 4, 6});
  expect_status(
      [&] {
        layers::slot_experts_forward<float>(c, wrong, plan, Tensor<float>("u", {4, 4}), false, generator);
      },
      Status::shape_mismatch, "parameter w2");
}
