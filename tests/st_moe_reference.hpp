// Host references in double for the ST-MoE tests (test_top_n_gating.cpp, test_st_moe.cpp), written
// like the originals: dense one-hot masks, exclusive cumsums along each sequence, in-place capacity
// truncation, dense [groups, n, E, C] combine tensors and the einsum dispatch / combine
// (st-moe-pytorch v0.1.8 TopNGating / MoE; v0.0.14 Top2Gating with the 'sum' fix, its importance
// masks and HeirarchicalMoE).
#pragma once

#include "kmoe/moe/top_n_gating.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace kmoe::test {

struct RefGating {
  index_t capacity = 0;
  std::vector<int> expert_index, position;  // [tokens, k], −1 where not kept
  std::vector<double> gate;                 // [tokens, k]
  std::vector<double> normalised;           // [tokens, k] before routing and capacity
  std::vector<double> margins;              // per token: smallest gap among the top k + 1 probabilities
  std::vector<double> route_ratio;          // [k, tokens] ĝ_i / τ_i
  std::vector<double> combine;              // [tokens, E, capacity]
  double balance = 0, z = 0;
};

// logits [G, n, E]; uniform [k, G·n]; importance [G·n] or empty.
inline RefGating reference_gating(const moe::TopNGatingOptions& o, const std::vector<double>& logits, index_t G,
                                  index_t n, const std::vector<double>& uniform,
                                  const std::vector<double>& importance) {
  using moe::BalanceDensity;
  using moe::GateNormalisation;
  const index_t E = o.num_gates, N = G * n;
  const int k = o.top_n;
  const bool has_imp = !importance.empty();
  RefGating r;
  r.capacity = std::max<index_t>(std::min<index_t>(n, static_cast<index_t>(std::floor(n * o.capacity_factor / E))), 4);
  std::vector<double> p(N * E), lse(N);
  std::vector<std::vector<double>> mask(k, std::vector<double>(N * E, 0.0));
  std::vector<int> idx(N * k);
  std::vector<double> val(N * k);
  r.normalised.resize(N * k);
  r.route_ratio.resize(k * N);
  for (index_t t = 0; t < N; ++t) {
    double m = -INFINITY, s = 0;
    for (index_t e = 0; e < E; ++e) m = std::max(m, logits[t * E + e]);
    for (index_t e = 0; e < E; ++e) s += std::exp(logits[t * E + e] - m);
    lse[t] = m + std::log(s);
    for (index_t e = 0; e < E; ++e) p[t * E + e] = std::exp(logits[t * E + e] - lse[t]);
    std::vector<int> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return p[t * E + a] > p[t * E + b]; });
    double margin = INFINITY;
    for (int i = 0; i < std::min<int>(k, static_cast<int>(E) - 1); ++i)
      margin = std::min(margin, p[t * E + order[i]] - p[t * E + order[i + 1]]);
    r.margins.push_back(margin);
    for (int i = 0; i < k; ++i) {
      idx[t * k + i] = order[i];
      val[t * k + i] = p[t * E + order[i]];
    }
    const double imp = has_imp ? importance[t] : 1.0;
    if (has_imp && imp != 1.0) {  // v0.0.14: gate_1 *= (importance == 1); index_2 = top1 of the unmasked
      idx[t * k + 1] = idx[t * k];
      val[t * k + 1] = val[t * k];
      val[t * k] = 0;
    }
    double sum = 0;
    for (int i = 0; i < k; ++i) sum += val[t * k + i];
    const double denominator = o.normalisation == GateNormalisation::clamped_sum    ? std::max(sum, o.eps)
                               : o.normalisation == GateNormalisation::sum_plus_eps ? sum + o.eps
                                                                                    : 1.0;
    for (int i = 0; i < k; ++i) {
      const double g = val[t * k + i] / denominator;
      r.normalised[t * k + i] = g;
      const double tau = std::max(i == 0 ? o.eps : o.thresholds[i - 1], o.eps);
      r.route_ratio[i * N + t] = g / tau;
      const bool allowed = i == 0 ? imp == 1.0 : imp > 0.0;
      const bool route = allowed && (i == 0 || uniform[i * N + t] < g / tau);
      if (route) mask[i][t * E + idx[t * k + i]] = 1.0;
    }
  }
  std::vector<double> density(G * E, 0.0), proxy(G * E, 0.0);
  const auto take_density = [&] {
    std::fill(density.begin(), density.end(), 0.0);
    for (index_t t = 0; t < N; ++t)
      for (index_t e = 0; e < E; ++e) density[(t / n) * E + e] += mask[0][t * E + e] / n;
  };
  if (o.balance_density == BalanceDensity::before_capacity) take_density();
  r.expert_index.assign(N * k, -1);
  r.position.assign(N * k, -1);
  r.gate.assign(N * k, 0.0);
  r.combine.assign(N * E * r.capacity, 0.0);
  for (index_t g = 0; g < G; ++g) {
    std::vector<double> prev(E, 0.0);
    for (int i = 0; i < k; ++i) {
      std::vector<double> cum(E, 0.0);
      for (index_t t = 0; t < n; ++t) {
        const index_t row = g * n + t;
        for (index_t e = 0; e < E; ++e) {
          const double m = mask[i][row * E + e];
          const double pos = (cum[e] + prev[e]) * m;
          cum[e] += m;
          mask[i][row * E + e] = m * (pos < r.capacity ? 1.0 : 0.0);
          if (mask[i][row * E + e] > 0) {
            r.expert_index[row * k + i] = static_cast<int>(e);
            r.position[row * k + i] = static_cast<int>(pos);
            r.gate[row * k + i] = r.normalised[row * k + i];
            r.combine[(row * E + e) * r.capacity + static_cast<index_t>(pos)] += r.normalised[row * k + i];
          }
        }
      }
      for (index_t t = 0; t < n; ++t)
        for (index_t e = 0; e < E; ++e) prev[e] += mask[i][(g * n + t) * E + e];
    }
  }
  if (o.balance_density == BalanceDensity::after_capacity) take_density();
  if (o.compute_losses) {
    double count = 0, zsum = 0;
    for (index_t t = 0; t < N; ++t) {
      const double m = has_imp ? (importance[t] == 1.0 ? 1.0 : 0.0) : 1.0;
      for (index_t e = 0; e < E; ++e) proxy[(t / n) * E + e] += p[t * E + e] * m / n;
      zsum += m * lse[t] * lse[t];
      count += m;
    }
    for (index_t i = 0; i < G * E; ++i) r.balance += proxy[i] * density[i];
    r.balance *= static_cast<double>(E * E) / static_cast<double>(G * E);
    r.z = has_imp ? zsum / std::max(count, 1e-5) : zsum / N;
  }
  return r;
}

