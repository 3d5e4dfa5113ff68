#include "kmoe/layers/geglu_expert.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/moe/cvmm.hpp"
#include "kmoe/moe/expert_bias.hpp"
#include "kmoe/ops/activations.hpp"
#include "kmoe/ops/glu.hpp"
#include "kmoe/ops/impl/column_reduce.hpp"
#include "kmoe/ops/init.hpp"
#include "kmoe/ops/linear.hpp"
#include "kmoe/ops/norms.hpp"

#include <cmath>
#include <string>

namespace kmoe::layers {

index_t geglu_hidden_size(index_t dim, double hidden_mult) {
  // Python's int(dim * hidden_mult * 2 / 3): left to right in doubles, truncated.
  const double width = static_cast<double>(dim) * hidden_mult * 2.0 / 3.0;
  require(std::isfinite(width) && width >= 1, Status::invalid_argument, "GEGLU expert: dim = ", dim,
          ", hidden_mult = ", hidden_mult, " give a hidden size int(dim · hidden_mult · 2/3) below 1");
  return static_cast<index_t>(width);
}

namespace geglu_impl {

constexpr double rms_norm_eps = 1e-12;  // F.normalize's eps

// out[i] = U(−bound, bound), from the next counters of rng.
template <class T>
void fill_uniform(const View1<T>& out, Generator& rng, double bound) {
  ops::fill_uniform<T>(out, rng.take(out.extent(0)), static_cast<T>(-bound), static_cast<T>(bound));
}

// The expert of each routed sorted row s, through the plan (rows past them are dropped pairs).
KOKKOS_INLINE_FUNCTION int expert_of_row(const View1<int>& expert_of_pair, const View1<int>& sorted_pair, index_t s) {
  return expert_of_pair(sorted_pair(s));
}

// hidden(s, :) = gelu(pre(s, h:)) · pre(s, :h) · mult_bias(expert of s, :) for the routed sorted
// rows: one launch for every expert (as ops::glu_forward over each expert's block).
template <class T>
void expert_glu_forward(const moe::DispatchPlan& plan, const Tensor<T>& pre, const Tensor<T>& mult_bias,
                        const Tensor<T>& hidden) {
  const View2<T> in = pre.as_matrix(), out = hidden.as_matrix(), mult = mult_bias.as_matrix();
  const View1<int> expert_of_pair = plan.expert_of_pair(), sorted_pair = plan.sorted_pair();
  const index_t h = mult.extent(1);
  Kokkos::parallel_for(
      "kmoe::geglu::expert_glu_forward", md_range<2>({0, 0}, {plan.n_routed_pairs(), h}),
      KOKKOS_LAMBDA(const index_t s, const index_t j) {
        const int e = expert_of_row(expert_of_pair, sorted_pair, s);
        out(s, j) = ops::impl::glu_gated(ops::Activation::gelu, in(s, j), in(s, h + j)) * mult(e, j);
      });
}

// Its backward for the routed sorted rows: dpre from dhidden, and dmult_bias(e, :) += the sum over
// expert e's rows, in the fixed order of ops::glu_backward over each expert's block.
template <class T>
void expert_glu_backward(const moe::DispatchPlan& plan, const Tensor<T>& pre, const Tensor<T>& mult_bias,
                         const Tensor<T>& dhidden, const Tensor<T>& dpre, const Tensor<T>& dmult_bias) {
  const View2<T> in = pre.as_matrix(), dout = dhidden.as_matrix(), din = dpre.as_matrix();
  const View2<T> mult = mult_bias.as_matrix(), dmult = dmult_bias.as_matrix();
  const View1<int> expert_of_pair = plan.expert_of_pair(), sorted_pair = plan.sorted_pair();
  const index_t h = mult.extent(1);
  Kokkos::parallel_for(
      "kmoe::geglu::expert_glu_backward", md_range<2>({0, 0}, {plan.n_routed_pairs(), h}),
      KOKKOS_LAMBDA(const index_t s, const index_t j) {
        const T g = dout(s, j) * mult(expert_of_row(expert_of_pair, sorted_pair, s), j);
        const auto d = ops::impl::glu_input_gradient(ops::Activation::gelu, g, in(s, j), in(s, h + j));
        din(s, j) = d.value;
        din(s, h + j) = d.gate;
      });
  ops::impl::segmented_column_reduce<T, 1>(
      "kmoe::geglu::expert_glu_backward_mult", plan.expert_offsets(), plan.expert_offsets_host(), h,
      KOKKOS_LAMBDA(const index_t s, const index_t j) {
        const T term = ops::impl::glu_mult_gradient_term(ops::Activation::gelu, dout(s, j), in(s, j), in(s, h + j));
        return Kokkos::Array<T, 1>{term};
      },
      KOKKOS_LAMBDA(const index_t e, const index_t j, const Kokkos::Array<T, 1>& sum) { dmult(e, j) += sum[0]; });
}

}  // namespace geglu_impl

// ---- GegluExpert ----

template <class T>
GegluExpert<T>::GegluExpert(index_t dim, double hidden_mult, bool prenorm, std::uint64_t seed, ParameterInit init)
    : dim_(dim), hidden_(0), prenorm_(prenorm) {
  require(dim >= 1, Status::invalid_argument, "GegluExpert: dim = ", dim, " must be at least 1");
  hidden_ = geglu_hidden_size(dim, hidden_mult);
  const index_t h = hidden_;
  const auto make = [&](const char* name, const Shape& shape) { return Tensor<T>(std::string("geglu::") + name, shape); };
  for (GegluExpertParams<T>* p : {&params_, &grads_}) {
    p->gamma = prenorm ? make("gamma", {dim}) : Tensor<T>();
    p->w_in = make("w_in", {2 * h, dim});
    p->b_in = make("b_in", {2 * h});
    p->mult_bias = make("mult_bias", {h});
    p->w_out = make("w_out", {dim, h});
    p->b_out = make("b_out", {dim});
  }
  if (prenorm) params_.gamma.fill(T(1));
  params_.mult_bias.fill(T(1));
  // The original's order: net Linear 1 (weight, bias), Linear 2 (weight, bias); bound out_features^−½.
  Generator rng(seed, init);
  const double bound_in = 1.0 / std::sqrt(static_cast<double>(2 * h)), bound_out = 1.0 / std::sqrt(static_cast<double>(dim));
  geglu_impl::fill_uniform<T>(params_.w_in.flat(), rng, bound_in);
  geglu_impl::fill_uniform<T>(params_.b_in.flat(), rng, bound_in);
  geglu_impl::fill_uniform<T>(params_.w_out.flat(), rng, bound_out);
  geglu_impl::fill_uniform<T>(params_.b_out.flat(), rng, bound_out);
}

template <class T>
void GegluExpert<T>::visit_parameters(const model::ParameterVisitor<T>& visit, const std::string& prefix) {
  // The Sequential's indices shift by one with the RMSNorm in front.
  const int first = prenorm_ ? 1 : 0;
  const auto dense = [&](int index, const char* name, Tensor<T>& param, Tensor<T>& grad) {
    auto entry = model::dense_parameter(prefix + "net." + std::to_string(index) + "." + name, param, grad);
    visit(entry);
  };
  if (prenorm_) dense(0, "gamma", params_.gamma, grads_.gamma);
  dense(first, "weight", params_.w_in, grads_.w_in);
  dense(first, "bias", params_.b_in, grads_.b_in);
  dense(first + 1, "mult_bias", params_.mult_bias, grads_.mult_bias);
  dense(first + 2, "weight", params_.w_out, grads_.w_out);
  dense(first + 2, "bias", params_.b_out, grads_.b_out);
}

template <class T>
void GegluExpert<T>::zero_grad() {
  for (Tensor<T>* g : {&grads_.gamma, &grads_.w_in, &grads_.b_in, &grads_.mult_bias, &grads_.w_out, &grads_.b_out})
    if (!g->empty()) g->fill(T(0));
}

template <class T>
GegluExpertForward<T> GegluExpert<T>::forward(const Tensor<T>& x) const {
  require(x.rank() == 2 && x.dim(1) == dim_, Status::shape_mismatch, "GegluExpert::forward: x is ", x.shape().str(),
          ", expected [rows, dim = ", dim_, "]");
  const index_t rows = x.dim(0), h = hidden_;
  GegluExpertForward<T> f;
  f.x = x;
  Tensor<T> in = x;
  if (prenorm_) {
    f.normed = Tensor<T>::uninitialized("geglu::normed", {rows, dim_});
    f.scale = Tensor<T>::uninitialized("geglu::scale", {rows});
    ops::rms_norm_forward<T>(ops::RmsNormMode::l2_normalize, x.as_matrix(), params_.gamma.flat(),
                             static_cast<T>(geglu_impl::rms_norm_eps), f.normed.as_matrix(), f.scale.flat());
    in = f.normed;
  }
  f.pre = Tensor<T>::uninitialized("geglu::pre", {rows, 2 * h});
  ops::linear_forward<T>(in.as_matrix(), params_.w_in.as_matrix(), params_.b_in.flat(), f.pre.as_matrix());
  f.hidden = Tensor<T>::uninitialized("geglu::hidden", {rows, h});
  ops::glu_forward<T>(ops::Activation::gelu, f.pre.as_matrix(), params_.mult_bias.flat(), f.hidden.as_matrix());
  f.y = Tensor<T>::uninitialized("geglu::y", {rows, dim_});
  ops::linear_forward<T>(f.hidden.as_matrix(), params_.w_out.as_matrix(), params_.b_out.flat(), f.y.as_matrix());
  return f;
}

template <class T>
Tensor<T> GegluExpert<T>::backward(const GegluExpertForward<T>& f, const Tensor<T>& dy) {
  require(!f.y.empty(), Status::invalid_argument, "GegluExpert::backward: the forward result is empty");
  dy.require_shape(f.y.shape(), "GegluExpert::backward: dy");
  const index_t rows = f.x.dim(0), h = hidden_;
  const auto dhidden = Tensor<T>::uninitialized("geglu::dhidden", {rows, h});
  ops::linear_backward<T>(f.hidden.as_matrix(), params_.w_out.as_matrix(), dy.as_matrix(), dhidden.as_matrix(),
                          grads_.w_out.as_matrix(), grads_.b_out.flat());
  const auto dpre = Tensor<T>::uninitialized("geglu::dpre", {rows, 2 * h});
  ops::glu_backward<T>(ops::Activation::gelu, f.pre.as_matrix(), params_.mult_bias.flat(), dhidden.as_matrix(),
                       dpre.as_matrix(), grads_.mult_bias.flat());
  const Tensor<T>& in = prenorm_ ? f.normed : f.x;
  const auto din = Tensor<T>::uninitialized("geglu::din", {rows, dim_});
  ops::linear_backward<T>(in.as_matrix(), params_.w_in.as_matrix(), dpre.as_matrix(), din.as_matrix(),
                          grads_.w_in.as_matrix(), grads_.b_in.flat());
  if (!prenorm_) return din;
  const auto dx = Tensor<T>::uninitialized("geglu::dx", {rows, dim_});
  ops::rms_norm_backward<T>(ops::RmsNormMode::l2_normalize, f.x.as_matrix(), params_.gamma.flat(),
                            static_cast<T>(geglu_impl::rms_norm_eps), f.scale.flat(), din.as_matrix(), dx.as_matrix(),
                            grads_.gamma.flat());
  return dx;
}

// ---- stacked experts ----

namespace geglu_impl {

// out(i) = U(−bound, bound) from counter counter_of(i) of stream.
template <class T, class Counter>
void fill_uniform_at(const View1<T>& out, const RngStream& stream, double bound, const Counter& counter_of) {
  if (!stream.draws) return;
  const T lo = static_cast<T>(-bound), hi = static_cast<T>(bound);
  Kokkos::parallel_for(
      "kmoe::geglu::fill_uniform_at", Kokkos::RangePolicy<ExecSpace>(0, out.extent(0)),
      KOKKOS_LAMBDA(const index_t i) { out(i) = lo + (hi - lo) * stream.uniform<T>(counter_of(i)); });
}

}  // namespace geglu_impl

template <class T>
GegluExpertsParams<T> make_geglu_experts(int experts, index_t dim, index_t hidden, Generator& rng, bool zeros,
                                         const GegluExpertsShare& share) {
  require(experts >= 1 && dim >= 1 && hidden >= 1, Status::invalid_argument, "make_geglu_experts: experts = ",
          experts, ", dim = ", dim, ", hidden = ", hidden, " must all be at least 1");
  const index_t E = share.experts < 0 ? experts : share.experts, H = hidden;
  const index_t h = share.hidden < 0 ? hidden : share.hidden, e0 = share.first_expert, h0 = share.hidden_begin;
  require(e0 >= 0 && e0 + E <= experts && h0 >= 0 && h0 + h <= H, Status::invalid_argument,
          "make_geglu_experts: the share (experts ", e0, " + ", E, ", hidden ", h0, " + ", h, ") lies outside ",
          experts, " experts of ", H, " units");
  GegluExpertsParams<T> p{Tensor<T>("experts::w_in", {E, dim, 2 * h}), Tensor<T>("experts::b_in", {E, 2 * h}),
                          Tensor<T>("experts::mult_bias", {E, h}), Tensor<T>("experts::w_out", {E, h, dim}),
                          Tensor<T>("experts::b_out", {E, dim})};
  if (zeros) return p;
  p.mult_bias.fill(T(1));
  // Expert by expert in the original's module order, each expert's w_in, b_in, w_out, b_out in
  // turn (the weights' draw order within a matrix is kmoe's own: the stored layout, the
  // transpose of PyTorch's). An element of the share draws the counter it has in the whole.
  const index_t w_in_at = 0, b_in_at = dim * 2 * H, w_out_at = b_in_at + 2 * H, b_out_at = w_out_at + H * dim,
                per_expert = b_out_at + dim;
  const RngStream whole = rng.take(static_cast<std::uint64_t>(experts * per_expert));
  const double bound_in = 1.0 / std::sqrt(static_cast<double>(2 * H)), bound_out = 1.0 / std::sqrt(static_cast<double>(dim));
  // Unit u of half `half` of the first layer's 2h outputs, in the whole's 2H.
  const auto first_layer_unit = [=] KOKKOS_FUNCTION(index_t column) { return (column / h) * H + h0 + column % h; };
  geglu_impl::fill_uniform_at<T>(p.w_in.flat(), whole, bound_in, [=] KOKKOS_FUNCTION(index_t i) {
    const index_t e = i / (dim * 2 * h), d = i / (2 * h) % dim, column = i % (2 * h);
    return static_cast<std::uint64_t>((e0 + e) * per_expert + w_in_at + d * 2 * H + first_layer_unit(column));
  });
  geglu_impl::fill_uniform_at<T>(p.b_in.flat(), whole, bound_in, [=] KOKKOS_FUNCTION(index_t i) {
    return static_cast<std::uint64_t>((e0 + i / (2 * h)) * per_expert + b_in_at + first_layer_unit(i % (2 * h)));
  });
  geglu_impl::fill_uniform_at<T>(p.w_out.flat(), whole, bound_out, [=] KOKKOS_FUNCTION(index_t i) {
    const index_t e = i / (h * dim), u = i / dim % h, c = i % dim;
    return static_cast<std::uint64_t>((e0 + e) * per_expert + w_out_at + (h0 + u) * dim + c);
  });
  geglu_impl::fill_uniform_at<T>(p.b_out.flat(), whole, bound_out, [=] KOKKOS_FUNCTION(index_t i) {
    return static_cast<std::uint64_t>((e0 + i / dim) * per_expert + b_out_at + i % dim);
  });
  return p;
}

namespace geglu_impl {

template <class T>
void require_experts_args(const char* op, const GegluExpertsParams<T>& params, const moe::DispatchPlan& plan,
                          const Tensor<T>& a, const char* a_name, const Tensor<T>& b, const char* b_name) {
  const index_t E = params.w_in.dim(0), dim = params.w_in.dim(1);
  require(plan.n_experts() == E, Status::shape_mismatch, op, ": the plan has ", plan.n_experts(),
          " experts, the parameters ", E);
  a.require_shape({plan.n_pairs(), dim}, std::string(op) + ": " + a_name);
  b.require_shape({plan.n_pairs(), dim}, std::string(op) + ": " + b_name);
}

}  // namespace geglu_impl

template <class T>
GegluExpertsSaved<T> geglu_experts_forward(const GegluExpertsParams<T>& params, const moe::DispatchPlan& plan,
                                           const Tensor<T>& x_sorted, const Tensor<T>& y_sorted, bool output_bias,
                                           Precision precision) {
  geglu_impl::require_experts_args("geglu_experts_forward", params, plan, x_sorted, "x_sorted", y_sorted, "y_sorted");
  const index_t pairs = plan.n_pairs(), h = params.mult_bias.dim(1);
  GegluExpertsSaved<T> saved;
  saved.w_in = moe::ExpertOperand<T>(params.w_in, precision, "geglu_experts::w_in_operand");
  saved.w_out = moe::ExpertOperand<T>(params.w_out, precision, "geglu_experts::w_out_operand");
  saved.pre = Tensor<T>::uninitialized("experts::pre", {pairs, 2 * h});
  moe::cvmm_forward<T>(plan, x_sorted.as_matrix(), saved.w_in, saved.pre.as_matrix(), moe::PairRows::sorted,
                       moe::XRows::per_pair);
  moe::add_expert_bias<T>(plan, moe::PairRows::sorted, saved.pre.as_matrix(), params.b_in.as_matrix());
  saved.hidden = Tensor<T>::uninitialized("experts::hidden", {pairs, h});
  geglu_impl::expert_glu_forward<T>(plan, saved.pre, params.mult_bias, saved.hidden);
  moe::cvmm_forward<T>(plan, saved.hidden.as_matrix(), saved.w_out, y_sorted.as_matrix(), moe::PairRows::sorted,
                       moe::XRows::per_pair);
  if (output_bias) moe::add_expert_bias<T>(plan, moe::PairRows::sorted, y_sorted.as_matrix(), params.b_out.as_matrix());
  return saved;
}

template <class T>
void geglu_experts_backward(const GegluExpertsParams<T>& params, GegluExpertsParams<T>& grads,
                            const moe::DispatchPlan& plan, const Tensor<T>& x_sorted,
                            const GegluExpertsSaved<T>& saved, const Tensor<T>& dy_sorted,
                            const Tensor<T>& dx_sorted, bool output_bias) {
  const char* op = "geglu_experts_backward";
  geglu_impl::require_experts_args(op, params, plan, dy_sorted, "dy_sorted", dx_sorted, "dx_sorted");
  x_sorted.require_shape(dy_sorted.shape(), std::string(op) + ": x_sorted");
  const index_t pairs = plan.n_pairs(), h = params.mult_bias.dim(1);
  require(!saved.hidden.empty() && saved.hidden.dim(0) == pairs, Status::shape_mismatch, op,
          ": the saved activations do not come from this plan");
  if (output_bias)
    moe::accumulate_expert_bias_gradient<T>(plan, moe::PairRows::sorted, dy_sorted.as_matrix(), grads.b_out.as_matrix());
  const auto dhidden = Tensor<T>::uninitialized("experts::dhidden", {pairs, h});
  moe::cvmm_backward<T>(plan, saved.hidden.as_matrix(), saved.w_out, dy_sorted.as_matrix(),
                        dhidden.as_matrix(), grads.w_out.template view<3>(), moe::PairRows::sorted, moe::XRows::per_pair);
  const auto dpre = Tensor<T>::uninitialized("experts::dpre", {pairs, 2 * h});
  geglu_impl::expert_glu_backward<T>(plan, saved.pre, params.mult_bias, dhidden, dpre, grads.mult_bias);
  moe::accumulate_expert_bias_gradient<T>(plan, moe::PairRows::sorted, dpre.as_matrix(), grads.b_in.as_matrix());
  moe::cvmm_backward<T>(plan, x_sorted.as_matrix(), saved.w_in, dpre.as_matrix(),
                        dx_sorted.as_matrix(), grads.w_in.template view<3>(), moe::PairRows::sorted, moe::XRows::per_pair);
}

template class GegluExpert<float>;
template class GegluExpert<double>;

#define KMOE_INSTANTIATE(T)                                                                                        \
  template GegluExpertsParams<T> make_geglu_experts<T>(int, index_t, index_t, Generator&, bool,                  \
                                                       const GegluExpertsShare&);                                 \
  template GegluExpertsSaved<T> geglu_experts_forward<T>(const GegluExpertsParams<T>&, const moe::DispatchPlan&, \
                                                         const Tensor<T>&, const Tensor<T>&, bool, Precision);    \
  template void geglu_experts_backward<T>(const GegluExpertsParams<T>&, GegluExpertsParams<T>&,                   \
                                          const moe::DispatchPlan&, const Tensor<T>&, const GegluExpertsSaved<T>&, \
                                          const Tensor<T>&, const Tensor<T>&, bool);
KMOE_INSTANTIATE(float)
KMOE_INSTANTIATE(double)
#undef KMOE_INSTANTIATE

}  // namespace kmoe::layers
