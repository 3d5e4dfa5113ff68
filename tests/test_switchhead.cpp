#include "kmoe/layers/moeut_init.hpp"
#include "kmoe/layers/switchhead_attention.hpp"
#include "test_util.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

using namespace kmoe;
using namespace kmoe::test;
using layers::SwitchHeadAttention;
using layers::SwitchHeadConfig;

namespace {

SwitchHeadConfig small_config(int experts) {
  SwitchHeadConfig c;
  c.state_size = 8;
  c.n_heads = 2;
  c.n_experts = experts;
  c.projection_size = 5;
  c.moe_k = experts > 1 ? 2 : 1;
  c.rotate_fraction = 0.6;  // 3 → 2 rotated channels (rounded down to even)
  return c;
}

template <class T>
std::vector<Tensor<T>*> param_list(layers::SwitchHeadParams<T>& p) {
  std::vector<Tensor<T>*> list = {&p.q, &p.k, &p.v, &p.o, &p.sel_o};
  if (!p.sel_v.empty()) list.push_back(&p.sel_v);
  return list;
}

double sigmoid(double x) { return 1 / (1 + std::exp(-x)); }

// The original's SwitchHeadRope forward written out with loops in double, for one sequence batch
// with a causal mask (n_experts > 1 or = 1).
std::vector<double> naive_switchhead(const SwitchHeadConfig& c, layers::SwitchHeadParams<double>& p,
                                     const std::vector<double>& x_hat, const std::vector<double>& x, index_t B,
                                     index_t T) {
  const index_t D = c.state_size, H = c.n_heads, P = c.d_head(), E = c.n_experts, K = c.moe_k;
  const auto q = to_double(p.q), k = to_double(p.k), v = to_double(p.v), o = to_double(p.o);
  const auto so = to_double(p.sel_o);
  const auto sv = E > 1 ? to_double(p.sel_v) : std::vector<double>();
  const int rot = c.rotary_dims(), half = rot / 2;
  const double qk_scale = std::pow(static_cast<double>(P), -0.25);
  auto linear_row = [&](const std::vector<double>& w, const std::vector<double>& in, index_t n, index_t row) {
    double s = 0;
    for (index_t d = 0; d < D; ++d) s += w[row * D + d] * in[n * D + d];
    return s;
  };
  // Top-K experts of head h for token n from router weights w.
  auto select = [&](const std::vector<double>& w, index_t n, index_t h) {
    std::vector<std::pair<double, int>> s;
    for (int e = 0; e < E; ++e) s.push_back({sigmoid(linear_row(w, x_hat, n, h * E + e)), e});
    std::sort(s.begin(), s.end(), [](auto a, auto b) { return a.first > b.first; });
    s.resize(K);
    return s;
  };
  const index_t N = B * T;
  std::vector<double> Q(N * H * P), Kt(N * H * P), V(N * H * P, 0.0);
  for (index_t n = 0; n < N; ++n)
    for (index_t h = 0; h < H; ++h) {
      for (index_t c2 = 0; c2 < P; ++c2) {
        Q[(n * H + h) * P + c2] = qk_scale * linear_row(q, x_hat, n, h * P + c2);
        Kt[(n * H + h) * P + c2] = qk_scale * linear_row(k, x_hat, n, h * P + c2);
      }
      if (E > 1) {
        for (auto [g, e] : select(sv, n, h))
          for (index_t c2 = 0; c2 < P; ++c2) {
            double s = 0;
            for (index_t d = 0; d < D; ++d) s += x[n * D + d] * v[((h * E + e) * D + d) * P + c2];
            V[(n * H + h) * P + c2] += g * s;
          }
      } else {
        for (index_t c2 = 0; c2 < P; ++c2) V[(n * H + h) * P + c2] = linear_row(v, x, n, h * P + c2);
      }
    }
  auto rope = [&](std::vector<double>& t) {
    for (index_t n = 0; n < N; ++n)
      for (index_t h = 0; h < H; ++h)
        for (int i = 0; i < half; ++i) {
          const double a = static_cast<double>(n % T) * std::pow(c.rope_base, -2.0 * i / rot);
          double& lo = t[(n * H + h) * P + i];
          double& hi = t[(n * H + h) * P + i + half];
          const double l = lo, u = hi;
          lo = l * std::cos(a) - u * std::sin(a);
          hi = u * std::cos(a) + l * std::sin(a);
        }
  };
  rope(Q);
  rope(Kt);
  std::vector<double> y(N * D, 0.0);
  for (index_t b = 0; b < B; ++b)
    for (index_t i = 0; i < T; ++i) {
      const index_t n = b * T + i;
      for (index_t h = 0; h < H; ++h) {
        std::vector<double> s(i + 1);
        double mx = -INFINITY, z = 0;
        for (index_t j = 0; j <= i; ++j) {
          double d = 0;
          for (index_t e = 0; e < P; ++e) d += Q[(n * H + h) * P + e] * Kt[((b * T + j) * H + h) * P + e];
          mx = std::max(mx, s[j] = d);
        }
        for (auto& e : s) z += (e = std::exp(e - mx));
        std::vector<double> res(P, 0.0);
        for (index_t j = 0; j <= i; ++j)
          for (index_t e = 0; e < P; ++e) res[e] += s[j] / z * V[((b * T + j) * H + h) * P + e];
        if (E > 1) {
          for (auto [g, e] : select(so, n, h))
            for (index_t d = 0; d < D; ++d) {
              double acc = 0;
              for (index_t c2 = 0; c2 < P; ++c2) acc += res[c2] * o[((h * E + e) * P + c2) * D + d];
              y[n * D + d] += g * acc;
            }
        } else {
          const double gate = sigmoid(linear_row(so, x_hat, n, h));
          for (index_t d = 0; d < D; ++d)
            for (index_t c2 = 0; c2 < P; ++c2) y[n * D + d] += gate * res[c2] * o[d * H * P + h * P + c2];
        }
      }
    }
  return y;
}

template <class T>
struct Data {
  Tensor<T> x_hat, x;
  ops::AttentionMask mask;
};

template <class T>
Data<T> make_data(index_t B, index_t T_len, index_t D, std::uint64_t seed) {
  Data<T> d;
  d.x_hat = make_tensor<T>({B, T_len, D}, random_values(B * T_len * D, seed, -1.5, 1.5));
  d.x = make_tensor<T>({B, T_len, D}, random_values(B * T_len * D, seed + 1, -1.5, 1.5));
  d.mask.causal = true;
  return d;
}

}  // namespace

