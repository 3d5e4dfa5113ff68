#include "kmoe/layers/sigma_moe.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/core/profile_region.hpp"
#include "kmoe/dist/parameter_blocks.hpp"
#include "kmoe/model/config_fields.hpp"
#include "kmoe/moe/cvmm.hpp"
#include "kmoe/moe/entropy_regulariser.hpp"
#include "kmoe/moe/expert_bias.hpp"
#include "kmoe/ops/dropout.hpp"
#include "kmoe/ops/gemm.hpp"
#include "kmoe/ops/init.hpp"
#include "kmoe/ops/linear.hpp"
#include "kmoe/ops/softmax.hpp"
#include "kmoe/ops/impl/column_reduce.hpp"
#include "kmoe/ops/topk.hpp"

#include <cmath>
#include <limits>
#include <vector>

namespace kmoe::layers {

SelectionMode parse_selection_mode(const std::string& name) {
  if (name == "sigmoid") return SelectionMode::sigmoid;
  if (name == "softmax") return SelectionMode::softmax;
  if (name == "sinkmoid") return SelectionMode::sinkmoid;
  fail(Status::invalid_argument, "SigmaMoE: unknown selection_mode '", name, "' (sigmoid, softmax, sinkmoid)");
}

const char* selection_mode_name(SelectionMode mode) {
  switch (mode) {
    case SelectionMode::sigmoid: return "sigmoid";
    case SelectionMode::softmax: return "softmax";
    case SelectionMode::sinkmoid: return "sinkmoid";
  }
  return "unknown";
}

const model::FieldTable<SigmaMoEConfig>& sigma_moe_fields() {
  using C = SigmaMoEConfig;
  static const model::FieldTable<C> table = {
      model::required_field("dmodel", &C::dmodel, model::at_least(&C::dmodel, index_t(1))),
      model::required_field("n_experts", &C::n_experts, model::at_least(&C::n_experts, 1)),
      model::required_field("expert_size", &C::expert_size, model::at_least(&C::expert_size, index_t(1))),
      model::required_field("k", &C::k, model::at_least(&C::k, 1)),
      model::field("dropout", &C::dropout, model::probability(&C::dropout)),
      model::enum_field("selection_mode", &C::selection_mode, parse_selection_mode, selection_mode_name),
      model::field("activation_after_topk", &C::activation_after_topk),
      model::enum_field("activation", &C::activation, ops::parse_activation, ops::activation_name),
      model::field("bias", &C::bias),
      model::nullable_field("v_dim", &C::v_dim, model::at_least(&C::v_dim, index_t(0))),
      model::field("sinkhorn_n_iters", &C::sinkhorn_n_iters, model::at_least(&C::sinkhorn_n_iters, 0)),
      model::field("expert_dropout", &C::expert_dropout, model::probability(&C::expert_dropout)),
      model::field("weight_std_scale", &C::weight_std_scale, model::finite_positive(&C::weight_std_scale)),
      model::enum_field("precision", &C::precision, parse_precision, precision_name),
  };
  return table;
}

void SigmaMoEConfig::validate() const {
  model::check_fields(sigma_moe_fields(), *this, "SigmaMoEConfig");
  require(k <= n_experts, Status::invalid_argument, "SigmaMoEConfig: k = ", k, " must lie in [1, n_experts = ",
          n_experts, "]");
  require(k <= ops::topk_max_k, Status::invalid_argument, "SigmaMoEConfig: k = ", k, " exceeds the top-k limit ",
          ops::topk_max_k);
}

namespace impl {


inline Shape with_last_dim(const Shape& shape, index_t last) {
  auto dims = shape.dims();
  dims.back() = last;
  return Shape(dims);
}

// The original's renorm_keep_std(dim=1): rows scaled to unit L2 norm, then the whole matrix
// rescaled to its former unbiased std. A one-time O(E·D) pass done on the host in double, so the
// sums do not depend on the thread count.
template <class T>
void renorm_keep_std(Tensor<T>& weight) {
  const index_t rows = weight.dim(0), cols = weight.dim(1), n = weight.size();
  if (n < 2) return;  // the unbiased std of one element is undefined; leave the draw as it is
  const auto values = weight.to_host();
  std::vector<double> w(values.begin(), values.end());
  const auto unbiased_std = [&] {
    double mean = 0, sum_sq = 0;
    for (double v : w) mean += v;
    mean /= static_cast<double>(n);
    for (double v : w) sum_sq += (v - mean) * (v - mean);
    return std::sqrt(sum_sq / static_cast<double>(n - 1));
  };
  const double original_std = unbiased_std();
  for (index_t r = 0; r < rows; ++r) {
    double norm = 0;
    for (index_t c = 0; c < cols; ++c) norm += w[r * cols + c] * w[r * cols + c];
    norm = std::sqrt(norm);
    for (index_t c = 0; c < cols; ++c) w[r * cols + c] /= norm;
  }
  const double scale = original_std / unbiased_std();
  std::vector<T> result(w.size());
  for (std::size_t i = 0; i < w.size(); ++i) result[i] = static_cast<T>(w[i] * scale);
  weight.copy_from_host(result);
}

// sinkhorn_unnorm of the original, literally (its updates subtract a and b, its output adds
// them), on z [N, E] seen as groups of rows_per_group consecutive rows (A = z.shape[-2]).
template <class T>
Tensor<T> sinkhorn_unnorm(const Tensor<T>& z, index_t rows_per_group, int n_iters) {
  const index_t rows = z.dim(0), experts = z.dim(1), groups = rows / rows_per_group, A = rows_per_group;
  const Tensor<T> a("sigma_moe::sinkhorn_a", {groups, experts}), b("sigma_moe::sinkhorn_b", {rows, 1});
  const Tensor<T> shifted("sigma_moe::sinkhorn_shifted", {rows, experts});
  const Tensor<T> row_lse("sigma_moe::sinkhorn_row_lse", {rows, 1});
  const Tensor<T> column_lse("sigma_moe::sinkhorn_column_lse", {groups, experts});
  const View2<T> zv = z.as_matrix(), av = a.as_matrix(), bv = b.as_matrix(), sv = shifted.as_matrix();
  const View2<T> row_lse_v = row_lse.as_matrix(), column_lse_v = column_lse.as_matrix();
  const T log_rows = static_cast<T>(std::log(static_cast<double>(A)));
  const T log_experts = static_cast<T>(std::log(static_cast<double>(experts)));
  const auto all = md_range<2>({0, 0}, {rows, experts});
  for (int iter = 0; iter < n_iters; ++iter) {
    // b = log A − LSE_e(z − a)
    Kokkos::parallel_for(
        "kmoe::sigma_moe::sinkhorn_minus_a", all,
        KOKKOS_LAMBDA(const index_t n, const index_t e) { sv(n, e) = zv(n, e) - av(n / A, e); });
    ops::logsumexp_forward<T>(shifted.as_3d(1), row_lse_v);
    Kokkos::parallel_for(
        "kmoe::sigma_moe::sinkhorn_b", Kokkos::RangePolicy<ExecSpace>(0, rows),
        KOKKOS_LAMBDA(const index_t n) { bv(n, 0) = log_rows - row_lse_v(n, 0); });
    // a = log E − LSE_t(z − b), t over the rows of a group
    Kokkos::parallel_for(
        "kmoe::sigma_moe::sinkhorn_minus_b", all,
        KOKKOS_LAMBDA(const index_t n, const index_t e) { sv(n, e) = zv(n, e) - bv(n, 0); });
    ops::logsumexp_forward<T>(shifted.reshape({groups, A, experts}).template view<3>(), column_lse_v);
    Kokkos::parallel_for(
        "kmoe::sigma_moe::sinkhorn_a", md_range<2>({0, 0}, {groups, experts}),
        KOKKOS_LAMBDA(const index_t g, const index_t e) { av(g, e) = log_experts - column_lse_v(g, e); });
  }
  const Tensor<T> scores("sigma_moe::sinkhorn_scores", {rows, experts});
  const View2<T> out = scores.as_matrix();
  Kokkos::parallel_for(
      "kmoe::sigma_moe::sinkhorn_scores", all, KOKKOS_LAMBDA(const index_t n, const index_t e) {
        out(n, e) = Kokkos::Experimental::exp(av(n / A, e) + bv(n, 0) + zv(n, e));
      });
  return scores;
}

// out[t, j] = z[t, index[t, j]]: the router logits of the selected experts.
template <class T>
Tensor<T> gather_selected(const Tensor<T>& z, const Tensor<int>& index) {
  const Tensor<T> out("sigma_moe::selected_logits", index.shape());
  const View2<T> zv = z.as_matrix(), ov = out.as_matrix();
  const View2<int> iv = index.as_matrix();
  Kokkos::parallel_for(
      "kmoe::sigma_moe::gather_selected", md_range<2>({0, 0}, {index.dim(0), index.dim(1)}),
      KOKKOS_LAMBDA(const index_t t, const index_t j) { ov(t, j) = zv(t, iv(t, j)); });
  return out;
}

// rows[r, :] += bias for every row (o_bias).
template <class T>
void add_bias_to_rows(const View2<T>& rows, const View1<const T>& bias) {
  Kokkos::parallel_for(
      "kmoe::sigma_moe::add_bias",
      md_range<2>({0, 0}, {static_cast<index_t>(rows.extent(0)), static_cast<index_t>(rows.extent(1))}),
      KOKKOS_LAMBDA(const index_t r, const index_t c) { rows(r, c) += bias(c); });
}

// The order of the per-pair hidden units: the plan's sorted order, so that each expert's rows stay
// contiguous between the projections; with k = 1 pair order (CVMM's sorted order needs k > 1, and
// with one pair per token the two projections read the same rows anyway).
inline moe::PairRows hidden_order(const moe::DispatchPlan& plan) {
  return plan.k() > 1 ? moe::PairRows::sorted : moe::PairRows::pair_order;
}

// The dropout counter of unit 0 of each hidden row (in `order`): pair (received row r, slot j)
// is pair (t·k + j) of the global batch, t = received_tokens[r], and its unit u draws
// ((t·k + j)·expert_size + hidden_begin + u).
inline Tensor<std::int64_t> hidden_dropout_keys(const moe::DispatchPlan& plan, moe::PairRows order,
                                                const View1<const std::int64_t>& tokens, int k,
                                                index_t expert_size, index_t hidden_begin) {
  const index_t pairs = plan.n_pairs();
  auto storage = Tensor<std::int64_t>::uninitialized("sigma_moe::dropout_keys", {pairs});
  const View1<std::int64_t> keys = storage.flat();
  const View1<int> sorted = plan.sorted_pair();
  const bool by_sorted = order == moe::PairRows::sorted;
  Kokkos::parallel_for(
      "kmoe::sigma_moe::dropout_keys", Kokkos::RangePolicy<ExecSpace>(0, pairs), KOKKOS_LAMBDA(const index_t s) {
        const index_t p = by_sorted ? sorted(s) : s;
        const index_t r = p / k, j = p % k;
        keys(s) = (tokens(r) * k + j) * expert_size + hidden_begin;
      });
  return storage;
}

// sums[c] += Σ_r src[r, c] (a deterministic column reduction: reproducible, no atomics).
template <class T>
void accumulate_column_sums(const View2<const T>& src, const View1<T>& sums) {
  ops::impl::column_reduce<T, 1>(
      "kmoe::sigma_moe::column_sums", src.extent(0), src.extent(1),
      KOKKOS_LAMBDA(const index_t r, const index_t c) { return Kokkos::Array<T, 1>{src(r, c)}; },
      KOKKOS_LAMBDA(const index_t c, const Kokkos::Array<T, 1>& sum) { sums(c) += sum[0]; });
}

// dst += src elementwise.
template <class T>
void add_into(const View1<T>& dst, const View1<const T>& src) {
  Kokkos::parallel_for(
      "kmoe::sigma_moe::add_into", Kokkos::RangePolicy<ExecSpace>(0, dst.extent(0)),
      KOKKOS_LAMBDA(const index_t i) { dst(i) += src(i); });
}

// The tensor top-k runs on (RobertCsordas/moe_layer@c9b9c01c7071fe5c39d1f91ae6f24911fb75adb0
// triton_src/moe_layer/moe_layer_simple.py, MoE.forward up to sel.topk): the activated logits, or
// the raw ones when the activation comes after top-k; for sinkmoid the Sinkhorn scores in
// training, σ(z) in eval.
template <class T>
Tensor<T> selection_scores(const SigmaMoEConfig& config, const Tensor<T>& z, index_t rows_per_group,
                           bool training) {
  if (config.selection_mode == SelectionMode::sinkmoid && training)
    return sinkhorn_unnorm(z, rows_per_group, config.sinkhorn_n_iters);
  const bool activate = !config.activation_after_topk || config.selection_mode == SelectionMode::sinkmoid;
  if (!activate) return z.clone("sigma_moe::selection_scores");
  const auto scores = Tensor<T>::uninitialized("sigma_moe::selection_scores", z.shape());
  if (config.selection_mode == SelectionMode::softmax) {
    ops::softmax_forward<T>(z.as_3d(1), scores.as_3d(1));
  } else {
    ops::activation_forward<T>(ops::Activation::sigmoid, z.flat(), scores.flat());
  }
  return scores;
}

// The reduction weights (moe_layer@c9b9c01 MoE.forward, sel_val after sel.topk): activations of
// the selected raw logits (σ, or a softmax over the k of them) after top-k or for sinkmoid;
// otherwise the top-k values themselves.
template <class T>
Tensor<T> gate_values(const SigmaMoEConfig& config, const Tensor<T>& z, const Tensor<int>& expert_index,
                      const Tensor<T>& topk_values) {
  const bool sinkmoid = config.selection_mode == SelectionMode::sinkmoid;
  if (!config.activation_after_topk && !sinkmoid) return topk_values;
  const Tensor<T> selected = gather_selected(z, expert_index);
  if (config.selection_mode == SelectionMode::softmax) {
    const Tensor<T> gates("sigma_moe::gates", selected.shape());
    ops::softmax_forward<T>(selected.as_3d(1), gates.as_3d(1));
    return gates;
  }
  ops::activation_forward<T>(ops::Activation::sigmoid, selected.flat(), selected.flat());
  return selected;
}

// dz [N, E] from the gate gradients: σ' of the selected logits (sigmoid, sinkmoid), the softmax
// Jacobian over the k selected logits (softmax after top-k) or over all E (softmax before top-k).
template <class T>
Tensor<T> router_gradient(const SigmaMoEConfig& config, const SigmaMoEForward<T>& forward,
                          const Tensor<T>& dgates) {
  const Tensor<T>& z = forward.router_logits;
  const Tensor<T> dz("sigma_moe::dz", z.shape());
  const auto index = forward.expert_index.as_matrix();
  if (config.selection_mode == SelectionMode::softmax && !config.activation_after_topk) {
    const Tensor<T> probs("sigma_moe::probs", z.shape()), dprobs("sigma_moe::dprobs", z.shape());
    ops::softmax_forward<T>(z.as_3d(1), probs.as_3d(1));
    ops::topk_backward<T>(index, dgates.as_matrix(), dprobs.as_matrix());
    ops::softmax_backward<T>(probs.as_3d(1), dprobs.as_3d(1), dz.as_3d(1));
    return dz;
  }
  const Tensor<T> dselected("sigma_moe::dselected", dgates.shape());
  if (config.selection_mode == SelectionMode::softmax) {
    ops::softmax_backward<T>(forward.gates.as_3d(1), dgates.as_3d(1), dselected.as_3d(1));
  } else {
    const Tensor<T> selected = gather_selected(z, forward.expert_index);
    ops::activation_backward<T>(ops::Activation::sigmoid, selected.flat(), dgates.flat(), dselected.flat());
  }
  ops::topk_backward<T>(index, dselected.as_matrix(), dz.as_matrix());
  return dz;
}

}  // namespace impl

template <class T>
SigmaMoE<T>::SigmaMoE(const SigmaMoEConfig& config, std::uint64_t seed, ParameterInit init,
                      const dist::Communicator& comm)
    : config_(config), comm_(comm) {
  config_.validate();
  require_precision_supported<T>(config_.precision, "SigmaMoE");
  comm_.require_same(dist::text_hash(model::write_fields(sigma_moe_fields(), config_).dump()) ^ seed,
                     "the SigmaMoE config or seed");
  const index_t E = config_.n_experts, D = config_.dmodel, es = config_.expert_size, Dv = config_.value_dim();
  placement_ = dist::Placement(static_cast<int>(E), comm_.size(), es);
  const int rank = comm_.rank();
  const index_t El = placement_.local_experts(rank), e0 = placement_.first_expert(rank);
  const index_t hl = placement_.local_hidden(rank), h0 = placement_.hidden_begin(rank);
  const double wss = config_.weight_std_scale;
  params_.keys = Tensor<T>("sigma_moe::keys", {El, D, hl});
  params_.values = Tensor<T>("sigma_moe::values", {El, hl, Dv});
  params_.expert_sel = Tensor<T>("sigma_moe::expert_sel", {E, D});
  // The original's creation order: keys, values, expert_sel; each rank draws its block of the
  // one-rank tensors.
  Generator generator(seed, init);
  const double keys_std = std::pow(static_cast<double>(D), -0.5) * wss;
  const double values_std = std::pow(static_cast<double>(E * es), -0.5) * wss;
  ops::fill_normal_block<T>(params_.keys.template view<3>(), generator.take(static_cast<std::uint64_t>(E * D * es)),
                            T(0), static_cast<T>(keys_std), D, es, e0, 0, h0);
  ops::fill_normal_block<T>(params_.values.template view<3>(), generator.take(static_cast<std::uint64_t>(E * es * Dv)),
                            T(0), static_cast<T>(values_std), es, Dv, e0, h0, 0);
  ops::fill_normal<T>(params_.expert_sel.flat(), generator.take(static_cast<std::uint64_t>(E * D)), T(0),
                      static_cast<T>(std::pow(static_cast<double>(D), -0.5) * wss));
  if (generator.draws()) impl::renorm_keep_std(params_.expert_sel);
  if (config_.bias) {
    params_.bias = Tensor<T>("sigma_moe::bias", {El, hl});
    params_.o_bias = Tensor<T>("sigma_moe::o_bias", {Dv});
  }
  const auto zeros_like = [](const Tensor<T>& t) {
    return t.empty() ? Tensor<T>() : Tensor<T>("grad::" + t.label(), t.shape());
  };
  grads_ = {zeros_like(params_.keys), zeros_like(params_.values), zeros_like(params_.expert_sel),
            zeros_like(params_.bias), zeros_like(params_.o_bias)};
}

template <class T>
void SigmaMoE<T>::visit_parameters(const model::ParameterVisitor<T>& visit, const std::string& prefix) {
  const int rank = comm_.rank();
  const auto placed = [&](model::Parameter<T> p) { return dist::placed(std::move(p), placement_, rank); };
  auto keys = placed(model::expert_parameter(prefix + "keys", params_.keys, grads_.keys, 2));
  auto values = placed(model::expert_parameter(prefix + "values", params_.values, grads_.values, 1));
  auto expert_sel = model::dense_parameter(prefix + "expert_sel", params_.expert_sel, grads_.expert_sel);
  visit(keys);
  visit(values);
  visit(expert_sel);
  if (config_.bias) {
    auto bias = placed(model::expert_parameter(prefix + "bias", params_.bias, grads_.bias, 1));
    auto o_bias = model::dense_parameter(prefix + "o_bias", params_.o_bias, grads_.o_bias);
    visit(bias);
    visit(o_bias);
  }
}

template <class T>
void SigmaMoE<T>::zero_grad() {
  for (Tensor<T>* grad : {&grads_.keys, &grads_.values, &grads_.expert_sel, &grads_.bias, &grads_.o_bias})
    if (!grad->empty()) grad->fill(T(0));
}

template <class T>
SigmaMoEForward<T> SigmaMoE<T>::forward(const Tensor<T>& x, bool training, Generator& rng) const {
  return forward(x, Tensor<T>(), training, rng);
}

template <class T>
SigmaMoEOperands<T> SigmaMoE<T>::expert_operands() const {
  return {moe::ExpertOperand<T>(params_.keys, config_.precision, "sigma_moe::keys_operand"),
          moe::ExpertOperand<T>(params_.values, config_.precision, "sigma_moe::values_operand")};
}

template <class T>
SigmaMoEForward<T> SigmaMoE<T>::forward(const Tensor<T>& x, const Tensor<T>& sel_input, bool training,
                                        Generator& rng, bool batch_regulariser,
                                        const SigmaMoEOperands<T>* operands) const {
  const ProfileRegion region("kmoe::sigma_moe::forward");
  const SigmaMoEConfig& c = config_;
  const index_t D = c.dmodel, E = c.n_experts, es = c.expert_size, Dv = c.value_dim();
  const int K = c.k;
  // A bad input on one rank is an error on every rank (the others would wait for it otherwise).
  comm_.collectively([&] {
    require(x.rank() >= 1 && x.rank() <= 4 && x.dim(x.rank() - 1) == D, Status::shape_mismatch,
            "SigmaMoE::forward: x is ", x.shape().str(), ", expected rank 1-4 [..., dmodel = ", D, "]");
    // A rank may bring no tokens when others do (data parallelism); one rank alone may not.
    require(x.size() / D >= 1 || comm_.distributed(), Status::shape_mismatch, "SigmaMoE::forward: x ",
            x.shape().str(), " has no tokens");
    require_finite(x, "SigmaMoE::forward: x");
    if (!sel_input.empty()) sel_input.require_shape(x.shape(), "SigmaMoE::forward: sel_input (must match x)");
  });
  const index_t tokens = x.size() / D;

  SigmaMoEForward<T> f;
  f.training = training;
  f.x = x.reshape({tokens, D});
  if (!sel_input.empty()) f.sel_input = sel_input.reshape({tokens, D});
  f.router_logits = Tensor<T>::uninitialized("sigma_moe::router_logits", {tokens, E});
  if (tokens > 0) {
    ops::linear_forward<T>((sel_input.empty() ? f.x : f.sel_input).as_matrix(), params_.expert_sel.as_matrix(),
                           View1<const T>(), f.router_logits.as_matrix());
  }
  // The regulariser pools all tokens of the batch, every rank's: one sequence, one call, one group.
  if (batch_regulariser) {
    f.regulariser =
        moe::entropy_reg_forward(std::vector<Tensor<T>>{f.router_logits.reshape({1, tokens, 1, E})}, &comm_);
    f.reg_loss = f.regulariser.value;
    f.has_regulariser = true;
  }
  // Draws are keyed by the token's position in the global batch (ranks in order), so every world
  // size draws what one rank draws.
  const std::int64_t first_token = comm_.exclusive_prefix_sum(tokens);
  const std::int64_t global_tokens = comm_.sum(tokens);

  // Sinkhorn groups: the original's A = z.shape[-2] (one group of all tokens for 2-D x, one per
  // leading index for 3-D/4-D x); a single token for 1-D x.
  const index_t rows_per_group = x.rank() >= 2 ? x.dim(x.rank() - 2) : 1;
  require(!(comm_.distributed() && training && c.selection_mode == SelectionMode::sinkmoid && x.rank() == 2),
          Status::unsupported, "SigmaMoE::forward: sinkmoid training over a 2-D x normalises over the whole batch, "
          "which is not split over ranks; give x as [batch, sequence, dmodel]");
  RngStream expert_dropout;
  if (training && c.expert_dropout > 0) expert_dropout = dist::take_global(comm_, rng, static_cast<std::uint64_t>(tokens * E));
  f.expert_index = Tensor<int>("sigma_moe::expert_index", {tokens, K});
  if (tokens > 0) {
    f.selection_scores = impl::selection_scores(c, f.router_logits, rows_per_group, training);
    if (training && c.expert_dropout > 0)
      ops::drop_to_minus_infinity<T>(f.selection_scores.flat(), static_cast<T>(c.expert_dropout), expert_dropout);
    const Tensor<T> topk_values("sigma_moe::topk_values", {tokens, K});
    ops::topk_forward<T>(f.selection_scores.as_matrix(), K, ops::TopkOrder::descending, topk_values.as_matrix(),
                         f.expert_index.as_matrix());
    f.gates = impl::gate_values(c, f.router_logits, f.expert_index, topk_values);
  } else {
    f.selection_scores = Tensor<T>("sigma_moe::selection_scores", {0, E});
    f.gates = Tensor<T>("sigma_moe::gates", {0, K});
  }

  // Each token to the ranks that hold its experts; the plan over what this rank received.
  f.exchange = dist::ExpertExchange(comm_, placement_, f.expert_index, first_token);
  f.x_received = f.exchange.dispatch(f.x);
  f.gates_received = f.exchange.dispatch(f.gates);
  const int local_experts = placement_.local_experts(comm_.rank());
  const index_t es_local = params_.keys.dim(2), received = f.exchange.received_rows();
  // Unit j of pair (token t, slot s) draws ((t·k + s)·expert_size + j) of the global batch; every
  // rank takes the stream, also one whose experts received nothing, so that its generator stays
  // with the others'.
  const RngStream dropout_stream =
      training && c.dropout > 0 ? rng.take(static_cast<std::uint64_t>(global_tokens * K * es)) : RngStream{};
  Tensor<T> y_received;
  if (received > 0) {
  f.plan = moe::DispatchPlan::build_with_drops(f.exchange.received_experts().as_matrix(), local_experts);
  {
    const SigmaMoEOperands<T> own = operands != nullptr ? *operands : expert_operands();
    f.keys_operand = own.keys;
    f.values_operand = own.values;
  }

  // Up-projection: u = x · keys[e] (+ bias[e]), h = dropout(activation(u)).
  const index_t pairs = f.plan.n_pairs();
  f.pre_activation = Tensor<T>::uninitialized("sigma_moe::pre_activation", {pairs, es_local});
  moe::cvmm_forward<T>(f.plan, f.x_received.as_matrix(), f.keys_operand, f.pre_activation.as_matrix(),
                       impl::hidden_order(f.plan));
  if (c.bias) {
    moe::add_expert_bias<T>(f.plan, impl::hidden_order(f.plan), f.pre_activation.as_matrix(),
                            params_.bias.as_matrix());
  }
  f.hidden = Tensor<T>::uninitialized("sigma_moe::hidden", {pairs, es_local});
  ops::activation_forward<T>(c.activation, f.pre_activation.flat(), f.hidden.flat());
  if (training && c.dropout > 0) {
    f.dropout_stream = dropout_stream;
    f.dropout_keys = impl::hidden_dropout_keys(f.plan, impl::hidden_order(f.plan), f.exchange.received_tokens(), K, es,
                                               placement_.hidden_begin(comm_.rank()));
    ops::dropout_rows<T>(f.hidden.as_matrix(), static_cast<T>(c.dropout), f.dropout_stream, f.dropout_keys.flat(),
                         f.hidden.as_matrix());
  }

  // Down-projection reduced with the gates: y_t = Σ_j g_tj · h_tj · values[e_tj] (+ o_bias), the
  // rows summed over the ranks that computed parts of them.
  y_received = Tensor<T>::uninitialized("sigma_moe::y_received", {received, Dv});
  moe::cvmm_forward_reduced<T>(f.plan, f.hidden.as_matrix(), f.values_operand, f.gates_received.as_matrix(),
                               y_received.as_matrix(), impl::hidden_order(f.plan));
  }
  const Tensor<T> y = f.exchange.combine(y_received);
  if (c.bias) impl::add_bias_to_rows<T>(y.as_matrix(), params_.o_bias.flat());
  f.y = y.reshape(impl::with_last_dim(x.shape(), Dv));
  return f;
}

template <class T>
Tensor<T> SigmaMoE<T>::backward(const SigmaMoEForward<T>& f, const Tensor<T>& dy, T reg_coef) {
  const ProfileRegion region("kmoe::sigma_moe::backward");
  return backward_with_router(f, dy, reg_coef, Tensor<T>()).dx;
}

template <class T>
SigmaMoEInputGrads<T> SigmaMoE<T>::backward_with_router(const SigmaMoEForward<T>& f, const Tensor<T>& dy, T reg_coef,
                                                        const Tensor<T>& drouter_logits) {
  const SigmaMoEConfig& c = config_;
  const index_t D = c.dmodel, E = c.n_experts, es = c.expert_size, Dv = c.value_dim();
  const index_t received = f.exchange.received_rows(), pairs = f.plan.n_pairs();
  comm_.collectively([&] {
    require(!f.y.empty(), Status::invalid_argument, "SigmaMoE::backward: the forward result is empty (default-constructed)");
    const index_t tokens = f.x.dim(0);
    require(f.x.dim(1) == D && f.router_logits.shape() == Shape{tokens, E} && f.gates.shape() == Shape{tokens, c.k} &&
                (received == 0 || f.hidden.shape() == Shape{pairs, params_.keys.dim(2)}) && f.y.size() == tokens * Dv,
            Status::shape_mismatch, "SigmaMoE::backward: the forward result (x ", f.x.shape().str(), ", hidden ",
            f.hidden.shape().str(), ", y ", f.y.shape().str(),
            ") does not come from a layer with dmodel = ", D, ", n_experts = ", E, ", k = ", c.k,
            ", expert_size = ", es, ", v_dim = ", Dv);
    dy.require_shape(f.y.shape(), "SigmaMoE::backward: dy");
    require(reg_coef == T(0) || f.has_regulariser, Status::invalid_argument, "SigmaMoE::backward: reg_coef = ",
            reg_coef, ", but the forward skipped the batch regulariser");
  });
  const index_t tokens = f.x.dim(0);
  const Tensor<T> dy_rows = dy.reshape({tokens, Dv});

  if (c.bias) impl::accumulate_column_sums<T>(dy_rows.as_matrix(), grads_.o_bias.flat());

  // The transpose of forward's exchange: dy to the experts' ranks, dx and the gate gradients back.
  const Tensor<T> dy_received = f.exchange.dispatch(dy_rows);
  Tensor<T> dx_received, dgates_received;
  if (received > 0) {
  const index_t es_local = f.hidden.dim(1);
  // Down-projection: dgates, d values, dh.
  const auto du = Tensor<T>::uninitialized("sigma_moe::du", {pairs, es_local});
  dgates_received = Tensor<T>::uninitialized("sigma_moe::dgates", {received, c.k});
  moe::cvmm_backward_reduced<T>(f.plan, f.hidden.as_matrix(), f.values_operand, f.gates_received.as_matrix(),
                                dy_received.as_matrix(), du.as_matrix(), grads_.values.template view<3>(),
                                dgates_received.as_matrix(), impl::hidden_order(f.plan));
  // Up-projection: replay the dropout mask, then activation', bias and keys.
  if (f.training && c.dropout > 0)
    ops::dropout_rows<T>(du.as_matrix(), static_cast<T>(c.dropout), f.dropout_stream, f.dropout_keys.flat(), du.as_matrix());
  ops::activation_backward<T>(c.activation, f.pre_activation.flat(), du.flat(), du.flat());
  if (c.bias) {
    moe::accumulate_expert_bias_gradient<T>(f.plan, impl::hidden_order(f.plan), du.as_matrix(),
                                            grads_.bias.as_matrix());
  }
  dx_received = Tensor<T>::uninitialized("sigma_moe::dx_received", {received, D});
  moe::cvmm_backward<T>(f.plan, f.x_received.as_matrix(), f.keys_operand, du.as_matrix(), dx_received.as_matrix(),
                        grads_.keys.template view<3>(), impl::hidden_order(f.plan));
  }
  const Tensor<T> dx = f.exchange.combine(dx_received);
  const Tensor<T> dgates = f.exchange.combine(dgates_received);

  if (tokens == 0) {  // a rank without tokens of its own: only its experts' share above
    SigmaMoEInputGrads<T> none;
    none.dx = dx.reshape(impl::with_last_dim(f.y.shape(), D));
    if (!f.sel_input.empty()) none.dsel_input = Tensor<T>("sigma_moe::dsel_input", none.dx.shape());
    return none;
  }
  // Router: gates, regulariser and the caller's logit gradient → dz → d expert_sel and the
  // router input's gradient (dx itself, or a separate dsel_input).
  const Tensor<T> dz = impl::router_gradient(c, f, dgates);
  if (reg_coef != T(0)) {
    moe::entropy_reg_backward_add(f.regulariser, reg_coef, std::vector<Tensor<T>>{dz.reshape({1, tokens, 1, E})});
  }
  if (!drouter_logits.empty()) {
    drouter_logits.require_shape(f.router_logits.shape(), "SigmaMoE::backward_with_router: drouter_logits");
    impl::add_into<T>(dz.flat(), drouter_logits.flat());
  }
  const bool separate_router = !f.sel_input.empty();
  SigmaMoEInputGrads<T> grads;
  grads.dx = dx.reshape(impl::with_last_dim(f.y.shape(), D));
  Tensor<T> d_router_input = dx;  // z = x · expert_selᵀ: dx += dz · expert_sel (onto the experts' share)
  if (separate_router) {
    d_router_input = Tensor<T>::uninitialized("sigma_moe::dsel_input", {tokens, D});
    grads.dsel_input = d_router_input.reshape(grads.dx.shape());
  }
  ops::gemm<T>(false, false, T(1), dz.as_matrix(), params_.expert_sel.as_matrix(), separate_router ? T(0) : T(1),
               d_router_input.as_matrix());
  ops::gemm<T>(true, false, T(1), dz.as_matrix(), (separate_router ? f.sel_input : f.x).as_matrix(), T(1),
               grads_.expert_sel.as_matrix());
  return grads;
}

template class SigmaMoE<float>;
template class SigmaMoE<double>;

}  // namespace kmoe::layers