// Stacked GEGLU experts on the host (kmoe's layout: w_in [E, D, 2h], b_in [E, 2h], mult [E, h],
// w_out [E, h, D], b_out [E, D]).
struct RefExperts {
  index_t E = 0, D = 0, h = 0;
  std::vector<double> w_in, b_in, mult, w_out, b_out;

  std::vector<double> apply(index_t e, const double* x) const {
    std::vector<double> a(2 * h), y(D);
    for (index_t j = 0; j < 2 * h; ++j) {
      a[j] = b_in[e * 2 * h + j];
      for (index_t d = 0; d < D; ++d) a[j] += x[d] * w_in[(e * D + d) * 2 * h + j];
    }
    for (index_t d = 0; d < D; ++d) y[d] = b_out[e * D + d];
    for (index_t j = 0; j < h; ++j) {
      const double gate = a[h + j];
      const double hidden = 0.5 * gate * (1 + std::erf(gate / std::sqrt(2.0))) * a[j] * mult[e * h + j];
      for (index_t d = 0; d < D; ++d) y[d] += hidden * w_out[(e * h + j) * D + d];
    }
    return y;
  }
};

// x [R, D] · routerᵀ [E, D] → [R, E].
inline std::vector<double> reference_logits(const std::vector<double>& x, const double* router, index_t R, index_t D,
                                            index_t E) {
  std::vector<double> logits(R * E, 0.0);
  for (index_t r = 0; r < R; ++r)
    for (index_t e = 0; e < E; ++e)
      for (index_t d = 0; d < D; ++d) logits[r * E + e] += x[r * D + d] * router[e * D + d];
  return logits;
}

