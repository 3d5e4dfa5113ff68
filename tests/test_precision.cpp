// Precision::bfloat16 (core/precision.hpp) for every layer family, through the JSON builder: the
// mixed-precision layer against the float32 layer built from the same config and seed, on the same
// input, draws and output gradient.
//
// What must be equal: the master weights (float32 in both), and for the single-layer families the
// routing (expert loads) and the routing losses, since router logits and selection stay float32
// and read the same input. What may differ: the expert outputs and every gradient, by bfloat16
// rounding of the expert GEMMs' operands and outputs. One rounded operand pair gives a relative
// error of about u = 2⁻⁹ per product; two chained GEMMs with random signs land near 2u–3u in
// relative L2, and backward's GEMMs read rounded forward activations once more, so 6u bounds a
// single layer. MoEUT stacks its layers (each adding its own rounding to the residual stream), so
// it gets 12u and no routing equality: its later routers read a stream that bfloat16 perturbed.
// Gradients through a kinked activation (ReLU experts: σ-MoE's default, MoEUT's) are not smooth in
// the rounding: a pre-activation within rounding distance of 0 (a fraction O(u) of them) flips its
// mask, and each flip moves one gradient entry by its full size, so the relative L2 error there
// grows like √u; 2√u ≈ 0.088 bounds those gradients. A float32 path differs by ~1e-7, so a lower
// bound of u/64 on the output shows the bfloat16 GEMMs ran.
#include "kmoe/model/builder.hpp"

#include "test_util.hpp"

#include <cmath>
#include <string>

using namespace kmoe;
using namespace kmoe::test;

namespace {

struct Case {
  const char* kind;
  const char* config;  // with "%s" where the precision goes ("native" or "bfloat16")
  Shape input;         // x, or tokens for moeut_lm
  bool stacked;        // several layers: looser bound, no routing equality
  bool kinked;         // ReLU experts: gradients bounded by 2√u
};

const std::vector<Case>& cases() {
  static const std::vector<Case> all = {
      {"sigma_moe", R"({"dmodel": 48, "n_experts": 12, "expert_size": 16, "k": 3, "bias": true, "dropout": 0.1,
                        "precision": "%s"})", {4, 25, 48}, false, true},
      {"st_moe", R"({"dim": 32, "num_experts": 6, "precision": "%s"})", {4, 24, 32}, false, false},
      {"hier_moe_v0014", R"({"dim": 32, "num_experts": [2, 3], "precision": "%s"})", {4, 24, 32}, false, false},
      {"st_moe_block", R"({"moe": {"dim": 32, "num_experts": 6, "precision": "%s"}})", {4, 24, 32}, false, false},
      {"soft_moe_lite", R"({"d_model": 32, "num_experts": 5, "num_slots": 2, "precision": "%s"})", {4, 20, 32}, false, false},
      {"soft_moe_lucidrains", R"({"dim": 32, "num_experts": 5, "num_slots": 2, "dropout": 0.1, "precision": "%s"})",
       {4, 20, 32}, false, false},
      {"switchhead", R"({"state_size": 32, "n_heads": 2, "n_experts": 4, "moe_k": 2, "precision": "%s"})",
       {3, 12, 32}, false, false},
      {"moeut", R"({"d_model": 32, "n_layers": 2, "n_heads": 2, "ff_n_experts": 8, "att_n_experts": 3, "ff_k": 2,
                    "att_k": 2, "ff_expert_size": 16, "precision": "%s"})", {3, 12, 32}, true, true},
      {"moeut_lm", R"({"n_tokens": 40, "d_model": 32, "n_layers": 2, "n_heads": 2, "ff_n_experts": 8,
                       "att_n_experts": 3, "ff_k": 2, "att_k": 2, "ff_expert_size": 16, "precision": "%s"})",
       {3, 12}, true, true},
  };
  return all;
}

std::string config_of(const Case& c, const char* precision) {
  std::string text = c.config;
  text.replace(text.find("%s"), 2, precision);
  return text;
}

