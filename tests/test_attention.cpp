#include "kmoe/ops/attention.hpp"
#include "test_util.hpp"

#include <cmath>
#include <limits>

using namespace kmoe;
using namespace kmoe::test;

namespace {

using BoolView = Kokkos::View<bool**, Layout, MemSpace>;

struct Case {
  index_t b, h, tq, tk, dh, dv;
  std::vector<int> src_mask;  // [b, tk], empty = none
  std::vector<int> pos_mask;  // [tq, tm], empty = none
  index_t tm = 0;
  bool causal = false;
};

BoolView make_mask(const std::vector<int>& bits, index_t rows, index_t cols) {
  BoolView mask("mask", rows, cols);
  const auto host = Kokkos::create_mirror_view(mask);
  for (index_t r = 0; r < rows; ++r)
    for (index_t c = 0; c < cols; ++c) host(r, c) = bits[r * cols + c] != 0;
  Kokkos::deep_copy(mask, host);
  return mask;
}

bool naive_masked(const Case& c, index_t b, index_t i, index_t j) {
  if (!c.src_mask.empty() && c.src_mask[b * c.tk + j]) return true;
  if (c.causal && j > (c.tk - c.tq) + i) return true;
  if (!c.pos_mask.empty()) {
    const index_t col = j - (c.tk - c.tm);
    if (col >= 0 && c.pos_mask[i * c.tm + col]) return true;
  }
  return false;
}

// softmax(scale·QKᵀ masked)·V in double; fully masked rows → 0.
std::vector<double> naive_attention(const Case& c, const std::vector<double>& q, const std::vector<double>& k,
                                    const std::vector<double>& v, double scale) {
  std::vector<double> out(c.b * c.h * c.tq * c.dv, 0.0);
  for (index_t b = 0; b < c.b; ++b)
    for (index_t h = 0; h < c.h; ++h)
      for (index_t i = 0; i < c.tq; ++i) {
        const index_t bh = b * c.h + h;
        std::vector<double> s(c.tk, -INFINITY);
        double mx = -INFINITY;
        for (index_t j = 0; j < c.tk; ++j) {
          if (naive_masked(c, b, i, j)) continue;
          double d = 0;
          for (index_t e = 0; e < c.dh; ++e) d += q[(bh * c.tq + i) * c.dh + e] * k[(bh * c.tk + j) * c.dh + e];
          s[j] = scale * d;
          mx = std::max(mx, s[j]);
        }
        if (mx == -INFINITY) continue;
        double z = 0;
        for (auto& x : s) z += (x = std::exp(x - mx));
        for (index_t j = 0; j < c.tk; ++j)
          for (index_t e = 0; e < c.dv; ++e)
            out[(bh * c.tq + i) * c.dv + e] += s[j] / z * v[(bh * c.tk + j) * c.dv + e];
      }
  return out;
}

template <class T>
struct Run {
  Tensor<T> q, k, v, probs, out;
  ops::AttentionMask mask;
  BoolView src, pos;
};

template <class T>
Run<T> run_forward(const Case& c, const std::vector<double>& q, const std::vector<double>& k,
                   const std::vector<double>& v, double scale) {
  Run<T> r;
  r.q = make_tensor<T>({c.b, c.h, c.tq, c.dh}, q);
  r.k = make_tensor<T>({c.b, c.h, c.tk, c.dh}, k);
  r.v = make_tensor<T>({c.b, c.h, c.tk, c.dv}, v);
  r.probs = Tensor<T>("probs", {c.b, c.h, c.tq, c.tk});
  r.out = Tensor<T>("out", {c.b, c.h, c.tq, c.dv});
  if (!c.src_mask.empty()) r.mask.src_length_mask = r.src = make_mask(c.src_mask, c.b, c.tk);
  if (!c.pos_mask.empty()) r.mask.position_mask = r.pos = make_mask(c.pos_mask, c.tq, c.tm);
  r.mask.causal = c.causal;
  ops::attention_forward<T>(r.q.template view<4>(), r.k.template view<4>(), r.v.template view<4>(),
                            static_cast<T>(scale), r.mask, r.probs.template view<4>(), r.out.template view<4>());
  return r;
}

std::vector<int> random_bits(std::size_t n, std::uint64_t seed, int percent) {
  std::mt19937_64 gen(seed);
  std::vector<int> bits(n);
  for (auto& b : bits) b = random_int(gen, 0, 99) < percent;
  return bits;
}

std::vector<Case> cases() {
  std::vector<Case> all;
  all.push_back({2, 3, 7, 7, 5, 4, {}, {}, 0, false});                                // no mask
  all.push_back({2, 2, 7, 7, 8, 8, {}, {}, 0, true});                                 // causal
  all.push_back({1, 3, 3, 9, 4, 6, {}, {}, 0, true});                                 // causal, cached keys
  Case pos{2, 2, 5, 5, 6, 3, {}, {}, 5, false};
  for (index_t i = 0; i < 5; ++i)  // an explicit causal mask
    for (index_t j = 0; j < 5; ++j) pos.pos_mask.push_back(j > i);
  all.push_back(pos);
  Case left{1, 2, 4, 11, 3, 5, {}, {}, 4, false};  // position mask over the last 4 keys (left padded)
  for (index_t i = 0; i < 4; ++i)
    for (index_t j = 0; j < 4; ++j) left.pos_mask.push_back(j > i);
  all.push_back(left);
  Case both{2, 2, 6, 6, 4, 4, random_bits(12, 31, 30), {}, 6, true};  // padding + causal mask
  both.pos_mask = random_bits(36, 32, 20);
  all.push_back(both);
  all.push_back({1, 1, 1, 1, 1, 1, {}, {}, 0, false});
  all.push_back({1, 2, 33, 33, 16, 16, random_bits(33, 33, 10), {}, 0, true});
  return all;
}

}  // namespace