// The dispatch tensor: [combine ≠ 0], or with the straight-through estimator
// [combine ≠ 0] + combine − detached, detached being the combine tensor's value at the point where
// the gradient is taken (a constant): its derivative there is the original's straight-through
// gradient, which finite differences of the real forward (where dispatch is 0/1) do not see.
inline double reference_dispatch(const std::vector<double>& combine, const std::vector<double>* detached,
                                 index_t i) {
  const double one_hot = combine[i] != 0 ? 1.0 : 0.0;
  return detached ? one_hot + combine[i] - (*detached)[i] : one_hot;
}

// The einsums of MoE.forward for groups of n rows: X_in[g, e, c] = Σ_t x[g, t] · dispatch;
// Y = f_{offset + e}(X_in) (empty slots too, as the original); out[g, t] = Σ_{e,c} Y · combine.
inline std::vector<double> reference_dispatch_combine(const RefExperts& experts, index_t expert_offset,
                                                      const std::vector<double>& x, const RefGating& gate, index_t G,
                                                      index_t n, index_t E, index_t D,
                                                      const std::vector<double>* detached = nullptr) {
  const index_t C = gate.capacity;
  std::vector<double> out(G * n * D, 0.0);
  for (index_t g = 0; g < G; ++g)
    for (index_t e = 0; e < E; ++e)
      for (index_t c = 0; c < C; ++c) {
        std::vector<double> slot(D, 0.0);
        for (index_t t = 0; t < n; ++t) {
          const double w = reference_dispatch(gate.combine, detached, ((g * n + t) * E + e) * C + c);
          if (w != 0)
            for (index_t d = 0; d < D; ++d) slot[d] += w * x[(g * n + t) * D + d];
        }
        const auto y = experts.apply(expert_offset + e, slot.data());
        for (index_t t = 0; t < n; ++t) {
          const double w = gate.combine[((g * n + t) * E + e) * C + c];
          for (index_t d = 0; d < D; ++d) out[(g * n + t) * D + d] += w * y[d];
        }
      }
  return out;
}

struct RefMoE {
  std::vector<double> out;
  double balance = 0, z = 0;
  RefGating outer, inner;
};

// Flat MoE: x [B, n, D], router [E, D], uniform [k, B·n]. detached: the straight-through
// surrogate around that result (see reference_dispatch), or null for the plain dispatch.
inline RefMoE reference_moe(const moe::TopNGatingOptions& o, const RefExperts& experts, const std::vector<double>& router,
                            const std::vector<double>& x, index_t B, index_t n, const std::vector<double>& uniform,
                            const RefMoE* detached = nullptr) {
  const index_t D = experts.D, E = o.num_gates;
  RefMoE r;
  r.outer = reference_gating(o, reference_logits(x, router.data(), B * n, D, E), B, n, uniform, {});
  r.out = reference_dispatch_combine(experts, 0, x, r.outer, B, n, E, D, detached ? &detached->outer.combine : nullptr);
  r.balance = r.outer.balance;
  r.z = r.outer.z;
  return r;
}