model::LayerInputs<float> inputs_for(const Case& c) {
  model::LayerInputs<float> in;
  if (std::string(c.kind) == "moeut_lm") {
    in.tokens = Tensor<int>::from_host("tokens", c.input, random_index(c.input.size(), 40, 3));
  } else {
    in.x = make_tensor<float>(c.input, random_values(c.input.size(), 3));
  }
  return in;
}

const double u = std::ldexp(1.0, -9);  // bfloat16's unit roundoff

// mixed against native within `bound` in relative L2 (both all-zero: equal).
void expect_close(const std::vector<double>& mixed, const std::vector<double>& native, double bound,
                  const std::string& what) {
  double norm = 0;
  for (const double v : native) norm += v * v;
  if (norm == 0) {
    EXPECT_EQ(mixed, native) << what;
    return;
  }
  const double error = relative_l2_error(mixed, native);
  EXPECT_LT(error, bound) << what << " (bound " << bound / u << " u)";
}

}  // namespace

TEST(Precision, Bfloat16TracksFloat32ForEveryFamily) {
  for (const Case& c : cases()) {
    const std::string kind = c.kind;
    const auto native = model::build_layer<float>(c.kind, config_of(c, "native"), 7);
    const auto mixed = model::build_layer<float>(c.kind, config_of(c, "bfloat16"), 7);
    EXPECT_EQ(mixed->config().dump().find("\"bfloat16\"") != std::string::npos, true) << kind;
    const double bound = (c.stacked ? 12 : 6) * u;
    const double gradient_bound = c.kinked ? 2 * std::sqrt(u) : bound;
    auto native_params = native->parameters(), mixed_params = mixed->parameters();
    ASSERT_EQ(native_params.size(), mixed_params.size()) << kind;
    for (std::size_t i = 0; i < native_params.size(); ++i) {
      EXPECT_EQ(mixed_params[i].tensor->to_host(), native_params[i].tensor->to_host())
          << kind << ": master weight " << native_params[i].name;
    }
    const auto in = inputs_for(c);
    for (const bool training : {true, false}) {
      const std::string what = kind + (training ? " (training)" : " (eval)");
      native->zero_grad();
      mixed->zero_grad();
      Generator rng_native(5), rng_mixed(5);
      const auto fn = native->forward(in, training, rng_native);
      const auto fm = mixed->forward(in, training, rng_mixed);
      if (!c.stacked) {
        EXPECT_EQ(fm.expert_counts.to_host(), fn.expert_counts.to_host()) << what << ": routing";
        EXPECT_EQ(fm.losses, fn.losses) << what << ": routing losses";
      }
      const auto yn = to_double(fn.out), ym = to_double(fm.out);
      const double error = relative_l2_error(ym, yn);
      std::printf("%s: output relative L2 %.2e = %.2f u\n", what.c_str(), error, error / u);
      EXPECT_LT(error, bound) << what << ": output";
      EXPECT_GT(error, u / 64) << what << ": no bfloat16 rounding seen";
      const auto dout = make_tensor<float>(fn.out.shape(), random_values(fn.out.size(), 11));
      const auto dxn = native->backward(fn, dout, 0.1f), dxm = mixed->backward(fm, dout, 0.1f);
      if (!dxn.empty()) expect_close(to_double(dxm), to_double(dxn), gradient_bound, what + ": dx");
      native_params = native->parameters();
      mixed_params = mixed->parameters();
      for (std::size_t i = 0; i < native_params.size(); ++i) {
        if (native_params[i].grad == nullptr) continue;
        expect_close(to_double(*mixed_params[i].grad), to_double(*native_params[i].grad), gradient_bound,
                     what + ": d " + native_params[i].name);
      }
    }
  }
}

TEST(Precision, Bfloat16NeedsAFloat32LayerAndAKnownName) {
  for (const Case& c : cases()) {
    expect_status([&] { model::build_layer<double>(c.kind, config_of(c, "bfloat16"), 7); }, Status::unsupported,
                  "needs a float32 layer", c.kind);
    expect_status([&] { model::build_layer<float>(c.kind, config_of(c, "bf16"), 7); }, Status::invalid_argument,
                  "'bf16'", c.kind);
  }
}