TEST(SwitchHead, ForwardMatchesNaiveLoop) {
  for (int experts : {3, 1}) {
    const SwitchHeadConfig c = small_config(experts);
    SwitchHeadAttention<double> layer(c, 7);
    const index_t B = 2, T = 5;
    const auto d = make_data<double>(B, T, c.state_size, 11);
    Generator rng(1);
    const auto f = layer.forward(d.x_hat, d.x, d.mask, true, rng);
    const auto expected = naive_switchhead(c, layer.params(), to_double(d.x_hat), to_double(d.x), B, T);
    EXPECT_LT(max_rel_error(to_double(f.y), expected), 1e-12) << experts;

    // float agrees to float rounding.
    SwitchHeadAttention<float> layer_f(c, 7);
    auto pf = param_list(layer_f.params());
    auto pd = param_list(layer.params());
    for (std::size_t i = 0; i < pf.size(); ++i) pf[i]->copy_from_host(cast_vector<float>(to_double(*pd[i])));
    const auto df = make_data<float>(B, T, c.state_size, 11);
    const auto ff = layer_f.forward(df.x_hat, df.x, df.mask, false, rng);
    EXPECT_LT(max_rel_error(to_double(ff.y), expected), 2e-5) << experts;
  }
}

TEST(SwitchHead, BackwardMatchesFiniteDifferences) {
  for (int experts : {3, 1}) {
    const SwitchHeadConfig c = small_config(experts);
    SwitchHeadAttention<double> layer(c, 8);
    const index_t B = 2, T = 3, D = c.state_size;
    auto d = make_data<double>(B, T, D, 21);
    Generator rng(1);
    const auto f0 = layer.forward(d.x_hat, d.x, d.mask, true, rng);
    const auto r = random_values(f0.y.size(), 22);
    const bool moe = experts > 1;
    const auto r_o = moe ? random_values(f0.sel_o_logits.size(), 23) : std::vector<double>();
    const auto r_v = moe ? random_values(f0.sel_v_logits.size(), 24) : std::vector<double>();
    // L = Σ y·R + Σ z_o·R_o + Σ z_v·R_v: the router logits get a gradient as from the regulariser.
    const auto loss = [&]() {
      const auto f = layer.forward(d.x_hat, d.x, d.mask, true, rng);
      double l = dot(to_double(f.y), r);
      if (moe) l += dot(to_double(f.sel_o_logits), r_o) + dot(to_double(f.sel_v_logits), r_v);
      return l;
    };
    layer.zero_grad();
    const auto dsel_o = moe ? make_tensor<double>(f0.sel_o_logits.shape(), r_o) : Tensor<double>();
    const auto dsel_v = moe ? make_tensor<double>(f0.sel_v_logits.shape(), r_v) : Tensor<double>();
    const auto g = layer.backward(f0, make_tensor<double>(f0.y.shape(), r), dsel_o, dsel_v);

    const auto check_tensor = [&](Tensor<double>& target, const std::vector<double>& analytic, const char* name) {
      const auto x0 = to_double(target);
      const auto fn = [&](const std::vector<double>& p) {
        target.copy_from_host(p);
        return loss();
      };
      EXPECT_LT(finite_difference_error(x0, fn, analytic), fd_tolerance) << name << " experts " << experts;
      target.copy_from_host(x0);
    };
    check_tensor(d.x_hat, to_double(g.dqk_src), "qk_src");
    check_tensor(d.x, to_double(g.dv_src), "v_src");
    auto params = param_list(layer.params());
    auto grads = param_list(layer.grads());
    const char* names[] = {"q", "k", "v", "o", "sel_o", "sel_v"};
    for (std::size_t i = 0; i < params.size(); ++i) check_tensor(*params[i], to_double(*grads[i]), names[i]);
  }
}

