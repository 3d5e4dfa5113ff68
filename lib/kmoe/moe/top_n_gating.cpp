#include "kmoe/moe/top_n_gating.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/ops/softmax.hpp"
#include "kmoe/ops/topk.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace kmoe::moe {

void TopNGatingOptions::validate() const {
  const char* op = "TopNGatingOptions";
  require(num_gates >= 1, Status::invalid_argument, op, ": num_gates = ", num_gates, " must be at least 1");
  require(top_n >= 1 && top_n <= num_gates && top_n <= ops::topk_max_k, Status::invalid_argument, op,
          ": top_n = ", top_n, " must lie in [1, min(num_gates = ", num_gates, ", ", ops::topk_max_k, ")]");
  require(static_cast<int>(thresholds.size()) == top_n - 1, Status::invalid_argument, op, ": thresholds has ",
          thresholds.size(), " values, expected top_n - 1 = ", top_n - 1);
  for (std::size_t i = 0; i < thresholds.size(); ++i) {
    require(std::isfinite(thresholds[i]) && thresholds[i] > 0, Status::invalid_argument, op, ": thresholds[", i,
            "] = ", thresholds[i], " must be finite and positive");
  }
  require(std::isfinite(capacity_factor) && capacity_factor >= 0, Status::invalid_argument, op,
          ": capacity_factor = ", capacity_factor, " must be finite and not negative");
  require(std::isfinite(eps) && eps > 0, Status::invalid_argument, op, ": eps = ", eps,
          " must be finite and positive");
}

index_t TopNGatingOptions::capacity(index_t group_size) const {
  // The original: max(min(n, int(n · cf / E)), MIN_EXPERT_CAPACITY), in Python floats.
  const auto scaled = static_cast<index_t>(std::floor(static_cast<double>(group_size) * capacity_factor / num_gates));
  return std::max<index_t>(std::min<index_t>(group_size, scaled), min_expert_capacity);
}

