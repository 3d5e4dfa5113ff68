#include "kmoe/layers/switchhead_attention.hpp"

#include <tuple>

#include "kmoe/core/error.hpp"
#include "kmoe/core/profile_region.hpp"
#include "kmoe/dist/parameter_blocks.hpp"
#include "kmoe/model/config_fields.hpp"
#include "kmoe/layers/moeut_init.hpp"
#include "kmoe/moe/cvmm.hpp"
#include "kmoe/ops/activations.hpp"
#include "kmoe/ops/dropout.hpp"
#include "kmoe/ops/gemm.hpp"
#include "kmoe/ops/init.hpp"
#include "kmoe/ops/linear.hpp"
#include "kmoe/ops/rope.hpp"
#include "kmoe/ops/topk.hpp"

#include <cmath>
#include <limits>

namespace kmoe::layers {

int SwitchHeadConfig::rotary_dims() const { return ops::rope_rotary_dims(d_head(), rotate_fraction); }

const model::FieldTable<SwitchHeadConfig>& switchhead_fields() {
  using C = SwitchHeadConfig;
  const std::function<void(const C&, const std::string&)> rotate_fraction_range = [](const C& c,
                                                                                     const std::string& where) {
    require(c.rotate_fraction >= 0 && c.rotate_fraction <= 1, Status::invalid_argument, where, " = ",
            c.rotate_fraction, " is outside [0, 1]");
  };
  static const model::FieldTable<C> table = {
      model::required_field("state_size", &C::state_size, model::at_least(&C::state_size, index_t(1))),
      model::required_field("n_heads", &C::n_heads, model::at_least(&C::n_heads, 1)),
      model::required_field("n_experts", &C::n_experts, model::at_least(&C::n_experts, 1)),
      model::nullable_field("projection_size", &C::projection_size, model::at_least(&C::projection_size, index_t(0))),
      model::field("expert_dropout", &C::expert_dropout, model::probability(&C::expert_dropout)),
      model::field("moe_k", &C::moe_k),
      model::field("rotate_fraction", &C::rotate_fraction, rotate_fraction_range),
      model::field("rope_base", &C::rope_base, model::finite_positive(&C::rope_base)),
      model::field("init_scale", &C::init_scale, model::finite_positive(&C::init_scale)),
      model::enum_field("precision", &C::precision, parse_precision, precision_name),
  };
  return table;
}

void SwitchHeadConfig::validate() const {
  model::check_fields(switchhead_fields(), *this, "SwitchHeadConfig");
  require(d_head() >= 1, Status::invalid_argument, "SwitchHeadConfig: d_head (projection_size, or state_size / n_heads) = ",
          d_head(), " must be at least 1");
  if (n_experts > 1) {
    require(moe_k >= 1 && moe_k <= n_experts && moe_k <= ops::topk_max_k, Status::invalid_argument,
            "SwitchHeadConfig: moe_k = ", moe_k, " must lie in [1, n_experts = ", n_experts, "]");
  }
}

namespace switchhead_impl {


// heads [B, H, T, P] = factor · rows [B·T, H·P] regrouped by head.
template <class T>
Tensor<T> rows_to_heads(const Tensor<T>& rows, index_t batch, index_t length, index_t heads, index_t d_head,
                        T factor, const char* label) {
  auto out = Tensor<T>::uninitialized(label, {batch, heads, length, d_head});
  const View2<T> r = rows.as_matrix();
  const View4<T> o = out.template view<4>();
  Kokkos::parallel_for(
      "kmoe::switchhead::rows_to_heads", md_range<2>({0, 0}, {batch * length, heads * d_head}),
      KOKKOS_LAMBDA(const index_t n, const index_t c) {
        o(n / length, c / d_head, n % length, c % d_head) = factor * r(n, c);
      });
  return out;
}

// rows [B·T, H·P] = factor · heads [B, H, T, P] in token-major order.
template <class T>
Tensor<T> heads_to_rows(const Tensor<T>& heads_view, T factor, const char* label) {
  const index_t batch = heads_view.dim(0), heads = heads_view.dim(1), length = heads_view.dim(2);
  const index_t d_head = heads_view.dim(3);
  auto out = Tensor<T>::uninitialized(label, {batch * length, heads * d_head});
  const View4<T> h = heads_view.template view<4>();
  const View2<T> o = out.as_matrix();
  Kokkos::parallel_for(
      "kmoe::switchhead::heads_to_rows", md_range<2>({0, 0}, {batch * length, heads * d_head}),
      KOKKOS_LAMBDA(const index_t n, const index_t c) {
        o(n, c) = factor * h(n / length, c / d_head, n % length, c % d_head);
      });
  return out;
}

// [B, H, Tc + T, P] = the cache followed by the new rows along time.
template <class T>
Tensor<T> concat_time(const Tensor<T>& cached, const Tensor<T>& fresh, const char* label) {
  const index_t batch = fresh.dim(0), heads = fresh.dim(1), old_len = cached.dim(2), new_len = fresh.dim(2);
  const index_t d_head = fresh.dim(3), total = old_len + new_len;
  auto out = Tensor<T>::uninitialized(label, {batch, heads, total, d_head});
  const View4<T> c = cached.template view<4>(), f = fresh.template view<4>(), o = out.template view<4>();
  Kokkos::parallel_for(
      "kmoe::switchhead::concat_time", md_range<2>({0, 0}, {batch * heads * total, d_head}),
      KOKKOS_LAMBDA(const index_t row, const index_t p) {
        const index_t t = row % total, h = (row / total) % heads, b = row / (total * heads);
        o(b, h, t, p) = t < old_len ? c(b, h, t, p) : f(b, h, t - old_len, p);
      });
  return out;
}

// A sigmoid top-k selection per (token, head) from logits z [N, H·Ea] (the original's get_sel):
// top-k of σ(z) after expert dropout (−inf where a draw < p), gates = σ(z) of the chosen experts
// (unmasked). local [N·H, ka]: expert within the head, descending score; gates [N, H·ka];
// global [N, H·ka] = h·Ea + local (the rows of v / o).
template <class T>
struct Selection {
  Tensor<int> local;
  Tensor<T> gates;
  Tensor<int> global;
};

template <class T>
Selection<T> select_experts(const Tensor<T>& z, int heads, int experts, int k, bool training, double expert_dropout,
                            Generator& rng, const dist::Communicator& comm) {
  const index_t tokens = z.dim(0), lines = tokens * heads;
  const Tensor<T> probs = Tensor<T>::uninitialized("switchhead::sel_probs", {lines, experts});
  ops::activation_forward<T>(ops::Activation::sigmoid, z.flat(), probs.flat());
  Tensor<T> scores = probs;
  if (training && expert_dropout > 0) {
    scores = probs.clone("switchhead::sel_scores");
    ops::drop_to_minus_infinity<T>(scores.flat(), static_cast<T>(expert_dropout),
                                   dist::take_global(comm, rng, static_cast<std::uint64_t>(scores.size())));
  }
  Selection<T> s;
  s.local = Tensor<int>("switchhead::sel_local", {lines, k});
  const auto topk_values = Tensor<T>::uninitialized("switchhead::sel_topk", {lines, k});
  ops::topk_forward<T>(scores.as_matrix(), k, ops::TopkOrder::descending, topk_values.as_matrix(),
                       s.local.as_matrix());
  s.gates = Tensor<T>::uninitialized("switchhead::sel_gates", {tokens, static_cast<index_t>(heads) * k});
  s.global = Tensor<int>("switchhead::sel_global", {tokens, static_cast<index_t>(heads) * k});
  const View2<T> pv = probs.as_matrix();
  const View2<int> lv = s.local.as_matrix();
  const View1<T> gv = s.gates.flat();
  const View1<int> ev = s.global.flat();
  Kokkos::parallel_for(
      "kmoe::switchhead::gather_gates", md_range<2>({0, 0}, {lines, static_cast<index_t>(k)}), KOKKOS_LAMBDA(const index_t line, const index_t j) {
        const int e = lv(line, j);
        gv(line * k + j) = pv(line, e);
        ev(line * k + j) = static_cast<int>(line % heads) * experts + e;
      });
  return s;
}

// dz [N, H·Ea] = σ'(z) · dgates scattered to the chosen experts (σ' = g(1 − g) with the saved
// gates), plus dz_extra (the regulariser's gradient) when given.
template <class T>
Tensor<T> selection_backward(const Tensor<int>& local, const Tensor<T>& gates, const Tensor<T>& dgates, int heads,
                             int experts, const Tensor<T>& dz_extra) {
  const index_t tokens = gates.dim(0), lines = local.dim(0), k = local.dim(1);
  const auto dselected = Tensor<T>::uninitialized("switchhead::dselected", {lines, k});
  const View1<T> g = gates.flat(), dg = dgates.flat(), ds = dselected.flat();
  Kokkos::parallel_for(
      "kmoe::switchhead::dsigmoid", Kokkos::RangePolicy<ExecSpace>(0, gates.size()),
      KOKKOS_LAMBDA(const index_t i) { ds(i) = dg(i) * g(i) * (T(1) - g(i)); });
  const auto dz = Tensor<T>::uninitialized("switchhead::dz", {tokens, static_cast<index_t>(heads) * experts});
  ops::topk_backward<T>(local.as_matrix(), dselected.as_matrix(), dz.reshape({lines, experts}).as_matrix());
  if (!dz_extra.empty()) {
    const View1<T> d = dz.flat(), extra = dz_extra.flat();
    Kokkos::parallel_for(
        "kmoe::switchhead::add_dz", Kokkos::RangePolicy<ExecSpace>(0, dz.size()),
        KOKKOS_LAMBDA(const index_t i) { d(i) += extra(i); });
  }
  return dz;
}

// A rank's experts hold the head channels [c0, c0 + Pl) of P (all of them unless sharded); the
// per-pair matrices below have Pl columns, the per-token rows H·P, zero outside the share.

// rows [N, H·P]: rows[t, h·P + c0 + c] = Σ_j gates[t, h·ka + j] · pairs[(t·H + h)·ka + j, c].
template <class T>
Tensor<T> mix_pairs(const Tensor<T>& pairs, const Tensor<T>& gates, index_t heads, index_t k, index_t d_head,
                    index_t c0) {
  const index_t tokens = gates.dim(0), share = pairs.dim(1);
  auto rows = Tensor<T>::uninitialized("switchhead::v_rows", {tokens, heads * d_head});
  const View2<T> pv = pairs.as_matrix(), gv = gates.as_matrix(), rv = rows.as_matrix();
  Kokkos::parallel_for(
      "kmoe::switchhead::mix_pairs", md_range<2>({0, 0}, {tokens, heads * d_head}),
      KOKKOS_LAMBDA(const index_t t, const index_t col) {
        const index_t h = col / d_head, c = col % d_head - c0;
        T sum = 0;
        if (c >= 0 && c < share)
          for (index_t j = 0; j < k; ++j) sum += gv(t, h * k + j) * pv((t * heads + h) * k + j, c);
        rv(t, col) = sum;
      });
  return rows;
}

// Backward of mix_pairs: dgates[t, h·ka + j] = ⟨pairs[p], drows[t, h]⟩, dpairs[p] = gate · drows[t, h].
template <class T>
void mix_pairs_backward(const Tensor<T>& pairs, const Tensor<T>& gates, const Tensor<T>& drows, index_t heads,
                        index_t k, index_t d_head, index_t c0, const Tensor<T>& dpairs, const Tensor<T>& dgates) {
  const index_t tokens = gates.dim(0), share = pairs.dim(1);
  const View2<T> pv = pairs.as_matrix(), gv = gates.as_matrix(), dr = drows.as_matrix();
  const View2<T> dp = dpairs.as_matrix(), dg = dgates.as_matrix();
  Kokkos::parallel_for(
      "kmoe::switchhead::mix_pairs_backward", md_range<2>({0, 0}, {tokens, heads * k}),
      KOKKOS_LAMBDA(const index_t t, const index_t slot) {
        const index_t h = slot / k, p = t * heads * k + slot;
        const T g = gv(t, slot);
        T sum = 0;
        for (index_t c = 0; c < share; ++c) {
          const T d = dr(t, h * d_head + c0 + c);
          sum += pv(p, c) * d;
          dp(p, c) = g * d;
        }
        dg(t, slot) = sum;
      });
}

// [N·H·ka, Pl]: row (t·H + h)·ka + j = attended[t, h·P + c0 : h·P + c0 + Pl] (one input row per O pair).
template <class T>
Tensor<T> replicate_heads(const Tensor<T>& attended, index_t heads, index_t k, index_t d_head, index_t c0,
                          index_t share) {
  const index_t tokens = attended.dim(0);
  auto out = Tensor<T>::uninitialized("switchhead::o_input", {tokens * heads * k, share});
  const View2<T> a = attended.as_matrix(), o = out.as_matrix();
  Kokkos::parallel_for(
      "kmoe::switchhead::replicate_heads", md_range<2>({0, 0}, {tokens * heads * k, share}),
      KOKKOS_LAMBDA(const index_t p, const index_t c) {
        o(p, c) = a(p / (heads * k), (p / k) % heads * d_head + c0 + c);
      });
  return out;
}

// Backward of replicate_heads: dattended[t, h·P + c0 + c] = Σ_j dpairs[(t·H + h)·ka + j, c], slots
// in order (0 outside the share).
template <class T>
Tensor<T> sum_replicas(const Tensor<T>& dpairs, index_t tokens, index_t heads, index_t k, index_t d_head, index_t c0) {
  const index_t share = dpairs.dim(1);
  auto out = Tensor<T>::uninitialized("switchhead::dattended", {tokens, heads * d_head});
  const View2<T> dp = dpairs.as_matrix(), o = out.as_matrix();
  Kokkos::parallel_for(
      "kmoe::switchhead::sum_replicas", md_range<2>({0, 0}, {tokens, heads * d_head}),
      KOKKOS_LAMBDA(const index_t t, const index_t col) {
        const index_t h = col / d_head, c = col % d_head - c0;
        T sum = 0;
        if (c >= 0 && c < share)
          for (index_t j = 0; j < k; ++j) sum += dp((t * heads + h) * k + j, c);
        o(t, col) = sum;
      });
  return out;
}

// out[t, h·P + c] = attended[t, h·P + c] · gate[t, h] (the n_experts = 1 output gate).
template <class T>
Tensor<T> apply_head_gate(const Tensor<T>& attended, const Tensor<T>& gate, index_t d_head) {
  auto out = Tensor<T>::uninitialized("switchhead::gated", attended.shape());
  const View2<T> a = attended.as_matrix(), g = gate.as_matrix(), o = out.as_matrix();
  Kokkos::parallel_for(
      "kmoe::switchhead::apply_head_gate", md_range<2>({0, 0}, {attended.dim(0), attended.dim(1)}),
      KOKKOS_LAMBDA(const index_t t, const index_t col) { o(t, col) = a(t, col) * g(t, col / d_head); });
  return out;
}

// Backward of apply_head_gate: dattended = dgated · gate; dz[t, h] = σ'(z) Σ_c dgated · attended.
template <class T>
void apply_head_gate_backward(const Tensor<T>& attended, const Tensor<T>& gate, const Tensor<T>& dgated,
                              index_t d_head, const Tensor<T>& dattended, const Tensor<T>& dz) {
  const View2<T> a = attended.as_matrix(), g = gate.as_matrix(), dg = dgated.as_matrix();
  const View2<T> da = dattended.as_matrix(), dzv = dz.as_matrix();
  Kokkos::parallel_for(
      "kmoe::switchhead::apply_head_gate_backward", md_range<2>({0, 0}, {gate.dim(0), gate.dim(1)}),
      KOKKOS_LAMBDA(const index_t t, const index_t h) {
        const T gate_value = g(t, h);
        T sum = 0;
        for (index_t c = h * d_head; c < (h + 1) * d_head; ++c) {
          sum += dg(t, c) * a(t, c);
          da(t, c) = dg(t, c) * gate_value;
        }
        dzv(t, h) = sum * gate_value * (T(1) - gate_value);
      });
}

// dweight += dyᵀ x and dx_accum += dy · weight (a linear map's backward accumulated into dx).
template <class T>
void linear_backward_accumulate(const Tensor<T>& x, const Tensor<T>& weight, const Tensor<T>& dy,
                                const Tensor<T>& dx_accum, const Tensor<T>& dweight) {
  ops::linear_backward<T>(x.as_matrix(), weight.as_matrix(), dy.as_matrix(), View2<T>(), dweight.as_matrix(),
                          View1<T>());
  ops::gemm<T>(false, false, T(1), dy.as_matrix(), weight.as_matrix(), T(1), dx_accum.as_matrix());
}

template <class T>
Tensor<T> linear(const Tensor<T>& x, const Tensor<T>& weight, const char* label) {
  auto y = Tensor<T>::uninitialized(label, {x.dim(0), weight.dim(0)});
  ops::linear_forward<T>(x.as_matrix(), weight.as_matrix(), View1<const T>(), y.as_matrix());
  return y;
}

// Sends each token's row and gates to the ranks holding its selected experts (experts [N, H·ka],
// global ids); on this rank's side: what it received and the plan over it in local expert ids.
// Returns whether anything was received. Collective.
template <class T>
bool send_to_experts(const dist::Communicator& comm, const dist::Placement& placement, const Tensor<int>& experts,
                     const Tensor<T>& rows, const Tensor<T>& gates, std::int64_t first_token,
                     dist::ExpertExchange& exchange, Tensor<T>& rows_received, Tensor<T>& gates_received,
                     moe::DispatchPlan& plan) {
  exchange = dist::ExpertExchange(comm, placement, experts, first_token);
  rows_received = exchange.dispatch(rows);
  gates_received = exchange.dispatch(gates);
  if (exchange.received_rows() == 0) return false;
  plan = moe::DispatchPlan::build_with_drops(exchange.received_experts().as_matrix(), placement.local_experts(comm.rank()));
  return true;
}

// The value experts: each token's v_src row to the owners of its selected experts, which return
// their share of Σ_j g_j · x · V[e_j] per head; v_rows [N, H·P] is the owners' rows summed.
// Collective (every rank, also one without tokens).
// f.v_operand holds V as the GEMMs read it.
template <class T>
Tensor<T> value_experts_forward(const Tensor<T>& v, const dist::Communicator& comm, const dist::Placement& placement,
                                const SwitchHeadConfig& c, const Tensor<T>& v_src, const Tensor<int>& experts,
                                const Tensor<T>& gates, std::int64_t first_token, SwitchHeadForward<T>& f) {
  const index_t H = c.n_heads, P = c.d_head(), ka = c.moe_k, c0 = placement.hidden_begin(comm.rank());
  Tensor<T> rows;
  if (send_to_experts(comm, placement, experts, v_src, gates, first_token, f.v_exchange, f.v_src_received,
                      f.v_gates_received, f.v_plan)) {
    f.v_pairs = Tensor<T>::uninitialized("switchhead::v_pairs", {f.v_plan.n_pairs(), v.dim(2)});
    moe::cvmm_forward<T>(f.v_plan, f.v_src_received.as_matrix(), f.v_operand, f.v_pairs.as_matrix());
    rows = mix_pairs(f.v_pairs, f.v_gates_received, H, ka, P, c0);
  }
  return f.v_exchange.combine(rows);
}

// Its backward from dv_rows [N, H·P]: accumulates dV, returns dv_src [N, D] and dgates [N, H·ka].
template <class T>
std::pair<Tensor<T>, Tensor<T>> value_experts_backward(const Tensor<T>& dv_weights,
                                                       const dist::Communicator& comm,
                                                       const dist::Placement& placement, const SwitchHeadConfig& c,
                                                       const SwitchHeadForward<T>& f, const Tensor<T>& dv_rows) {
  const index_t H = c.n_heads, P = c.d_head(), ka = c.moe_k, c0 = placement.hidden_begin(comm.rank());
  const Tensor<T> dreceived = f.v_exchange.dispatch(dv_rows);
  Tensor<T> dx, dgates;
  if (f.v_exchange.received_rows() > 0) {
    const auto dpairs = Tensor<T>::uninitialized("switchhead::dv_pairs", f.v_pairs.shape());
    dgates = Tensor<T>::uninitialized("switchhead::dv_gates", f.v_gates_received.shape());
    mix_pairs_backward(f.v_pairs, f.v_gates_received, dreceived, H, ka, P, c0, dpairs, dgates);
    dx = Tensor<T>::uninitialized("switchhead::dv_src_received", f.v_src_received.shape());
    moe::cvmm_backward<T>(f.v_plan, f.v_src_received.as_matrix(), f.v_operand, dpairs.as_matrix(),
                          dx.as_matrix(), dv_weights.template view<3>());
  }
  return {f.v_exchange.combine(dx), f.v_exchange.combine(dgates)};
}

// The output experts: each token's attended row [H·P] to the owners of its selected experts,
// which return their share of Σ_j g_j · attended_h · O[e_j]; y [N, D] summed. Collective;
// f.o_operand holds O as the GEMMs read it.
template <class T>
Tensor<T> output_experts_forward(const Tensor<T>& o, const dist::Communicator& comm, const dist::Placement& placement,
                                 const SwitchHeadConfig& c, const Tensor<T>& attended, const Tensor<int>& experts,
                                 const Tensor<T>& gates, std::int64_t first_token, SwitchHeadForward<T>& f) {
  const index_t H = c.n_heads, P = c.d_head(), ka = c.moe_k, c0 = placement.hidden_begin(comm.rank());
  Tensor<T> y;
  if (send_to_experts(comm, placement, experts, attended, gates, first_token, f.o_exchange, f.attended_received,
                      f.o_gates_received, f.o_plan)) {
    const index_t R = f.o_exchange.received_rows();
    const Tensor<T> input = replicate_heads(f.attended_received, H, ka, P, c0, o.dim(1));
    y = Tensor<T>::uninitialized("switchhead::y_received", {R, c.state_size});
    moe::cvmm_forward_reduced<T>(f.o_plan, input.as_matrix(), f.o_operand, f.o_gates_received.as_matrix(),
                                 y.as_matrix());
  }
  return f.o_exchange.combine(y);
}

// Its backward from dy [N, D]: accumulates dO, returns dattended [N, H·P] and dgates [N, H·ka].
template <class T>
std::pair<Tensor<T>, Tensor<T>> output_experts_backward(const Tensor<T>& o, const Tensor<T>& do_weights,
                                                        const dist::Communicator& comm,
                                                        const dist::Placement& placement, const SwitchHeadConfig& c,
                                                        const SwitchHeadForward<T>& f, const Tensor<T>& dy) {
  const index_t H = c.n_heads, P = c.d_head(), ka = c.moe_k, c0 = placement.hidden_begin(comm.rank());
  const Tensor<T> dreceived = f.o_exchange.dispatch(dy);
  const index_t R = f.o_exchange.received_rows();
  Tensor<T> dattended, dgates;
  if (R > 0) {
    const Tensor<T> input = replicate_heads(f.attended_received, H, ka, P, c0, o.dim(1));
    const auto dinput = Tensor<T>::uninitialized("switchhead::do_input", input.shape());
    dgates = Tensor<T>::uninitialized("switchhead::do_gates", f.o_gates_received.shape());
    moe::cvmm_backward_reduced<T>(f.o_plan, input.as_matrix(), f.o_operand, f.o_gates_received.as_matrix(),
                                  dreceived.as_matrix(), dinput.as_matrix(), do_weights.template view<3>(),
                                  dgates.as_matrix());
    dattended = sum_replicas(dinput, R, H, ka, P, c0);
  }
  return {f.o_exchange.combine(dattended), f.o_exchange.combine(dgates)};
}

}  // namespace switchhead_impl

template <class T>
SwitchHeadAttention<T>::SwitchHeadAttention(const SwitchHeadConfig& config, std::uint64_t seed, ParameterInit init,
                                            const dist::Communicator& comm)
    : config_(config), comm_(comm) {
  config_.validate();
  require_precision_supported<T>(config_.precision, "SwitchHeadAttention");
  comm_.require_same(dist::text_hash(model::write_fields(switchhead_fields(), config_).dump()) ^ seed,
                     "the SwitchHead config or seed");
  const index_t D = config_.state_size, H = config_.n_heads, P = config_.d_head(), Ea = config_.n_experts;
  const bool moe = Ea > 1;
  if (moe) placement_ = dist::Placement(static_cast<int>(H * Ea), comm_.size(), P);
  const int rank = comm_.rank();
  const index_t El = moe ? placement_.local_experts(rank) : 0, e0 = moe ? placement_.first_expert(rank) : 0;
  const index_t Pl = moe ? placement_.local_hidden(rank) : 0, c0 = moe ? placement_.hidden_begin(rank) : 0;
  params_.q = Tensor<T>("switchhead::q", {H * P, D});
  params_.k = Tensor<T>("switchhead::k", {H * P, D});
  params_.v = moe ? Tensor<T>("switchhead::v", {El, D, Pl}) : Tensor<T>("switchhead::v", {H * P, D});
  params_.o = moe ? Tensor<T>("switchhead::o", {El, Pl, D}) : Tensor<T>("switchhead::o", {D, H * P});
  if (moe) params_.sel_v = Tensor<T>("switchhead::sel_v", {H * Ea, D});
  params_.sel_o = Tensor<T>("switchhead::sel_o", {moe ? H * Ea : H, D});
  // The original's reset_parameters order: sel_v, sel_o, k, q, v, o.
  Generator generator(seed, init);
  const double s = config_.init_scale, in_std = s / std::sqrt(static_cast<double>(D));
  if (moe) {
    moeut_init::fill_normal(params_.sel_v, generator, in_std);
    if (generator.draws()) moeut_init::renorm_rows(params_.sel_v);
  }
  moeut_init::fill_normal(params_.sel_o, generator, in_std);
  if (generator.draws()) moeut_init::renorm_rows(params_.sel_o);
  moeut_init::fill_normal(params_.k, generator, in_std);
  moeut_init::fill_normal(params_.q, generator, in_std);
  const double o_std = s / std::sqrt(static_cast<double>(H * P));
  if (moe) {
    // Each rank draws its block of the one-rank tensors.
    ops::fill_normal_block<T>(params_.v.template view<3>(), generator.take(static_cast<std::uint64_t>(H * Ea * D * P)),
                              T(0), static_cast<T>(in_std), D, P, e0, 0, c0);
    ops::fill_normal_block<T>(params_.o.template view<3>(), generator.take(static_cast<std::uint64_t>(H * Ea * P * D)),
                              T(0), static_cast<T>(o_std), P, D, e0, c0, 0);
  } else {
    moeut_init::fill_normal(params_.v, generator, in_std);
    moeut_init::fill_normal(params_.o, generator, o_std);
  }
  const auto zeros_like = [](const Tensor<T>& t) {
    return t.empty() ? Tensor<T>() : Tensor<T>("grad::" + t.label(), t.shape());
  };
  grads_ = {zeros_like(params_.q), zeros_like(params_.k), zeros_like(params_.v), zeros_like(params_.o),
            zeros_like(params_.sel_v), zeros_like(params_.sel_o)};
}

template <class T>
void SwitchHeadAttention<T>::visit_parameters(const model::ParameterVisitor<T>& visit, const std::string& prefix) {
  const bool experts = config_.n_experts > 1;
  auto q = model::dense_parameter(prefix + "q.weight", params_.q, grads_.q);
  auto k = model::dense_parameter(prefix + "k.weight", params_.k, grads_.k);
  const int rank = comm_.rank();
  // Placed (dist/placement.hpp): this rank's experts, of each its head channels.
  const auto placed = [&](model::Parameter<T> p) { return dist::placed(std::move(p), placement_, rank); };
  auto v = experts ? placed(model::expert_parameter(prefix + "v", params_.v, grads_.v, 2))
                   : model::dense_parameter(prefix + "v", params_.v, grads_.v);
  auto o = experts ? placed(model::expert_parameter(prefix + "o", params_.o, grads_.o, 1))
                   : model::dense_parameter(prefix + "o", params_.o, grads_.o);
  visit(q);
  visit(k);
  visit(v);
  visit(o);
  if (experts) {
    auto sel_v = model::dense_parameter(prefix + "sel_v", params_.sel_v, grads_.sel_v);
    visit(sel_v);
  }
  auto sel_o = model::dense_parameter(prefix + "sel_o", params_.sel_o, grads_.sel_o);
  visit(sel_o);
}

template <class T>
void SwitchHeadAttention<T>::zero_grad() {
  for (Tensor<T>* grad : {&grads_.q, &grads_.k, &grads_.v, &grads_.o, &grads_.sel_v, &grads_.sel_o})
    if (!grad->empty()) grad->fill(T(0));
}

template <class T>
SwitchHeadOperands<T> SwitchHeadAttention<T>::expert_operands() const {
  if (config_.n_experts <= 1) return {};
  return {moe::ExpertOperand<T>(params_.v, config_.precision, "switchhead::v_operand"),
          moe::ExpertOperand<T>(params_.o, config_.precision, "switchhead::o_operand")};
}

template <class T>
SwitchHeadForward<T> SwitchHeadAttention<T>::forward(const Tensor<T>& qk_src, const Tensor<T>& v_src,
                                                     const ops::AttentionMask& mask, bool training, Generator& rng,
                                                     SwitchHeadCache<T>* cache,
                                                     const SwitchHeadOperands<T>* operands) const {
  const ProfileRegion region("kmoe::switchhead::forward");
  namespace si = switchhead_impl;
  const SwitchHeadConfig& c = config_;
  const index_t D = c.state_size, H = c.n_heads, P = c.d_head(), Ea = c.n_experts, ka = c.moe_k;
  require(qk_src.rank() == 3 && qk_src.dim(2) == D, Status::shape_mismatch, "SwitchHeadAttention::forward: qk_src is ",
          qk_src.shape().str(), ", expected [B, T, state_size = ", D, "]");
  v_src.require_shape(qk_src.shape(), "SwitchHeadAttention::forward: v_src (must match qk_src)");
  const index_t B = qk_src.dim(0), Tq = qk_src.dim(1), N = B * Tq;
  require(N >= 1 || comm_.distributed(), Status::shape_mismatch,
          "SwitchHeadAttention::forward: qk_src ", qk_src.shape().str(), " has no tokens");
  // The experts' exchanges and the draws are keyed by the token's place in the global batch.
  const std::int64_t first_token = Ea > 1 ? comm_.exclusive_prefix_sum(N) : 0;
  const SwitchHeadOperands<T> expert_weights = operands != nullptr ? *operands : expert_operands();
  if (N == 0) {
    // A rank without sequences computes nothing of its own, but takes part in the batch-wide
    // draws and serves its experts.
    SwitchHeadForward<T> none;
    none.training = training;
    none.qk_src = qk_src.reshape({0, D});
    none.v_src = v_src.reshape({0, D});
    none.y = Tensor<T>("switchhead::y", {B, Tq, D});
    none.v_operand = expert_weights.v;
    none.o_operand = expert_weights.o;
    if (Ea > 1) {
      if (training && c.expert_dropout > 0) {
        (void)dist::take_global(comm_, rng, 0);
        (void)dist::take_global(comm_, rng, 0);
      }
      const Tensor<int> no_experts("switchhead::no_experts", {0, H * ka});
      const Tensor<T> no_gates("switchhead::no_gates", {0, H * ka});
      (void)si::value_experts_forward(params_.v, comm_, placement_, c, none.v_src, no_experts, no_gates, first_token,
                                      none);
      (void)si::output_experts_forward(params_.o, comm_, placement_, c, Tensor<T>("switchhead::attended", {0, H * P}),
                                       no_experts, no_gates, first_token, none);
      none.sel_o_logits = Tensor<T>("switchhead::sel_o_logits", {B, Tq, H, Ea});
      none.sel_v_logits = Tensor<T>("switchhead::sel_v_logits", {B, Tq, H, Ea});
    }
    if (cache != nullptr) {
      // Its (empty) cache grows with the others', so that every rank's cache has one length.
      const index_t length = cache->length() + Tq;
      cache->k = Tensor<T>("switchhead::k_cached", {0, H, length, P});
      cache->v = Tensor<T>("switchhead::v_cached", {0, H, length, P});
      none.cached = true;
    }
    return none;
  }
  const index_t Tc = cache != nullptr ? cache->length() : 0;
  if (Tc > 0) {
    cache->k.require_shape({B, H, Tc, P}, "SwitchHeadAttention::forward: cache k");
    cache->v.require_shape({B, H, Tc, P}, "SwitchHeadAttention::forward: cache v");
  }

  SwitchHeadForward<T> f;
  f.training = training;
  f.cached = cache != nullptr;
  f.v_operand = expert_weights.v;
  f.o_operand = expert_weights.o;
  f.qk_src = qk_src.reshape({N, D});
  f.v_src = v_src.reshape({N, D});
  const T qk_scale = static_cast<T>(std::pow(static_cast<double>(P), -0.25));
  const Tensor<T> q_heads =
      si::rows_to_heads(si::linear(f.qk_src, params_.q, "switchhead::q_rows"), B, Tq, H, P, qk_scale, "switchhead::q");
  Tensor<T> k_heads =
      si::rows_to_heads(si::linear(f.qk_src, params_.k, "switchhead::k_rows"), B, Tq, H, P, qk_scale, "switchhead::k");

  // Values: expert-mixed (Ea > 1) or one linear map; the output selection is made here too.
  Tensor<T> v_rows;
  Tensor<int> o_experts;
  if (Ea > 1) {
    const Tensor<T> z_v = si::linear(f.qk_src, params_.sel_v, "switchhead::sel_v_logits");
    const Tensor<T> z_o = si::linear(f.qk_src, params_.sel_o, "switchhead::sel_o_logits");
    const si::Selection<T> v_sel =
        si::select_experts(z_v, c.n_heads, c.n_experts, ka, training, c.expert_dropout, rng, comm_);
    const si::Selection<T> o_sel =
        si::select_experts(z_o, c.n_heads, c.n_experts, ka, training, c.expert_dropout, rng, comm_);
    f.v_local_index = v_sel.local;
    f.v_gates = v_sel.gates;
    f.o_local_index = o_sel.local;
    f.o_gates = o_sel.gates;
    v_rows = si::value_experts_forward(params_.v, comm_, placement_, c, f.v_src, v_sel.global, f.v_gates, first_token, f);
    o_experts = o_sel.global;
    f.sel_v_logits = z_v.reshape({B, Tq, H, Ea});
    f.sel_o_logits = z_o.reshape({B, Tq, H, Ea});
  } else {
    v_rows = si::linear(f.v_src, params_.v, "switchhead::v_rows");
    f.o_gate = si::linear(f.qk_src, params_.sel_o, "switchhead::o_gate");
    ops::activation_forward<T>(ops::Activation::sigmoid, f.o_gate.flat(), f.o_gate.flat());
  }
  Tensor<T> v_heads = si::rows_to_heads(v_rows, B, Tq, H, P, T(1), "switchhead::v");

  if (cache != nullptr) {
    if (Tc > 0) {
      k_heads = si::concat_time(cache->k, k_heads, "switchhead::k_cached");
      v_heads = si::concat_time(cache->v, v_heads, "switchhead::v_cached");
    }
    cache->k = k_heads;
    cache->v = v_heads;
  }
  const index_t Tk = Tc + Tq;
  const int rot = c.rotary_dims();
  f.q_rot = Tensor<T>::uninitialized("switchhead::q_rot", q_heads.shape());
  ops::rope_forward<T>(q_heads.template view<4>(), rot, c.rope_base, Tc, f.q_rot.template view<4>());
  f.k_rot = Tensor<T>::uninitialized("switchhead::k_rot", k_heads.shape());
  ops::rope_forward<T>(k_heads.template view<4>(), rot, c.rope_base, 0, f.k_rot.template view<4>());
  f.v_heads = v_heads;
  f.probs = Tensor<T>::uninitialized("switchhead::probs", {B, H, Tq, Tk});
  const auto out_heads = Tensor<T>::uninitialized("switchhead::attended_heads", {B, H, Tq, P});
  ops::attention_forward<T>(f.q_rot.template view<4>(), f.k_rot.template view<4>(), f.v_heads.template view<4>(), T(1),
                            mask, f.probs.template view<4>(), out_heads.template view<4>());
  f.attended = si::heads_to_rows(out_heads, T(1), "switchhead::attended");

  Tensor<T> y;
  if (Ea > 1) {
    y = si::output_experts_forward(params_.o, comm_, placement_, c, f.attended, o_experts, f.o_gates, first_token, f);
  } else {
    y = Tensor<T>::uninitialized("switchhead::y", {N, D});
    const Tensor<T> gated = si::apply_head_gate(f.attended, f.o_gate, P);
    ops::linear_forward<T>(gated.as_matrix(), params_.o.as_matrix(), View1<const T>(), y.as_matrix());
  }
  f.y = y.reshape({B, Tq, D});
  return f;
}

template <class T>
typename SwitchHeadAttention<T>::InputGrads SwitchHeadAttention<T>::backward(const SwitchHeadForward<T>& f,
                                                                             const Tensor<T>& dy,
                                                                             const Tensor<T>& dsel_o_logits,
                                                                             const Tensor<T>& dsel_v_logits) {
  const ProfileRegion region("kmoe::switchhead::backward");
  namespace si = switchhead_impl;
  const SwitchHeadConfig& c = config_;
  const index_t D = c.state_size, H = c.n_heads, P = c.d_head(), Ea = c.n_experts;
  require(!f.y.empty(), Status::invalid_argument, "SwitchHeadAttention::backward: the forward result is empty");
  if (f.y.size() == 0) {  // a rank without sequences (see forward): it serves its experts
    dy.require_shape(f.y.shape(), "SwitchHeadAttention::backward: dy");
    if (Ea > 1) {
      (void)si::output_experts_backward(params_.o, grads_.o, comm_, placement_, c, f, Tensor<T>("switchhead::dy", {0, D}));
      (void)si::value_experts_backward(grads_.v, comm_, placement_, c, f,
                                       Tensor<T>("switchhead::dv_rows", {0, H * P}));
    }
    return {Tensor<T>("switchhead::dqk_src", f.y.shape()), Tensor<T>("switchhead::dv_src", f.y.shape())};
  }
  require(!f.cached, Status::invalid_argument,
          "SwitchHeadAttention::backward: the forward used a KV cache (inference only); run it without one");
  require(f.y.rank() == 3 && f.y.dim(2) == D && f.q_rot.dim(1) == H && f.q_rot.dim(3) == P, Status::shape_mismatch,
          "SwitchHeadAttention::backward: the forward result (y ", f.y.shape().str(),
          ") does not come from a layer with state_size = ", D, ", n_heads = ", H, ", d_head = ", P);
  dy.require_shape(f.y.shape(), "SwitchHeadAttention::backward: dy");
  const index_t B = f.y.dim(0), Tq = f.y.dim(1), N = B * Tq;
  const Shape logits_shape{B, Tq, H, Ea};
  if (!dsel_o_logits.empty()) dsel_o_logits.require_shape(logits_shape, "SwitchHeadAttention::backward: dsel_o_logits");
  if (!dsel_v_logits.empty()) dsel_v_logits.require_shape(logits_shape, "SwitchHeadAttention::backward: dsel_v_logits");
  require(Ea > 1 || (dsel_o_logits.empty() && dsel_v_logits.empty()), Status::invalid_argument,
          "SwitchHeadAttention::backward: router-logit gradients given, but n_experts = 1 has no routers");
  const Tensor<T> dy_rows = dy.reshape({N, D});

  InputGrads grads;
  grads.dqk_src = Tensor<T>("switchhead::dqk_src", {N, D});
  grads.dv_src = Tensor<T>::uninitialized("switchhead::dv_src", {N, D});

  // Output projection → d attended, d o-router.
  Tensor<T> dattended;
  if (Ea > 1) {
    Tensor<T> dgates;
    std::tie(dattended, dgates) = si::output_experts_backward(params_.o, grads_.o, comm_, placement_, c, f, dy_rows);
    const Tensor<T> dz_o = si::selection_backward(f.o_local_index, f.o_gates, dgates, c.n_heads, c.n_experts,
                                                  dsel_o_logits.empty() ? Tensor<T>() : dsel_o_logits.reshape({N, H * Ea}));
    si::linear_backward_accumulate(f.qk_src, params_.sel_o, dz_o, grads.dqk_src, grads_.sel_o);
  } else {
    const Tensor<T> gated = si::apply_head_gate(f.attended, f.o_gate, P);
    const auto dgated = Tensor<T>::uninitialized("switchhead::dgated", gated.shape());
    ops::linear_backward<T>(gated.as_matrix(), params_.o.as_matrix(), dy_rows.as_matrix(), dgated.as_matrix(),
                            grads_.o.as_matrix(), View1<T>());
    dattended = Tensor<T>::uninitialized("switchhead::dattended", gated.shape());
    const auto dz_o = Tensor<T>::uninitialized("switchhead::dz_o", f.o_gate.shape());
    si::apply_head_gate_backward(f.attended, f.o_gate, dgated, P, dattended, dz_o);
    si::linear_backward_accumulate(f.qk_src, params_.sel_o, dz_o, grads.dqk_src, grads_.sel_o);
  }

  // Attention, then RoPE (in place) and the q/k scale back to token-major rows.
  const Tensor<T> dout_heads = si::rows_to_heads(dattended, B, Tq, H, P, T(1), "switchhead::dattended_heads");
  const auto dq = Tensor<T>::uninitialized("switchhead::dq_rot", f.q_rot.shape());
  const auto dk = Tensor<T>::uninitialized("switchhead::dk_rot", f.k_rot.shape());
  const auto dv = Tensor<T>::uninitialized("switchhead::dv_heads", f.v_heads.shape());
  ops::attention_backward<T>(f.q_rot.template view<4>(), f.k_rot.template view<4>(), f.v_heads.template view<4>(), T(1),
                             f.probs.template view<4>(), dout_heads.template view<4>(), dq.template view<4>(),
                             dk.template view<4>(), dv.template view<4>());
  const int rot = c.rotary_dims();
  ops::rope_backward<T>(dq.template view<4>(), rot, c.rope_base, 0, dq.template view<4>());
  ops::rope_backward<T>(dk.template view<4>(), rot, c.rope_base, 0, dk.template view<4>());
  const T qk_scale = static_cast<T>(std::pow(static_cast<double>(P), -0.25));
  si::linear_backward_accumulate(f.qk_src, params_.q, si::heads_to_rows(dq, qk_scale, "switchhead::dq_rows"),
                                 grads.dqk_src, grads_.q);
  si::linear_backward_accumulate(f.qk_src, params_.k, si::heads_to_rows(dk, qk_scale, "switchhead::dk_rows"),
                                 grads.dqk_src, grads_.k);

  // Values → dv_src and the v-router.
  const Tensor<T> dv_rows = si::heads_to_rows(dv, T(1), "switchhead::dv_rows");
  if (Ea > 1) {
    Tensor<T> dgates;
    std::tie(grads.dv_src, dgates) = si::value_experts_backward(grads_.v, comm_, placement_, c, f, dv_rows);
    const Tensor<T> dz_v = si::selection_backward(f.v_local_index, f.v_gates, dgates, c.n_heads, c.n_experts,
                                                  dsel_v_logits.empty() ? Tensor<T>() : dsel_v_logits.reshape({N, H * Ea}));
    si::linear_backward_accumulate(f.qk_src, params_.sel_v, dz_v, grads.dqk_src, grads_.sel_v);
  } else {
    ops::linear_backward<T>(f.v_src.as_matrix(), params_.v.as_matrix(), dv_rows.as_matrix(), grads.dv_src.as_matrix(),
                            grads_.v.as_matrix(), View1<T>());
  }
  grads.dqk_src = grads.dqk_src.reshape({B, Tq, D});
  grads.dv_src = grads.dv_src.reshape({B, Tq, D});
  return grads;
}

template class SwitchHeadAttention<float>;
template class SwitchHeadAttention<double>;

}  // namespace kmoe::layers