TEST(Attention, ForwardMatchesNaiveLoop) {
  for (const Case& c : cases()) {
    const auto q = random_values(c.b * c.h * c.tq * c.dh, 41, -2, 2);
    const auto k = random_values(c.b * c.h * c.tk * c.dh, 42, -2, 2);
    const auto v = random_values(c.b * c.h * c.tk * c.dv, 43);
    const double scale = 1 / std::sqrt(static_cast<double>(c.dh));
    const auto expected = naive_attention(c, q, k, v, scale);
    EXPECT_LT(max_rel_error(to_double(run_forward<double>(c, q, k, v, scale).out), expected), 1e-13)
        << c.tq << "x" << c.tk;
    EXPECT_LT(max_rel_error(to_double(run_forward<float>(c, q, k, v, scale).out), expected), 2e-6)
        << c.tq << "x" << c.tk;
  }
}

TEST(Attention, FullyMaskedRowGivesZeros) {
  Case c{2, 1, 3, 4, 2, 3, {1, 1, 1, 1, 0, 0, 0, 0}, {}, 0, false};  // sequence 0 is all padding
  c.pos_mask = {0, 0, 0, 0, 1, 1, 1, 1, 0, 1, 0, 1};                // row 1 masks everything
  c.tm = 4;
  const auto q = random_values(c.b * c.tq * c.dh, 44), k = random_values(c.b * c.tk * c.dh, 45);
  const auto v = random_values(c.b * c.tk * c.dv, 46);
  const auto r = run_forward<double>(c, q, k, v, 0.7);
  const auto out = to_double(r.out);
  for (double x : out) EXPECT_TRUE(std::isfinite(x));
  for (index_t e = 0; e < c.b * c.tq * c.dv; ++e) {
    const index_t row = e / c.dv;
    const bool fully_masked = row < 3 || row == 4;
    if (fully_masked) EXPECT_EQ(out[e], 0.0) << row;
  }
  EXPECT_LT(max_rel_error(out, naive_attention(c, q, k, v, 0.7)), 1e-13);
  // ... and no gradient flows through them.
  Tensor<double> dq("dq", r.q.shape()), dk("dk", r.k.shape()), dv("dv", r.v.shape());
  const auto dout = make_tensor<double>(r.out.shape(), random_values(r.out.size(), 47));
  ops::attention_backward<double>(r.q.view<4>(), r.k.view<4>(), r.v.view<4>(), 0.7, r.probs.view<4>(),
                                  dout.view<4>(), dq.view<4>(), dk.view<4>(), dv.view<4>());
  const auto dqh = to_double(dq);
  for (index_t e = 0; e < 3 * c.dh; ++e) EXPECT_EQ(dqh[e], 0.0);
  for (index_t e = 0; e < c.tk * c.dh; ++e) EXPECT_EQ(to_double(dk)[e], 0.0);  // sequence 0's keys
}