namespace gating_impl {

// The device passes over a group's tokens (slot counts, z-loss sums) run a thread per chunk of
// this many consecutive tokens.
constexpr index_t token_chunk = 64;

inline index_t token_chunks(index_t n) { return (n + token_chunk - 1) / token_chunk; }

// Tokens [first, end) of chunk c of group g, whose n tokens start at g · n.
KOKKOS_INLINE_FUNCTION Kokkos::pair<index_t, index_t> chunk_tokens(index_t g, index_t c, index_t n) {
  const index_t first = g * n + c * token_chunk;
  return Kokkos::make_pair(first, first + token_chunk < (g + 1) * n ? first + token_chunk : (g + 1) * n);
}

// Per-token choices: importance adjustments, normalised gates, routing decisions. routed [tokens, k]
// gets the expert of each routed choice (−1 otherwise); expert_index and position start at −1.
template <class T>
void route_choices(const TopNGatingOptions& options, const TopNRouting<T>& r, const Tensor<T>& route_uniform,
                   const RngStream& stream, const View2<int>& routed) {
  const View2<int> index = r.choice_index.as_matrix(), expert_index = r.expert_index.as_matrix(),
                   position = r.position.as_matrix();
  const View2<T> value = r.choice_value.as_matrix(), gate = r.normalised_gate.as_matrix();
  const bool has_importance = !r.importance.empty(), injected = !route_uniform.empty();
  const View1<T> importance = has_importance ? r.importance.flat() : View1<T>();
  const View2<T> uniform = injected ? route_uniform.as_matrix() : View2<T>();
  const int k = options.top_n;
  const index_t tokens = r.choice_index.dim(0);
  // τ_0 = eps as in the original's buffer [eps, τ_1, …] (choice 0 is routed regardless). Passed by
  // value in the kernel's arguments (validate() bounds top_n by topk_max_k): a View would be an
  // allocation and a fencing upload per call.
  Kokkos::Array<T, ops::topk_max_k> threshold{};
  for (int i = 0; i < k; ++i) {
    threshold[i] = static_cast<T>(std::max(i == 0 ? options.eps : options.thresholds[i - 1], options.eps));
  }
  const T eps = static_cast<T>(options.eps);
  const GateNormalisation normalisation = options.normalisation;
  Kokkos::parallel_for(
      "kmoe::gating::route_choices", Kokkos::RangePolicy<ExecSpace>(0, tokens), KOKKOS_LAMBDA(const index_t t) {
        // v0.0.14 with importance ≠ 1: no first choice, the second is the best expert.
        const T imp = has_importance ? importance(t) : T(1);
        if (has_importance && imp != T(1)) {
          index(t, 1) = index(t, 0);
          value(t, 1) = value(t, 0);
          value(t, 0) = T(0);
        }
        T sum = 0;
        for (int i = 0; i < k; ++i) sum += value(t, i);
        const T denominator = normalisation == GateNormalisation::clamped_sum ? Kokkos::Experimental::fmax(sum, eps)
                              : normalisation == GateNormalisation::sum_plus_eps ? sum + eps
                                                                                 : T(1);
        for (int i = 0; i < k; ++i) {
          const T g = value(t, i) / denominator;
          gate(t, i) = g;
          const T u = injected ? uniform(i, t) : stream.uniform<T>(static_cast<std::uint64_t>(i * tokens + t));
          const bool allowed = i == 0 ? imp == T(1) : imp > T(0);
          const bool route = allowed && (i == 0 || u < g / threshold[i]);
          routed(t, i) = route ? index(t, i) : -1;
          expert_index(t, i) = -1;
          position(t, i) = -1;
        }
      });
}

// Slots in priority order (choice-major, then sequence order) for every (group, expert): the kept
// choices and their positions, the first-choice density and the balance term mean_t(p · m) ·
// density. The group's choices are cut into chunks of one choice's consecutive tokens, so that
// the device runs a thread per (group, expert, chunk) rather than one walking the group's k · n
// choices: each chunk's routed choices counted (and, for the first choice, its tokens' router
// probabilities summed), the counts' prefix per (group, expert), then each chunk's slots placed
// from its prefix. Integer counts and partial sums in a fixed order: repeatable bit for bit.
template <class T>
void assign_slots(const TopNGatingOptions& options, const TopNRouting<T>& r, const View2<const int>& routed,
                  const View2<T>& balance_terms) {
  const View2<int> expert_index = r.expert_index.as_matrix(), position = r.position.as_matrix();
  const View2<T> density = r.density.as_matrix(), probs = r.probs.as_matrix();
  const bool has_importance = !r.importance.empty();
  const View1<T> importance = has_importance ? r.importance.flat() : View1<T>();
  const int k = options.top_n, E = options.num_gates;
  const index_t n = r.group_size, capacity = r.capacity, lines = r.groups * E;
  const bool before_capacity = options.balance_density == BalanceDensity::before_capacity;
  const bool losses = options.compute_losses;
  // Chunk c holds choice c / chunks_per_choice, token chunk c % chunks_per_choice of the group.
  const index_t chunks_per_choice = token_chunks(n), chunks = k * chunks_per_choice;
  const auto start = Tensor<int>::uninitialized("gating::slot_chunk_start", {lines, chunks});
  const auto proxy = losses ? Tensor<T>::uninitialized("gating::proxy_chunk_sum", {lines, chunks_per_choice})
                            : Tensor<T>();
  const View2<int> counts = start.as_matrix();
  const View2<T> proxy_sums = losses ? proxy.as_matrix() : View2<T>();
  Kokkos::parallel_for(
      "kmoe::gating::count_slots", md_range<2>({0, 0}, {lines, chunks}),
      KOKKOS_LAMBDA(const index_t ge, const index_t c) {
        const index_t g = ge / E, e = ge % E, i = c / chunks_per_choice;
        const auto tokens = chunk_tokens(g, c % chunks_per_choice, n);
        int count = 0;
        T sum = 0;
        for (index_t t = tokens.first; t < tokens.second; ++t) {
          count += routed(t, i) == e ? 1 : 0;
          if (losses && i == 0 && (!has_importance || importance(t) == T(1))) sum += probs(t, e);
        }
        counts(ge, c) = count;
        if (losses && i == 0) proxy_sums(ge, c) = sum;
      });
  Kokkos::parallel_for(
      "kmoe::gating::slot_prefix", Kokkos::RangePolicy<ExecSpace>(0, lines), KOKKOS_LAMBDA(const index_t ge) {
        int before = 0, first_routed = 0;
        for (index_t c = 0; c < chunks; ++c) {
          if (c == chunks_per_choice) first_routed = before;
          const int count = counts(ge, c);
          counts(ge, c) = before;
          before += count;
        }
        if (chunks == chunks_per_choice) first_routed = before;
        // Only the first choice's first `capacity` slots are kept among its routed ones.
        const index_t first_kept = first_routed < capacity ? first_routed : capacity;
        const T d = static_cast<T>(before_capacity ? first_routed : first_kept) / static_cast<T>(n);
        density(ge / E, ge % E) = d;
        if (losses) {
          T sum = 0;
          for (index_t c = 0; c < chunks_per_choice; ++c) sum += proxy_sums(ge, c);
          balance_terms(ge / E, ge % E) = sum / static_cast<T>(n) * d;
        }
      });
  Kokkos::parallel_for(
      "kmoe::gating::place_slots", md_range<2>({0, 0}, {lines, chunks}),
      KOKKOS_LAMBDA(const index_t ge, const index_t c) {
        const index_t g = ge / E, e = ge % E, i = c / chunks_per_choice;
        const auto tokens = chunk_tokens(g, c % chunks_per_choice, n);
        // Slots are counted over every routed choice, kept or not: once the count passes the
        // capacity every later choice of this expert is dropped.
        index_t count = counts(ge, c);
        for (index_t t = tokens.first; t < tokens.second; ++t) {
          if (routed(t, i) != e) continue;
          if (count < capacity) {
            expert_index(t, i) = static_cast<int>(e);
            position(t, i) = static_cast<int>(count);
          }
          ++count;
        }
      });
}

// gate(t, i) = ĝ_i where the choice was kept, else 0.
template <class T>
void kept_gates(const TopNRouting<T>& r) {
  const View2<int> expert_index = r.expert_index.as_matrix();
  const View2<T> normalised = r.normalised_gate.as_matrix(), gate = r.gate.as_matrix();
  Kokkos::parallel_for(
      "kmoe::gating::kept_gates", md_range<2>({0, 0}, {r.gate.dim(0), r.gate.dim(1)}),
      KOKKOS_LAMBDA(const index_t t, const index_t i) {
        gate(t, i) = expert_index(t, i) >= 0 ? normalised(t, i) : T(0);
      });
}

// Σ_t m_t · LSE_t² and Σ_t m_t (m = [importance == 1], or 1) over this rank's tokens: partial sums
// over chunks of each group's tokens on the device, summed on the host in (group, chunk) order.
template <class T>
std::pair<double, double> router_z_sums(const TopNRouting<T>& r) {
  const View1<T> lse = r.logit_lse.flat();
  const bool has_importance = !r.importance.empty();
  const View1<T> importance = has_importance ? r.importance.flat() : View1<T>();
  const index_t n = r.group_size;
  const index_t chunks = token_chunks(n);
  const auto partial = Tensor<T>::uninitialized("gating::z_chunk_sums", {r.groups, chunks, 2});
  const View3<T> sums = partial.template view<3>();
  Kokkos::parallel_for(
      "kmoe::gating::z_loss", md_range<2>({0, 0}, {r.groups, chunks}), KOKKOS_LAMBDA(const index_t g, const index_t c) {
        T sum = 0, count = 0;
        const auto tokens = chunk_tokens(g, c, n);
        for (index_t t = tokens.first; t < tokens.second; ++t) {
          if (has_importance && importance(t) != T(1)) continue;
          sum += lse(t) * lse(t);
          count += T(1);
        }
        sums(g, c, 0) = sum;
        sums(g, c, 1) = count;
      });
  const std::vector<T> host = partial.to_host();
  double sum = 0, count = 0;
  for (std::size_t i = 0; i < host.size(); i += 2) {
    sum += host[i];
    count += host[i + 1];
  }
  return {sum, count};
}

// The losses from this rank's sums, over every rank's groups: balance = E / groups · Σ terms,
// z = Σ m·LSE² / count. Collective.
template <class T>
void finish_losses(TopNRouting<T>& r, index_t E, bool has_importance, double balance_sum, double z_sum,
                   double z_count, const dist::Communicator& comm) {
  double totals[5] = {balance_sum, z_sum, z_count, static_cast<double>(r.groups),
                      static_cast<double>(r.groups * r.group_size)};
  comm.all_reduce_sum(totals, 5);
  r.loss_groups = static_cast<index_t>(totals[3]);
  r.z_loss_count = has_importance ? std::max(totals[2], 1e-5) : totals[4];
  r.balance_loss = static_cast<T>(totals[3] > 0 ? totals[0] * static_cast<double>(E) / totals[3] : 0.0);
  r.router_z_loss = static_cast<T>(r.z_loss_count > 0 ? totals[1] / r.z_loss_count : 0.0);
}

template <class T>
double sum_on_host(const View2<T>& values) {
  const auto host = Kokkos::create_mirror_view_and_copy(HostSpace(), values);
  double sum = 0;
  for (std::size_t i = 0; i < host.extent(0); ++i)
    for (std::size_t j = 0; j < host.extent(1); ++j) sum += host(i, j);
  return sum;
}

}  // namespace gating_impl

