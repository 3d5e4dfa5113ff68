#include "kmoe/layers/moeut.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/core/profile_region.hpp"
#include "kmoe/model/config_fields.hpp"
#include "kmoe/layers/moeut_init.hpp"
#include "kmoe/ops/dropout.hpp"
#include "kmoe/ops/embedding.hpp"
#include "kmoe/ops/linear.hpp"
#include "kmoe/ops/norms.hpp"

#include <cmath>
#include <map>

namespace kmoe::layers {

// ---------------------------------------------------------------------------------------------
// Config and profiles

double MoEUTConfig::init_scale() const {
  return std::sqrt(2.0 / static_cast<double>(n_repeats() * group_size));
}

SwitchHeadConfig MoEUTConfig::attention_config() const {
  SwitchHeadConfig c;
  c.state_size = d_model;
  c.n_heads = n_heads;
  c.n_experts = att_n_experts;
  c.projection_size = head_dim();
  c.expert_dropout = att_expert_dropout;
  c.moe_k = att_k;
  c.rotate_fraction = rotate_fraction;
  c.rope_base = rope_base;
  c.init_scale = init_scale();
  c.precision = precision;
  return c;
}

SigmaMoEConfig MoEUTConfig::ffn_config() const {
  SigmaMoEConfig c;
  c.dmodel = d_model;
  c.n_experts = ff_n_experts;
  c.expert_size = ff_expert_size;
  c.k = ff_k;
  c.expert_dropout = ff_expert_dropout;
  c.weight_std_scale = init_scale();  // MoEUT's SigmaMoE init = moe_layer's with wss = √(2/n_layers)
  c.precision = precision;
  return c;
}

const model::FieldTable<MoEUTConfig>& moeut_fields(bool lm) {
  using C = MoEUTConfig;
  const auto make = [](bool with_tokens) {
    model::FieldTable<C> table;
    if (with_tokens) table.push_back(model::required_field("n_tokens", &C::n_tokens, model::at_least(&C::n_tokens, index_t(1))));
    table.push_back(model::required_field("d_model", &C::d_model, model::at_least(&C::d_model, index_t(1))));
    table.push_back(model::required_field("n_layers", &C::n_layers, model::at_least(&C::n_layers, 1)));
    table.push_back(model::required_field("n_heads", &C::n_heads, model::at_least(&C::n_heads, 1)));
    table.push_back(model::required_field("ff_n_experts", &C::ff_n_experts, model::at_least(&C::ff_n_experts, 1)));
    table.push_back(model::required_field("att_n_experts", &C::att_n_experts, model::at_least(&C::att_n_experts, 1)));
    table.push_back(model::nullable_field("d_head", &C::d_head, model::at_least(&C::d_head, index_t(0))));
    table.push_back(model::field("group_size", &C::group_size, model::at_least(&C::group_size, 1)));
    table.push_back(model::field("ff_k", &C::ff_k));
    table.push_back(model::field("att_k", &C::att_k));
    table.push_back(model::field("ff_expert_dropout", &C::ff_expert_dropout, model::probability(&C::ff_expert_dropout)));
    table.push_back(model::field("att_expert_dropout", &C::att_expert_dropout, model::probability(&C::att_expert_dropout)));
    model::Field<C> ff_expert_size = model::field("ff_expert_size", &C::ff_expert_size, model::at_least(&C::ff_expert_size, index_t(1)));
    ff_expert_size.required = !with_tokens;
    table.push_back(ff_expert_size);
    table.push_back(model::field("dropout", &C::dropout, model::probability(&C::dropout)));
    table.push_back(model::field("entropy_reg", &C::entropy_reg, model::finite(&C::entropy_reg)));
    table.push_back(model::field("att_entropy_reg", &C::att_entropy_reg, model::finite(&C::att_entropy_reg)));
    table.push_back(model::fixed_field<C>("attention", [](const nlohmann::json& v) { return v == "SwitchHeadRope"; },
                                          "kmoe implements SwitchHeadRope attention only"));
    table.push_back(model::field("rotate_fraction", &C::rotate_fraction));
    table.push_back(model::field("rope_base", &C::rope_base));
    table.push_back(model::enum_field("precision", &C::precision, parse_precision, precision_name));
    return table;
  };
  static const model::FieldTable<C> lm_table = make(true), plain_table = make(false);
  return lm ? lm_table : plain_table;
}

void MoEUTConfig::validate() const {
  model::check_fields(moeut_fields(false), *this, "MoEUTConfig");
  require(n_layers % group_size == 0, Status::invalid_argument, "MoEUTConfig: n_layers = ", n_layers,
          " is not a multiple of group_size = ", group_size, " (the original would silently drop ",
          n_layers % group_size, " layers)");
  attention_config().validate();
  ffn_config().validate();
}

namespace {

struct Profile {
  index_t d_model;
  int n_layers, n_heads, ff_n_experts, att_n_experts;
  index_t d_head;
  int ff_k, group_size;
};

// profiles.py of RobertCsordas/moeut@87f0497, plus the paper's 727M width.
const std::map<std::string, Profile>& profiles() {
  static const std::map<std::string, Profile> table = {
      {"MoEUT_44M", {412, 16, 4, 155, 8, 82, 12, 2}},
      {"MoEUT_126M", {768, 18, 4, 254, 10, 96, 12, 2}},
      {"MoEUT_244M", {1024, 18, 4, 387, 10, 128, 16, 2}},
      {"MoEUT_318M", {1024, 24, 4, 338, 10, 128, 16, 3}},
      {"MoEUT_727M", {1024, 36, 5, 467, 13, 128, 20, 4}},
      {"MoEUT_727M_paper", {1280, 36, 5, 467, 13, 128, 20, 4}},
      {"MoEUT_1B", {1536, 36, 6, 565, 12, 128, 24, 4}},
  };
  return table;
}

}  // namespace

std::vector<std::string> moeut_profile_names() {
  return {"MoEUT_44M", "MoEUT_126M", "MoEUT_244M", "MoEUT_318M", "MoEUT_727M", "MoEUT_727M_paper", "MoEUT_1B"};
}

MoEUTConfig moeut_profile(const std::string& name, index_t n_tokens) {
  const auto found = profiles().find(name);
  if (found == profiles().end()) {
    std::string known;
    for (const std::string& n : moeut_profile_names()) known += (known.empty() ? "" : ", ") + n;
    fail(Status::invalid_argument, "moeut_profile: unknown profile '", name, "' (known: ", known, ")");
  }
  const Profile& p = found->second;
  MoEUTConfig c;
  c.n_tokens = n_tokens;
  c.d_model = p.d_model;
  c.n_layers = p.n_layers;
  c.n_heads = p.n_heads;
  c.ff_n_experts = p.ff_n_experts;
  c.att_n_experts = p.att_n_experts;
  c.d_head = p.d_head;
  c.ff_k = p.ff_k;
  c.group_size = p.group_size;
  return c;
}

index_t moeut_parameter_count(const MoEUTConfig& c, bool lm) {
  const index_t D = c.d_model, H = c.n_heads, P = c.head_dim(), Ea = c.att_n_experts;
  const index_t E = c.ff_n_experts, es = c.ff_expert_size;
  const index_t attention = Ea > 1 ? 2 * D * H * P + 2 * H * Ea * D * P + 2 * H * Ea * D : 4 * D * H * P + H * D;
  const index_t ffn = 2 * E * D * es + E * D;
  const index_t layer = attention + ffn + 4 * D;
  const index_t body = c.group_size * layer;
  return lm ? body + 2 * c.n_tokens * D + c.n_tokens + 2 * D : body;
}

// ---------------------------------------------------------------------------------------------
// Internal helpers

namespace moeut_impl {

// A child seed for sub-module `tag` of a model seeded with `seed` (splitmix64 of the pair).
inline std::uint64_t child_seed(std::uint64_t seed, std::uint64_t tag) {
  std::uint64_t z = seed + 0x9E3779B97F4A7C15ull * (tag + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

template <class T>
Tensor<T> filled(const std::string& label, index_t n, T value) {
  Tensor<T> t(label, {n});
  t.fill(value);
  return t;
}

// y = LN(x) over the last axis (eps 1e-5, as torch.nn.LayerNorm); statistics into mean, rstd.
template <class T>
Tensor<T> layer_norm(const Tensor<T>& x, const Tensor<T>& weight, const Tensor<T>& bias, Tensor<T>& mean,
                     Tensor<T>& rstd, const char* label) {
  const index_t rows = x.dim(0);
  auto y = Tensor<T>::uninitialized(label, x.shape());
  mean = Tensor<T>::uninitialized("moeut::ln_mean", {rows});
  rstd = Tensor<T>::uninitialized("moeut::ln_rstd", {rows});
  ops::layer_norm_forward<T>(x.as_matrix(), weight.flat(), bias.flat(), T(1e-5), y.as_matrix(), mean.flat(),
                             rstd.flat());
  return y;
}

// dx_accum += LN'(x)ᵀ dy; d weight, d bias accumulated.
template <class T>
void layer_norm_backward_accumulate(const Tensor<T>& x, const Tensor<T>& weight, const Tensor<T>& mean,
                                    const Tensor<T>& rstd, const Tensor<T>& dy, const Tensor<T>& dx_accum,
                                    const Tensor<T>& dweight, const Tensor<T>& dbias) {
  const auto dx = Tensor<T>::uninitialized("moeut::ln_dx", x.shape());
  ops::layer_norm_backward<T>(x.as_matrix(), weight.flat(), mean.flat(), rstd.flat(), dy.as_matrix(), dx.as_matrix(),
                              dweight.flat(), dbias.flat());
  const View1<T> acc = dx_accum.flat(), add = dx.flat();
  Kokkos::parallel_for(
      "kmoe::moeut::accumulate", Kokkos::RangePolicy<ExecSpace>(0, acc.extent(0)),
      KOKKOS_LAMBDA(const index_t i) { acc(i) += add(i); });
}

// out = a + b (new tensor, shape of a).
template <class T>
Tensor<T> add(const Tensor<T>& a, const Tensor<T>& b, const char* label) {
  auto out = Tensor<T>::uninitialized(label, a.shape());
  const View1<T> o = out.flat(), x = a.flat(), y = b.flat();
  Kokkos::parallel_for(
      "kmoe::moeut::add", Kokkos::RangePolicy<ExecSpace>(0, out.size()),
      KOKKOS_LAMBDA(const index_t i) { o(i) = x(i) + y(i); });
  return out;
}

// acc += b.
template <class T>
void add_into(const Tensor<T>& acc, const Tensor<T>& b) {
  const View1<T> o = acc.flat(), y = b.flat();
  Kokkos::parallel_for(
      "kmoe::moeut::add_into", Kokkos::RangePolicy<ExecSpace>(0, acc.size()),
      KOKKOS_LAMBDA(const index_t i) { o(i) += y(i); });
}

}  // namespace moeut_impl

// ---------------------------------------------------------------------------------------------
// MoEUT

template <class T>
MoEUT<T>::MoEUT(const MoEUTConfig& config, std::uint64_t seed, ParameterInit init, const dist::Communicator& comm)
    : config_(config), comm_(comm) {
  config_.validate();
  // The whole config (the LM's fields included: n_tokens is one of them) and the seed, before any
  // child layer's own check.
  comm_.require_same(dist::text_hash(model::write_fields(moeut_fields(true), config_).dump()) ^ seed,
                     "the MoEUT config or seed");
  const index_t D = config_.d_model;
  for (int i = 0; i < config_.group_size; ++i) {
    attention_.push_back(std::make_unique<SwitchHeadAttention<T>>(config_.attention_config(),
                                                                  moeut_impl::child_seed(seed, 2 * i), init, comm));
    ffn_.push_back(
        std::make_unique<SigmaMoE<T>>(config_.ffn_config(), moeut_impl::child_seed(seed, 2 * i + 1), init, comm));
    norms_.push_back({moeut_impl::filled<T>("moeut::ln1.weight", D, T(1)), Tensor<T>("moeut::ln1.bias", {D}),
                      moeut_impl::filled<T>("moeut::ln2.weight", D, T(1)), Tensor<T>("moeut::ln2.bias", {D})});
    norm_grads_.push_back({Tensor<T>("grad::ln1.weight", {D}), Tensor<T>("grad::ln1.bias", {D}),
                           Tensor<T>("grad::ln2.weight", {D}), Tensor<T>("grad::ln2.bias", {D})});
  }
}

template <class T>
void MoEUT<T>::visit_parameters(const model::ParameterVisitor<T>& visit, const std::string& prefix) {
  for (int i = 0; i < config_.group_size; ++i) {
    const std::string layer = prefix + "layers." + std::to_string(i) + ".";
    attention_[i]->visit_parameters(visit, layer + "attention.");
    ffn_[i]->visit_parameters(visit, layer + "ffn.");
    MoEUTNorms<T>& p = norms_[i];
    MoEUTNorms<T>& g = norm_grads_[i];
    for (auto [name, param, grad] : {std::tuple{"ln1.weight", &p.ln1_weight, &g.ln1_weight},
                                     std::tuple{"ln1.bias", &p.ln1_bias, &g.ln1_bias},
                                     std::tuple{"ln2.weight", &p.ln2_weight, &g.ln2_weight},
                                     std::tuple{"ln2.bias", &p.ln2_bias, &g.ln2_bias}}) {
      auto entry = model::dense_parameter(layer + name, *param, *grad);
      visit(entry);
    }
  }
}

template <class T>
index_t MoEUT<T>::parameter_count() {
  return model::parameter_count(model::collect_parameters(*this));
}

template <class T>
void MoEUT<T>::zero_grad() {
  model::zero_gradients(model::collect_parameters(*this));
}

template <class T>
MoEUTForward<T> MoEUT<T>::forward(const Tensor<T>& x, const ops::AttentionMask& mask, bool training, Generator& rng,
                                  MoEUTCache<T>* cache, bool for_backward) const {
  const ProfileRegion region("kmoe::moeut::forward");
  const MoEUTConfig& c = config_;
  const index_t D = c.d_model;
  // On every rank, so that a bad input does not leave the others waiting. A rank may bring no
  // sequences when others do (it still takes part in the FFN exchanges).
  comm_.collectively([&] {
    require(x.rank() == 3 && x.dim(2) == D, Status::shape_mismatch, "MoEUT::forward: x is ", x.shape().str(),
            ", expected [B, T, d_model = ", D, "]");
    require(x.dim(0) * x.dim(1) >= 1 || (comm_.distributed() && x.dim(1) >= 1),
            Status::shape_mismatch, "MoEUT::forward: x ", x.shape().str(), " has no tokens");
  });
  const index_t B = x.dim(0), T_len = x.dim(1), N = B * T_len;
  if (cache != nullptr) {
    if (cache->layers.empty()) cache->layers.resize(c.n_layers);
    require(static_cast<int>(cache->layers.size()) == c.n_layers, Status::shape_mismatch, "MoEUT::forward: the cache has ",
            cache->layers.size(), " layers, the model ", c.n_layers);
  }
  MoEUTForward<T> f;
  f.training = training;
  f.cached = cache != nullptr;
  // Training keeps them for the regulariser too.
  f.kept_records = training || (for_backward && cache == nullptr);
  const int G = c.group_size, R = c.n_repeats();
  Tensor<T> h = x.reshape({N, D});
  // Each distinct layer's expert GEMM operands once for all its repeats (under bfloat16: one
  // rounding of its weights per forward, not one per repeat).
  std::vector<SwitchHeadOperands<T>> attention_operands;
  std::vector<SigmaMoEOperands<T>> ffn_operands;
  for (int i = 0; i < G; ++i) {
    attention_operands.push_back(attention_[i]->expert_operands());
    ffn_operands.push_back(ffn_[i]->expert_operands());
  }
  for (int r = 0; r < R; ++r) {
    for (int i = 0; i < G; ++i) {
      const MoEUTNorms<T>& norms = norms_[i];
      MoEUTLayerForward<T> lf;
      // x̂ = LN1(x); x = x + Dropout(SwitchHead(x̂, x̂, x))
      lf.x_hat = moeut_impl::layer_norm(h, norms.ln1_weight, norms.ln1_bias, lf.ln1_mean, lf.ln1_rstd, "moeut::x_hat");
      lf.attention = attention_[i]->forward(lf.x_hat.reshape({B, T_len, D}), h.reshape({B, T_len, D}), mask, training,
                                            rng, cache != nullptr ? &cache->layers[r * G + i] : nullptr,
                                            &attention_operands[i]);
      Tensor<T> attended = lf.attention.y.reshape({N, D});
      if (training && c.dropout > 0) {
        lf.dropout_stream = dist::take_global(comm_, rng, static_cast<std::uint64_t>(N * D));
        const auto dropped = Tensor<T>::uninitialized("moeut::attention_dropped", {N, D});
        ops::dropout_forward<T>(attended.flat(), static_cast<T>(c.dropout), lf.dropout_stream, dropped.flat());
        attended = dropped;
      }
      lf.mid = moeut_impl::add(h, attended, "moeut::mid");
      // x = x + σ-MoE(x, router ← LN2(x))
      lf.sel_input = moeut_impl::layer_norm(lf.mid, norms.ln2_weight, norms.ln2_bias, lf.ln2_mean, lf.ln2_rstd,
                                            "moeut::sel_input");
      // MoEUT regularises the router logits itself (over time × repeats, below).
      lf.ffn = ffn_[i]->forward(lf.mid, lf.sel_input, training, rng, /*batch_regulariser=*/false, &ffn_operands[i]);
      h = moeut_impl::add(lf.mid, lf.ffn.y, "moeut::layer_out");
      // Without records a layer's memory goes when the next starts: one layer's, not the stack's.
      if (f.kept_records) f.calls.push_back(std::move(lf));
    }
  }
  f.out = h.reshape({B, T_len, D});
  if (!training) return f;  // the original keeps routing histories (and so the regulariser) in training only

  // The regularisers of each distinct layer over its R calls (time × repeats, per sequence).
  double reg = 0;
  const index_t H = c.n_heads, Ea = c.att_n_experts, E = c.ff_n_experts;
  for (int i = 0; i < G; ++i) {
    std::vector<Tensor<T>> ffn_logits, o_logits, v_logits;
    for (int r = 0; r < R; ++r) {
      const MoEUTLayerForward<T>& lf = f.calls[r * G + i];
      ffn_logits.push_back(lf.ffn.router_logits.reshape({B, T_len, 1, E}));
      if (Ea > 1) {
        o_logits.push_back(lf.attention.sel_o_logits.reshape({B, T_len, H, Ea}));
        v_logits.push_back(lf.attention.sel_v_logits.reshape({B, T_len, H, Ea}));
      }
    }
    // Per-sequence means: the ranks hold whole sequences.
    f.ffn_reg.push_back(moe::entropy_reg_forward(ffn_logits, &comm_, moe::SplitOver::sequences));
    reg += c.entropy_reg * static_cast<double>(f.ffn_reg.back().value);
    if (Ea > 1) {
      f.att_o_reg.push_back(moe::entropy_reg_forward(o_logits, &comm_, moe::SplitOver::sequences));
      f.att_v_reg.push_back(moe::entropy_reg_forward(v_logits, &comm_, moe::SplitOver::sequences));
      reg += c.att_entropy_reg *
             (static_cast<double>(f.att_o_reg.back().value) + static_cast<double>(f.att_v_reg.back().value));
    }
  }
  f.reg_loss = static_cast<T>(reg);
  return f;
}

template <class T>
Tensor<T> MoEUT<T>::backward(const MoEUTForward<T>& f, const Tensor<T>& dout, T dreg_loss) {
  const ProfileRegion region("kmoe::moeut::backward");
  const MoEUTConfig& c = config_;
  require(!f.out.empty(), Status::invalid_argument, "MoEUT::backward: the forward result is empty");
  require(!f.cached, Status::invalid_argument,
          "MoEUT::backward: the forward used a KV cache (inference only); run it without one");
  require(f.kept_records, Status::invalid_argument,
          "MoEUT::backward: the forward kept no records for backward (inference only); run it for backward");
  const int G = c.group_size, R = c.n_repeats();
  require(static_cast<int>(f.calls.size()) == G * R && f.out.rank() == 3 && f.out.dim(2) == c.d_model,
          Status::shape_mismatch, "MoEUT::backward: the forward result (", f.calls.size(), " layer calls, out ",
          f.out.shape().str(), ") does not come from this model (", G * R, " calls, d_model ", c.d_model, ")");
  dout.require_shape(f.out.shape(), "MoEUT::backward: dout");
  const index_t B = f.out.dim(0), T_len = f.out.dim(1), N = B * T_len, D = c.d_model;
  const bool att_moe = c.att_n_experts > 1;
  const index_t H = c.n_heads, Ea = c.att_n_experts, E = c.ff_n_experts;

  // Router-logit gradients from the regularisers, per call (empty in eval or with zero weight).
  std::vector<Tensor<T>> dz_ffn(G * R), dz_o(G * R), dz_v(G * R);
  if (f.training && dreg_loss != T(0)) {
    for (int i = 0; i < G; ++i) {
      const auto ffn = moe::entropy_reg_backward(f.ffn_reg[i], static_cast<T>(dreg_loss * c.entropy_reg));
      for (int r = 0; r < R; ++r) dz_ffn[r * G + i] = ffn[r].reshape({N, E});
      if (!att_moe) continue;
      const T att_coef = static_cast<T>(dreg_loss * c.att_entropy_reg);
      const auto o = moe::entropy_reg_backward(f.att_o_reg[i], att_coef);
      const auto v = moe::entropy_reg_backward(f.att_v_reg[i], att_coef);
      for (int r = 0; r < R; ++r) {
        dz_o[r * G + i] = o[r].reshape({B, T_len, H, Ea});
        dz_v[r * G + i] = v[r].reshape({B, T_len, H, Ea});
      }
    }
  }

  Tensor<T> dh = dout.reshape({N, D}).clone("moeut::dh");
  for (int call = G * R - 1; call >= 0; --call) {
    const int i = call % G;
    const MoEUTLayerForward<T>& lf = f.calls[call];
    const MoEUTNorms<T>& norms = norms_[i];
    MoEUTNorms<T>& ngrads = norm_grads_[i];
    // out = mid + σ-MoE(mid, LN2(mid)): dmid = dout + dx_experts + LN2'(dsel).
    const SigmaMoEInputGrads<T> g = ffn_[i]->backward_with_router(lf.ffn, dh, T(0), dz_ffn[call]);
    Tensor<T> dmid = moeut_impl::add(dh, g.dx, "moeut::dmid");
    moeut_impl::layer_norm_backward_accumulate(lf.mid, norms.ln2_weight, lf.ln2_mean, lf.ln2_rstd, g.dsel_input, dmid,
                                               ngrads.ln2_weight, ngrads.ln2_bias);
    // mid = x + Dropout(attention(LN1(x), LN1(x), x)).
    Tensor<T> dattended = dmid;
    if (f.training && c.dropout > 0) {
      dattended = Tensor<T>::uninitialized("moeut::dattended", {N, D});
      ops::dropout_backward<T>(dmid.flat(), static_cast<T>(c.dropout), lf.dropout_stream, dattended.flat());
    }
    const auto ag = attention_[i]->backward(lf.attention, dattended.reshape({B, T_len, D}), dz_o[call], dz_v[call]);
    const Tensor<T> x_in = lf.attention.v_src;
    dh = moeut_impl::add(dmid, ag.dv_src.reshape({N, D}), "moeut::dh");
    moeut_impl::layer_norm_backward_accumulate(x_in, norms.ln1_weight, lf.ln1_mean, lf.ln1_rstd,
                                               ag.dqk_src.reshape({N, D}), dh, ngrads.ln1_weight, ngrads.ln1_bias);
  }
  return dh.reshape({B, T_len, D});
}

// ---------------------------------------------------------------------------------------------
// MoEUTLM

namespace moeut_impl {

template <class T>
MoEUTConfig validated_lm(const MoEUTConfig& config) {
  require(config.n_tokens >= 1, Status::invalid_argument, "MoEUTLM: n_tokens = ", config.n_tokens,
          " must be at least 1");
  return config;
}

}  // namespace moeut_impl

template <class T>
MoEUTLM<T>::MoEUTLM(const MoEUTConfig& config, std::uint64_t seed, ParameterInit init, const dist::Communicator& comm)
    : config_(moeut_impl::validated_lm<T>(config)), transformer_(config, moeut_impl::child_seed(seed, 1000), init, comm) {
  const index_t V = config_.n_tokens, D = config_.d_model;
  embedding_ = Tensor<T>("moeut_lm::embedding.weight", {V, D});
  lm_head_weight_ = Tensor<T>("moeut_lm::lm_head.weight", {V, D});
  lm_head_bias_ = Tensor<T>("moeut_lm::lm_head.bias", {V});
  out_norm_weight_ = moeut_impl::filled<T>("moeut_lm::out_norm.weight", D, T(1));
  out_norm_bias_ = Tensor<T>("moeut_lm::out_norm.bias", {D});
  Generator generator(moeut_impl::child_seed(seed, 1001), init);
  moeut_init::fill_normal(embedding_, generator, 1 / std::sqrt(static_cast<double>(D)));
  const double bound = 1 / std::sqrt(static_cast<double>(D));
  moeut_init::fill_uniform(lm_head_weight_, generator, bound);
  moeut_init::fill_uniform(lm_head_bias_, generator, bound);
  embedding_grad_ = Tensor<T>("grad::embedding.weight", {V, D});
  lm_head_weight_grad_ = Tensor<T>("grad::lm_head.weight", {V, D});
  lm_head_bias_grad_ = Tensor<T>("grad::lm_head.bias", {V});
  out_norm_weight_grad_ = Tensor<T>("grad::out_norm.weight", {D});
  out_norm_bias_grad_ = Tensor<T>("grad::out_norm.bias", {D});
}

template <class T>
void MoEUTLM<T>::visit_parameters(const model::ParameterVisitor<T>& visit, const std::string& prefix) {
  const auto dense = [&](const char* name, Tensor<T>& param, Tensor<T>& grad) {
    auto entry = model::dense_parameter(prefix + name, param, grad);
    visit(entry);
  };
  dense("embedding.weight", embedding_, embedding_grad_);
  transformer_.visit_parameters(visit, prefix + "transformer.");
  dense("out_norm.weight", out_norm_weight_, out_norm_weight_grad_);
  dense("out_norm.bias", out_norm_bias_, out_norm_bias_grad_);
  dense("lm_head.weight", lm_head_weight_, lm_head_weight_grad_);
  dense("lm_head.bias", lm_head_bias_, lm_head_bias_grad_);
}

template <class T>
index_t MoEUTLM<T>::parameter_count() {
  return model::parameter_count(model::collect_parameters(*this));
}

template <class T>
void MoEUTLM<T>::zero_grad() {
  model::zero_gradients(model::collect_parameters(*this));
}

template <class T>
MoEUTLMForward<T> MoEUTLM<T>::forward(const Tensor<int>& tokens, const std::optional<ops::AttentionMask>& mask,
                                      bool training, Generator& rng, MoEUTCache<T>* cache,
                                      bool for_backward) const {
  const ProfileRegion region("kmoe::moeut_lm::forward");
  const index_t D = config_.d_model, V = config_.n_tokens;
  const dist::Communicator& comm = transformer_.communicator();
  comm.collectively([&] {
    require(tokens.rank() == 2 && (tokens.size() >= 1 || (comm.distributed() && tokens.dim(1) >= 1)),
            Status::shape_mismatch, "MoEUTLM::forward: tokens is ", tokens.shape().str(), ", expected a non-empty [B, T]");
  });
  const index_t B = tokens.dim(0), T_len = tokens.dim(1), N = B * T_len;
  MoEUTLMForward<T> f;
  f.tokens = tokens.reshape({N});
  const auto embedded = Tensor<T>::uninitialized("moeut_lm::embedded", {N, D});
  ops::embedding_forward<T>(f.tokens.flat(), embedding_.as_matrix(), embedded.as_matrix());
  ops::AttentionMask causal;
  causal.causal = true;
  f.body = transformer_.forward(embedded.reshape({B, T_len, D}), mask.value_or(causal), training, rng, cache,
                                for_backward);
  f.reg_loss = f.body.reg_loss;
  f.normed = moeut_impl::layer_norm(f.body.out.reshape({N, D}), out_norm_weight_, out_norm_bias_, f.norm_mean,
                                    f.norm_rstd, "moeut_lm::normed");
  const auto logits = Tensor<T>::uninitialized("moeut_lm::logits", {N, V});
  ops::linear_forward<T>(f.normed.as_matrix(), lm_head_weight_.as_matrix(), lm_head_bias_.flat(), logits.as_matrix());
  f.logits = logits.reshape({B, T_len, V});
  return f;
}

template <class T>
void MoEUTLM<T>::backward(const MoEUTLMForward<T>& f, const Tensor<T>& dlogits, T dreg_loss) {
  const ProfileRegion region("kmoe::moeut_lm::backward");
  require(!f.logits.empty(), Status::invalid_argument, "MoEUTLM::backward: the forward result is empty");
  dlogits.require_shape(f.logits.shape(), "MoEUTLM::backward: dlogits");
  const index_t N = f.normed.dim(0), D = config_.d_model, V = config_.n_tokens;
  const auto dnormed = Tensor<T>::uninitialized("moeut_lm::dnormed", {N, D});
  ops::linear_backward<T>(f.normed.as_matrix(), lm_head_weight_.as_matrix(), dlogits.reshape({N, V}).as_matrix(),
                          dnormed.as_matrix(), lm_head_weight_grad_.as_matrix(), lm_head_bias_grad_.flat());
  const auto dbody = Tensor<T>::uninitialized("moeut_lm::dbody", {N, D});
  ops::layer_norm_backward<T>(f.body.out.reshape({N, D}).as_matrix(), out_norm_weight_.flat(), f.norm_mean.flat(),
                              f.norm_rstd.flat(), dnormed.as_matrix(), dbody.as_matrix(), out_norm_weight_grad_.flat(),
                              out_norm_bias_grad_.flat());
  const Tensor<T> dembedded = transformer_.backward(f.body, dbody.reshape(f.body.out.shape()), dreg_loss);
  ops::embedding_backward<T>(f.tokens.flat(), dembedded.reshape({N, D}).as_matrix(), embedding_grad_.as_matrix());
}

template <class T>
Tensor<int> MoEUTLM<T>::generate(const Tensor<int>& prompt, int n_new) const {
  require(prompt.rank() == 2 && prompt.size() >= 1, Status::shape_mismatch, "MoEUTLM::generate: prompt is ",
          prompt.shape().str(), ", expected a non-empty [B, T0]");
  require(n_new >= 0, Status::invalid_argument, "MoEUTLM::generate: n_new = ", n_new, " must not be negative");
  const index_t B = prompt.dim(0), T0 = prompt.dim(1), V = config_.n_tokens;
  std::vector<int> out(static_cast<std::size_t>(B * (T0 + n_new)));
  const std::vector<int> p = prompt.to_host();
  for (index_t b = 0; b < B; ++b)
    for (index_t t = 0; t < T0; ++t) out[b * (T0 + n_new) + t] = p[b * T0 + t];
  MoEUTCache<T> cache;
  Generator rng(0);  // eval: nothing is drawn
  Tensor<int> step = prompt;
  for (int s = 0; s < n_new; ++s) {
    const MoEUTLMForward<T> f = forward(step, std::nullopt, false, rng, &cache);
    const index_t len = step.dim(1);
    const std::vector<T> logits = f.logits.to_host();
    std::vector<int> next(B);
    for (index_t b = 0; b < B; ++b) {  // argmax of the last position (ties: lowest id)
      const T* row = logits.data() + ((b * len) + len - 1) * V;
      index_t best = 0;
      for (index_t v = 1; v < V; ++v)
        if (row[v] > row[best]) best = v;
      next[b] = static_cast<int>(best);
      out[b * (T0 + n_new) + T0 + s] = next[b];
    }
    step = Tensor<int>::from_host("moeut_lm::next", {B, 1}, next);
  }
  return Tensor<int>::from_host("moeut_lm::generated", {B, T0 + n_new}, out);
}

template class MoEUT<float>;
template class MoEUT<double>;
template class MoEUTLM<float>;
template class MoEUTLM<double>;

}  // namespace kmoe::layers