// HeirarchicalMoE: outer gate over O groups, slots X_o[o, b, c], importance from the outer combine,
// inner gates (router_inner [O, I, D]) over each group's slots, experts o · I + i.
inline RefMoE reference_hierarchical_moe(const moe::TopNGatingOptions& outer_options,
                                         const moe::TopNGatingOptions& inner_options, const RefExperts& experts,
                                         const std::vector<double>& router, const std::vector<double>& router_inner,
                                         const std::vector<double>& x, index_t B, index_t n,
                                         const std::vector<double>& uniform_outer,
                                         const std::vector<double>& uniform_inner, const RefMoE* detached = nullptr) {
  const index_t D = experts.D, O = outer_options.num_gates, I = inner_options.num_gates;
  RefMoE r;
  r.outer = reference_gating(outer_options, reference_logits(x, router.data(), B * n, D, O), B, n, uniform_outer, {});
  const index_t C = r.outer.capacity;
  // Slots in [O, B, C] order, their importance from Σ_n combine.
  std::vector<double> slots(O * B * C * D, 0.0), importance(O * B * C, 0.0);
  for (index_t o = 0; o < O; ++o)
    for (index_t b = 0; b < B; ++b)
      for (index_t c = 0; c < C; ++c) {
        const index_t s = (o * B + b) * C + c;
        double total = 0;
        for (index_t t = 0; t < n; ++t) {
          const index_t i = ((b * n + t) * O + o) * C + c;
          total += r.outer.combine[i];
          const double w = reference_dispatch(r.outer.combine, detached ? &detached->outer.combine : nullptr, i);
          if (w != 0)
            for (index_t d = 0; d < D; ++d) slots[s * D + d] += w * x[(b * n + t) * D + d];
        }
        importance[s] = 0.5 * ((total > 0.5 ? 1.0 : 0.0) + (total > 0 ? 1.0 : 0.0));
      }
  std::vector<double> inner_logits(O * B * C * I);
  for (index_t o = 0; o < O; ++o) {
    const std::vector<double> block(slots.begin() + o * B * C * D, slots.begin() + (o + 1) * B * C * D);
    const auto l = reference_logits(block, router_inner.data() + o * I * D, B * C, D, I);
    std::copy(l.begin(), l.end(), inner_logits.begin() + o * B * C * I);
  }
  r.inner = reference_gating(inner_options, inner_logits, O * B, C, uniform_inner, importance);
  std::vector<double> slot_out(O * B * C * D, 0.0);
  for (index_t o = 0; o < O; ++o) {
    // This group's rows of the inner combine (and of its detached value).
    const index_t Ci = r.inner.capacity, rows = B * C, begin = o * rows * I * Ci, end = (o + 1) * rows * I * Ci;
    RefGating group = r.inner;
    group.combine.assign(r.inner.combine.begin() + begin, r.inner.combine.begin() + end);
    std::vector<double> group_detached;
    if (detached) group_detached.assign(detached->inner.combine.begin() + begin, detached->inner.combine.begin() + end);
    const std::vector<double> block(slots.begin() + o * rows * D, slots.begin() + (o + 1) * rows * D);
    const auto y = reference_dispatch_combine(experts, o * I, block, group, B, C, I, D,
                                              detached ? &group_detached : nullptr);
    std::copy(y.begin(), y.end(), slot_out.begin() + o * rows * D);
  }
  r.out.assign(B * n * D, 0.0);
  for (index_t b = 0; b < B; ++b)
    for (index_t t = 0; t < n; ++t)
      for (index_t o = 0; o < O; ++o)
        for (index_t c = 0; c < C; ++c) {
          const double w = r.outer.combine[((b * n + t) * O + o) * C + c];
          if (w == 0) continue;
          for (index_t d = 0; d < D; ++d) r.out[(b * n + t) * D + d] += w * slot_out[((o * B + b) * C + c) * D + d];
        }
  r.balance = r.outer.balance + r.inner.balance;
  r.z = r.outer.z + r.inner.z;
  return r;
}

}  // namespace kmoe::test