template <class T>
TopNRouting<T> top_n_gating_forward(const TopNGatingOptions& options, const Tensor<T>& logits,
                                    const Tensor<T>& noise, const Tensor<T>& importance,
                                    const Tensor<T>& route_uniform, const RngStream& routing,
                                    const dist::Communicator& comm) {
  const char* op = "top_n_gating_forward";
  options.validate();
  require(logits.rank() == 3 && logits.dim(2) == options.num_gates, Status::shape_mismatch, op, ": logits are ",
          logits.shape().str(), ", expected [groups, group_size, num_gates = ", options.num_gates, "]");
  const index_t groups = logits.dim(0), n = logits.dim(1), tokens = groups * n, E = options.num_gates;
  const int k = options.top_n;
  require(tokens >= 1 || (comm.distributed() && groups == 0), Status::shape_mismatch, op, ": logits ",
          logits.shape().str(), " hold no tokens");
  if (!noise.empty()) noise.require_shape(logits.shape(), std::string(op) + ": noise");
  if (!importance.empty()) {
    importance.require_shape({groups, n}, std::string(op) + ": importance");
    require(k == 2, Status::invalid_argument, op, ": importance needs top_n = 2 (v0.0.14 Top2Gating), got top_n = ",
            k);
  }
  if (!route_uniform.empty()) route_uniform.require_shape({k, tokens}, std::string(op) + ": route_uniform");

  TopNRouting<T> r;
  r.groups = groups;
  r.group_size = n;
  r.capacity = options.capacity(n);
  if (tokens == 0) {  // a rank without groups: only the losses' collective
    if (options.compute_losses) gating_impl::finish_losses(r, E, !importance.empty(), 0, 0, 0, comm);
    return r;
  }
  r.logits = logits.reshape({tokens, E});
  r.importance = importance.empty() ? Tensor<T>() : importance.reshape({tokens});

  r.logit_lse = Tensor<T>::uninitialized("gating::logit_lse", {tokens});
  ops::logsumexp_forward<T>(r.logits.as_3d(1), View2<T>(r.logit_lse.data(), tokens, 1));
  r.probs = Tensor<T>::uninitialized("gating::probs", {tokens, E});
  if (noise.empty()) {
    ops::softmax_forward<T>(r.logits.as_3d(1), r.probs.as_3d(1));
  } else {
    const View1<T> noisy = r.probs.flat(), clean = r.logits.flat(), added = noise.flat();
    Kokkos::parallel_for(
        "kmoe::gating::add_noise", Kokkos::RangePolicy<ExecSpace>(0, tokens * E),
        KOKKOS_LAMBDA(const index_t i) { noisy(i) = clean(i) + added(i); });
    ops::softmax_forward<T>(r.probs.as_3d(1), r.probs.as_3d(1));
  }

  r.choice_index = Tensor<int>::uninitialized("gating::choice_index", {tokens, k});
  r.choice_value = Tensor<T>::uninitialized("gating::choice_value", {tokens, k});
  ops::topk_forward<T>(r.probs.as_matrix(), k, ops::TopkOrder::descending, r.choice_value.as_matrix(),
                       r.choice_index.as_matrix());
  r.normalised_gate = Tensor<T>::uninitialized("gating::normalised_gate", {tokens, k});
  r.expert_index = Tensor<int>::uninitialized("gating::expert_index", {tokens, k});
  r.position = Tensor<int>::uninitialized("gating::position", {tokens, k});
  const auto routed = Tensor<int>::uninitialized("gating::routed", {tokens, k});
  gating_impl::route_choices(options, r, route_uniform, routing, routed.as_matrix());

  r.density = Tensor<T>::uninitialized("gating::density", {groups, E});
  const auto balance_terms =
      options.compute_losses ? Tensor<T>::uninitialized("gating::balance_terms", {groups, E}) : Tensor<T>();
  gating_impl::assign_slots(options, r, routed.as_matrix(), options.compute_losses ? balance_terms.as_matrix() : View2<T>());
  r.gate = Tensor<T>::uninitialized("gating::gate", {tokens, k});
  gating_impl::kept_gates(r);

  if (options.compute_losses) {
    // E² · mean over (group, expert) = E / groups · Σ.
    const auto [z_sum, z_count] = gating_impl::router_z_sums(r);
    gating_impl::finish_losses(r, E, !importance.empty(), gating_impl::sum_on_host(balance_terms.as_matrix()), z_sum,
                               z_count, comm);
  }
  return r;
}

