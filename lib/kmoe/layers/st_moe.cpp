#include "kmoe/layers/st_moe.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/core/profile_region.hpp"
#include "kmoe/dist/parameter_blocks.hpp"
#include "kmoe/model/config_fields.hpp"
#include "kmoe/ops/gemm.hpp"
#include "kmoe/ops/impl/team_reduce.hpp"
#include "kmoe/ops/init.hpp"
#include "kmoe/ops/linear.hpp"
#include "kmoe/ops/topk.hpp"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <tuple>
#include <string>

namespace kmoe::layers {

// ---- configuration ----

index_t StMoEConfig::expert_hidden() const { return geglu_hidden_size(dim, expert_hidden_mult); }

namespace st_moe_impl {

// τ of choices 1 … top_n − 1 from one value or one per choice (the original's cast_tuple).
inline std::vector<double> thresholds_per_choice(const std::vector<double>& given, int top_n) {
  if (top_n <= 1) return {};
  if (given.size() == 1) return std::vector<double>(top_n - 1, given[0]);
  return given;
}

inline void require_thresholds(const char* field, const std::vector<double>& given, int top_n) {
  require(given.size() == 1 || static_cast<int>(given.size()) == top_n - 1 || (top_n == 1 && given.empty()),
          Status::invalid_argument, "StMoEConfig: ", field, " has ", given.size(),
          " values, expected one or gating_top_n - 1 = ", top_n - 1);
  for (std::size_t i = 0; i < given.size(); ++i) {
    require(std::isfinite(given[i]) && given[i] > 0, Status::invalid_argument, "StMoEConfig: ", field, "[", i,
            "] = ", given[i], " must be finite and positive");
  }
}

}  // namespace st_moe_impl

moe::TopNGatingOptions StMoEConfig::gating_options(bool training, bool inner) const {
  moe::TopNGatingOptions options;
  options.num_gates = inner ? num_experts_inner : num_experts;
  options.top_n = gating_top_n;
  options.thresholds = st_moe_impl::thresholds_per_choice(training ? threshold_train : threshold_eval, gating_top_n);
  options.capacity_factor = training ? capacity_factor_train : capacity_factor_eval;
  options.balance_density = balance_density;
  options.normalisation = gate_normalisation;
  options.compute_losses = training;
  return options;
}

const model::FieldTable<StMoEConfig>& st_moe_fields() {
  using C = StMoEConfig;
  const auto any = [](const nlohmann::json&) { return true; };
  static const model::FieldTable<C> table = {
      model::required_field("dim", &C::dim, model::at_least(&C::dim, index_t(1))),
      model::field("num_experts", &C::num_experts, model::at_least(&C::num_experts, 1)),
      model::field("expert_hidden_mult", &C::expert_hidden_mult, model::finite_positive(&C::expert_hidden_mult)),
      model::number_list_field("threshold_train", &C::threshold_train),
      model::number_list_field("threshold_eval", &C::threshold_eval),
      model::field("capacity_factor_train", &C::capacity_factor_train, model::finite_non_negative(&C::capacity_factor_train)),
      model::field("capacity_factor_eval", &C::capacity_factor_eval, model::finite_non_negative(&C::capacity_factor_eval)),
      model::field("gating_top_n", &C::gating_top_n),
      model::field("balance_loss_coef", &C::balance_loss_coef, model::finite(&C::balance_loss_coef)),
      model::field("router_z_loss_coef", &C::router_z_loss_coef, model::finite(&C::router_z_loss_coef)),
      model::field("straight_through_dispatch_tensor", &C::straight_through_dispatch_tensor),
      model::enum_field("precision", &C::precision, parse_precision, precision_name),
      model::fixed_field<C>("experts", [](const nlohmann::json& v) { return v.is_null(); }, "custom expert modules"),
      model::fixed_field<C>("differentiable_topk", [](const nlohmann::json& v) { return v == false; },
                            "the coordinate-descent top-k is not implemented"),
      model::fixed_field<C>("differentiable_topk_fused", any, "only used with differentiable_topk"),
      model::fixed_field<C>("is_distributed", [](const nlohmann::json& v) { return v.is_null() || v == false; },
                            "kmoe places experts across ranks through its own communicator"),
      model::fixed_field<C>("allow_var_seq_len", any, "only used when distributed"),
  };
  return table;
}

void StMoEConfig::validate() const {
  const char* op = "StMoEConfig";
  model::check_fields(st_moe_fields(), *this, op);
  require(num_experts_inner >= 0, Status::invalid_argument, op, ": num_experts_inner = ", num_experts_inner,
          " must not be negative (0: no hierarchy)");
  const int routed = std::min(num_experts, hierarchical() ? num_experts_inner : num_experts);
  require(gating_top_n >= 1 && gating_top_n <= routed && gating_top_n <= ops::topk_max_k, Status::invalid_argument,
          op, ": gating_top_n = ", gating_top_n, " must lie in [1, min(experts per gate = ", routed, ", ",
          ops::topk_max_k, ")]");
  require(!hierarchical() || gating_top_n == 2, Status::invalid_argument, op, ": gating_top_n = ", gating_top_n,
          ", but the hierarchical MoE gates are top-2");
  st_moe_impl::require_thresholds("threshold_train", threshold_train, gating_top_n);
  st_moe_impl::require_thresholds("threshold_eval", threshold_eval, gating_top_n);
  expert_hidden();  // throws when the hidden size is below 1
}

StMoEConfig StMoEV0014Config::to_config() const {
  StMoEConfig c;
  c.dim = dim;
  c.num_experts = num_experts;
  c.num_experts_inner = num_experts_inner;
  c.expert_hidden_mult = expert_hidden_mult;
  c.threshold_train = {second_threshold_train};
  c.threshold_eval = {second_threshold_eval};
  c.capacity_factor_train = capacity_factor_train;
  c.capacity_factor_eval = capacity_factor_eval;
  c.gating_top_n = 2;
  c.balance_loss_coef = loss_coef;
  c.router_z_loss_coef = router_z_loss_coef;
  c.straight_through_dispatch_tensor = !detached_dispatch_tensor;
  c.balance_density = moe::BalanceDensity::before_capacity;
  c.gate_normalisation = moe::GateNormalisation::sum_plus_eps;
  c.router_init = RouterInit::standard_normal;
  c.generation = StMoEGeneration::v0_0_14;
  c.precision = precision;
  return c;
}

namespace st_moe_impl {

using Member = Kokkos::TeamPolicy<ExecSpace>::member_type;

// The routing levels all move rows through one index structure: rows(t, j) is the row, in the
// next stage's matrix, of token t's kept choice j (−1: not kept). Every such row belongs to exactly
// one (t, j), so the scatters below write each row once (no accumulation).

// out(rows(t, j), :) = x(t, :).
template <class T>
void dispatch_rows(const View2<const T>& x, const View2<const int>& rows, const View2<T>& out) {
  const int k = static_cast<int>(rows.extent(1)), D = static_cast<int>(x.extent(1));
  Kokkos::parallel_for(
      "kmoe::st_moe::dispatch_rows", Kokkos::TeamPolicy<ExecSpace>(static_cast<int>(rows.extent(0) * k), Kokkos::AUTO),
      KOKKOS_LAMBDA(const Member& team) {
        const index_t t = team.league_rank() / k;
        const int row = rows(t, team.league_rank() % k);
        if (row < 0) return;
        Kokkos::parallel_for(Kokkos::TeamThreadRange(team, D), [&](const int c) { out(row, c) = x(t, c); });
      });
}

// out(t, :) = Σ_j gate(t, j) · src(rows(t, j), :), kept choices in order.
template <class T>
void combine_rows(const View2<const T>& gate, const View2<const int>& rows, const View2<const T>& src,
                  const View2<T>& out) {
  const int k = static_cast<int>(rows.extent(1));
  Kokkos::parallel_for(
      "kmoe::st_moe::combine_rows",
      md_range<2>({0, 0}, {static_cast<index_t>(out.extent(0)), static_cast<index_t>(out.extent(1))}),
      KOKKOS_LAMBDA(const index_t t, const index_t c) {
        T sum = 0;
        for (int j = 0; j < k; ++j) {
          const int row = rows(t, j);
          if (row >= 0) sum += gate(t, j) * src(row, c);
        }
        out(t, c) = sum;
      });
}

// dsrc(rows(t, j), :) = gate(t, j) · dout(t, :): the combine's gradient with respect to its rows.
template <class T>
void scatter_row_gradients(const View2<const T>& gate, const View2<const int>& rows, const View2<const T>& dout,
                           const View2<T>& dsrc) {
  const int k = static_cast<int>(rows.extent(1)), D = static_cast<int>(dout.extent(1));
  Kokkos::parallel_for(
      "kmoe::st_moe::scatter_row_gradients",
      Kokkos::TeamPolicy<ExecSpace>(static_cast<int>(rows.extent(0) * k), Kokkos::AUTO),
      KOKKOS_LAMBDA(const Member& team) {
        const index_t t = team.league_rank() / k;
        const int j = team.league_rank() % k;
        const int row = rows(t, j);
        if (row < 0) return;
        const T g = gate(t, j);
        Kokkos::parallel_for(Kokkos::TeamThreadRange(team, D), [&](const int c) { dsrc(row, c) = g * dout(t, c); });
      });
}

// The rest of a level's backward, once the gradient of the dispatched rows (drows) is known:
//   dgate(t, j) = ⟨dout(t), src(row)⟩ [+ ⟨drows(row), x(t)⟩ with the straight-through dispatch],
//   dx(t) = Σ_j drows(row(t, j)) (overwritten).
template <class T>
void level_backward(const View2<const int>& rows, const View2<const T>& dout, const View2<const T>& src,
                    const View2<const T>& drows, const View2<const T>& x, bool straight_through,
                    const View2<T>& dgate, const View2<T>& dx) {
  const int k = static_cast<int>(rows.extent(1)), D = static_cast<int>(x.extent(1));
  Kokkos::parallel_for(
      "kmoe::st_moe::level_backward", Kokkos::TeamPolicy<ExecSpace>(static_cast<int>(rows.extent(0)), Kokkos::AUTO),
      KOKKOS_LAMBDA(const Member& team) {
        const index_t t = team.league_rank();
        for (int j = 0; j < k; ++j) {
          const int row = rows(t, j);  // the same for the whole team
          T d = 0;
          if (row >= 0) {
            d = ops::impl::team_sum<T>(team, D, [&](const int c) {
              const T through_combine = dout(t, c) * src(row, c);
              return straight_through ? through_combine + drows(row, c) * x(t, c) : through_combine;
            });
          }
          Kokkos::single(Kokkos::PerTeam(team), [&]() { dgate(t, j) = d; });
        }
        Kokkos::parallel_for(Kokkos::TeamThreadRange(team, D), [&](const int c) {
          T sum = 0;
          for (int j = 0; j < k; ++j) {
            const int row = rows(t, j);
            if (row >= 0) sum += drows(row, c);
          }
          dx(t, c) = sum;
        });
      });
}

// [rows, k] experts of the kept choices for a DispatchPlan: expert_index + (row / rows_per_block) ·
// experts_per_block (the inner gates' experts are numbered group by group), −1 for choices not kept.
inline Tensor<int> plan_index(const Tensor<int>& expert_index, index_t rows_per_block, int experts_per_block) {
  const index_t R = expert_index.dim(0), k = expert_index.dim(1);
  const auto index = Tensor<int>::uninitialized("st_moe::plan_index", {R, k});
  const View2<int> in = expert_index.as_matrix(), out = index.as_matrix();
  Kokkos::parallel_for(
      "kmoe::st_moe::plan_index", md_range<2>({0, 0}, {R, k}), KOKKOS_LAMBDA(const index_t r, const index_t j) {
        const int e = in(r, j);
        out(r, j) = e < 0 ? -1 : e + static_cast<int>(r / rows_per_block) * experts_per_block;
      });
  return index;
}

// rows(t, j) = the plan's sorted position of pair t · k + j, −1 for a dropped pair.
inline Tensor<int> pair_rows(const moe::DispatchPlan& plan) {
  const index_t R = plan.n_tokens();
  const int k = plan.k();
  const auto rows = Tensor<int>::uninitialized("st_moe::pair_rows", {R, k});
  const View2<int> out = rows.as_matrix();
  const View1<int> expert_of_pair = plan.expert_of_pair(), pair_position = plan.pair_position();
  Kokkos::parallel_for(
      "kmoe::st_moe::pair_rows", md_range<2>({0, 0}, {R, static_cast<index_t>(k)}),
      KOKKOS_LAMBDA(const index_t r, const index_t j) {
        const index_t p = r * k + j;
        out(r, j) = expert_of_pair(p) < 0 ? -1 : pair_position(p);
      });
  return rows;
}

// rows(t, j) = slot (o · batch + b) · capacity + position of token t's kept outer choice j.
template <class T>
Tensor<int> slot_rows(const moe::TopNRouting<T>& routing, index_t batch) {
  const index_t tokens = routing.expert_index.dim(0), n = routing.group_size, C = routing.capacity;
  const int k = static_cast<int>(routing.expert_index.dim(1));
  const auto rows = Tensor<int>::uninitialized("st_moe::slot_rows", {tokens, k});
  const View2<int> out = rows.as_matrix(), expert = routing.expert_index.as_matrix(),
                   position = routing.position.as_matrix();
  Kokkos::parallel_for(
      "kmoe::st_moe::slot_rows", md_range<2>({0, 0}, {tokens, static_cast<index_t>(k)}),
      KOKKOS_LAMBDA(const index_t t, const index_t j) {
        const int o = expert(t, j);
        out(t, j) = o < 0 ? -1 : static_cast<int>((o * batch + t / n) * C + position(t, j));
      });
  return rows;
}

// The inner gate's importance of each slot: 0.5 · ([g > 0.5] + [g > 0]) with g the outer gate of
// the token in the slot (0 for an empty slot), as the original reduces its combine tensor.
template <class T>
Tensor<T> slot_importance(const moe::TopNRouting<T>& routing, const Tensor<int>& rows, index_t slots) {
  const Tensor<T> importance("st_moe::importance", {slots});
  const View1<T> out = importance.flat();
  const View2<int> r = rows.as_matrix();
  const View2<T> gate = routing.gate.as_matrix();
  Kokkos::parallel_for(
      "kmoe::st_moe::slot_importance", md_range<2>({0, 0}, {rows.dim(0), rows.dim(1)}),
      KOKKOS_LAMBDA(const index_t t, const index_t j) {
        const int row = r(t, j);
        if (row < 0) return;
        const T g = gate(t, j);
        out(row) = T(0.5) * ((g > T(0.5) ? T(1) : T(0)) + (g > T(0) ? T(1) : T(0)));
      });
  return importance;
}

// The [rows, cols] block b of a matrix viewed as consecutive blocks of `rows` rows.
template <class T>
View2<T> row_block(const Tensor<T>& matrix, index_t block, index_t rows) {
  return View2<T>(matrix.data() + block * rows * matrix.dim(1), rows, matrix.dim(1));
}

// The routing draws of this rank's rows, keyed by their place in the batch of every rank: a level's
// rows come in `blocks` blocks (the inner gate: one per expert group) of which this rank holds
// local_block rows at `first` of global_block; U[i, o · local_block + j] = draw
// (i · blocks + o) · global_block + first + j. With one rank this is the gating's own layout
// U_i(row) = draw i · rows + row.
template <class T>
Tensor<T> route_uniforms(const RngStream& stream, int k, index_t blocks, index_t local_block, index_t global_block,
                         index_t first) {
  const auto uniforms = Tensor<T>::uninitialized("st_moe::route_uniform", {k, blocks * local_block});
  const View2<T> out = uniforms.as_matrix();
  Kokkos::parallel_for(
      "kmoe::st_moe::route_uniforms", md_range<2>({0, 0}, {static_cast<index_t>(k), blocks * local_block}),
      KOKKOS_LAMBDA(const index_t i, const index_t row) {
        const index_t o = row / local_block, j = row % local_block;
        out(i, row) = stream.uniform<T>(static_cast<std::uint64_t>((i * blocks + o) * global_block + first + j));
      });
  return uniforms;
}

// Everything that decides the computation, for the ranks' agreement check.
inline std::string config_text(const StMoEConfig& c) {
  std::ostringstream text;
  text.precision(17);
  text << c.dim << ' ' << c.num_experts << ' ' << c.num_experts_inner << ' ' << c.expert_hidden_mult << ' '
       << c.capacity_factor_train << ' ' << c.capacity_factor_eval << ' ' << c.gating_top_n << ' '
       << c.balance_loss_coef << ' ' << c.router_z_loss_coef << ' ' << c.straight_through_dispatch_tensor << ' '
       << static_cast<int>(c.balance_density) << ' ' << static_cast<int>(c.gate_normalisation) << ' '
       << static_cast<int>(c.router_init) << ' ' << static_cast<int>(c.generation) << ' ' << static_cast<int>(c.precision);
  for (const double t : c.threshold_train) text << " t" << t;
  for (const double t : c.threshold_eval) text << " e" << t;
  return text.str();
}

// values = stddev · N(0, 1), or U(±bound) when uniform.
template <class T>
void fill_random(const Tensor<T>& t, const RngStream& stream, bool uniform, T scale) {
  if (uniform) return ops::fill_uniform<T>(t.flat(), stream, -scale, scale);
  ops::fill_normal<T>(t.flat(), stream, T(0), scale);
}

}  // namespace st_moe_impl

// ---- the layer ----

template <class T>
StMoE<T>::StMoE(const StMoEConfig& config, std::uint64_t seed, ParameterInit init, const dist::Communicator& comm)
    : config_(config), comm_(comm) {
  config_.validate();
  require_precision_supported<T>(config_.precision, "StMoE");
  comm_.require_same(dist::text_hash(st_moe_impl::config_text(config_)) ^ seed, "the StMoE config or seed");
  const index_t D = config_.dim, E = config_.num_experts, I = config_.num_experts_inner;
  placement_ = dist::Placement(config_.total_experts(), comm_.size(), config_.expert_hidden());
  const int rank = comm_.rank();
  share_ = {placement_.first_expert(rank), placement_.local_experts(rank), placement_.hidden_begin(rank),
            placement_.local_hidden(rank)};
  Generator rng(seed, init);
  const bool uniform = config_.router_init == RouterInit::linear_default;
  const T scale = uniform ? static_cast<T>(1.0 / std::sqrt(static_cast<double>(D))) : T(1);
  for (StMoEParams<T>* p : {&params_, &grads_}) {
    p->router = Tensor<T>("st_moe::router", {E, D});
    p->router_inner = config_.hierarchical() ? Tensor<T>("st_moe::router_inner", {E, I, D}) : Tensor<T>();
  }
  // The original's order: gate(s) first, then the experts.
  st_moe_impl::fill_random<T>(params_.router, rng.take(params_.router.size()), uniform, scale);
  if (config_.hierarchical()) {
    st_moe_impl::fill_random<T>(params_.router_inner, rng.take(params_.router_inner.size()), uniform, scale);
  }
  params_.experts = make_geglu_experts<T>(config_.total_experts(), D, config_.expert_hidden(), rng, false, share_);
  grads_.experts = make_geglu_experts<T>(config_.total_experts(), D, config_.expert_hidden(), rng, true, share_);
  if (config_.generation == StMoEGeneration::v0_1_8) {
    for (const bool training : {true, false}) {
      const moe::TopNGatingOptions options = config_.gating_options(training);
      std::vector<T> values = {static_cast<T>(options.eps)};
      for (const double threshold : options.thresholds) values.push_back(static_cast<T>(threshold));
      (training ? threshold_train_ : threshold_eval_) =
          Tensor<T>::from_host("st_moe::threshold", {static_cast<index_t>(values.size())}, values);
    }
  }
}

template <class T>
void StMoE<T>::visit_parameters(const model::ParameterVisitor<T>& visit, const std::string& prefix) {
  const StMoEConfig& c = config_;
  const bool v0_1_8 = c.generation == StMoEGeneration::v0_1_8;
  if (v0_1_8) {
    auto router = model::dense_parameter(prefix + "gate.to_gates.weight", params_.router, grads_.router);
    visit(router);
  } else {
    // v0.0.14 keeps w_gating as [dim, E] (inner: [groups, dim, I]).
    const model::TorchLayout transposed{{}, true};
    auto router = model::dense_parameter(prefix + (c.hierarchical() ? "gate_outer.w_gating" : "gate.w_gating"),
                                         params_.router, grads_.router, transposed);
    visit(router);
    if (c.hierarchical()) {
      auto inner = model::dense_parameter(prefix + "gate_inner.w_gating", params_.router_inner, grads_.router_inner,
                                          transposed);
      visit(inner);
    }
  }
  // Expert e = o · I + i is experts.<o>.experts.<i> in the hierarchy, experts.experts.<e> flat.
  std::vector<std::string> expert_prefixes;
  for (int e = 0; e < c.total_experts(); ++e) {
    expert_prefixes.push_back(prefix + (c.hierarchical() ? "experts." + std::to_string(e / c.num_experts_inner) +
                                                               ".experts." + std::to_string(e % c.num_experts_inner)
                                                         : "experts.experts." + std::to_string(e)) + ".net.");
  }
  const std::string pattern = prefix + (c.hierarchical() ? "experts.*.experts.*.net." : "experts.experts.*.net.");
  GegluExpertsParams<T>& p = params_.experts;
  GegluExpertsParams<T>& g = grads_.experts;
  // Placed (dist/placement.hpp): this rank's experts, of each its hidden units (both halves of
  // the first layer's [value | gate] outputs).
  const auto expert = [&](const std::string& name, Tensor<T>& param, Tensor<T>& grad, int hidden_axis, bool transposed,
                          int hidden_blocks = 1) {
    model::TorchLayout torch{{}, transposed};
    for (const std::string& expert_prefix : expert_prefixes) torch.per_expert_names.push_back(expert_prefix + name);
    auto entry = dist::placed(model::expert_parameter(pattern + name, param, grad, hidden_axis, torch), placement_,
                              comm_.rank());
    entry.hidden_blocks = hidden_blocks;
    visit(entry);
  };
  expert("0.weight", p.w_in, g.w_in, 2, true, 2);
  expert("0.bias", p.b_in, g.b_in, 1, false, 2);
  expert("1.mult_bias", p.mult_bias, g.mult_bias, 1, false);
  expert("2.weight", p.w_out, g.w_out, 1, true);
  expert("2.bias", p.b_out, g.b_out, -1, false);
  if (v0_1_8) {
    auto train = model::buffer_parameter(prefix + "gate.threshold_train", threshold_train_);
    auto eval = model::buffer_parameter(prefix + "gate.threshold_eval", threshold_eval_);
    visit(train);
    visit(eval);
  }
}

template <class T>
void StMoE<T>::zero_grad() {
  GegluExpertsParams<T>& e = grads_.experts;
  for (Tensor<T>* g : {&grads_.router, &grads_.router_inner, &e.w_in, &e.b_in, &e.mult_bias, &e.w_out, &e.b_out})
    if (!g->empty()) g->fill(T(0));
}

namespace st_moe_impl {

// The experts' stage of a forward: each row of `inputs` with a kept choice goes to the ranks
// holding its experts (experts [rows, top_n]: global ids, −1 not kept; gate [rows, top_n] the kept
// gates), which run them on what they received; returns [rows, dim] Σ_j gate_j · f_{e_j}(row),
// the owners' shares summed. Collective.
template <class T>
Tensor<T> run_experts(const StMoEParams<T>& params, const dist::Communicator& comm, const dist::Placement& placement,
                      const GegluExpertsShare& share, Precision precision, const Tensor<T>& inputs,
                      const Tensor<int>& experts, const Tensor<T>& gate, StMoEExpertStage<T>& s) {
  // ST-MoE's experts draw nothing, so the rows' global positions are not needed.
  s.exchange = dist::ExpertExchange(comm, placement, experts, 0);
  s.x_received = s.exchange.dispatch(inputs);
  s.gate_received = s.exchange.dispatch(gate);
  const index_t R = s.exchange.received_rows();
  Tensor<T> combined;
  if (R > 0) {
    s.plan = moe::DispatchPlan::build_with_drops(s.exchange.received_experts().as_matrix(), share.experts);
    s.rows = pair_rows(s.plan);
    const index_t D = s.x_received.dim(1), pairs = s.plan.n_pairs();
    s.expert_input = Tensor<T>::uninitialized("st_moe::expert_input", {pairs, D});
    dispatch_rows<T>(s.x_received.as_matrix(), s.rows.as_matrix(), s.expert_input.as_matrix());
    s.expert_output = Tensor<T>::uninitialized("st_moe::expert_output", {pairs, D});
    s.experts = geglu_experts_forward(params.experts, s.plan, s.expert_input, s.expert_output, share.output_bias(),
                                      precision);
    combined = Tensor<T>::uninitialized("st_moe::combined", {R, D});
    combine_rows<T>(s.gate_received.as_matrix(), s.rows.as_matrix(), s.expert_output.as_matrix(),
                    combined.as_matrix());
  }
  return s.exchange.combine(combined);
}

// The experts' stage of a backward: from the gradient of the stage's output rows (dcombined
// [rows, dim]) to the gradient of the level's kept gates [rows, top_n] and of its input rows
// [rows, dim], each the sum of the owners' shares. Collective.
template <class T>
std::pair<Tensor<T>, Tensor<T>> experts_backward(const StMoEParams<T>& params, StMoEParams<T>& grads,
                                                 const GegluExpertsShare& share, bool straight_through,
                                                 const StMoEExpertStage<T>& s, const Tensor<T>& dcombined) {
  const Tensor<T> dreceived = s.exchange.dispatch(dcombined);
  const index_t R = s.exchange.received_rows();
  Tensor<T> dgate, dinputs;
  if (R > 0) {
    const index_t pairs = s.plan.n_pairs(), D = s.x_received.dim(1);
    const auto dy = Tensor<T>::uninitialized("st_moe::dexpert_output", {pairs, D});
    scatter_row_gradients<T>(s.gate_received.as_matrix(), s.rows.as_matrix(), dreceived.as_matrix(), dy.as_matrix());
    const auto dx = Tensor<T>::uninitialized("st_moe::dexpert_input", {pairs, D});
    geglu_experts_backward(params.experts, grads.experts, s.plan, s.expert_input, s.experts, dy, dx,
                           share.output_bias());
    dgate = Tensor<T>::uninitialized("st_moe::dgate_received", {R, s.exchange.k()});
    dinputs = Tensor<T>::uninitialized("st_moe::dx_received", {R, D});
    level_backward<T>(s.rows.as_matrix(), dreceived.as_matrix(), s.expert_output.as_matrix(), dx.as_matrix(),
                      s.x_received.as_matrix(), straight_through, dgate.as_matrix(), dinputs.as_matrix());
  }
  return {s.exchange.combine(dgate), s.exchange.combine(dinputs)};
}

template <class T>
Tensor<T> injected_uniforms(const Tensor<T>& given, const Shape& expected, const char* what) {
  if (given.empty()) return given;
  given.require_shape(expected, std::string("StMoE::forward: ") + what);
  return given.reshape({expected[0], expected.size() / expected[0]});
}

}  // namespace st_moe_impl

template <class T>
StMoEForward<T> StMoE<T>::forward(const Tensor<T>& x, bool training, Generator& rng, const StMoECall<T>& call) const {
  const ProfileRegion region("kmoe::st_moe::forward");
  const StMoEConfig& c = config_;
  const index_t D = c.dim, E = c.num_experts;
  const int k = c.gating_top_n;
  // A bad input on one rank is an error on every rank (the others would wait for it otherwise).
  comm_.collectively([&] {
    require(x.rank() == 3 && x.dim(2) == D && x.dim(1) >= 1 && (x.dim(0) >= 1 || comm_.distributed()),
            Status::shape_mismatch, "StMoE::forward: x is ", x.shape().str(), ", expected [batch >= 1, n >= 1, dim = ",
            D, "] (batch 0 only on a rank of several)");
    require_finite(x, "StMoE::forward: x");
    require(!call.noise_gates || !c.hierarchical(), Status::invalid_argument,
            "StMoE::forward: noise_gates is not available with the hierarchical MoE (v0.0.14 has no gate noise)");
    require(std::isfinite(call.noise_mult), Status::invalid_argument, "StMoE::forward: noise_mult = ",
            call.noise_mult, " is not finite");
  });
  const index_t B = x.dim(0), n = x.dim(1), tokens = B * n;
  // Sequences are the routing groups: every rank's must have the same length (the global batch is
  // [Σ batch, n, dim]).
  const std::vector<std::int64_t> lengths = comm_.all_gather(B > 0 ? n : 0);
  for (int r = 0; r < comm_.size(); ++r)
    require(lengths[r] == 0 || lengths[r] == n || B == 0, Status::shape_mismatch,
            "StMoE::forward: the ranks' sequences differ in length (", n, " here, ", lengths[r], " on rank ", r, ")");
  const index_t first_sequence = comm_.exclusive_prefix_sum(B), global_batch = comm_.sum(B);

  StMoEForward<T> f;
  f.training = training;
  f.x = x.reshape({tokens, D});

  // The (outer) gate over the tokens, one routing group per batch row.
  const moe::TopNGatingOptions options = c.gating_options(training);
  const auto logits = Tensor<T>::uninitialized("st_moe::logits", {B, n, E});
  if (tokens > 0)
    ops::linear_forward<T>(f.x.as_matrix(), params_.router.as_matrix(), View1<const T>(),
                           logits.reshape({tokens, E}).as_matrix());
  Tensor<T> noise;
  if (call.noise_gates) {
    noise = moe::gumbel_noise<T>(logits.shape(), dist::take_global(comm_, rng, static_cast<std::uint64_t>(tokens * E)),
                                 static_cast<T>(call.noise_mult));
  }
  const RngStream route_draws = rng.take(static_cast<std::uint64_t>(k * global_batch * n));
  const Tensor<T> uniform =
      !call.route_uniform.empty()
          ? st_moe_impl::injected_uniforms(call.route_uniform, {k, B, n}, "route_uniform")
          : st_moe_impl::route_uniforms<T>(route_draws, k, 1, tokens, global_batch * n, first_sequence * n);
  f.gate.routing = moe::top_n_gating_forward<T>(options, logits, noise, Tensor<T>(), uniform, route_draws, comm_);
  const Tensor<int> no_choices = Tensor<int>("st_moe::no_choices", {0, k});
  const Tensor<T> no_gates = Tensor<T>("st_moe::no_gates", {0, k});

  Tensor<T> out;
  if (!c.hierarchical()) {
    out = st_moe_impl::run_experts(params_, comm_, placement_, share_, c.precision, f.x,
                                   tokens > 0 ? f.gate.routing.expert_index : no_choices,
                                   tokens > 0 ? f.gate.routing.gate : no_gates, f.stage);
  } else {
    // Outer slots [groups, batch, C_outer] hold the tokens routed there (empty slots: zeros).
    const index_t I = c.num_experts_inner, C = f.gate.routing.capacity, slots = E * B * C, block = B * C;
    f.slot_input = Tensor<T>("st_moe::slot_input", {slots, D});
    Tensor<T> importance("st_moe::importance", {slots});
    if (tokens > 0) {
      f.gate.rows = st_moe_impl::slot_rows(f.gate.routing, B);
      st_moe_impl::dispatch_rows<T>(f.x.as_matrix(), f.gate.rows.as_matrix(), f.slot_input.as_matrix());
      importance = st_moe_impl::slot_importance(f.gate.routing, f.gate.rows, slots);
    }
    // Inner logits: each group's slots through its own router.
    const auto inner_logits = Tensor<T>::uninitialized("st_moe::inner_logits", {E * B, C, I});
    const auto inner_logit_rows = inner_logits.reshape({slots, I});
    for (index_t o = 0; o < E && tokens > 0; ++o) {
      ops::gemm<T>(false, true, T(1), st_moe_impl::row_block(f.slot_input, o, block),
                   st_moe_impl::row_block(params_.router_inner.reshape({E * I, D}), o, I), T(0),
                   st_moe_impl::row_block(inner_logit_rows, o, block));
    }
    // The inner draws of slot (group o, sequence b, position c) are keyed by the global sequence.
    const RngStream inner_draws = rng.take(static_cast<std::uint64_t>(2 * E * global_batch * C));
    const Tensor<T> inner_uniform =
        !call.route_uniform_inner.empty()
            ? st_moe_impl::injected_uniforms(call.route_uniform_inner, {2, E, B, C}, "route_uniform_inner")
            : st_moe_impl::route_uniforms<T>(inner_draws, 2, E, block, global_batch * C, first_sequence * C);
    f.gate_inner.routing = moe::top_n_gating_forward<T>(c.gating_options(training, true), inner_logits, Tensor<T>(),
                                                        importance.reshape({E * B, C}), inner_uniform, inner_draws,
                                                        comm_);
    // The inner gates number their experts group by group: global expert o · I + i.
    const Tensor<int> experts =
        tokens > 0 ? st_moe_impl::plan_index(f.gate_inner.routing.expert_index, block, static_cast<int>(I))
                   : no_choices;
    f.slot_output = st_moe_impl::run_experts(params_, comm_, placement_, share_, c.precision, f.slot_input, experts,
                                             tokens > 0 ? f.gate_inner.routing.gate : no_gates, f.stage);
    out = Tensor<T>::uninitialized("st_moe::out", {tokens, D});
    if (tokens > 0)
      st_moe_impl::combine_rows<T>(f.gate.routing.gate.as_matrix(), f.gate.rows.as_matrix(), f.slot_output.as_matrix(),
                                   out.as_matrix());
  }
  f.out = out.reshape(x.shape());

  f.balance_loss = f.gate.routing.balance_loss + (c.hierarchical() ? f.gate_inner.routing.balance_loss : T(0));
  f.router_z_loss = f.gate.routing.router_z_loss + (c.hierarchical() ? f.gate_inner.routing.router_z_loss : T(0));
  f.total_aux_loss = static_cast<T>(c.balance_loss_coef) * f.balance_loss +
                     static_cast<T>(c.router_z_loss_coef) * f.router_z_loss;
  return f;
}

template <class T>
Tensor<T> StMoE<T>::backward(const StMoEForward<T>& f, const Tensor<T>& dout, T aux_weight) {
  const ProfileRegion region("kmoe::st_moe::backward");
  const StMoEConfig& c = config_;
  const char* op = "StMoE::backward";
  const index_t D = c.dim, E = c.num_experts;
  comm_.collectively([&] {
    require(!f.out.empty(), Status::invalid_argument, op, ": the forward result is empty (default-constructed)");
    require(f.x.dim(1) == D && (f.x.dim(0) == 0 || f.gate.routing.probs.dim(1) == E) &&
                (f.gate_inner.routing.group_size > 0) == c.hierarchical(),
            Status::shape_mismatch, op, ": the forward result (x ", f.x.shape().str(),
            ") does not come from a layer with dim = ", D, ", num_experts = ", E, c.hierarchical() ? " (hierarchical)" : "");
    dout.require_shape(f.out.shape(), std::string(op) + ": dout");
    require_finite(dout, std::string(op) + ": dout");
  });
  const index_t tokens = f.x.dim(0);
  const Tensor<T> dout_rows = dout.reshape({tokens, D});
  const T balance_coef = aux_weight * static_cast<T>(c.balance_loss_coef);
  const T z_coef = aux_weight * static_cast<T>(c.router_z_loss_coef);
  const bool st = c.straight_through_dispatch_tensor;

  Tensor<T> dgate, dx;
  if (!c.hierarchical()) {
    std::tie(dgate, dx) = st_moe_impl::experts_backward(params_, grads_, share_, st, f.stage, dout_rows);
  } else {
    const index_t I = c.num_experts_inner, slots = f.slot_input.dim(0), block = slots / E;
    // Outer combine → slot outputs; inner level → slot inputs.
    const Tensor<T> dslot_output("st_moe::dslot_output", {slots, D});
    if (tokens > 0)
      st_moe_impl::scatter_row_gradients<T>(f.gate.routing.gate.as_matrix(), f.gate.rows.as_matrix(),
                                            dout_rows.as_matrix(), dslot_output.as_matrix());
    auto [dgate_inner, dslot_input] = st_moe_impl::experts_backward(params_, grads_, share_, st, f.stage, dslot_output);
    if (tokens > 0) {
      const Tensor<T> dlogits_inner = moe::top_n_gating_backward<T>(
          c.gating_options(f.training, true), f.gate_inner.routing, dgate_inner, balance_coef, z_coef);
      const Tensor<T> router_inner = params_.router_inner.reshape({E * I, D});
      const Tensor<T> drouter_inner = grads_.router_inner.reshape({E * I, D});
      for (index_t o = 0; o < E; ++o) {
        const View2<T> dl = st_moe_impl::row_block(dlogits_inner, o, block),
                       xs = st_moe_impl::row_block(f.slot_input, o, block);
        ops::gemm<T>(false, false, T(1), dl, st_moe_impl::row_block(router_inner, o, I), T(1),
                     st_moe_impl::row_block(dslot_input, o, block));
        ops::gemm<T>(true, false, T(1), dl, xs, T(1), st_moe_impl::row_block(drouter_inner, o, I));
      }
      dgate = Tensor<T>::uninitialized("st_moe::dgate", {tokens, 2});
      dx = Tensor<T>::uninitialized("st_moe::dx", {tokens, D});
      st_moe_impl::level_backward<T>(f.gate.rows.as_matrix(), dout_rows.as_matrix(), f.slot_output.as_matrix(),
                                     dslot_input.as_matrix(), f.x.as_matrix(), st, dgate.as_matrix(), dx.as_matrix());
    }
  }
  if (tokens == 0) return Tensor<T>("st_moe::dx", f.out.shape());
  // The (outer) router: logits = x · routerᵀ.
  const Tensor<T> dlogits =
      moe::top_n_gating_backward<T>(c.gating_options(f.training), f.gate.routing, dgate, balance_coef, z_coef);
  ops::gemm<T>(false, false, T(1), dlogits.as_matrix(), params_.router.as_matrix(), T(1), dx.as_matrix());
  ops::gemm<T>(true, false, T(1), dlogits.as_matrix(), f.x.as_matrix(), T(1), grads_.router.as_matrix());
  return dx.reshape(f.out.shape());
}

template class StMoE<float>;
template class StMoE<double>;

}  // namespace kmoe::layers