TEST(SwitchHead, CachedDecodingEqualsFullSequence) {
  for (int experts : {3, 1}) {
    const SwitchHeadConfig c = small_config(experts);
    SwitchHeadAttention<double> layer(c, 9);
    const index_t B = 2, T = 7, D = c.state_size;
    const auto d = make_data<double>(B, T, D, 31);
    Generator rng(1);
    const auto full = to_double(layer.forward(d.x_hat, d.x, d.mask, false, rng).y);
    layers::SwitchHeadCache<double> cache;
    const auto xh = to_double(d.x_hat), xv = to_double(d.x);
    std::vector<double> chunked(full.size());
    index_t start = 0;
    for (index_t len : {3, 1, 2, 1}) {
      std::vector<double> a, b;
      for (index_t bb = 0; bb < B; ++bb) {
        a.insert(a.end(), xh.begin() + (bb * T + start) * D, xh.begin() + (bb * T + start + len) * D);
        b.insert(b.end(), xv.begin() + (bb * T + start) * D, xv.begin() + (bb * T + start + len) * D);
      }
      ops::AttentionMask causal;
      causal.causal = true;
      const auto f = layer.forward(make_tensor<double>({B, len, D}, a), make_tensor<double>({B, len, D}, b), causal,
                                   false, rng, &cache);
      EXPECT_EQ(cache.length(), start + len);
      const auto y = to_double(f.y);
      for (index_t bb = 0; bb < B; ++bb)
        std::copy(y.begin() + bb * len * D, y.begin() + (bb + 1) * len * D, chunked.begin() + (bb * T + start) * D);
      start += len;
    }
    EXPECT_LT(max_rel_error(chunked, full), 1e-13) << experts;
  }
}

TEST(SwitchHead, ExpertDropoutChangesTheSelectionOnlyInTraining) {
  SwitchHeadConfig c = small_config(4);
  c.expert_dropout = 0.5;
  SwitchHeadAttention<double> layer(c, 10);
  const auto d = make_data<double>(2, 5, c.state_size, 41);
  Generator rng(3);
  const auto eval1 = to_double(layer.forward(d.x_hat, d.x, d.mask, false, rng).y);
  const auto eval2 = to_double(layer.forward(d.x_hat, d.x, d.mask, false, rng).y);
  EXPECT_EQ(eval1, eval2);
  const auto train = to_double(layer.forward(d.x_hat, d.x, d.mask, true, rng).y);
  EXPECT_GT(max_rel_error(train, eval1), 1e-6);
  for (double v : train) EXPECT_TRUE(std::isfinite(v));  // gates come from the unmasked sigmoid
}