template <class T>
Tensor<T> top_n_gating_backward(const TopNGatingOptions& options, const TopNRouting<T>& r, const Tensor<T>& dgate,
                                T balance_coef, T z_coef) {
  const char* op = "top_n_gating_backward";
  require(!r.gate.empty(), Status::invalid_argument, op, ": the routing is empty (default-constructed)");
  const index_t tokens = r.gate.dim(0), E = options.num_gates, n = r.group_size, groups = r.loss_groups;
  const int k = options.top_n;
  require(r.gate.dim(1) == k && r.probs.dim(1) == E, Status::shape_mismatch, op, ": the routing (gate ",
          r.gate.shape().str(), ", probs ", r.probs.shape().str(), ") does not match top_n = ", k,
          ", num_gates = ", E);
  dgate.require_shape({tokens, k}, std::string(op) + ": dgate");

  const auto dlogits = Tensor<T>::uninitialized("gating::dlogits", {tokens, E});
  const View2<T> dl = dlogits.as_matrix(), probs = r.probs.as_matrix(), logits = r.logits.as_matrix(),
                 value = r.choice_value.as_matrix(), density = r.density.as_matrix();
  const View2<const T> dg = dgate.as_matrix();
  const View2<int> index = r.choice_index.as_matrix(), expert_index = r.expert_index.as_matrix();
  const View1<T> lse = r.logit_lse.flat();
  const bool has_importance = !r.importance.empty();
  const View1<T> importance = has_importance ? r.importance.flat() : View1<T>();
  const bool losses = options.compute_losses;
  // d balance / d p[t, e] = E² / (groups · E) · density[g, e] / n;  d z / d logit = 2 · LSE · softmax / count.
  const T balance_scale =
      losses ? static_cast<T>(static_cast<double>(balance_coef) * E / static_cast<double>(groups * n)) : T(0);
  const T z_scale = losses ? static_cast<T>(2.0 * static_cast<double>(z_coef) / r.z_loss_count) : T(0);
  const T eps = static_cast<T>(options.eps);
  const GateNormalisation normalisation = options.normalisation;
  Kokkos::parallel_for(
      "kmoe::gating::backward", Kokkos::RangePolicy<ExecSpace>(0, tokens), KOKKOS_LAMBDA(const index_t t) {
        const index_t g = t / n;
        const T m = has_importance && importance(t) != T(1) ? T(0) : T(1);
        // ĝ_i = v_i / S(v): dv_i = dĝ_i / S − [S depends on v] · Σ_j dĝ_j v_j / S².
        T sum = 0, weighted = 0;
        for (int i = 0; i < k; ++i) {
          sum += value(t, i);
          if (expert_index(t, i) >= 0) weighted += dg(t, i) * value(t, i);
        }
        T denominator = T(1), correction = T(0);
        if (normalisation == GateNormalisation::clamped_sum) {
          denominator = Kokkos::Experimental::fmax(sum, eps);
          correction = sum > eps ? weighted / (denominator * denominator) : T(0);
        } else if (normalisation == GateNormalisation::sum_plus_eps) {
          denominator = sum + eps;
          correction = weighted / (denominator * denominator);
        }
        // An absent first choice (importance ≠ 1) has no gate: nothing flows through it.
        const int first = has_importance && importance(t) != T(1) ? 1 : 0;
        const auto dprob = [&](const index_t e) {
          T d = balance_scale * m * density(g, e);
          for (int i = first; i < k; ++i) {
            if (index(t, i) != e) continue;
            const T dgi = expert_index(t, i) >= 0 ? dg(t, i) : T(0);
            d += dgi / denominator - correction;
          }
          return d;
        };
        T dot = 0;
        for (index_t e = 0; e < E; ++e) dot += dprob(e) * probs(t, e);
        const T z_factor = z_scale * m * lse(t);
        for (index_t e = 0; e < E; ++e) {
          const T clean_softmax = Kokkos::Experimental::exp(logits(t, e) - lse(t));
          dl(t, e) = probs(t, e) * (dprob(e) - dot) + z_factor * clean_softmax;
        }
      });
  return dlogits;
}