TEST(Attention, BackwardMatchesFiniteDifferences) {
  for (const Case& c : cases()) {
    if (c.tq > 8) continue;  // keep the stencil small
    const auto q = random_values(c.b * c.h * c.tq * c.dh, 51, -2, 2);
    const auto k = random_values(c.b * c.h * c.tk * c.dh, 52, -2, 2);
    const auto v = random_values(c.b * c.h * c.tk * c.dv, 53);
    const auto r = random_values(c.b * c.h * c.tq * c.dv, 54);
    const double scale = 0.6;
    auto run = run_forward<double>(c, q, k, v, scale);
    const auto dout = make_tensor<double>(run.out.shape(), r);
    Tensor<double> dq("dq", run.q.shape()), dk("dk", run.k.shape()), dv("dv", run.v.shape());
    ops::attention_backward<double>(run.q.view<4>(), run.k.view<4>(), run.v.view<4>(), scale, run.probs.view<4>(),
                                    dout.view<4>(), dq.view<4>(), dk.view<4>(), dv.view<4>());
    const auto loss_q = [&](const std::vector<double>& p) { return dot(naive_attention(c, p, k, v, scale), r); };
    const auto loss_k = [&](const std::vector<double>& p) { return dot(naive_attention(c, q, p, v, scale), r); };
    const auto loss_v = [&](const std::vector<double>& p) { return dot(naive_attention(c, q, k, p, scale), r); };
    EXPECT_LT(finite_difference_error(q, loss_q, to_double(dq)), fd_tolerance) << c.tq << "x" << c.tk;
    EXPECT_LT(finite_difference_error(k, loss_k, to_double(dk)), fd_tolerance) << c.tq << "x" << c.tk;
    EXPECT_LT(finite_difference_error(v, loss_v, to_double(dv)), fd_tolerance) << c.tq << "x" << c.tk;
  }
}

// Without value dimensions the output is zero, so no gradient reaches q or k; the dP scratch must
// then be zeroed, not taken as left in a reused memory-pool block (made NaN here first).
TEST(Attention, NoValueDimensionsGiveZeroGradients) {
  const index_t b = 2, h = 3, tq = 4, tk = 5, dh = 6;
  { Tensor<double>("stale", {b, h, tq, tk}).fill(std::nan("")); }
  const auto q = make_tensor<double>({b, h, tq, dh}, random_values(b * h * tq * dh, 61));
  const auto k = make_tensor<double>({b, h, tk, dh}, random_values(b * h * tk * dh, 62));
  Tensor<double> v("v", {b, h, tk, 0}), probs("probs", {b, h, tq, tk}), out("out", {b, h, tq, 0});
  ops::attention_forward<double>(q.view<4>(), k.view<4>(), v.view<4>(), 0.5, {}, probs.view<4>(), out.view<4>());
  { Tensor<double>("stale", {b, h, tq, tk}).fill(std::nan("")); }
  Tensor<double> dq("dq", q.shape()), dk("dk", k.shape()), dv("dv", v.shape());
  ops::attention_backward<double>(q.view<4>(), k.view<4>(), v.view<4>(), 0.5, probs.view<4>(), out.view<4>(),
                                  dq.view<4>(), dk.view<4>(), dv.view<4>());
  EXPECT_EQ(to_double(dq), std::vector<double>(dq.size(), 0.0));
  EXPECT_EQ(to_double(dk), std::vector<double>(dk.size(), 0.0));
}

TEST(Attention, BadArgumentsThrow) {
  Tensor<float> q("q", {2, 2, 3, 4}), k("k", {2, 2, 5, 4}), v("v", {2, 2, 5, 6}), p("p", {2, 2, 3, 5}),
      o("o", {2, 2, 3, 6}), k_bad("k", {2, 2, 5, 3}), o_bad("o", {2, 2, 3, 5});
  ops::AttentionMask none;
  expect_status([&] { ops::attention_forward<float>(q.view<4>(), k_bad.view<4>(), v.view<4>(), 1, none, p.view<4>(), o.view<4>()); },
                Status::shape_mismatch, "k is");
  expect_status([&] { ops::attention_forward<float>(q.view<4>(), k.view<4>(), v.view<4>(), 1, none, p.view<4>(), o_bad.view<4>()); },
                Status::shape_mismatch, "out is");
  ops::AttentionMask bad_src;
  bad_src.src_length_mask = BoolView("m", 2, 3);
  expect_status([&] { ops::attention_forward<float>(q.view<4>(), k.view<4>(), v.view<4>(), 1, bad_src, p.view<4>(), o.view<4>()); },
                Status::shape_mismatch, "src_length_mask");
  ops::AttentionMask bad_pos;
  bad_pos.position_mask = BoolView("m", 3, 6);
  expect_status([&] { ops::attention_forward<float>(q.view<4>(), k.view<4>(), v.view<4>(), 1, bad_pos, p.view<4>(), o.view<4>()); },
                Status::shape_mismatch, "position_mask");
  expect_status([&] {
    ops::attention_forward<float>(q.view<4>(), k.view<4>(), v.view<4>(), std::numeric_limits<float>::infinity(),
                                  none, p.view<4>(), o.view<4>());
  }, Status::invalid_argument, "scale");
  expect_status([&] {
    ops::attention_backward<float>(q.view<4>(), k.view<4>(), v.view<4>(), 1, p.view<4>(), o.view<4>(), q.view<4>(),
                                   k.view<4>(), o.view<4>());
  }, Status::shape_mismatch, "dv is");
}