TEST(SwitchHead, InitialisationStatistics) {
  SwitchHeadConfig c;
  c.state_size = 64;
  c.n_heads = 4;
  c.n_experts = 5;
  c.projection_size = 16;
  c.init_scale = 0.5;
  SwitchHeadAttention<double> layer(c, 12);
  const auto stddev = [](const std::vector<double>& v) {
    const double mean = std::accumulate(v.begin(), v.end(), 0.0) / v.size();
    double s = 0;
    for (double x : v) s += (x - mean) * (x - mean);
    return std::sqrt(s / (v.size() - 1));
  };
  EXPECT_NEAR(stddev(to_double(layer.params().q)), 0.5 / 8, 0.004);
  EXPECT_NEAR(stddev(to_double(layer.params().v)), 0.5 / 8, 0.002);
  EXPECT_NEAR(stddev(to_double(layer.params().o)), 0.5 / 8, 0.002);
  EXPECT_EQ(layer.params().v.shape(), (Shape{20, 64, 16}));
  EXPECT_EQ(layer.params().sel_v.shape(), (Shape{20, 64}));
  SwitchHeadConfig one = c;
  one.n_experts = 1;
  SwitchHeadAttention<float> plain(one, 1);
  EXPECT_TRUE(plain.params().sel_v.empty());
  EXPECT_EQ(plain.params().sel_o.shape(), (Shape{4, 64}));
  EXPECT_EQ(plain.params().o.shape(), (Shape{64, 64}));
}

TEST(SwitchHead, RenormRowsMatchesTheOriginal) {
  // W_r / ‖W_r‖ · std_r / std(all normalised rows), std unbiased (SwitchHeadCore.renorm_rows).
  const index_t rows = 3, cols = 5;
  const auto w = random_values(rows * cols, 61);
  auto t = make_tensor<double>({rows, cols}, w);
  layers::moeut_init::renorm_rows(t);
  const auto unbiased_std = [](const std::vector<double>& v) {
    const double mean = std::accumulate(v.begin(), v.end(), 0.0) / v.size();
    double s = 0;
    for (double x : v) s += (x - mean) * (x - mean);
    return std::sqrt(s / (v.size() - 1));
  };
  std::vector<double> normalised(w.size()), row_std(rows);
  for (index_t r = 0; r < rows; ++r) {
    const std::vector<double> row(w.begin() + r * cols, w.begin() + (r + 1) * cols);
    row_std[r] = unbiased_std(row);
    double norm = 0;
    for (double x : row) norm += x * x;
    for (index_t c = 0; c < cols; ++c) normalised[r * cols + c] = row[c] / std::sqrt(norm);
  }
  const double global = unbiased_std(normalised);
  std::vector<double> expected(w.size());
  for (index_t i = 0; i < rows * cols; ++i) expected[i] = normalised[i] * row_std[i / cols] / global;
  EXPECT_LT(max_rel_error(to_double(t), expected), 1e-14);
}

TEST(SwitchHead, BadArgumentsThrow) {
  SwitchHeadConfig c = small_config(3);
  c.moe_k = 4;
  expect_status([&] { SwitchHeadAttention<float> l(c, 1); }, Status::invalid_argument, "moe_k");
  c = small_config(3);
  c.expert_dropout = 1.0;
  expect_status([&] { SwitchHeadAttention<float> l(c, 1); }, Status::invalid_argument, "expert_dropout");
  c = small_config(3);
  SwitchHeadAttention<float> layer(c, 1);
  Generator rng(1);
  Tensor<float> x("x", {2, 3, 8}), bad("bad", {2, 3, 7}), other("other", {2, 4, 8});
  ops::AttentionMask none;
  expect_status([&] { layer.forward(bad, bad, none, false, rng); }, Status::shape_mismatch, "qk_src");
  expect_status([&] { layer.forward(x, other, none, false, rng); }, Status::shape_mismatch, "v_src");
  layers::SwitchHeadCache<float> cache;
  cache.k = Tensor<float>("k", {2, 2, 4, 4});
  cache.v = Tensor<float>("v", {2, 2, 4, 4});
  expect_status([&] { layer.forward(x, x, none, false, rng, &cache); }, Status::shape_mismatch, "cache k");
  layers::SwitchHeadCache<float> fresh;
  const auto f = layer.forward(x, x, none, false, rng, &fresh);
  expect_status([&] { layer.backward(f, f.y, Tensor<float>(), Tensor<float>()); }, Status::invalid_argument,
                "KV cache");
  const auto g = layer.forward(x, x, none, false, rng);
  expect_status([&] { layer.backward(g, x, Tensor<float>("z", {2, 3, 2, 2}), Tensor<float>()); },
                Status::shape_mismatch, "dsel_o_logits");
}
