#include <algorithm>
#include <cmath>
#include <functional>
#include <set>

#include "kmoe/layers/soft_moe.hpp"
#include "test_soft_moe_reference.hpp"
#include "test_util.hpp"

using namespace kmoe;
using namespace kmoe::test;
using layers::MaskedTokenOutput;
using layers::SoftMoE;
using layers::SoftMoEConfig;
using layers::SoftMoEVariant;
namespace ref = kmoe::test::soft_moe_reference;

namespace {

layers::LucidrainsSoftMoEOptions lucidrains_options(int experts, index_t slots, double mult, bool geglu,
                                                    bool layernorm) {
  layers::LucidrainsSoftMoEOptions o;
  o.num_experts = experts;
  o.num_slots = slots;
  o.expert_mult = mult;
  o.geglu = geglu;
  o.use_layernorm = layernorm;
  return o;
}

// lite as its README builds the experts: output LayerNorm and ReLU, here also with the residual.
SoftMoEConfig lite_readme(index_t dim, int experts, index_t slots, bool residual) {
  SoftMoEConfig c = SoftMoEConfig::lite(dim, experts, slots);
  c.experts.output_layer_norm = true;
  c.experts.output_activation = ops::Activation::relu;
  c.experts.residual = residual;
  return c;
}

// Parameters of O(1) size so every part of the layer matters: norm gains around 1, shifts and
// biases around 0, Linear weights ~ U(±1.5/√in), φ / slot embeddings ~ U(±1). Loaded into the
// layer and returned by state_dict name.
template <class T>
ref::StateDict randomise(SoftMoE<T>& layer, std::uint64_t seed) {
  ref::StateDict state;
  std::uint64_t s = seed;
  for (const auto& group : {ref::state_entries(layer)}) {
    for (const auto& entry : group) {
      const std::string& name = entry.name;
      const auto n = static_cast<std::size_t>(entry.tensor.size());
      const bool norm = name.find("norm") != std::string::npos || name.find("last_ln") != std::string::npos;
      const bool gain = name.find("gamma") != std::string::npos || (norm && name.find("weight") != std::string::npos);
      const bool shift = name.find("bias") != std::string::npos || name.find("beta") != std::string::npos;
      if (entry.tensor.rank() == 2) {
        const double bound = 1.5 / std::sqrt(static_cast<double>(entry.tensor.dim(1)));
        state[name] = random_values(n, ++s, -bound, bound);
      } else if (gain) {
        state[name] = random_values(n, ++s, 0.6, 1.4);
      } else if (shift) {
        state[name] = random_values(n, ++s, -0.3, 0.3);
      } else {
        state[name] = random_values(n, ++s, -1.0, 1.0);
      }
    }
  }
  ref::load_host_state_dict(layer, state);
  for (const auto& buffer : ref::buffer_entries(layer)) state[buffer.name] = to_double(buffer.tensor);
  return state;
}

Tensor<int> mask_tensor(index_t B, index_t n, const std::vector<int>& mask) {
  return mask.empty() ? Tensor<int>() : Tensor<int>::from_host("mask", {B, n}, mask);
}

// mask [B·n] with the tokens [first, last) of sequence b masked.
std::vector<int> masked_range(index_t B, index_t n, index_t b, index_t first, index_t last,
                              std::vector<int> mask = {}) {
  if (mask.empty()) mask.assign(static_cast<std::size_t>(B * n), 1);
  for (index_t t = first; t < last; ++t) mask[b * n + t] = 0;
  return mask;
}

template <class T>
void expect_forward_matches(const SoftMoEConfig& c, index_t B, index_t n, const std::vector<int>& mask,
                            std::uint64_t seed, double tolerance) {
  SoftMoE<T> layer(c, seed);
  const ref::StateDict state = randomise(layer, seed);
  const auto x = random_values(static_cast<std::size_t>(B * n * c.dim), seed + 7, -1.5, 1.5);
  Generator rng(3);
  const auto f = layer.forward(make_tensor<T>({B, n, c.dim}, x), mask_tensor(B, n, mask), false, rng);
  const ref::Result r = ref::forward(c, state, x, B, n, mask);
  const std::string what = std::string(layers::soft_moe_variant_name(c.variant)) + " B=" + std::to_string(B) +
                           " n=" + std::to_string(n) + " Z=" + std::to_string(c.total_slots());
  EXPECT_LT(max_rel_error(to_double(f.y), r.y), tolerance) << what << ": y";
  EXPECT_LT(max_rel_error(to_double(f.dispatch), r.dispatch), tolerance) << what << ": dispatch";
  EXPECT_LT(max_rel_error(to_double(f.combine), r.combine), tolerance) << what << ": combine";
  EXPECT_LT(max_rel_error(to_double(f.slots), r.slots), tolerance) << what << ": slots";
  EXPECT_LT(max_rel_error(to_double(f.experts.y), r.expert_out), tolerance) << what << ": expert outputs";
}

template <class T>
void expect_forward_matches_all_shapes(const SoftMoEConfig& c, std::uint64_t seed, double tolerance) {
  const index_t Z = c.total_slots();
  // Slots · experts below, above and equal to the tokens per sequence; a single sequence.
  expect_forward_matches<T>(c, 2, Z + 3, {}, seed, tolerance);
  expect_forward_matches<T>(c, 3, std::max<index_t>(1, Z / 2), {}, seed + 1, tolerance);
  expect_forward_matches<T>(c, 1, Z, {}, seed + 2, tolerance);
  expect_forward_matches<T>(c, 2, 7, masked_range(2, 7, 0, 5, 7, masked_range(2, 7, 1, 0, 2)), seed + 3, tolerance);
}

// The gradient checks: loss = Σ y ⊙ R in double; dx and every parameter (by state_dict name)
// against central differences.
struct GradientCase {
  SoftMoEConfig config;
  Shape x_shape;
  std::vector<int> mask;  // [batch · tokens] or empty
  bool training = false;
};

void expect_gradients(const GradientCase& g, std::uint64_t seed) {
  const SoftMoEConfig& c = g.config;
  SoftMoE<double> layer(c, seed);
  const ref::StateDict state = randomise(layer, seed);
  const auto x = random_values(static_cast<std::size_t>(g.x_shape.size()), seed + 5, -1.5, 1.5);
  const index_t B = g.x_shape[0], n = g.x_shape.size() / (B * c.dim);
  const Tensor<int> mask = mask_tensor(B, n, g.mask);
  const auto run = [&](const std::vector<double>& input) {
    Generator rng(17);  // the same dropout mask in every evaluation
    return layer.forward(make_tensor<double>(g.x_shape, input), mask, g.training, rng);
  };
  const auto probe = run(x);
  const auto weights = random_values(static_cast<std::size_t>(probe.y.size()), seed + 9);
  const std::string what = std::string(layers::soft_moe_variant_name(c.variant)) + " x " + g.x_shape.str();

  layer.zero_grad();
  const auto dx = to_double(layer.backward(probe, make_tensor<double>(probe.y.shape(), weights)));
  const auto loss_of_x = [&](const std::vector<double>& input) { return dot(to_double(run(input).y), weights); };
  EXPECT_LT(finite_difference_error(x, loss_of_x, dx), fd_tolerance) << what << ": dx";

  for (const auto& grad : ref::grad_entries(layer)) {
    const auto loss_of_param = [&](const std::vector<double>& values) {
      ref::load_entries(layer, {{grad.name, make_tensor<double>(grad.tensor.shape(), values)}});
      return dot(to_double(run(x).y), weights);
    };
    EXPECT_LT(sampled_fd_error(state.at(grad.name), loss_of_param, to_double(grad.tensor), 12), fd_tolerance)
        << what << ": " << grad.name;
    ref::load_entries(layer, {{grad.name, make_tensor<double>(grad.tensor.shape(), state.at(grad.name))}});
  }
}

SoftMoEConfig small_lucidrains(bool geglu, bool layernorm) {
  return SoftMoEConfig::lucidrains(6, lucidrains_options(3, 2, 1.5, geglu, layernorm));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Forward against the host reference.

TEST(SoftMoE, LucidrainsRmsGeluForwardMatchesReference) {
  const SoftMoEConfig c = SoftMoEConfig::lucidrains(8, lucidrains_options(4, 2, 2, false, false));
  expect_forward_matches_all_shapes<double>(c, 11, 1e-12);
  expect_forward_matches_all_shapes<float>(c, 12, 2e-5);
}

TEST(SoftMoE, LucidrainsLayerNormGegluForwardMatchesReference) {
  const SoftMoEConfig c = SoftMoEConfig::lucidrains(9, lucidrains_options(3, 3, 2, true, true));
  EXPECT_EQ(c.experts.hidden, 12);  // int(9 · 2 · 2/3)
  expect_forward_matches_all_shapes<double>(c, 21, 1e-12);
  expect_forward_matches_all_shapes<float>(c, 22, 2e-5);
}

TEST(SoftMoE, LiteForwardMatchesReference) {
  const SoftMoEConfig c = SoftMoEConfig::lite(7, 3, 2);
  expect_forward_matches_all_shapes<double>(c, 31, 1e-12);
  expect_forward_matches_all_shapes<float>(c, 32, 2e-5);
  // The README's experts (output LayerNorm and ReLU), with and without the residual.
  expect_forward_matches_all_shapes<double>(lite_readme(7, 3, 2, false), 33, 1e-12);
  expect_forward_matches_all_shapes<double>(lite_readme(7, 2, 3, true), 34, 1e-12);
  expect_forward_matches_all_shapes<float>(lite_readme(7, 2, 3, true), 35, 2e-5);
}

TEST(SoftMoE, SeqLenGivesSlotsPerExpert) {
  layers::LucidrainsSoftMoEOptions o;
  o.seq_len = 13;
  o.num_experts = 4;
  const SoftMoEConfig c = SoftMoEConfig::lucidrains(8, o);
  EXPECT_EQ(c.slots_per_expert(), 3);  // 13 // 4
  EXPECT_EQ(c.experts.hidden, 32);     // int(8 · 4)
  // seq_len only sizes the slots: other sequence lengths work.
  expect_forward_matches<double>(c, 2, 5, {}, 41, 1e-12);
  expect_forward_matches<double>(c, 1, 20, {}, 42, 1e-12);
}

TEST(SoftMoE, ManyExpertsRunAsOneGroupedComputation) {
  // 130 experts with one slot each, more slots than tokens.
  const SoftMoEConfig c = SoftMoEConfig::lucidrains(8, lucidrains_options(130, 1, 1, false, false));
  expect_forward_matches<double>(c, 2, 9, {}, 51, 1e-12);
  expect_forward_matches<float>(c, 2, 200, masked_range(2, 200, 1, 150, 200), 52, 2e-5);
}

// ---------------------------------------------------------------------------------------------
// Gradients against central differences in double.

TEST(SoftMoE, GradientsLucidrainsRmsGelu) {
  expect_gradients({small_lucidrains(false, false), {2, 5, 6}, {}}, 61);
  expect_gradients({small_lucidrains(false, false), {1, 9, 6}, {}}, 62);  // Z = 6 < 9 tokens
}

TEST(SoftMoE, GradientsLucidrainsLayerNormGegluWithMask) {
  expect_gradients({small_lucidrains(true, true), {2, 5, 6}, masked_range(2, 5, 0, 3, 5, masked_range(2, 5, 1, 0, 1))},
                   71);
  expect_gradients({small_lucidrains(true, false), {2, 4, 6}, masked_range(2, 4, 1, 1, 3)}, 72);
  expect_gradients({small_lucidrains(false, true), {1, 8, 6}, {}}, 73);
}

TEST(SoftMoE, GradientsLite) {
  expect_gradients({SoftMoEConfig::lite(5, 3, 2), {2, 4, 5}, {}}, 81);
  expect_gradients({SoftMoEConfig::lite(5, 2, 2), {2, 6, 5}, masked_range(2, 6, 0, 4, 6)}, 82);
}

TEST(SoftMoE, GradientsLiteReadmeExperts) {
  // Output LayerNorm + ReLU (README), with the residual on both layers, and a GEGLU variant.
  expect_gradients({lite_readme(5, 2, 2, false), {2, 4, 5}, masked_range(2, 4, 1, 0, 1)}, 91);
  expect_gradients({lite_readme(5, 2, 2, true), {2, 4, 5}, {}}, 92);
  SoftMoEConfig glu = SoftMoEConfig::lite(4, 2, 2);
  glu.experts.glu = true;
  glu.experts.activation = ops::Activation::gelu;
  glu.experts.output_layer_norm = true;
  expect_gradients({glu, {2, 3, 4}, {}}, 93);
}

TEST(SoftMoE, GradientsMaskedTokensReturningZeros) {
  SoftMoEConfig c = small_lucidrains(false, false);
  c.masked_output = MaskedTokenOutput::zeros;
  expect_gradients({c, {2, 5, 6}, masked_range(2, 5, 0, 2, 4)}, 101);
  SoftMoEConfig lite = SoftMoEConfig::lite(5, 2, 2);
  lite.masked_output = MaskedTokenOutput::zeros;
  expect_gradients({lite, {2, 4, 5}, masked_range(2, 4, 1, 0, 4)}, 102);  // a fully masked sequence
}

TEST(SoftMoE, GradientsFullyMaskedSequence) {
  expect_gradients({small_lucidrains(false, true), {2, 3, 6}, masked_range(2, 3, 0, 0, 3)}, 111);
}

TEST(SoftMoE, GradientsOtherInputRanks) {
  expect_gradients({small_lucidrains(false, false), {3, 6}, {}}, 121);      // [batch, dim]
  expect_gradients({small_lucidrains(true, true), {2, 6, 2, 3}, {}}, 122);  // [batch, dim, h, w]
  expect_gradients({SoftMoEConfig::lite(5, 2, 2), {2, 5, 3, 1}, masked_range(2, 3, 0, 1, 2)}, 123);
}

TEST(SoftMoE, GradientsWithExpertDropout) {
  layers::LucidrainsSoftMoEOptions o = lucidrains_options(3, 2, 1.5, false, false);
  o.dropout = 0.3;
  expect_gradients({SoftMoEConfig::lucidrains(6, o), {2, 5, 6}, {}, true}, 131);
  o.geglu = true;
  expect_gradients({SoftMoEConfig::lucidrains(6, o), {2, 5, 6}, masked_range(2, 5, 1, 3, 5), true}, 132);
}

// ---------------------------------------------------------------------------------------------
// Masks.

TEST(SoftMoE, MaskedTokensGetNoDispatchAndAUniformCombineRow) {
  const SoftMoEConfig c = small_lucidrains(true, false);
  const index_t B = 2, n = 5, D = c.dim, Z = c.total_slots();
  SoftMoE<float> layer(c, 141);
  randomise(layer, 141);
  const std::vector<int> mask = masked_range(B, n, 0, 1, 3);
  const auto x = make_tensor<float>({B, n, D}, random_values(B * n * D, 142));
  Generator rng(1);
  const auto f = layer.forward(x, mask_tensor(B, n, mask), false, rng);
  const auto dispatch = to_double(f.dispatch), combine = to_double(f.combine), y = to_double(f.y);
  const auto expert_out = to_double(f.experts.y);
  for (const index_t t : {1, 2}) {  // the masked tokens of sequence 0
    for (index_t z = 0; z < Z; ++z) {
      EXPECT_EQ(dispatch[t * Z + z], 0.0) << "t " << t << " z " << z;
      EXPECT_NEAR(combine[t * Z + z], 1.0 / static_cast<double>(Z), 1e-7);
    }
    for (index_t d = 0; d < D; ++d) {  // the mean of all slot outputs of the sequence
      double mean = 0;
      for (index_t z = 0; z < Z; ++z) mean += expert_out[z * D + d] / static_cast<double>(Z);
      EXPECT_NEAR(y[t * D + d], mean, 1e-6);
    }
  }
  // Per slot, the valid tokens' dispatch weights sum to one.
  for (index_t z = 0; z < Z; ++z) {
    double sum = 0;
    for (const index_t t : {0, 3, 4}) sum += dispatch[t * Z + z];
    EXPECT_NEAR(sum, 1.0, 1e-6);
  }

  // With MaskedTokenOutput::zeros the masked tokens output zeros; the rest is unchanged.
  SoftMoEConfig zeros = c;
  zeros.masked_output = MaskedTokenOutput::zeros;
  SoftMoE<float> zero_layer(zeros, 141);
  ref::load_entries(zero_layer, ref::state_entries(layer));
  const auto yz = to_double(zero_layer.forward(x, mask_tensor(B, n, mask), false, rng).y);
  for (index_t t = 0; t < B * n; ++t)
    for (index_t d = 0; d < D; ++d) EXPECT_EQ(yz[t * D + d], mask[t] ? y[t * D + d] : 0.0) << "token " << t;
}

TEST(SoftMoE, FullyMaskedSequenceIsFiniteAndFollowsTheReference) {
  for (const auto output : {MaskedTokenOutput::slot_mean, MaskedTokenOutput::zeros}) {
    for (const bool lite : {false, true}) {
      SoftMoEConfig c = lite ? SoftMoEConfig::lite(6, 3, 2) : small_lucidrains(false, true);
      c.masked_output = output;
      const index_t B = 2, n = 4, D = c.dim, Z = c.total_slots();
      SoftMoE<float> layer(c, 151);
      const ref::StateDict state = randomise(layer, 151);
      const std::vector<int> mask = masked_range(B, n, 1, 0, n);  // sequence 1 entirely masked
      const auto xv = random_values(B * n * D, 152);
      Generator rng(1);
      const auto f = layer.forward(make_tensor<float>({B, n, D}, xv), mask_tensor(B, n, mask), false, rng);
      const auto y = to_double(f.y), dispatch = to_double(f.dispatch);
      for (const double v : y) ASSERT_TRUE(std::isfinite(v));
      // Every token of the masked sequence is equally (in)valid: the dispatch is uniform over them,
      // as the references' softmax over equal −max logits gives.
      for (index_t t = n; t < 2 * n; ++t)
        for (index_t z = 0; z < Z; ++z) EXPECT_NEAR(dispatch[t * Z + z], 1.0 / static_cast<double>(n), 1e-7);
      const ref::Result r = ref::forward(c, state, xv, B, n, mask);
      EXPECT_LT(max_rel_error(y, r.y), 2e-5);
      if (output == MaskedTokenOutput::zeros) {
        for (index_t i = n * D; i < 2 * n * D; ++i) EXPECT_EQ(y[i], 0.0);
      }
      const auto dx = to_double(layer.backward(f, make_tensor<float>(f.y.shape(), random_values(B * n * D, 153))));
      for (const double v : dx) ASSERT_TRUE(std::isfinite(v));
      for (const auto& grad : ref::grad_entries(layer))
        for (const double v : to_double(grad.tensor)) ASSERT_TRUE(std::isfinite(v)) << grad.name;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Input ranks, noise, dropout.

TEST(SoftMoE, InputRanksAreLucidrainsReshapes) {
  const SoftMoEConfig c = small_lucidrains(false, false);
  const index_t B = 3, D = c.dim, H = 2, W = 3;
  SoftMoE<double> layer(c, 161);
  randomise(layer, 161);
  Generator rng(1);
  // [batch, dim] is [batch, 1, dim].
  const auto single = random_values(B * D, 162);
  const auto y2 = layer.forward(make_tensor<double>({B, D}, single), false, rng).y;
  const auto y3 = layer.forward(make_tensor<double>({B, 1, D}, single), false, rng).y;
  EXPECT_EQ(y2.shape(), (Shape{B, D}));
  EXPECT_EQ(to_double(y2), to_double(y3));
  // [batch, dim, h, w] is [batch, h·w, dim] after 'b d h w -> b (h w) d', and back.
  const auto image = random_values(B * D * H * W, 163);
  std::vector<double> rows(image.size());
  for (index_t b = 0; b < B; ++b)
    for (index_t d = 0; d < D; ++d)
      for (index_t p = 0; p < H * W; ++p) rows[(b * H * W + p) * D + d] = image[(b * D + d) * H * W + p];
  const auto y4 = layer.forward(make_tensor<double>({B, D, H, W}, image), false, rng).y;
  const auto yr = to_double(layer.forward(make_tensor<double>({B, H * W, D}, rows), false, rng).y);
  EXPECT_EQ(y4.shape(), (Shape{B, D, H, W}));
  const auto y4v = to_double(y4);
  for (index_t b = 0; b < B; ++b)
    for (index_t d = 0; d < D; ++d)
      for (index_t p = 0; p < H * W; ++p) EXPECT_EQ(y4v[(b * D + d) * H * W + p], yr[(b * H * W + p) * D + d]);
}

TEST(SoftMoE, GumbelNoiseIsSeededAndLeavesTheGradientExact) {
  const SoftMoEConfig c = small_lucidrains(false, false);
  SoftMoE<double> layer(c, 171);
  randomise(layer, 171);
  const auto x = make_tensor<double>({2, 5, c.dim}, random_values(2 * 5 * c.dim, 172));
  Generator plain_rng(1), rng_a(5), rng_b(5);
  const auto plain = layer.forward(x, Tensor<int>(), false, plain_rng);
  const auto noisy_a = layer.forward(x, Tensor<int>(), false, rng_a, {true, 0.5});
  const auto noisy_b = layer.forward(x, Tensor<int>(), false, rng_b, {true, 0.5});
  EXPECT_EQ(to_double(noisy_a.y), to_double(noisy_b.y));
  EXPECT_GT(max_rel_error(to_double(noisy_a.logits), to_double(plain.logits)), 1e-3);
  // Noise is a constant shift of the logits: the gradient with it is the finite difference of the
  // same noise draws.
  const auto weights = random_values(static_cast<std::size_t>(noisy_a.y.size()), 173);
  layer.zero_grad();
  const auto dx = to_double(layer.backward(noisy_a, make_tensor<double>(noisy_a.y.shape(), weights)));
  const auto loss = [&](const std::vector<double>& v) {
    Generator rng(5);
    return dot(to_double(layer.forward(make_tensor<double>(x.shape(), v), Tensor<int>(), false, rng, {true, 0.5}).y),
               weights);
  };
  EXPECT_LT(finite_difference_error(to_double(x), loss, dx), fd_tolerance);
}

TEST(SoftMoE, ExpertDropoutOnlyInTraining) {
  layers::LucidrainsSoftMoEOptions o = lucidrains_options(3, 2, 2, false, false);
  const SoftMoEConfig without = SoftMoEConfig::lucidrains(6, o);
  o.dropout = 0.5;
  const SoftMoEConfig with = SoftMoEConfig::lucidrains(6, o);
  SoftMoE<double> a(without, 181), b(with, 181);
  randomise(a, 181);
  ref::load_entries(b, ref::state_entries(a));
  const auto x = make_tensor<double>({2, 5, 6}, random_values(60, 182));
  Generator rng(1);
  const auto eval_a = to_double(a.forward(x, false, rng).y), eval_b = to_double(b.forward(x, false, rng).y);
  EXPECT_EQ(eval_a, eval_b);
  EXPECT_EQ(to_double(a.forward(x, true, rng).y), eval_a);
  const auto train_b = b.forward(x, true, rng);
  EXPECT_GT(max_rel_error(to_double(train_b.y), eval_b), 1e-3);
  // About half of the hidden units are dropped.
  const auto h = to_double(train_b.experts.h);
  const auto zeros = std::count(h.begin(), h.end(), 0.0);
  EXPECT_GT(zeros, static_cast<long>(h.size() / 4));
  EXPECT_LT(zeros, static_cast<long>(3 * h.size() / 4));
}

// ---------------------------------------------------------------------------------------------
// Parameters: names, init.

TEST(SoftMoE, StateDictUsesTheReferencesNamesAndLayouts) {
  SoftMoEConfig lite = lite_readme(4, 2, 3, false);
  SoftMoE<float> lite_layer(lite, 191);
  std::set<std::string> names;
  for (const auto& entry : ref::state_entries(lite_layer)) names.insert(entry.name + " " + entry.tensor.shape().str());
  const std::set<std::string> lite_names = {"phi [4, 2, 3]",
                                            "experts.0.fcs.0.weight [4, 4]",
                                            "experts.0.fcs.0.bias [4]",
                                            "experts.0.layer_norms.0.weight [4]",
                                            "experts.0.layer_norms.0.bias [4]",
                                            "experts.0.last_fc.weight [4, 4]",
                                            "experts.0.last_fc.bias [4]",
                                            "experts.0.last_ln.weight [4]",
                                            "experts.0.last_ln.bias [4]",
                                            "experts.1.fcs.0.weight [4, 4]",
                                            "experts.1.fcs.0.bias [4]",
                                            "experts.1.layer_norms.0.weight [4]",
                                            "experts.1.layer_norms.0.bias [4]",
                                            "experts.1.last_fc.weight [4, 4]",
                                            "experts.1.last_fc.bias [4]",
                                            "experts.1.last_ln.weight [4]",
                                            "experts.1.last_ln.bias [4]"};
  EXPECT_EQ(names, lite_names);
  EXPECT_TRUE(ref::buffer_entries(lite_layer).empty());

  SoftMoE<float> geglu(SoftMoEConfig::lucidrains(6, lucidrains_options(2, 1, 2, true, true)), 192);
  names.clear();
  for (const auto& entry : ref::state_entries(geglu)) names.insert(entry.name + " " + entry.tensor.shape().str());
  const std::set<std::string> lucidrains_names = {"norm.gamma [6]",
                                                  "slot_norm.gamma [6]",
                                                  "slot_embeds [2, 1, 6]",
                                                  "experts.experts.0.0.weight [16, 6]",
                                                  "experts.experts.0.0.bias [16]",
                                                  "experts.experts.0.3.weight [6, 8]",
                                                  "experts.experts.0.3.bias [6]",
                                                  "experts.experts.1.0.weight [16, 6]",
                                                  "experts.experts.1.0.bias [16]",
                                                  "experts.experts.1.3.weight [6, 8]",
                                                  "experts.experts.1.3.bias [6]"};
  EXPECT_EQ(names, lucidrains_names);
  ASSERT_EQ(ref::buffer_entries(geglu).size(), 2u);
  EXPECT_EQ(ref::buffer_entries(geglu)[0].name, "norm.beta");
  EXPECT_EQ(to_double(ref::buffer_entries(geglu)[1].tensor), std::vector<double>(6, 0.0));

  // A torch-layout weight lands transposed in the stacked CVMM weight.
  const auto w = random_values(16 * 6, 193);
  ref::load_entries(geglu, {{"experts.experts.1.0.weight", make_tensor<float>({16, 6}, w)}});
  const auto stacked = to_double(geglu.params().experts.w1);  // [2, 6, 16]
  for (index_t o = 0; o < 16; ++o)
    for (index_t i = 0; i < 6; ++i) EXPECT_EQ(stacked[(6 + i) * 16 + o], static_cast<float>(w[o * 6 + i]));
  expect_status(
      [&] {
        ref::load_entries(geglu, {{"experts.experts.2.0.weight", make_tensor<float>({16, 6}, w)}});
      },
      Status::invalid_argument, "not parameters of this layer: experts.experts.2.0.weight");
  expect_status(
      [&] {
        ref::load_entries(geglu, {{"experts.experts.1.0.weight", make_tensor<float>({6, 16}, w)}});
      },
      Status::shape_mismatch, "'experts.experts.1.0.weight': expected shape [16, 6], got [6, 16]");
  expect_status(
      [&] {
        ref::load_entries(geglu, {{"slot_embeds", make_tensor<float>({2, 6}, random_values(12, 1))}});
      },
      Status::shape_mismatch, "'slot_embeds'");
}

TEST(SoftMoE, InitialisationFollowsTheReferences) {
  // lite: φ ~ N(0, 1); expert weights 0.01 · orthogonal, biases 0, LayerNorm 1 / 0.
  SoftMoE<double> lite(SoftMoEConfig::lite(32, 4, 8), 201);
  const auto phi = to_double(lite.params().phi);
  double mean = 0, sq = 0;
  for (const double v : phi) {
    mean += v / static_cast<double>(phi.size());
    sq += v * v / static_cast<double>(phi.size());
  }
  EXPECT_NEAR(mean, 0.0, 0.05);
  EXPECT_NEAR(std::sqrt(sq - mean * mean), 1.0, 0.05);
  for (const auto& entry : ref::state_entries(lite)) {
    const auto v = to_double(entry.tensor);
    if (entry.name.find("fcs.0.weight") != std::string::npos ||
        entry.name.find("last_fc.weight") != std::string::npos) {
      for (index_t i = 0; i < 32; ++i)
        for (index_t j = 0; j < 32; ++j) {
          double wwt = 0;
          for (index_t k = 0; k < 32; ++k) wwt += v[i * 32 + k] * v[j * 32 + k];
          EXPECT_NEAR(wwt, i == j ? 1e-4 : 0.0, 1e-12) << entry.name;
        }
    } else if (entry.name.find("layer_norms.0.weight") != std::string::npos) {
      EXPECT_EQ(v, std::vector<double>(32, 1.0));
    } else if (entry.name != "phi") {
      EXPECT_EQ(v, std::vector<double>(v.size(), 0.0)) << entry.name;
    }
  }
  // lucidrains: nn.Linear's U(±1/√in) for weights and biases, norm gains 1.
  SoftMoE<double> luc(SoftMoEConfig::lucidrains(16, lucidrains_options(2, 2, 4, false, false)), 202);
  for (const auto& entry : ref::state_entries(luc)) {
    const auto v = to_double(entry.tensor);
    const bool second = entry.name.find(".3.") != std::string::npos;
    if (entry.name.find("experts.") == 0) {
      const double bound = 1 / std::sqrt(second ? 64.0 : 16.0);
      const double largest = std::max(*std::max_element(v.begin(), v.end()), -*std::min_element(v.begin(), v.end()));
      EXPECT_LE(largest, bound) << entry.name;
      EXPECT_GT(largest, 0.8 * bound) << entry.name;
    } else if (entry.name.find("gamma") != std::string::npos) {
      EXPECT_EQ(v, std::vector<double>(16, 1.0));
    }
  }
  // The same seed gives the same parameters.
  SoftMoE<double> again(SoftMoEConfig::lite(32, 4, 8), 201);
  EXPECT_EQ(to_double(again.params().experts.w2), to_double(lite.params().experts.w2));
}

// ---------------------------------------------------------------------------------------------
// Errors.

TEST(SoftMoE, InvalidConfigsAreRejected) {
  const auto rejects = [](SoftMoEConfig c, const std::string& needle) {
    expect_status([&] { SoftMoE<float>(c, 1); }, Status::invalid_argument, needle, needle);
  };
  layers::LucidrainsSoftMoEOptions both;
  both.seq_len = 16;
  both.num_slots = 2;
  rejects(SoftMoEConfig::lucidrains(8, both), "exactly one of seq_len and num_slots");
  rejects(SoftMoEConfig::lucidrains(8, {}), "exactly one of seq_len and num_slots");
  layers::LucidrainsSoftMoEOptions short_seq;
  short_seq.seq_len = 3;  // 3 // 4 experts = 0 slots
  rejects(SoftMoEConfig::lucidrains(8, short_seq), "gives no slots per expert");
  SoftMoEConfig lite_seq = SoftMoEConfig::lite(8, 2, 2);
  lite_seq.seq_len = 4;
  rejects(lite_seq, "needs num_slots");
  rejects(SoftMoEConfig::lite(8, 2, 0), "needs num_slots");
  SoftMoEConfig lite_ln = SoftMoEConfig::lite(8, 2, 2);
  lite_ln.use_layernorm = true;
  rejects(lite_ln, "use_layernorm is a lucidrains option");
  rejects(SoftMoEConfig::lite(0, 2, 2), "dim = 0");
  rejects(SoftMoEConfig::lite(8, 0, 2), "num_experts = 0");
  SoftMoEConfig mismatch = SoftMoEConfig::lite(8, 2, 2);
  mismatch.num_experts = 3;
  rejects(mismatch, "experts.n_experts = 2");
  layers::LucidrainsSoftMoEOptions drop;
  drop.num_slots = 1;
  drop.dropout = 1.0;
  rejects(SoftMoEConfig::lucidrains(8, drop), "dropout = 1");
  layers::LucidrainsSoftMoEOptions tiny_mult;
  tiny_mult.num_slots = 1;
  tiny_mult.expert_mult = 0.1;  // int(8 · 0.1) = 0 hidden units
  rejects(SoftMoEConfig::lucidrains(8, tiny_mult), "hidden = 0");
  SoftMoEConfig eps = small_lucidrains(false, true);
  eps.layer_norm_eps = 0;
  rejects(eps, "layer_norm_eps");
}

TEST(SoftMoE, BadShapesAreRejected) {
  const SoftMoEConfig c = small_lucidrains(false, false);  // dim 6
  SoftMoE<float> layer(c, 211);
  Generator rng(1);
  const auto forward = [&](const Shape& shape, const Tensor<int>& mask = Tensor<int>()) {
    return layer.forward(make_tensor<float>(shape, random_values(static_cast<std::size_t>(shape.size()), 1)), mask,
                         false, rng);
  };
  expect_status([&] { forward({2, 5, 7}); }, Status::shape_mismatch, "x is [2, 5, 7]");
  expect_status([&] { forward({6}); }, Status::shape_mismatch, "x is [6]");
  expect_status([&] { forward({2, 2, 3, 6}); }, Status::shape_mismatch, "[batch, dim, height, width]");
  expect_status([&] { forward({2, 0, 6}); }, Status::shape_mismatch, "has no tokens");
  expect_status(
      [&] {
        forward({2, 5, 6}, Tensor<int>::from_host("m", {2, 4}, std::vector<int>(8, 1)));
      },
      Status::shape_mismatch, "mask ([batch, tokens]");
  expect_status(
      [&] {
        forward({2, 6, 2, 2}, Tensor<int>::from_host("m", {2, 2}, std::vector<int>(4, 1)));
      },
      Status::shape_mismatch, "mask");
  auto bad = make_tensor<float>({1, 2, 6}, random_values(12, 2));
  bad.copy_from_host({0, 0, 0, 0, 0, NAN, 0, 0, 0, 0, 0, 0});
  expect_status([&] { layer.forward(bad, false, rng); }, Status::non_finite, "x");
  const auto f = forward({2, 5, 6});
  expect_status(
      [&] {
        layer.backward(f, make_tensor<float>({2, 5, 5}, random_values(50, 3)));
      },
      Status::shape_mismatch, "dy");
  expect_status([&] { layer.backward(layers::SoftMoEForward<float>(), f.y); }, Status::invalid_argument,
                "forward result is empty");
  SoftMoE<float> other(SoftMoEConfig::lucidrains(6, lucidrains_options(2, 2, 1.5, false, false)), 1);
  expect_status([&] { other.backward(f, f.y); }, Status::shape_mismatch, "does not come from a layer");
}
