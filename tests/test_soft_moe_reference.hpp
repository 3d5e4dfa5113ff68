// Host reference of Soft MoE in double, written from the two references (class SoftMoE of
// zhaozijie2022/soft-moe@5bf98ffddfb7ace8114fb3834e1ad91f1835572f soft_moe.py and of
// lucidrains/soft-moe-pytorch@f3779d58860bb302a45459fc7ab5c5e24005d46c soft_moe_pytorch/soft_moe.py)
// in their own layouts (torch nn.Linear weights [out, in], φ [dim, E, S], slot_embeds [E, S, dim]),
// for the Soft MoE tests. Straight loops, no kmoe kernels.
#pragma once

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "kmoe/layers/soft_moe.hpp"
#include "kmoe/model/state_dict.hpp"
#include "test_util.hpp"

namespace kmoe::test::soft_moe_reference {

using Vec = std::vector<double>;

inline double activation(ops::Activation a, double v) {
  switch (a) {
    case ops::Activation::identity:
      return v;
    case ops::Activation::relu:
      return v > 0 ? v : 0;
    case ops::Activation::gelu:
      return 0.5 * v * (1 + std::erf(v / std::sqrt(2.0)));
    case ops::Activation::silu:
      return v / (1 + std::exp(-v));
    case ops::Activation::sigmoid:
      return 1 / (1 + std::exp(-v));
  }
  return v;
}

// One expert's parameters in torch layouts; norm vectors empty when that LayerNorm is off.
struct Expert {
  Vec w1, b1, hidden_gamma, hidden_beta, w2, b2, output_gamma, output_beta;
};

// y [rows, out] = x [rows, in] · Wᵀ + b, W [out, in].
inline Vec linear(const Vec& x, const Vec& w, const Vec& b, index_t rows, index_t in, index_t out) {
  Vec y(static_cast<std::size_t>(rows * out));
  for (index_t r = 0; r < rows; ++r)
    for (index_t o = 0; o < out; ++o) {
      double s = b[o];
      for (index_t i = 0; i < in; ++i) s += x[r * in + i] * w[o * in + i];
      y[r * out + o] = s;
    }
  return y;
}

// Row-wise LayerNorm (biased variance) with affine γ, β.
inline Vec layer_norm(const Vec& x, const Vec& gamma, const Vec& beta, index_t rows, index_t width, double eps) {
  Vec y(x.size());
  for (index_t r = 0; r < rows; ++r) {
    double mean = 0, var = 0;
    for (index_t j = 0; j < width; ++j) mean += x[r * width + j];
    mean /= static_cast<double>(width);
    for (index_t j = 0; j < width; ++j) var += (x[r * width + j] - mean) * (x[r * width + j] - mean);
    const double rstd = 1 / std::sqrt(var / static_cast<double>(width) + eps);
    for (index_t j = 0; j < width; ++j) y[r * width + j] = (x[r * width + j] - mean) * rstd * gamma[j] + beta[j];
  }
  return y;
}

// lucidrains' RMSNorm: x / max(‖x‖, eps) · √width · γ.
inline Vec rms_norm(const Vec& x, const Vec& gamma, index_t rows, index_t width, double eps) {
  Vec y(x.size());
  for (index_t r = 0; r < rows; ++r) {
    double sq = 0;
    for (index_t j = 0; j < width; ++j) sq += x[r * width + j] * x[r * width + j];
    const double scale = std::sqrt(static_cast<double>(width)) / std::max(std::sqrt(sq), eps);
    for (index_t j = 0; j < width; ++j) y[r * width + j] = x[r * width + j] * scale * gamma[j];
  }
  return y;
}

// The expert on rows u [rows, dim] (no dropout).
inline Vec expert_forward(const layers::SlotExpertConfig& c, const Expert& p, const Vec& u, index_t rows) {
  const index_t D = c.dim, H = c.hidden, H1 = c.first_width();
  Vec first = linear(u, p.w1, p.b1, rows, D, H1);
  if (c.hidden_layer_norm) first = layer_norm(first, p.hidden_gamma, p.hidden_beta, rows, H1, c.layer_norm_eps);
  Vec h(static_cast<std::size_t>(rows * H));
  for (index_t r = 0; r < rows; ++r)
    for (index_t j = 0; j < H; ++j) {
      const double a = c.glu ? first[r * H1 + j] * activation(c.activation, first[r * H1 + H + j])
                             : activation(c.activation, first[r * H1 + j]);
      h[r * H + j] = c.has_residual() ? u[r * D + j] + a : a;
    }
  Vec q = linear(h, p.w2, p.b2, rows, H, D);
  if (c.output_layer_norm) q = layer_norm(q, p.output_gamma, p.output_beta, rows, D, c.layer_norm_eps);
  for (index_t r = 0; r < rows; ++r)
    for (index_t j = 0; j < D; ++j) {
      const double o = activation(c.output_activation, q[r * D + j]);
      q[r * D + j] = c.has_residual() ? h[r * H + j] + o : o;
    }
  return q;
}

// Parameters and buffers by state_dict name.
using StateDict = std::map<std::string, Vec>;

// The layer's state_dict entries as tensors, through the registry (model/state_dict.hpp).
template <class T>
struct NamedTensor {
  std::string name;
  Tensor<T> tensor;
};

template <class T>
std::vector<NamedTensor<T>> entries_of(layers::SoftMoE<T>& layer, bool buffers, model::StateOf what) {
  model::ParameterList<T> selected;
  for (const auto& p : model::collect_parameters(layer))
    if ((p.kind == model::ParameterKind::buffer) == buffers) selected.push_back(p);
  std::vector<NamedTensor<T>> out;
  for (const auto& [name, host] : model::state_dict(selected, what))
    out.push_back({name, make_tensor<T>(host.shape, host.values, name)});
  return out;
}
template <class T>
std::vector<NamedTensor<T>> state_entries(layers::SoftMoE<T>& layer) {
  return entries_of(layer, false, model::StateOf::parameters);
}
template <class T>
std::vector<NamedTensor<T>> buffer_entries(layers::SoftMoE<T>& layer) {
  return entries_of(layer, true, model::StateOf::parameters);
}
template <class T>
std::vector<NamedTensor<T>> grad_entries(layers::SoftMoE<T>& layer) {
  return entries_of(layer, false, model::StateOf::gradients);
}
// Sets the named entries (any subset); unknown names and wrong shapes throw.
template <class T>
void load_entries(layers::SoftMoE<T>& layer, const std::vector<NamedTensor<T>>& entries) {
  model::StateDict state;
  for (const auto& e : entries) state[e.name] = {e.tensor.shape(), to_double(e.tensor)};
  model::load_state_dict(model::collect_parameters(layer), state, false);
}

template <class T>
StateDict host_state_dict(layers::SoftMoE<T>& layer) {
  StateDict dict;
  for (const auto& [name, host] : model::state_dict(model::collect_parameters(layer))) dict[name] = host.values;
  return dict;
}

// Loads every parameter of the layer from dict (buffers are the config's; dict must agree).
template <class T>
void load_host_state_dict(layers::SoftMoE<T>& layer, const StateDict& dict) {
  model::StateDict state;
  for (const auto& p : model::collect_parameters(layer))
    for (const auto& entry : model::torch_entries(p))
      if (dict.count(entry.name) != 0) state[entry.name] = {entry.shape, dict.at(entry.name)};
  model::load_state_dict(model::collect_parameters(layer), state, true);
}

inline Expert expert_from_state(const layers::SoftMoEConfig& c, const StateDict& s, int e) {
  const bool lite = c.variant == layers::SoftMoEVariant::lite;
  const std::string prefix = (lite ? "experts." : "experts.experts.") + std::to_string(e) + ".";
  const std::string first = lite ? "fcs.0" : "0", second = lite ? "last_fc" : "3";
  const std::string hidden_norm = lite ? "layer_norms.0" : "hidden_norm",
                    output_norm = lite ? "last_ln" : "output_norm";
  Expert p;
  p.w1 = s.at(prefix + first + ".weight");
  p.b1 = s.at(prefix + first + ".bias");
  p.w2 = s.at(prefix + second + ".weight");
  p.b2 = s.at(prefix + second + ".bias");
  if (c.experts.hidden_layer_norm) {
    p.hidden_gamma = s.at(prefix + hidden_norm + ".weight");
    p.hidden_beta = s.at(prefix + hidden_norm + ".bias");
  }
  if (c.experts.output_layer_norm) {
    p.output_gamma = s.at(prefix + output_norm + ".weight");
    p.output_beta = s.at(prefix + output_norm + ".bias");
  }
  return p;
}

// Everything the layer's forward computes, in double.
struct Result {
  Vec y, logits, dispatch, combine, slots, expert_out;  // [B,n,D] [B,n,Z]x3 [B,Z,D]x2
};

// x as token rows [B, n, dim]; mask [B·n] (1 = valid) or empty. The references' semantics: masked
// logits −max(double), dispatch softmax over n, combine over Z; masked_output zeros zeroes the
// masked tokens' combine rows.
inline Result forward(const layers::SoftMoEConfig& c, const StateDict& s, const Vec& x, index_t B, index_t n,
                      const std::vector<int>& mask) {
  const index_t D = c.dim, E = c.num_experts, S = c.slots_per_expert(), Z = E * S, N = B * n;
  const bool norm = c.normalizes();
  Vec u = x, slot_embeds(static_cast<std::size_t>(Z * D));
  if (norm) {
    if (c.use_layernorm) {
      u = layer_norm(x, s.at("norm.gamma"), s.at("norm.beta"), N, D, c.layer_norm_eps);
      slot_embeds =
          layer_norm(s.at("slot_embeds"), s.at("slot_norm.gamma"), s.at("slot_norm.beta"), Z, D, c.layer_norm_eps);
    } else {
      u = rms_norm(x, s.at("norm.gamma"), N, D, c.rms_norm_eps);
      slot_embeds = rms_norm(s.at("slot_embeds"), s.at("slot_norm.gamma"), Z, D, c.rms_norm_eps);
    }
  } else {
    const Vec& phi = s.at("phi");  // [D, Z]
    for (index_t z = 0; z < Z; ++z)
      for (index_t d = 0; d < D; ++d) slot_embeds[z * D + d] = phi[d * Z + z];
  }
  Result r;
  r.logits.assign(static_cast<std::size_t>(N * Z), 0.0);
  for (index_t t = 0; t < N; ++t)
    for (index_t z = 0; z < Z; ++z) {
      double l = 0;
      for (index_t d = 0; d < D; ++d) l += u[t * D + d] * slot_embeds[z * D + d];
      r.logits[t * Z + z] = !mask.empty() && mask[t] == 0 ? -std::numeric_limits<double>::max() : l;
    }
  r.dispatch.assign(r.logits.size(), 0.0);
  r.combine.assign(r.logits.size(), 0.0);
  for (index_t b = 0; b < B; ++b)
    for (index_t z = 0; z < Z; ++z) {
      double m = -std::numeric_limits<double>::infinity(), sum = 0;
      for (index_t t = 0; t < n; ++t) m = std::max(m, r.logits[(b * n + t) * Z + z]);
      for (index_t t = 0; t < n; ++t) sum += std::exp(r.logits[(b * n + t) * Z + z] - m);
      for (index_t t = 0; t < n; ++t)
        r.dispatch[(b * n + t) * Z + z] = std::exp(r.logits[(b * n + t) * Z + z] - m) / sum;
    }
  for (index_t t = 0; t < N; ++t) {
    double m = -std::numeric_limits<double>::infinity(), sum = 0;
    for (index_t z = 0; z < Z; ++z) m = std::max(m, r.logits[t * Z + z]);
    for (index_t z = 0; z < Z; ++z) sum += std::exp(r.logits[t * Z + z] - m);
    const bool zero = !mask.empty() && mask[t] == 0 && c.masked_output == layers::MaskedTokenOutput::zeros;
    for (index_t z = 0; z < Z; ++z) r.combine[t * Z + z] = zero ? 0.0 : std::exp(r.logits[t * Z + z] - m) / sum;
  }
  r.slots.assign(static_cast<std::size_t>(B * Z * D), 0.0);
  for (index_t b = 0; b < B; ++b)
    for (index_t z = 0; z < Z; ++z)
      for (index_t d = 0; d < D; ++d) {
        double v = 0;
        for (index_t t = 0; t < n; ++t) v += r.dispatch[(b * n + t) * Z + z] * u[(b * n + t) * D + d];
        r.slots[(b * Z + z) * D + d] = v;
      }
  r.expert_out.assign(r.slots.size(), 0.0);
  for (int e = 0; e < E; ++e) {
    const Expert p = expert_from_state(c, s, e);
    for (index_t b = 0; b < B; ++b) {
      const auto first = r.slots.begin() + (b * Z + e * S) * D;
      const Vec out = expert_forward(c.experts, p, Vec(first, first + S * D), S);
      std::copy(out.begin(), out.end(), r.expert_out.begin() + (b * Z + e * S) * D);
    }
  }
  r.y.assign(static_cast<std::size_t>(N * D), 0.0);
  for (index_t b = 0; b < B; ++b)
    for (index_t t = 0; t < n; ++t)
      for (index_t d = 0; d < D; ++d) {
        double v = 0;
        for (index_t z = 0; z < Z; ++z) v += r.combine[(b * n + t) * Z + z] * r.expert_out[(b * Z + z) * D + d];
        r.y[(b * n + t) * D + d] = v;
      }
  return r;
}

}  // namespace kmoe::test::soft_moe_reference