template <class T>
Tensor<T> gumbel_noise(const Shape& shape, const RngStream& stream, T noise_mult) {
  const auto noise = Tensor<T>::uninitialized("gating::gumbel_noise", shape);
  const View1<T> out = noise.flat();
  Kokkos::parallel_for(
      "kmoe::gating::gumbel_noise", Kokkos::RangePolicy<ExecSpace>(0, noise.size()), KOKKOS_LAMBDA(const index_t i) {
        const T u = stream.uniform<T>(static_cast<std::uint64_t>(i));
        const T inner = -Kokkos::Experimental::log(Kokkos::Experimental::fmax(u, T(1e-20)));
        out(i) = -Kokkos::Experimental::log(Kokkos::Experimental::fmax(inner, T(1e-20))) * noise_mult;
      });
  return noise;
}

#define KMOE_INSTANTIATE(T)                                                                                      \
  template struct TopNRouting<T>;                                                                               \
  template TopNRouting<T> top_n_gating_forward<T>(const TopNGatingOptions&, const Tensor<T>&, const Tensor<T>&, \
                                                  const Tensor<T>&, const Tensor<T>&, const RngStream&,        \
                                                  const dist::Communicator&);                                 \
  template Tensor<T> top_n_gating_backward<T>(const TopNGatingOptions&, const TopNRouting<T>&,                  \
                                              const Tensor<T>&, T, T);                                          \
  template Tensor<T> gumbel_noise<T>(const Shape&, const RngStream&, T);
KMOE_INSTANTIATE(float)
KMOE_INSTANTIATE(double)
#undef KMOE_INSTANTIATE

}  // namespace kmoe::moe
