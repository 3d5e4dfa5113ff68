#include "kmoe/layers/soft_moe.hpp"

#include <KokkosBlas1_axpby.hpp>
#include <cmath>
#include <limits>
#include <sstream>

#include "kmoe/core/profile_region.hpp"
#include "kmoe/dist/parameter_blocks.hpp"
#include "kmoe/core/error.hpp"
#include "kmoe/ops/gemm.hpp"
#include "kmoe/ops/init.hpp"
#include "kmoe/ops/norms.hpp"
#include "kmoe/ops/softmax.hpp"

namespace kmoe::layers {

const char* soft_moe_variant_name(SoftMoEVariant variant) {
  return variant == SoftMoEVariant::lite ? "lite" : "lucidrains";
}

SoftMoEConfig SoftMoEConfig::lite(index_t d_model, int num_experts, index_t num_slots) {
  SoftMoEConfig c;
  c.variant = SoftMoEVariant::lite;
  c.dim = d_model;
  c.num_experts = num_experts;
  c.num_slots = num_slots;
  c.experts.dim = d_model;
  c.experts.hidden = d_model;
  c.experts.n_experts = num_experts;
  c.experts.activation = ops::Activation::relu;
  c.experts.hidden_layer_norm = true;
  c.experts.init = ExpertInit::orthogonal_gain_001;
  return c;
}

SoftMoEConfig SoftMoEConfig::lucidrains(index_t dim, const LucidrainsSoftMoEOptions& o) {
  SoftMoEConfig c;
  c.variant = SoftMoEVariant::lucidrains;
  c.dim = dim;
  c.num_experts = o.num_experts;
  c.num_slots = o.num_slots;
  c.seq_len = o.seq_len;
  c.use_layernorm = o.use_layernorm;
  c.experts.dim = dim;
  // int(dim * mult) and int(dim * mult * 2 / 3) in Python's float arithmetic.
  c.experts.hidden = static_cast<index_t>(o.geglu ? static_cast<double>(dim) * o.expert_mult * 2.0 / 3.0
                                                  : static_cast<double>(dim) * o.expert_mult);
  c.experts.n_experts = o.num_experts;
  c.experts.activation = ops::Activation::gelu;
  c.experts.glu = o.geglu;
  c.experts.dropout = o.dropout;
  c.experts.init = ExpertInit::torch_default;
  return c;
}

index_t SoftMoEConfig::slots_per_expert() const {
  return num_slots > 0 ? num_slots : (num_experts > 0 ? seq_len / num_experts : 0);
}

void SoftMoEConfig::validate() const {
  const char* name = soft_moe_variant_name(variant);
  require(dim >= 1, Status::invalid_argument, "SoftMoEConfig (", name, "): dim = ", dim, " must be at least 1");
  require(num_experts >= 1, Status::invalid_argument, "SoftMoEConfig (", name, "): num_experts = ", num_experts,
          " must be at least 1");
  require(num_slots >= 0 && seq_len >= 0, Status::invalid_argument, "SoftMoEConfig (", name,
          "): num_slots = ", num_slots, " and seq_len = ", seq_len, " must not be negative (0 means None)");
  if (variant == SoftMoEVariant::lite) {
    require(num_slots >= 1 && seq_len == 0, Status::invalid_argument,
            "SoftMoEConfig (lite): needs num_slots ≥ 1 "
            "and no seq_len, got num_slots = ",
            num_slots, ", seq_len = ", seq_len);
    require(!use_layernorm, Status::invalid_argument,
            "SoftMoEConfig (lite): use_layernorm is a lucidrains option (lite normalises nothing)");
  } else {
    require((num_slots > 0) != (seq_len > 0), Status::invalid_argument,
            "SoftMoEConfig (lucidrains): exactly one of seq_len and num_slots must be given, got seq_len = ", seq_len,
            ", num_slots = ", num_slots, " (0 = None)");
    require(slots_per_expert() >= 1, Status::invalid_argument, "SoftMoEConfig (lucidrains): seq_len = ", seq_len,
            " // num_experts = ", num_experts, " gives no slots per expert");
  }
  require(std::isfinite(layer_norm_eps) && layer_norm_eps > 0, Status::invalid_argument, "SoftMoEConfig (", name,
          "): layer_norm_eps = ", layer_norm_eps, " must be finite and positive");
  require(std::isfinite(rms_norm_eps) && rms_norm_eps > 0, Status::invalid_argument, "SoftMoEConfig (", name,
          "): rms_norm_eps = ", rms_norm_eps, " must be finite and positive");
  require(experts.dim == dim && experts.n_experts == num_experts, Status::invalid_argument, "SoftMoEConfig (", name,
          "): experts.dim = ", experts.dim, " and experts.n_experts = ", experts.n_experts, " must equal dim = ", dim,
          " and num_experts = ", num_experts);
  experts.validate();
}

template <class T>
std::vector<Tensor<T>*> SoftMoEParams<T>::all() {
  std::vector<Tensor<T>*> present;
  for (Tensor<T>* t : {&phi, &slot_embeds, &norm_gamma, &slot_norm_gamma})
    if (!t->empty()) present.push_back(t);
  for (Tensor<T>* t : experts.all()) present.push_back(t);
  return present;
}

namespace impl::soft_moe {


// dst[b, c, a] = src[b, a, c]: images [B, dim, H·W] ↔ token rows [B, H·W, dim].
template <class T>
Tensor<T> swap_last_two(const Tensor<T>& src, const char* label) {
  const index_t B = src.dim(0), A = src.dim(1), C = src.dim(2);
  const auto dst = Tensor<T>::uninitialized(label, {B, C, A});
  const View3<T> s = src.template view<3>(), d = dst.template view<3>();
  Kokkos::parallel_for(
      "kmoe::soft_moe::swap_last_two", md_range<3>({0, 0, 0}, {B, C, A}),
      KOKKOS_LAMBDA(const index_t b, const index_t c, const index_t a) { d(b, c, a) = s(b, a, c); });
  return dst;
}

// The token rows [batch, tokens, dim] of an input of rank 2, 3 or 4 (lucidrains' reshapes).
template <class T>
Tensor<T> as_token_rows(const Tensor<T>& x, const char* label) {
  if (x.rank() == 2) return x.reshape({x.dim(0), 1, x.dim(1)});
  if (x.rank() == 3) return x;
  return swap_last_two(x.reshape({x.dim(0), x.dim(1), x.dim(2) * x.dim(3)}), label);
}

// The inverse of as_token_rows: rows [batch, tokens, dim] back into `shape`.
template <class T>
Tensor<T> from_token_rows(const Tensor<T>& rows, const Shape& shape, const char* label) {
  if (shape.rank() != 4) return rows.reshape(shape);
  return swap_last_two(rows, label).reshape(shape);
}

// Per-batch GEMMs: c[b] = op(a[b]) · op(bm[b]) + beta · c[b], one after another, each threaded
// inside ops::gemm (whose bits do not depend on the thread count).
template <class T>
void gemm_per_batch(bool transpose_a, bool transpose_b, const View3<const T>& a, const View3<const T>& bm, T beta,
                    const View3<T>& c) {
  for (int b = 0; b < static_cast<int>(a.extent(0)); ++b) {
    ops::gemm<T>(transpose_a, transpose_b, T(1), Kokkos::subview(a, b, Kokkos::ALL, Kokkos::ALL),
                 Kokkos::subview(bm, b, Kokkos::ALL, Kokkos::ALL), beta,
                 Kokkos::subview(c, b, Kokkos::ALL, Kokkos::ALL));
  }
}

// The token / slot-embedding norm (lucidrains): RMSNorm (F.normalize · √dim · γ) or LayerNorm (γ, β
// buffer). stat_a, stat_b: the row statistics (scale; or mean, rstd).
template <class T>
Tensor<T> norm_forward(const SoftMoEConfig& c, const Tensor<T>& x, const Tensor<T>& gamma, const Tensor<T>& beta,
                       Tensor<T>& stat_a, Tensor<T>& stat_b, const char* label) {
  const index_t rows = x.dim(0);
  const auto y = Tensor<T>::uninitialized(label, x.shape());
  stat_a = Tensor<T>::uninitialized(label, {rows});
  if (c.use_layernorm) {
    stat_b = Tensor<T>::uninitialized(label, {rows});
    ops::layer_norm_forward<T>(x.as_matrix(), gamma.flat(), beta.flat(), static_cast<T>(c.layer_norm_eps),
                               y.as_matrix(), stat_a.flat(), stat_b.flat());
  } else {
    ops::rms_norm_forward<T>(ops::RmsNormMode::l2_normalize, x.as_matrix(), gamma.flat(),
                             static_cast<T>(c.rms_norm_eps), y.as_matrix(), stat_a.flat());
  }
  return y;
}

// dx (new tensor) from dy; dgamma accumulated. β is a buffer: no gradient.
template <class T>
Tensor<T> norm_backward(const SoftMoEConfig& c, const Tensor<T>& x, const Tensor<T>& gamma, const Tensor<T>& stat_a,
                        const Tensor<T>& stat_b, const Tensor<T>& dy, const Tensor<T>& dgamma, const char* label) {
  const auto dx = Tensor<T>::uninitialized(label, x.shape());
  if (c.use_layernorm) {
    ops::layer_norm_backward<T>(x.as_matrix(), gamma.flat(), stat_a.flat(), stat_b.flat(), dy.as_matrix(),
                                dx.as_matrix(), dgamma.flat(), View1<T>());
  } else {
    ops::rms_norm_backward<T>(ops::RmsNormMode::l2_normalize, x.as_matrix(), gamma.flat(),
                              static_cast<T>(c.rms_norm_eps), stat_a.flat(), dy.as_matrix(), dx.as_matrix(),
                              dgamma.flat());
  }
  return dx;
}

// logits[i] += mult · (−log(−log u_i)), with lucidrains' clamp of both logs' arguments at 1e-20.
template <class T>
void add_gumbel_noise(const Tensor<T>& logits, const RngStream& stream, T mult) {
  const View1<T> l = logits.flat();
  Kokkos::parallel_for(
      "kmoe::soft_moe::gumbel_noise", Kokkos::RangePolicy<ExecSpace>(0, logits.size()), KOKKOS_LAMBDA(const index_t i) {
        const T tiny = T(1e-20);
        const T u = stream.uniform<T>(static_cast<std::uint64_t>(i));
        const T inner = -Kokkos::Experimental::log(u > tiny ? u : tiny);
        l(i) += mult * -Kokkos::Experimental::log(inner > tiny ? inner : tiny);
      });
}

// rows(t, :) = value for every token t whose mask is 0.
template <class T>
void fill_masked_rows(const View2<T>& rows, const View1<const int>& mask, T value) {
  Kokkos::parallel_for(
      "kmoe::soft_moe::fill_masked_rows", md_range<2>({0, 0}, {rows.extent(0), rows.extent(1)}),
      KOKKOS_LAMBDA(const index_t t, const index_t z) {
        if (mask(t) == 0) rows(t, z) = value;
      });
}

// v, or 0 when |v| is below the smallest normal number. Softmax weights (and their logit
// gradients) that small change no sum they enter by more than that bound times the other operand,
// far below the rounding of the result; but x86 CPUs multiply denormal operands about 100x slower,
// and with lucidrains' logits of size ±dim most dispatch weights over a long sequence underflow
// into that range (the slot and combine GEMMs ran 10-20x slower with them).
template <class T>
KOKKOS_INLINE_FUNCTION T flush_denormal(T v, T smallest_normal) {
  return (v < smallest_normal && v > -smallest_normal) ? T(0) : v;
}

template <class T>
void flush_denormals(const Tensor<T>& a, const Tensor<T>& b) {
  const View1<T> av = a.flat(), bv = b.flat();
  const T smallest = std::numeric_limits<T>::min();
  Kokkos::parallel_for(
      "kmoe::soft_moe::flush_denormals", Kokkos::RangePolicy<ExecSpace>(0, a.size()), KOKKOS_LAMBDA(const index_t i) {
        av(i) = flush_denormal(av(i), smallest);
        bv(i) = flush_denormal(bv(i), smallest);
      });
}

// dlogits = dcombine_logits + ddispatch_logits (denormals flushed), 0 where masked (masked_fill
// passes no gradient).
template <class T>
void sum_logit_gradients(const View2<T>& dlogits, const View2<const T>& other, const View1<const int>& mask) {
  const bool masked = mask.data() != nullptr;
  const T smallest = std::numeric_limits<T>::min();
  Kokkos::parallel_for(
      "kmoe::soft_moe::logit_gradient", md_range<2>({0, 0}, {dlogits.extent(0), dlogits.extent(1)}),
      KOKKOS_LAMBDA(const index_t t, const index_t z) {
        dlogits(t, z) = masked && mask(t) == 0 ? T(0) : flush_denormal(dlogits(t, z) + other(t, z), smallest);
      });
}

template <class T>
View3<T> per_batch(const Tensor<T>& t, index_t batch) {
  return t.reshape({batch, t.size() / (batch * t.dim(t.rank() - 1)), t.dim(t.rank() - 1)}).template view<3>();
}

// [rows, 1] the (global) expert of each slot row r = (b · E + e) · S + s.
inline Tensor<int> expert_of_slot(index_t rows, index_t E, index_t S) {
  const Tensor<int> index("soft_moe::expert_of_slot", {rows, 1});
  const View2<int> out = index.as_matrix();
  Kokkos::parallel_for(
      "kmoe::soft_moe::expert_of_slot", Kokkos::RangePolicy<ExecSpace>(0, rows),
      KOKKOS_LAMBDA(const index_t r) { out(r, 0) = static_cast<int>((r / S) % E); });
  return index;
}

// Everything that decides the computation, for the ranks' agreement check.
inline std::string config_text(const SoftMoEConfig& c) {
  const SlotExpertConfig& e = c.experts;
  std::ostringstream text;
  text.precision(17);
  text << static_cast<int>(c.variant) << ' ' << c.dim << ' ' << c.num_experts << ' ' << c.num_slots << ' '
       << c.seq_len << ' ' << c.use_layernorm << ' ' << c.layer_norm_eps << ' ' << c.rms_norm_eps << ' '
       << static_cast<int>(c.masked_output) << " | " << e.hidden << ' ' << static_cast<int>(e.activation) << ' '
       << e.glu << ' ' << e.hidden_layer_norm << ' ' << e.output_layer_norm << ' '
       << static_cast<int>(e.output_activation) << ' ' << e.residual << ' ' << e.dropout << ' ' << e.layer_norm_eps
       << ' ' << static_cast<int>(e.init) << ' ' << static_cast<int>(e.precision);
  return text.str();
}

}  // namespace impl::soft_moe

template <class T>
SoftMoE<T>::SoftMoE(const SoftMoEConfig& config, std::uint64_t seed, ParameterInit init, const dist::Communicator& comm)
    : config_(config), comm_(comm) {
  config_.validate();
  require_precision_supported<T>(config_.experts.precision, "SoftMoE");
  comm_.require_same(dist::text_hash(impl::soft_moe::config_text(config_)) ^ seed, "the SoftMoE config or seed");
  const index_t D = config_.dim, E = config_.num_experts, S = config_.slots_per_expert(), H = config_.experts.hidden;
  placement_ = dist::Placement(static_cast<int>(E), comm_.size(), H);
  const int rank = comm_.rank();
  local_experts_ = config_.experts;
  local_experts_.n_experts = placement_.local_experts(rank);
  local_experts_.hidden = placement_.local_hidden(rank);
  require(local_experts_.hidden >= 1, Status::invalid_argument, "SoftMoE: ", comm_.size(), " ranks split ", E,
          " experts of ", H, " hidden units into shards of none; use at most ", E * H, " ranks");
  // A rank holds one shard of one expert when there are more ranks than experts.
  shards_ = placement_.sharded() ? comm_.split(placement_.first_expert(rank)) : dist::Communicator();

  Generator generator(seed, init);
  if (config_.variant == SoftMoEVariant::lite) {
    params_.phi = Tensor<T>("soft_moe::phi", {D, E, S});
    ops::fill_normal<T>(params_.phi.flat(), generator.take(static_cast<std::uint64_t>(params_.phi.size())), T(0), T(1));
  } else {
    params_.slot_embeds = Tensor<T>("soft_moe::slot_embeds", {E, S, D});
    ops::fill_normal<T>(params_.slot_embeds.flat(),
                        generator.take(static_cast<std::uint64_t>(params_.slot_embeds.size())), T(0), T(1));
    params_.norm_gamma = Tensor<T>("soft_moe::norm_gamma", {D});
    params_.norm_gamma.fill(T(1));
    params_.slot_norm_gamma = Tensor<T>("soft_moe::slot_norm_gamma", {D});
    params_.slot_norm_gamma.fill(T(1));
    if (config_.use_layernorm) {
      norm_beta_ = Tensor<T>("soft_moe::norm_beta", {D});
      slot_norm_beta_ = Tensor<T>("soft_moe::slot_norm_beta", {D});
    }
  }
  // The experts are drawn whole (the orthogonal init works on whole matrices) and each rank keeps
  // its block, through the registry's block map.
  SlotExpertParams<T> whole = init_slot_expert_params<T>(config_.experts, generator);
  Generator no_draws(0, ParameterInit::zeros);
  params_.experts = init_slot_expert_params<T>(local_experts_, no_draws);
  const auto zeros = [](const Tensor<T>& t) {
    return t.empty() ? Tensor<T>() : Tensor<T>("grad::" + t.label(), t.shape());
  };
  grads_.phi = zeros(params_.phi);
  grads_.slot_embeds = zeros(params_.slot_embeds);
  grads_.norm_gamma = zeros(params_.norm_gamma);
  grads_.slot_norm_gamma = zeros(params_.slot_norm_gamma);
  grads_.experts = zeros_like(params_.experts);
  const std::vector<Tensor<T>*> sources = whole.all();
  std::size_t next = 0;
  visit_experts([&](model::Parameter<T>& p) { dist::take_block(p, *sources[next++], *p.tensor); }, "",
                params_.experts, grads_.experts);
}

template <class T>
void SoftMoE<T>::zero_grad() {
  for (Tensor<T>* grad : grads_.all()) grad->fill(T(0));
}

template <class T>
void SoftMoE<T>::visit_parameters(const model::ParameterVisitor<T>& visit, const std::string& prefix) {
  const bool lite = config_.variant == SoftMoEVariant::lite;
  const auto dense = [&](const char* name, Tensor<T>& param, Tensor<T>& grad) {
    model::Parameter<T> entry = model::dense_parameter(prefix + name, param, grad);
    visit(entry);
  };
  if (lite) {
    dense("phi", params_.phi, grads_.phi);
  } else {
    dense("norm.gamma", params_.norm_gamma, grads_.norm_gamma);
    dense("slot_norm.gamma", params_.slot_norm_gamma, grads_.slot_norm_gamma);
    dense("slot_embeds", params_.slot_embeds, grads_.slot_embeds);
  }
  visit_experts(visit, prefix, params_.experts, grads_.experts);
  if (!norm_beta_.empty()) {
    model::Parameter<T> norm_beta = model::buffer_parameter(prefix + "norm.beta", norm_beta_);
    model::Parameter<T> slot_norm_beta = model::buffer_parameter(prefix + "slot_norm.beta", slot_norm_beta_);
    visit(norm_beta);
    visit(slot_norm_beta);
  }
}

template <class T>
void SoftMoE<T>::visit_experts(const model::ParameterVisitor<T>& visit, const std::string& prefix,
                               SlotExpertParams<T>& p, SlotExpertParams<T>& g) {
  const SoftMoEConfig& c = config_;
  const bool lite = c.variant == SoftMoEVariant::lite;
  const int rank = comm_.rank();
  // One module per expert in the references: lite Mlp's fcs.0 / layer_norms.0 / last_fc / last_ln;
  // lucidrains' nn.Sequential indices 0 and 3 (its norm names are kmoe's own: the reference has
  // none). Linear weights are stored transposed ([in, out]) for the grouped GEMMs. Placed
  // (dist/placement.hpp): this rank's experts, of each its hidden units (in both halves of a
  // GEGLU's first layer).
  const std::string experts = prefix + (lite ? "experts.*." : "experts.experts.*.");
  const auto expert = [&](const std::string& name, Tensor<T>& param, Tensor<T>& grad, int hidden_axis,
                          bool transposed, int hidden_blocks = 1) {
    model::TorchLayout torch{model::per_expert_names(experts + name, c.num_experts), transposed};
    model::Parameter<T> entry =
        dist::placed(model::expert_parameter(experts + name, param, grad, hidden_axis, torch), placement_, rank);
    entry.hidden_blocks = hidden_blocks;
    visit(entry);
  };
  const int first_blocks = c.experts.glu ? 2 : 1;
  const std::string first = lite ? "fcs.0" : "0", second = lite ? "last_fc" : "3";
  const std::string hidden_norm = lite ? "layer_norms.0" : "hidden_norm", output_norm = lite ? "last_ln" : "output_norm";
  expert(first + ".weight", p.w1, g.w1, 2, true, first_blocks);
  expert(first + ".bias", p.b1, g.b1, 1, false, first_blocks);
  if (c.experts.hidden_layer_norm) {
    expert(hidden_norm + ".weight", p.hidden_norm_weight, g.hidden_norm_weight, 1, false, first_blocks);
    expert(hidden_norm + ".bias", p.hidden_norm_bias, g.hidden_norm_bias, 1, false, first_blocks);
  }
  expert(second + ".weight", p.w2, g.w2, 1, true);
  expert(second + ".bias", p.b2, g.b2, -1, false);
  if (c.experts.output_layer_norm) {
    expert(output_norm + ".weight", p.output_norm_weight, g.output_norm_weight, -1, false);
    expert(output_norm + ".bias", p.output_norm_bias, g.output_norm_bias, -1, false);
  }
}

template <class T>
SoftMoEForward<T> SoftMoE<T>::forward(const Tensor<T>& x, const Tensor<int>& mask, bool training, Generator& rng,
                                      const SoftMoENoise& noise) const {
  const ProfileRegion region("kmoe::soft_moe::forward");
  const SoftMoEConfig& c = config_;
  const index_t D = c.dim, E = c.num_experts, S = c.slots_per_expert(), Z = c.total_slots();
  const bool image = x.rank() == 4;
  // A bad input on one rank is an error on every rank (the others would wait for it otherwise).
  comm_.collectively([&] {
    require((x.rank() == 2 || x.rank() == 3) ? x.dim(x.rank() - 1) == D : image && x.dim(1) == D,
            Status::shape_mismatch, "SoftMoE::forward: x is ", x.shape().str(),
            ", expected [batch, dim], [batch, tokens, dim] or [batch, dim, height, width] with dim = ", D);
    // A rank may bring no sequences when others do (data parallelism); one rank alone may not.
    require(x.size() > 0 || (comm_.distributed() && x.dim(0) == 0), Status::shape_mismatch, "SoftMoE::forward: x ",
            x.shape().str(), " has no tokens");
    require_finite(x, "SoftMoE::forward: x");
    if (!mask.empty()) {
      const index_t tokens = x.rank() == 2 ? 1 : image ? x.dim(2) * x.dim(3) : x.dim(1);
      mask.require_shape({x.dim(0), tokens}, "SoftMoE::forward: mask ([batch, tokens] of x " + x.shape().str() + ")");
    }
  });

  SoftMoEForward<T> f;
  f.training = training;
  f.input_shape = x.shape();
  const Tensor<T> rows = impl::soft_moe::as_token_rows(x, "soft_moe::x_tokens");
  const index_t B = rows.dim(0), n = rows.dim(1), N = B * n;
  f.batch = B;
  f.tokens = n;
  if (!mask.empty()) f.mask = mask;
  f.x_tokens = rows.reshape({N, D});
  // Noise is keyed by the token's place in the batch of every rank.
  const RngStream noise_draws =
      noise.add ? dist::take_global(comm_, rng, static_cast<std::uint64_t>(N * Z)) : RngStream{};
  const std::int64_t first_sequence = comm_.exclusive_prefix_sum(B), total_sequences = comm_.sum(B);

  f.slots = Tensor<T>::uninitialized("soft_moe::slots", {B * Z, D});
  if (B > 0) {
    // Tokens and slot embeddings as the logits and slots use them.
    if (c.normalizes()) {
      f.tokens_normed = impl::soft_moe::norm_forward(c, f.x_tokens, params_.norm_gamma, norm_beta_, f.norm_stat_a,
                                                     f.norm_stat_b, "soft_moe::x_normed");
      f.slot_embeds_normed = impl::soft_moe::norm_forward(c, params_.slot_embeds.reshape({Z, D}),
                                                          params_.slot_norm_gamma, slot_norm_beta_, f.slot_norm_stat_a,
                                                          f.slot_norm_stat_b, "soft_moe::slot_embeds_normed");
    } else {
      f.tokens_normed = f.x_tokens;
    }

    // Logits [N, Z]: tokens · φ [dim, Z] (lite) or tokens · φ̂ᵀ (lucidrains), then noise and mask.
    f.logits = Tensor<T>::uninitialized("soft_moe::logits", {B, n, Z});
    const View2<T> logits = f.logits.reshape({N, Z}).as_matrix();
    if (c.normalizes()) {
      ops::gemm<T>(false, true, T(1), f.tokens_normed.as_matrix(), f.slot_embeds_normed.as_matrix(), T(0), logits);
    } else {
      ops::gemm<T>(false, false, T(1), f.tokens_normed.as_matrix(), params_.phi.reshape({D, Z}).as_matrix(), T(0),
                   logits);
    }
    if (noise.add) impl::soft_moe::add_gumbel_noise(f.logits, noise_draws, static_cast<T>(noise.mult));
    if (!mask.empty()) impl::soft_moe::fill_masked_rows<T>(logits, mask.flat(), -std::numeric_limits<T>::max());

    f.dispatch = Tensor<T>::uninitialized("soft_moe::dispatch", {B, n, Z});
    ops::softmax_forward<T>(f.logits.template view<3>(), f.dispatch.template view<3>());
    f.combine = Tensor<T>::uninitialized("soft_moe::combine", {B, n, Z});
    ops::softmax_forward<T>(f.logits.reshape({N, Z, 1}).template view<3>(),
                            f.combine.reshape({N, Z, 1}).template view<3>());
    impl::soft_moe::flush_denormals(f.dispatch, f.combine);
    if (!mask.empty() && c.masked_output == MaskedTokenOutput::zeros)
      impl::soft_moe::fill_masked_rows<T>(f.combine.reshape({N, Z}).as_matrix(), mask.flat(), T(0));

    // Slots [B, Z, dim] = dispatchᵀ · tokens per batch.
    impl::soft_moe::gemm_per_batch<T>(true, false, f.dispatch.template view<3>(),
                                      impl::soft_moe::per_batch(f.tokens_normed, B), T(0),
                                      impl::soft_moe::per_batch(f.slots, B));
  }

  // Each slot row to the ranks holding (shards of) its expert; global slot row = global sequence · Z + row.
  f.exchange = dist::ExpertExchange(comm_, placement_, impl::soft_moe::expert_of_slot(B * Z, E, S), first_sequence * Z);
  const Tensor<T> received = f.exchange.dispatch(f.slots);
  const index_t R = f.exchange.received_rows();
  // Every rank holds an expert or a shard of one, and every sequence sends slots to every expert:
  // a rank receives nothing only when the whole batch is empty, and then nobody draws.
  Tensor<T> outputs_received;
  if (R > 0) {
    f.plan = moe::DispatchPlan::build(f.exchange.received_experts().as_matrix(), local_experts_.n_experts);
    SlotExpertShare share;
    share.hidden_begin = placement_.hidden_begin(comm_.rank());
    share.hidden_total = c.experts.hidden;
    share.shards = shards_;
    share.global_rows = f.exchange.received_tokens();
    share.total_rows = total_sequences * Z;
    f.experts = slot_experts_forward<T>(local_experts_, params_.experts, f.plan, received, training, rng, share);
    outputs_received = f.experts.y;
  }
  f.slot_outputs = f.exchange.combine(outputs_received);

  // y = combine · expert outputs.
  const auto y = Tensor<T>::uninitialized("soft_moe::y", {B, n, D});
  if (B > 0)
    impl::soft_moe::gemm_per_batch<T>(false, false, f.combine.template view<3>(),
                                      impl::soft_moe::per_batch(f.slot_outputs, B), T(0), y.template view<3>());
  f.y = impl::soft_moe::from_token_rows(y, x.shape(), "soft_moe::y_image");
  return f;
}

template <class T>
Tensor<T> SoftMoE<T>::backward(const SoftMoEForward<T>& f, const Tensor<T>& dy) {
  const ProfileRegion region("kmoe::soft_moe::backward");
  const SoftMoEConfig& c = config_;
  const index_t D = c.dim, Z = c.total_slots(), B = f.batch, n = f.tokens, N = B * n;
  comm_.collectively([&] {
    require(!f.y.empty(), Status::invalid_argument,
            "SoftMoE::backward: the forward result is empty (default-constructed)");
    require(f.x_tokens.shape() == Shape{N, D} && f.slots.shape() == Shape{B * Z, D}, Status::shape_mismatch,
            "SoftMoE::backward: the forward result (tokens ", f.x_tokens.shape().str(), ", slots ",
            f.slots.shape().str(), ") does not come from a layer with dim = ", D, " and ", Z, " slots");
    dy.require_shape(f.y.shape(), "SoftMoE::backward: dy");
    require_finite(dy, "SoftMoE::backward: dy");
  });
  const Tensor<T> dy_rows = impl::soft_moe::as_token_rows(dy, "soft_moe::dy_tokens");
  const View1<const int> mask = f.mask.empty() ? View1<const int>() : View1<const int>(f.mask.flat());

  // y = combine · expert outputs: dcombine = dy · outᵀ, dout = combineᵀ · dy.
  const auto dcombine = Tensor<T>::uninitialized("soft_moe::dcombine", {B, n, Z});
  const auto dexpert_out = Tensor<T>::uninitialized("soft_moe::dexpert_out", {B * Z, D});
  if (B > 0) {
    impl::soft_moe::gemm_per_batch<T>(false, true, dy_rows.template view<3>(),
                                      impl::soft_moe::per_batch(f.slot_outputs, B), T(0), dcombine.template view<3>());
    impl::soft_moe::gemm_per_batch<T>(true, false, f.combine.template view<3>(), dy_rows.template view<3>(), T(0),
                                      impl::soft_moe::per_batch(dexpert_out, B));
  }
  // The experts' side: the outputs' gradients to the owners, the slots' gradients back.
  const Tensor<T> doutputs_received = f.exchange.dispatch(dexpert_out);
  Tensor<T> dslots_received;
  if (f.exchange.received_rows() > 0)
    dslots_received = slot_experts_backward<T>(local_experts_, params_.experts, f.plan, f.experts, doutputs_received,
                                               grads_.experts);
  const Tensor<T> dslots = f.exchange.combine(dslots_received);
  if (B == 0) return Tensor<T>("soft_moe::dx", f.input_shape);

  // slots = dispatchᵀ · tokens: ddispatch = tokens · dslotsᵀ, dtokens = dispatch · dslots.
  const auto ddispatch = Tensor<T>::uninitialized("soft_moe::ddispatch", {B, n, Z});
  impl::soft_moe::gemm_per_batch<T>(false, true, impl::soft_moe::per_batch(f.tokens_normed, B),
                                    impl::soft_moe::per_batch(dslots, B), T(0), ddispatch.template view<3>());
  const auto dtokens = Tensor<T>::uninitialized("soft_moe::dtokens", {N, D});
  impl::soft_moe::gemm_per_batch<T>(false, false, f.dispatch.template view<3>(), impl::soft_moe::per_batch(dslots, B),
                                    T(0), impl::soft_moe::per_batch(dtokens, B));
  // The two softmaxes back to the logits (both reuse the buffers of their upstream gradients).
  const auto dlogits = Tensor<T>::uninitialized("soft_moe::dlogits", {B, n, Z});
  ops::softmax_backward<T>(f.combine.reshape({N, Z, 1}).template view<3>(),
                           dcombine.reshape({N, Z, 1}).template view<3>(),
                           dlogits.reshape({N, Z, 1}).template view<3>());
  ops::softmax_backward<T>(f.dispatch.template view<3>(), ddispatch.template view<3>(), dcombine.template view<3>());
  const View2<T> dl = dlogits.reshape({N, Z}).as_matrix();
  impl::soft_moe::sum_logit_gradients<T>(dl, dcombine.reshape({N, Z}).as_matrix(), mask);

  // The logits' product: onto the tokens' gradient and the slot embeddings.
  if (c.normalizes()) {
    ops::gemm<T>(false, false, T(1), dl, f.slot_embeds_normed.as_matrix(), T(1), dtokens.as_matrix());
    const auto dslot_normed = Tensor<T>::uninitialized("soft_moe::dslot_embeds_normed", {Z, D});
    ops::gemm<T>(true, false, T(1), dl, f.tokens_normed.as_matrix(), T(0), dslot_normed.as_matrix());
    const Tensor<T> dslot_embeds = impl::soft_moe::norm_backward(
        c, params_.slot_embeds.reshape({Z, D}), params_.slot_norm_gamma, f.slot_norm_stat_a, f.slot_norm_stat_b,
        dslot_normed, grads_.slot_norm_gamma, "soft_moe::dslot_embeds");
    KokkosBlas::axpy(T(1), dslot_embeds.flat(), grads_.slot_embeds.flat());
    const Tensor<T> dx_rows =
        impl::soft_moe::norm_backward(c, f.x_tokens, params_.norm_gamma, f.norm_stat_a, f.norm_stat_b, dtokens,
                                      grads_.norm_gamma, "soft_moe::dx_tokens");
    return impl::soft_moe::from_token_rows(dx_rows.reshape({B, n, D}), f.input_shape, "soft_moe::dx_image");
  }
  const View2<T> phi = params_.phi.reshape({D, Z}).as_matrix();
  ops::gemm<T>(false, true, T(1), dl, phi, T(1), dtokens.as_matrix());
  ops::gemm<T>(true, false, T(1), f.tokens_normed.as_matrix(), dl, T(1), grads_.phi.reshape({D, Z}).as_matrix());
  return impl::soft_moe::from_token_rows(dtokens.reshape({B, n, D}), f.input_shape, "soft_moe::dx_image");
}

template struct SoftMoEParams<float>;
template struct SoftMoEParams<double>;
template class SoftMoE<float>;
template class SoftMoE<double>;

}  // namespace kmoe::layers
