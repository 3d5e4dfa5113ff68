#include "kmoe/layers/soft_moe_experts.hpp"

#include <KokkosBlas1_axpby.hpp>
#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "kmoe/core/error.hpp"
#include "kmoe/dist/mpi_memory.hpp"
#include "kmoe/moe/cvmm.hpp"
#include "kmoe/moe/expert_bias.hpp"
#include "kmoe/ops/dropout.hpp"
#include "kmoe/ops/glu.hpp"
#include "kmoe/ops/init.hpp"
#include "kmoe/ops/impl/team_reduce.hpp"
#include "kmoe/ops/norms.hpp"

namespace kmoe::layers {

void SlotExpertConfig::validate() const {
  const auto positive = [](const char* field, index_t value) {
    require(value >= 1, Status::invalid_argument, "SlotExpertConfig: ", field, " = ", value, " must be at least 1");
  };
  positive("dim", dim);
  positive("hidden", hidden);
  positive("n_experts", n_experts);
  require(dropout >= 0 && dropout < 1, Status::invalid_argument, "SlotExpertConfig: dropout = ", dropout,
          " is outside [0, 1)");
  require(std::isfinite(layer_norm_eps) && layer_norm_eps > 0, Status::invalid_argument,
          "SlotExpertConfig: layer_norm_eps = ", layer_norm_eps, " must be finite and positive");
}

template <class T>
std::vector<Tensor<T>*> SlotExpertParams<T>::all() {
  std::vector<Tensor<T>*> present;
  for (Tensor<T>* t :
       {&w1, &b1, &hidden_norm_weight, &hidden_norm_bias, &w2, &b2, &output_norm_weight, &output_norm_bias})
    if (!t->empty()) present.push_back(t);
  return present;
}

namespace impl::slot_experts {


inline MDRange<2> all_of(index_t rows, index_t cols) { return md_range<2>({0, 0}, {rows, cols}); }

// stacked [E, in, out] = gain · (per expert) the transpose of torch.nn.init.orthogonal_ of an
// [out, in] weight: a normal matrix of the taller orientation, orthonormalised column by column
// (Gram-Schmidt, applied twice for stability; the same Q as QR with diag(R) made positive, which is
// what orthogonal_ returns). A one-time host computation in double.
template <class T>
void fill_orthogonal(Tensor<T> stacked, const RngStream& stream, double gain) {
  if (!stream.draws) return;  // ParameterInit::zeros
  const index_t experts = stacked.dim(0), in = stacked.dim(1), out = stacked.dim(2);
  const index_t m = std::max(in, out), n = std::min(in, out);
  std::vector<T> values(static_cast<std::size_t>(stacked.size()));
  std::vector<double> q(static_cast<std::size_t>(m * n));  // column j at q[j·m ...]
  for (index_t e = 0; e < experts; ++e) {
    for (index_t i = 0; i < m * n; ++i) q[i] = stream.normal<double>(static_cast<std::uint64_t>(e * m * n + i));
    for (index_t j = 0; j < n; ++j) {
      double* col = &q[j * m];
      for (int pass = 0; pass < 2; ++pass) {
        for (index_t k = 0; k < j; ++k) {
          const double* prev = &q[k * m];
          double proj = 0;
          for (index_t i = 0; i < m; ++i) proj += prev[i] * col[i];
          for (index_t i = 0; i < m; ++i) col[i] -= proj * prev[i];
        }
      }
      double norm = 0;
      for (index_t i = 0; i < m; ++i) norm += col[i] * col[i];
      norm = std::sqrt(norm);
      for (index_t i = 0; i < m; ++i) col[i] /= norm;
    }
    // The torch weight W [out, in] is Q [m, n] when out ≥ in, else Qᵀ; stacked holds Wᵀ.
    for (index_t o = 0; o < out; ++o)
      for (index_t i = 0; i < in; ++i) {
        const double w = out >= in ? q[i * m + o] : q[o * m + i];
        values[static_cast<std::size_t>((e * in + i) * out + o)] = static_cast<T>(gain * w);
      }
  }
  stacked.copy_from_host(values);
}

// rows(r, c) = rows(r, c) · gamma(expert(r), c) + beta(expert(r), c): the per-expert affine part of
// a LayerNorm whose normalisation ran without one.
template <class T>
void expert_affine(const View2<T>& rows, const View1<const int>& expert, const View2<const T>& gamma,
                   const View2<const T>& beta) {
  Kokkos::parallel_for(
      "kmoe::soft_moe_experts::affine", all_of(rows.extent(0), rows.extent(1)),
      KOKKOS_LAMBDA(const index_t r, const index_t c) {
        const int e = expert(r);
        rows(r, c) = rows(r, c) * gamma(e, c) + beta(e, c);
      });
}

// dnormalized(r, c) = dz(r, c) · gamma(expert(r), c).
template <class T>
void expert_affine_input_gradient(const View2<const T>& dz, const View1<const int>& expert, const View2<const T>& gamma,
                                  const View2<T>& dnormalized) {
  Kokkos::parallel_for(
      "kmoe::soft_moe_experts::affine_backward", all_of(dz.extent(0), dz.extent(1)),
      KOKKOS_LAMBDA(const index_t r, const index_t c) { dnormalized(r, c) = dz(r, c) * gamma(expert(r), c); });
}

// dgain[e, c] += Σ over expert e's rows r of dz(r, c) · x̂(r, c), x̂ = (x(r, c) − mean(r)) · rstd(r), in
// ascending pair order (reproducible, no atomics): the gain gradient of a per-expert LayerNorm
// affine (its shift gradient is moe::accumulate_expert_bias_gradient).
template <class T>
void accumulate_expert_gain_gradient(const moe::DispatchPlan& plan, const View2<const T>& dz, const View2<const T>& x,
                                     const View1<const T>& mean, const View1<const T>& rstd, const View2<T>& dgain) {
  const View1<int> offsets = plan.expert_offsets(), sorted_row = plan.sorted_pair();
  Kokkos::parallel_for(
      "kmoe::soft_moe_experts::expert_gain_gradient", all_of(plan.n_experts(), dz.extent(1)),
      KOKKOS_LAMBDA(const index_t e, const index_t c) {
        T sum = 0;
        for (int s = offsets(e); s < offsets(e + 1); ++s) {
          const int r = sorted_row(s);
          sum += dz(r, c) * (x(r, c) - mean(r)) * rstd(r);
        }
        dgain(e, c) += sum;
      });
}

// Linear (CVMM) + per-expert bias: out = x · W[e] + b[e].
template <class T>
Tensor<T> expert_linear(const moe::DispatchPlan& plan, const Tensor<T>& x, const moe::ExpertOperand<T>& w,
                        index_t out_width, const Tensor<T>& b, const char* label) {
  const auto out = Tensor<T>::uninitialized(label, {x.dim(0), out_width});
  moe::cvmm_forward<T>(plan, x.as_matrix(), w, out.as_matrix());
  moe::add_expert_bias<T>(plan, moe::PairRows::pair_order, out.as_matrix(), b.as_matrix());
  return out;
}

// [rows] Σ_c term(r, c) over this rank's `cols` columns, summed over the shards that hold the
// row's other columns (in rank order). A team per row, reducing in a fixed order.
template <class T, class Term>
Tensor<T> shard_row_sums(index_t rows, index_t cols, const dist::Communicator& shards, const Term& term) {
  using Member = Kokkos::TeamPolicy<ExecSpace>::member_type;
  const auto storage = Tensor<T>::uninitialized("kmoe::soft_moe_experts::row_sums", {rows});
  const View1<T> sums = storage.flat();
  const int width = static_cast<int>(cols);
  Kokkos::parallel_for(
      "kmoe::soft_moe_experts::row_sums", Kokkos::TeamPolicy<ExecSpace>(static_cast<int>(rows), Kokkos::AUTO),
      KOKKOS_LAMBDA(const Member& team) {
        const index_t r = team.league_rank();
        const T sum = ops::impl::team_sum<T>(team, width, [&](const int c) { return term(r, c); });
        Kokkos::single(Kokkos::PerTeam(team), [&]() { sums(r) = sum; });
      });
  dist::all_reduce_sum(shards, sums);
  return storage;
}

// A LayerNorm over `width` units of which a shard holds pre's columns (the others on the other
// shards): statistics (biased variance, as torch) from row sums over every shard.
template <class T>
void sharded_layer_norm_forward(const View2<const T>& pre, index_t width, const dist::Communicator& shards, T eps,
                                const View2<T>& out, const View1<T>& mean, const View1<T>& rstd) {
  const index_t rows = pre.extent(0), cols = pre.extent(1);
  const T inverse_width = T(1) / static_cast<T>(width);
  const auto sums_storage =
      shard_row_sums<T>(rows, cols, shards, KOKKOS_LAMBDA(index_t r, index_t c) { return pre(r, c); });
  const View1<T> sums = sums_storage.flat();
  Kokkos::parallel_for(
      "kmoe::soft_moe_experts::sharded_mean", Kokkos::RangePolicy<ExecSpace>(0, rows),
      KOKKOS_LAMBDA(const index_t r) { mean(r) = sums(r) * inverse_width; });
  const auto squares_storage = shard_row_sums<T>(rows, cols, shards, KOKKOS_LAMBDA(index_t r, index_t c) {
    const T centred = pre(r, c) - mean(r);
    return centred * centred;
  });
  const View1<T> squares = squares_storage.flat();
  Kokkos::parallel_for(
      "kmoe::soft_moe_experts::sharded_normalise", all_of(rows, cols), KOKKOS_LAMBDA(const index_t r, const index_t c) {
        const T s = T(1) / Kokkos::Experimental::sqrt(squares(r) * inverse_width + eps);
        if (c == 0) rstd(r) = s;
        out(r, c) = (pre(r, c) - mean(r)) * s;
      });
}

// Its backward without affine: dpre = rstd · (dn − mean(dn) − x̂ · mean(dn · x̂)), the means over
// every shard's units.
template <class T>
void sharded_layer_norm_backward(const View2<const T>& pre, index_t width, const dist::Communicator& shards,
                                 const View1<const T>& mean, const View1<const T>& rstd, const View2<const T>& dn,
                                 const View2<T>& dpre) {
  const index_t rows = pre.extent(0), cols = pre.extent(1);
  const T inverse_width = T(1) / static_cast<T>(width);
  const auto dn_sums_storage =
      shard_row_sums<T>(rows, cols, shards, KOKKOS_LAMBDA(index_t r, index_t c) { return dn(r, c); });
  const View1<T> dn_sums = dn_sums_storage.flat();
  const auto dn_xhat_sums_storage = shard_row_sums<T>(
      rows, cols, shards, KOKKOS_LAMBDA(index_t r, index_t c) { return dn(r, c) * (pre(r, c) - mean(r)) * rstd(r); });
  const View1<T> dn_xhat_sums = dn_xhat_sums_storage.flat();
  Kokkos::parallel_for(
      "kmoe::soft_moe_experts::sharded_layer_norm_backward", all_of(rows, cols),
      KOKKOS_LAMBDA(const index_t r, const index_t c) {
        const T xhat = (pre(r, c) - mean(r)) * rstd(r);
        dpre(r, c) = rstd(r) * (dn(r, c) - dn_sums(r) * inverse_width - xhat * dn_xhat_sums(r) * inverse_width);
      });
}

// [LayerNorm with per-expert affine] of pre: returns what follows it (pre itself without the norm)
// and fills the statistics. `width`: the units the norm runs over, of which pre holds its shard's
// (the shards' statistics are combined over `shards`); pre's own width when not sharded.
template <class T>
Tensor<T> maybe_expert_layer_norm(bool enabled, const moe::DispatchPlan& plan, const Tensor<T>& pre,
                                  const Tensor<T>& gamma, const Tensor<T>& beta, T eps, Tensor<T>& mean,
                                  Tensor<T>& rstd, const char* label, index_t width, const dist::Communicator& shards) {
  if (!enabled) return pre;
  const index_t rows = pre.dim(0);
  mean = Tensor<T>::uninitialized(label, {rows});
  rstd = Tensor<T>::uninitialized(label, {rows});
  const auto out = Tensor<T>::uninitialized(label, pre.shape());
  if (width == pre.dim(1)) {
    ops::layer_norm_forward<T>(pre.as_matrix(), View1<const T>(), View1<const T>(), eps, out.as_matrix(), mean.flat(),
                               rstd.flat());
  } else {
    sharded_layer_norm_forward<T>(pre.as_matrix(), width, shards, eps, out.as_matrix(), mean.flat(), rstd.flat());
  }
  expert_affine<T>(out.as_matrix(), plan.expert_of_pair(), gamma.as_matrix(), beta.as_matrix());
  return out;
}

// Backward of maybe_expert_layer_norm: from d(output) to d(pre), accumulating dγ, dβ.
template <class T>
Tensor<T> maybe_expert_layer_norm_backward(bool enabled, const moe::DispatchPlan& plan, const Tensor<T>& pre,
                                           const Tensor<T>& gamma, const Tensor<T>& mean, const Tensor<T>& rstd,
                                           const Tensor<T>& dout, Tensor<T>& dgamma, Tensor<T>& dbeta,
                                           const char* label, index_t width, const dist::Communicator& shards) {
  if (!enabled) return dout;
  accumulate_expert_gain_gradient<T>(plan, dout.as_matrix(), pre.as_matrix(), mean.flat(), rstd.flat(),
                                     dgamma.as_matrix());
  moe::accumulate_expert_bias_gradient<T>(plan, moe::PairRows::pair_order, dout.as_matrix(), dbeta.as_matrix());
  const auto dnormalized = Tensor<T>::uninitialized(label, pre.shape());
  expert_affine_input_gradient<T>(dout.as_matrix(), plan.expert_of_pair(), gamma.as_matrix(), dnormalized.as_matrix());
  const auto dpre = Tensor<T>::uninitialized(label, pre.shape());
  if (width == pre.dim(1)) {
    ops::layer_norm_backward<T>(pre.as_matrix(), View1<const T>(), mean.flat(), rstd.flat(), dnormalized.as_matrix(),
                                dpre.as_matrix(), View1<T>(), View1<T>());
  } else {
    sharded_layer_norm_backward<T>(pre.as_matrix(), width, shards, mean.flat(), rstd.flat(), dnormalized.as_matrix(),
                                   dpre.as_matrix());
  }
  return dpre;
}

// The dropout counter of each row's hidden unit 0: (global row) · hidden_total + hidden_begin.
inline Tensor<std::int64_t> dropout_keys(index_t rows, index_t hidden_total, const SlotExpertShare& share) {
  auto storage = Tensor<std::int64_t>::uninitialized("kmoe::soft_moe_experts::dropout_keys", {rows});
  const View1<std::int64_t> out = storage.flat();
  const View1<const std::int64_t> global = share.global_rows;
  const bool given = global.size() > 0;
  const index_t hidden_begin = share.hidden_begin;
  Kokkos::parallel_for(
      "kmoe::soft_moe_experts::dropout_keys", Kokkos::RangePolicy<ExecSpace>(0, rows), KOKKOS_LAMBDA(const index_t r) {
        out(r) = (given ? global(r) : r) * hidden_total + hidden_begin;
      });
  return storage;
}

template <class T>
void require_expert_tensor(const Tensor<T>& t, const Shape& expected, const char* name) {
  t.require_shape(expected, std::string("slot experts: parameter ") + name);
}

template <class T>
void require_params(const SlotExpertConfig& c, const SlotExpertParams<T>& p) {
  const index_t E = c.n_experts, D = c.dim, H = c.hidden, H1 = c.first_width();
  require_expert_tensor(p.w1, {E, D, H1}, "w1");
  require_expert_tensor(p.b1, {E, H1}, "b1");
  require_expert_tensor(p.w2, {E, H, D}, "w2");
  require_expert_tensor(p.b2, {E, D}, "b2");
  if (c.hidden_layer_norm) {
    require_expert_tensor(p.hidden_norm_weight, {E, H1}, "hidden_norm_weight");
    require_expert_tensor(p.hidden_norm_bias, {E, H1}, "hidden_norm_bias");
  }
  if (c.output_layer_norm) {
    require_expert_tensor(p.output_norm_weight, {E, D}, "output_norm_weight");
    require_expert_tensor(p.output_norm_bias, {E, D}, "output_norm_bias");
  }
}

inline void require_plan(const SlotExpertConfig& c, const moe::DispatchPlan& plan, index_t rows, const char* op) {
  require(plan.k() == 1 && plan.n_experts() == c.n_experts && plan.n_tokens() == rows, Status::shape_mismatch, op,
          ": the plan has ", plan.n_tokens(), " rows, k = ", plan.k(), " and ", plan.n_experts(), " experts; expected ",
          rows, " rows, k = 1 and ", c.n_experts, " experts");
}

template <class T>
void require_stacked_expert(const Tensor<T>& stacked, int rank, int expert, const char* op) {
  require(stacked.rank() == rank, Status::shape_mismatch, op, ": the stacked tensor is ", stacked.shape().str(),
          ", expected rank ", rank);
  require(expert >= 0 && expert < stacked.dim(0), Status::invalid_argument, op, ": expert ", expert, " is outside [0, ",
          stacked.dim(0), ")");
}

}  // namespace impl::slot_experts

template <class T>
SlotExpertParams<T> init_slot_expert_params(const SlotExpertConfig& c, Generator& generator) {
  c.validate();
  const index_t E = c.n_experts, D = c.dim, H = c.hidden, H1 = c.first_width();
  SlotExpertParams<T> p;
  p.w1 = Tensor<T>("soft_moe_experts::w1", {E, D, H1});
  p.b1 = Tensor<T>("soft_moe_experts::b1", {E, H1});
  p.w2 = Tensor<T>("soft_moe_experts::w2", {E, H, D});
  p.b2 = Tensor<T>("soft_moe_experts::b2", {E, D});
  const auto take = [&](const Tensor<T>& t) { return generator.take(static_cast<std::uint64_t>(t.size())); };
  if (c.init == ExpertInit::orthogonal_gain_001) {
    impl::slot_experts::fill_orthogonal<T>(p.w1, take(p.w1), 0.01);
    impl::slot_experts::fill_orthogonal<T>(p.w2, take(p.w2), 0.01);
  } else {
    // nn.Linear.reset_parameters: kaiming_uniform(a = √5) is U(±1/√in), as is the bias.
    for (const auto& [w, b, in] : {std::make_tuple(p.w1, p.b1, D), std::make_tuple(p.w2, p.b2, H)}) {
      const T bound = static_cast<T>(1.0 / std::sqrt(static_cast<double>(in)));
      ops::fill_uniform<T>(w.flat(), take(w), -bound, bound);
      ops::fill_uniform<T>(b.flat(), take(b), -bound, bound);
    }
  }
  if (c.hidden_layer_norm) {
    p.hidden_norm_weight = Tensor<T>("soft_moe_experts::hidden_norm_weight", {E, H1});
    p.hidden_norm_weight.fill(T(1));
    p.hidden_norm_bias = Tensor<T>("soft_moe_experts::hidden_norm_bias", {E, H1});
  }
  if (c.output_layer_norm) {
    p.output_norm_weight = Tensor<T>("soft_moe_experts::output_norm_weight", {E, D});
    p.output_norm_weight.fill(T(1));
    p.output_norm_bias = Tensor<T>("soft_moe_experts::output_norm_bias", {E, D});
  }
  return p;
}

template <class T>
SlotExpertParams<T> zeros_like(const SlotExpertParams<T>& p) {
  const auto zeros = [](const Tensor<T>& t) {
    return t.empty() ? Tensor<T>() : Tensor<T>("grad::" + t.label(), t.shape());
  };
  return {zeros(p.w1), zeros(p.b1), zeros(p.hidden_norm_weight), zeros(p.hidden_norm_bias),
          zeros(p.w2), zeros(p.b2), zeros(p.output_norm_weight), zeros(p.output_norm_bias)};
}

moe::DispatchPlan slot_dispatch_plan(index_t batch, int n_experts, index_t slots_per_expert) {
  require(batch >= 1 && n_experts >= 1 && slots_per_expert >= 1, Status::invalid_argument,
          "slot_dispatch_plan: batch = ", batch, ", n_experts = ", n_experts, ", slots_per_expert = ", slots_per_expert,
          " must all be at least 1");
  const index_t rows = batch * n_experts * slots_per_expert;
  const Tensor<int> expert_index("soft_moe_experts::expert_of_slot", {rows, 1});
  const View2<int> index = expert_index.as_matrix();
  const index_t S = slots_per_expert, E = n_experts;
  Kokkos::parallel_for(
      "kmoe::soft_moe_experts::expert_of_slot", Kokkos::RangePolicy<ExecSpace>(0, rows),
      KOKKOS_LAMBDA(const index_t r) { index(r, 0) = static_cast<int>((r / S) % E); });
  return moe::DispatchPlan::build(index, n_experts);
}

template <class T>
SlotExpertForward<T> slot_experts_forward(const SlotExpertConfig& c, const SlotExpertParams<T>& p,
                                          const moe::DispatchPlan& plan, const Tensor<T>& u, bool training,
                                          Generator& rng, const SlotExpertShare& share) {
  const char* op = "slot_experts_forward";
  require(u.rank() == 2 && u.dim(1) == c.dim, Status::shape_mismatch, op, ": u is ", u.shape().str(),
          ", expected [rows, dim = ", c.dim, "]");
  impl::slot_experts::require_plan(c, plan, u.dim(0), op);
  impl::slot_experts::require_params(c, p);
  const index_t hidden_total = share.hidden_total > 0 ? share.hidden_total : c.hidden;
  const bool sharded = hidden_total != c.hidden;
  require(!sharded || (!c.output_layer_norm && c.output_activation == ops::Activation::identity && !c.residual),
          Status::unsupported, op, ": experts with an output LayerNorm, an output activation or a residual cannot be "
          "split into hidden-unit shards (more ranks than experts); use at most as many ranks as experts");
  require(share.global_rows.size() == 0 || static_cast<index_t>(share.global_rows.size()) == u.dim(0), Status::internal, op,
          ": ", share.global_rows.size(), " global rows for ", u.dim(0), " rows");
  const T eps = static_cast<T>(c.layer_norm_eps);
  const index_t first_width_total = c.glu ? 2 * hidden_total : hidden_total;

  SlotExpertForward<T> f;
  f.u = u;
  f.share = share;
  f.w1 = moe::ExpertOperand<T>(p.w1, c.precision, "soft_moe_experts::w1_operand");
  f.w2 = moe::ExpertOperand<T>(p.w2, c.precision, "soft_moe_experts::w2_operand");
  f.first = impl::slot_experts::expert_linear(plan, u, f.w1, p.w1.dim(2), p.b1, "soft_moe_experts::first");
  f.activation_in = impl::slot_experts::maybe_expert_layer_norm(
      c.hidden_layer_norm, plan, f.first, p.hidden_norm_weight, p.hidden_norm_bias, eps, f.hidden_mean, f.hidden_rstd,
      "soft_moe_experts::hidden_norm", first_width_total, share.shards);
  f.h = Tensor<T>::uninitialized("soft_moe_experts::h", {u.dim(0), c.hidden});
  if (c.glu) {
    ops::glu_forward<T>(c.activation, f.activation_in.as_matrix(), View1<const T>(), f.h.as_matrix());
  } else {
    ops::activation_forward<T>(c.activation, f.activation_in.flat(), f.h.flat());
  }
  if (training && c.dropout > 0) {
    // Unit j of global row g draws g · hidden_total + j of the whole batch's stream.
    f.dropped = true;
    const std::int64_t total_rows = share.total_rows > 0 ? share.total_rows : u.dim(0);
    f.dropout_stream = rng.take(static_cast<std::uint64_t>(total_rows * hidden_total));
    f.dropout_keys = impl::slot_experts::dropout_keys(u.dim(0), hidden_total, share);
    ops::dropout_rows<T>(f.h.as_matrix(), static_cast<T>(c.dropout), f.dropout_stream, f.dropout_keys.flat(), f.h.as_matrix());
  }
  if (c.has_residual()) KokkosBlas::axpy(T(1), u.flat(), f.h.flat());

  f.second = Tensor<T>::uninitialized("soft_moe_experts::second", {u.dim(0), c.dim});
  moe::cvmm_forward<T>(plan, f.h.as_matrix(), f.w2, f.second.as_matrix());
  if (share.output_bias())
    moe::add_expert_bias<T>(plan, moe::PairRows::pair_order, f.second.as_matrix(), p.b2.as_matrix());
  f.output_in = impl::slot_experts::maybe_expert_layer_norm(c.output_layer_norm, plan, f.second, p.output_norm_weight,
                                                            p.output_norm_bias, eps, f.output_mean, f.output_rstd,
                                                            "soft_moe_experts::output_norm", c.dim, share.shards);
  f.y = Tensor<T>::uninitialized("soft_moe_experts::y", f.second.shape());
  ops::activation_forward<T>(c.output_activation, f.output_in.flat(), f.y.flat());
  if (c.has_residual()) KokkosBlas::axpy(T(1), f.h.flat(), f.y.flat());
  return f;
}

template <class T>
Tensor<T> slot_experts_backward(const SlotExpertConfig& c, const SlotExpertParams<T>& p, const moe::DispatchPlan& plan,
                                const SlotExpertForward<T>& f, const Tensor<T>& dy, SlotExpertParams<T>& g) {
  const char* op = "slot_experts_backward";
  require(!f.y.empty(), Status::invalid_argument, op, ": the forward result is empty (default-constructed)");
  const index_t rows = f.u.dim(0);
  require(f.u.dim(1) == c.dim && f.h.shape() == Shape{rows, c.hidden}, Status::shape_mismatch, op,
          ": the forward result (u ", f.u.shape().str(), ", h ", f.h.shape().str(),
          ") does not come from experts with dim = ", c.dim, ", hidden = ", c.hidden);
  impl::slot_experts::require_plan(c, plan, rows, op);
  impl::slot_experts::require_params(c, p);
  impl::slot_experts::require_params(c, g);
  dy.require_shape(f.y.shape(), std::string(op) + ": dy");

  // Output side: out_act', [LayerNorm], bias, second Linear.
  const auto doutput_in = Tensor<T>::uninitialized("soft_moe_experts::doutput_in", f.output_in.shape());
  ops::activation_backward<T>(c.output_activation, f.output_in.flat(), dy.flat(), doutput_in.flat());
  const Tensor<T> dsecond = impl::slot_experts::maybe_expert_layer_norm_backward(
      c.output_layer_norm, plan, f.second, p.output_norm_weight, f.output_mean, f.output_rstd, doutput_in,
      g.output_norm_weight, g.output_norm_bias, "soft_moe_experts::dsecond", c.dim, f.share.shards);
  if (f.share.output_bias())
    moe::accumulate_expert_bias_gradient<T>(plan, moe::PairRows::pair_order, dsecond.as_matrix(), g.b2.as_matrix());
  const auto dh = Tensor<T>::uninitialized("soft_moe_experts::dh", f.h.shape());
  moe::cvmm_backward<T>(plan, f.h.as_matrix(), f.w2, dsecond.as_matrix(), dh.as_matrix(),
                        g.w2.template view<3>());
  if (c.has_residual()) KokkosBlas::axpy(T(1), dy.flat(), dh.flat());  // y = h + out_act(q)

  // Hidden side: dropout, activation / GLU, [LayerNorm], bias, first Linear.
  Tensor<T> da = dh;
  if (f.dropped) {
    // h = u + a keeps dh for u, so the residual case needs its own copy.
    da = c.has_residual() ? Tensor<T>::uninitialized("soft_moe_experts::da", dh.shape()) : dh;
    ops::dropout_rows<T>(dh.as_matrix(), static_cast<T>(c.dropout), f.dropout_stream, f.dropout_keys.flat(), da.as_matrix());
  }
  const auto dactivation_in = Tensor<T>::uninitialized("soft_moe_experts::dactivation_in", f.activation_in.shape());
  if (c.glu) {
    ops::glu_backward<T>(c.activation, f.activation_in.as_matrix(), View1<const T>(), da.as_matrix(),
                         dactivation_in.as_matrix(), View1<T>());
  } else {
    ops::activation_backward<T>(c.activation, f.activation_in.flat(), da.flat(), dactivation_in.flat());
  }
  const index_t hidden_total = f.share.hidden_total > 0 ? f.share.hidden_total : c.hidden;
  const Tensor<T> dfirst = impl::slot_experts::maybe_expert_layer_norm_backward(
      c.hidden_layer_norm, plan, f.first, p.hidden_norm_weight, f.hidden_mean, f.hidden_rstd, dactivation_in,
      g.hidden_norm_weight, g.hidden_norm_bias, "soft_moe_experts::dfirst", c.glu ? 2 * hidden_total : hidden_total,
      f.share.shards);
  moe::accumulate_expert_bias_gradient<T>(plan, moe::PairRows::pair_order, dfirst.as_matrix(), g.b1.as_matrix());
  const auto du = Tensor<T>::uninitialized("soft_moe_experts::du", f.u.shape());
  moe::cvmm_backward<T>(plan, f.u.as_matrix(), f.w1, dfirst.as_matrix(), du.as_matrix(),
                        g.w1.template view<3>());
  if (c.has_residual()) KokkosBlas::axpy(T(1), dh.flat(), du.flat());  // h = u + a
  return du;
}

template <class T>
Tensor<T> expert_weight(const Tensor<T>& stacked, int expert) {
  impl::slot_experts::require_stacked_expert(stacked, 3, expert, "expert_weight");
  const index_t in = stacked.dim(1), out = stacked.dim(2);
  const auto result = Tensor<T>::uninitialized("soft_moe_experts::expert_weight", {out, in});
  const View3<T> s = stacked.template view<3>();
  const View2<T> w = result.as_matrix();
  Kokkos::parallel_for(
      "kmoe::soft_moe_experts::expert_weight", impl::slot_experts::all_of(out, in),
      KOKKOS_LAMBDA(const index_t o, const index_t i) { w(o, i) = s(expert, i, o); });
  return result;
}

template <class T>
void set_expert_weight(const Tensor<T>& stacked, int expert, const Tensor<T>& torch_weight) {
  impl::slot_experts::require_stacked_expert(stacked, 3, expert, "set_expert_weight");
  const index_t in = stacked.dim(1), out = stacked.dim(2);
  torch_weight.require_shape({out, in}, "set_expert_weight: torch_weight ([out, in] of the stacked [E, in, out])");
  const View3<T> s = stacked.template view<3>();
  const View2<T> w = torch_weight.as_matrix();
  Kokkos::parallel_for(
      "kmoe::soft_moe_experts::set_expert_weight", impl::slot_experts::all_of(out, in),
      KOKKOS_LAMBDA(const index_t o, const index_t i) { s(expert, i, o) = w(o, i); });
}

template <class T>
Tensor<T> expert_row(const Tensor<T>& stacked, int expert) {
  impl::slot_experts::require_stacked_expert(stacked, 2, expert, "expert_row");
  const auto row = Tensor<T>::uninitialized("soft_moe_experts::expert_row", {stacked.dim(1)});
  Kokkos::deep_copy(ExecSpace(), row.flat(), Kokkos::subview(stacked.as_matrix(), expert, Kokkos::ALL));
  return row;
}

template <class T>
void set_expert_row(const Tensor<T>& stacked, int expert, const Tensor<T>& row) {
  impl::slot_experts::require_stacked_expert(stacked, 2, expert, "set_expert_row");
  row.require_shape({stacked.dim(1)}, "set_expert_row: row");
  Kokkos::deep_copy(ExecSpace(), Kokkos::subview(stacked.as_matrix(), expert, Kokkos::ALL), row.flat());
}

#define KMOE_INSTANTIATE(T)                                                                                            \
  template struct SlotExpertParams<T>;                                                                                 \
  template SlotExpertParams<T> init_slot_expert_params<T>(const SlotExpertConfig&, Generator&);                        \
  template SlotExpertParams<T> zeros_like<T>(const SlotExpertParams<T>&);                                              \
  template SlotExpertForward<T> slot_experts_forward<T>(const SlotExpertConfig&, const SlotExpertParams<T>&,           \
                                                        const moe::DispatchPlan&, const Tensor<T>&, bool, Generator&,  \
                                                        const SlotExpertShare&);                                       \
  template Tensor<T> slot_experts_backward<T>(const SlotExpertConfig&, const SlotExpertParams<T>&,                     \
                                              const moe::DispatchPlan&, const SlotExpertForward<T>&, const Tensor<T>&, \
                                              SlotExpertParams<T>&);                                                   \
  template Tensor<T> expert_weight<T>(const Tensor<T>&, int);                                                          \
  template void set_expert_weight<T>(const Tensor<T>&, int, const Tensor<T>&);                                         \
  template Tensor<T> expert_row<T>(const Tensor<T>&, int);                                                             \
  template void set_expert_row<T>(const Tensor<T>&, int, const Tensor<T>&);
KMOE_INSTANTIATE(float)
KMOE_INSTANTIATE(double)
#undef KMOE_INSTANTIATE

}  // namespace kmoe::layers
