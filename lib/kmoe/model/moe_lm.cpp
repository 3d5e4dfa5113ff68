#include "kmoe/model/moe_lm.hpp"

#include "kmoe/model/builder.hpp"
#include "kmoe/model/config_fields.hpp"
#include "kmoe/model/moe_stack.hpp"
#include "kmoe/ops/attention.hpp"
#include "kmoe/ops/embedding.hpp"
#include "kmoe/ops/init.hpp"
#include "kmoe/ops/linear.hpp"
#include "kmoe/ops/norms.hpp"

#include <KokkosBlas1_axpby.hpp>

#include <cmath>

namespace kmoe::model {

namespace {

using C = MoELMConfig;

const FieldTable<C>& moe_lm_fields() {
  static const FieldTable<C> table = [] {
    FieldTable<C> t = {
        required_field("n_tokens", &C::n_tokens, at_least(&C::n_tokens, index_t(1))),
        required_field("d_model", &C::d_model, at_least(&C::d_model, index_t(1))),
        required_field("max_seq_len", &C::max_seq_len, at_least(&C::max_seq_len, index_t(1))),
        field("n_layers", &C::n_layers, at_least(&C::n_layers, 1)),
        field("n_heads", &C::n_heads,
              std::function<void(const C&, const std::string&)>([](const C& c, const std::string& where) {
                require(c.n_heads >= 1 && c.d_model % c.n_heads == 0, Status::invalid_argument, where, " = ",
                        c.n_heads, " must divide d_model = ", c.d_model);
              })),
        field("moe_kind", &C::moe_kind, one_of(&C::moe_kind, {"sigma_moe", "st_moe"}, "moe_lm")),
        field("norm_eps", &C::norm_eps, finite_positive(&C::norm_eps)),
    };
    t.push_back(object_field("moe", &C::moe));
    return t;
  }();
  return table;
}

// [B·T, H·Dh] rows ↔ [B, H, T, Dh] heads.
template <class T>
void to_heads(const Tensor<T>& rows, index_t B, index_t Tn, index_t H, const Tensor<T>& heads) {
  const View1<T> from = rows.flat(), to = heads.flat();
  const index_t Dh = rows.dim(1) / H;
  Kokkos::parallel_for(
      "kmoe::moe_lm::to_heads", Kokkos::RangePolicy<ExecSpace>(0, B * Tn * H * Dh), KOKKOS_LAMBDA(const index_t i) {
        const index_t d = i % Dh, h = (i / Dh) % H, t = (i / (Dh * H)) % Tn, b = i / (Dh * H * Tn);
        to(((b * H + h) * Tn + t) * Dh + d) = from(i);
      });
}

template <class T>
void from_heads(const Tensor<T>& heads, index_t B, index_t Tn, index_t H, const Tensor<T>& rows) {
  const View1<T> from = heads.flat(), to = rows.flat();
  const index_t Dh = rows.dim(1) / H;
  Kokkos::parallel_for(
      "kmoe::moe_lm::from_heads", Kokkos::RangePolicy<ExecSpace>(0, B * Tn * H * Dh), KOKKOS_LAMBDA(const index_t i) {
        const index_t d = i % Dh, h = (i / Dh) % H, t = (i / (Dh * H)) % Tn, b = i / (Dh * H * Tn);
        to(i) = from(((b * H + h) * Tn + t) * Dh + d);
      });
}

// A LayerNorm's affine parameters and their gradients.
template <class T>
struct Norm {
  Tensor<T> weight, bias, weight_grad, bias_grad;
  explicit Norm(index_t D)
      : weight("moe_lm::norm.weight", {D}), bias("moe_lm::norm.bias", {D}), weight_grad("moe_lm::norm.weight.grad", {D}),
        bias_grad("moe_lm::norm.bias.grad", {D}) {
    weight.fill(T(1));
  }
  void visit(const ParameterVisitor<T>& v, const std::string& name) {
    auto w = dense_parameter(name + ".weight", weight, weight_grad);
    auto b = dense_parameter(name + ".bias", bias, bias_grad);
    v(w);
    v(b);
  }
  struct Saved {
    Tensor<T> x, y, mean, rstd;
  };
  Saved forward(const Tensor<T>& x, double eps) const {
    const index_t N = x.dim(0), D = x.dim(1);
    Saved s{x, Tensor<T>::uninitialized("moe_lm::normed", {N, D}), Tensor<T>::uninitialized("moe_lm::mean", {N}),
            Tensor<T>::uninitialized("moe_lm::rstd", {N})};
    ops::layer_norm_forward<T>(x.as_matrix(), weight.flat(), bias.flat(), static_cast<T>(eps), s.y.as_matrix(),
                               s.mean.flat(), s.rstd.flat());
    return s;
  }
  // dx += LNᵀ · dy.
  void backward(const Saved& s, const Tensor<T>& dy, const Tensor<T>& dx) {
    auto d = Tensor<T>::uninitialized("moe_lm::dnorm", s.x.shape());
    ops::layer_norm_backward<T>(s.x.as_matrix(), weight.flat(), s.mean.flat(), s.rstd.flat(), dy.as_matrix(),
                                d.as_matrix(), weight_grad.flat(), bias_grad.flat());
    KokkosBlas::axpy(T(1), d.flat(), dx.flat());
  }
};

template <class T>
class MoELM final : public Layer<T> {
 public:
  MoELM(const C& c, std::uint64_t seed, ParameterInit init, const dist::Communicator& comm)
      : config_(c), comm_(comm), json_(write_fields(moe_lm_fields(), c)), out_norm_(c.d_model) {
    const index_t D = c.d_model, V = c.n_tokens;
    Generator rng(seed, init);
    const auto normal = [&](Tensor<T>& t, double std) {
      ops::fill_normal<T>(t.flat(), rng.take(static_cast<std::uint64_t>(t.size())), T(0), static_cast<T>(std));
    };
    embedding_ = Tensor<T>("moe_lm::embedding", {V, D});
    position_ = Tensor<T>("moe_lm::position", {c.max_seq_len, D});
    lm_head_ = Tensor<T>("moe_lm::lm_head", {V, D});
    embedding_grad_ = Tensor<T>("moe_lm::embedding.grad", {V, D});
    position_grad_ = Tensor<T>("moe_lm::position.grad", {c.max_seq_len, D});
    lm_head_grad_ = Tensor<T>("moe_lm::lm_head.grad", {V, D});
    normal(embedding_, 0.02);
    normal(position_, 0.02);
    normal(lm_head_, 1 / std::sqrt(static_cast<double>(D)));
    const nlohmann::json moe = with_model_width(c.moe_kind, c.moe, D, "moe_lm config");
    for (int b = 0; b < c.n_layers; ++b) {
      auto block = std::make_unique<Block>(D);
      for (int i = 0; i < 4; ++i) {
        block->w[i] = Tensor<T>("moe_lm::attention", {D, D});
        block->w_grad[i] = Tensor<T>("moe_lm::attention.grad", {D, D});
        normal(block->w[i], 1 / std::sqrt(static_cast<double>(D)));
      }
      block->moe = build_layer<T>(c.moe_kind, moe, seed * 1000003 + static_cast<std::uint64_t>(b) + 1, init, comm);
      blocks_.push_back(std::move(block));
    }
    json_["moe"] = blocks_.front()->moe->config();
  }

  const std::string& kind() const override {
    static const std::string name = "moe_lm";
    return name;
  }
  nlohmann::json config() const override { return json_; }
  const dist::Communicator& communicator() const override { return comm_; }

  void visit_parameters(const ParameterVisitor<T>& visit, const std::string& prefix) override {
    auto e = dense_parameter(prefix + "embedding.weight", embedding_, embedding_grad_);
    auto p = dense_parameter(prefix + "position.weight", position_, position_grad_);
    visit(e);
    visit(p);
    const char* names[] = {"q", "k", "v", "o"};
    for (std::size_t b = 0; b < blocks_.size(); ++b) {
      Block& block = *blocks_[b];
      const std::string at = prefix + "blocks." + std::to_string(b) + ".";
      block.ln1.visit(visit, at + "ln1");
      for (int i = 0; i < 4; ++i) {
        auto w = dense_parameter(at + "attention." + names[i] + ".weight", block.w[i], block.w_grad[i]);
        visit(w);
      }
      block.ln2.visit(visit, at + "ln2");
      block.moe->visit_parameters(visit, at + "moe.");
    }
    out_norm_.visit(visit, prefix + "out_norm");
    auto head = dense_parameter(prefix + "lm_head.weight", lm_head_, lm_head_grad_);
    visit(head);
  }

  struct BlockForward {
    typename Norm<T>::Saved ln1, ln2;
    Tensor<T> q, k, v, probs, attended;  // heads [B, H, T, Dh], probs [B, H, T, T], attended rows [N, D]
    Tensor<T> mid;                       // h + attention [N, D]
    LayerForward<T> moe;
  };
  struct Forward {
    Tensor<int> ids;  // [N]
    index_t B = 0, Tn = 0;
    std::vector<BlockForward> blocks;
    typename Norm<T>::Saved out_norm;
  };

  LayerForward<T> forward(const LayerInputs<T>& in, bool training, Generator& rng) const override {
    const C& c = config_;
    require(!in.tokens.empty() && in.x.empty(), Status::invalid_argument, "moe_lm takes token ids [B, T]");
    require(in.tokens.rank() == 2 && in.tokens.dim(1) >= 1 && in.tokens.dim(1) <= c.max_seq_len, Status::shape_mismatch,
            "moe_lm: tokens are ", in.tokens.shape().str(), ", expected [B, T] with 1 ≤ T ≤ max_seq_len = ",
            c.max_seq_len);
    const index_t B = in.tokens.dim(0), Tn = in.tokens.dim(1), N = B * Tn, D = c.d_model, H = c.n_heads, Dh = D / H;
    const std::vector<int> ids = in.tokens.to_host();
    for (const int id : ids)
      require(id >= 0 && id < c.n_tokens, Status::invalid_argument, "moe_lm: token id ", id, " outside [0, ",
              c.n_tokens, ")");
    Forward f;
    f.ids = in.tokens.reshape({N});
    f.B = B;
    f.Tn = Tn;
    Tensor<T> h = Tensor<T>::uninitialized("moe_lm::h", {N, D});
    if (N > 0) {
      ops::embedding_forward<T>(f.ids.flat(), embedding_.as_matrix(), h.as_matrix());
      const View2<T> hv = h.as_matrix();
      const View2<const T> pos = position_.as_matrix();
      Kokkos::parallel_for(
          "kmoe::moe_lm::position", md_range<2>({0, 0}, {N, D}),
          KOKKOS_LAMBDA(const index_t n, const index_t d) { hv(n, d) += pos(n % Tn, d); });
    }
    std::map<std::string, double> losses;
    Tensor<std::int64_t> counts;  // summed over the blocks' MoE layers
    T aux = T(0);
    const T scale = static_cast<T>(1 / std::sqrt(static_cast<double>(Dh)));
    ops::AttentionMask causal;
    causal.causal = true;
    for (const auto& block : blocks_) {
      BlockForward bf;
      Tensor<T> projected[3];
      if (N > 0) bf.ln1 = block->ln1.forward(h, c.norm_eps);
      Tensor<T>* heads[3] = {&bf.q, &bf.k, &bf.v};
      for (int i = 0; i < 3; ++i) {
        projected[i] = Tensor<T>::uninitialized("moe_lm::projected", {N, D});
        *heads[i] = Tensor<T>::uninitialized("moe_lm::heads", {B, H, Tn, Dh});
        if (N == 0) continue;
        ops::linear_forward<T>(bf.ln1.y.as_matrix(), block->w[i].as_matrix(), View1<const T>(), projected[i].as_matrix());
        to_heads(projected[i], B, Tn, H, *heads[i]);
      }
      bf.probs = Tensor<T>::uninitialized("moe_lm::probs", {B, H, Tn, Tn});
      auto out_heads = Tensor<T>::uninitialized("moe_lm::out_heads", {B, H, Tn, Dh});
      bf.attended = Tensor<T>::uninitialized("moe_lm::attended", {N, D});
      bf.mid = h.clone("moe_lm::mid");
      if (N > 0) {
        ops::attention_forward<T>(bf.q.template view<4>(), bf.k.template view<4>(), bf.v.template view<4>(), scale,
                                  causal, bf.probs.template view<4>(), out_heads.template view<4>());
        from_heads(out_heads, B, Tn, H, bf.attended);
        auto a = Tensor<T>::uninitialized("moe_lm::a", {N, D});
        ops::linear_forward<T>(bf.attended.as_matrix(), block->w[3].as_matrix(), View1<const T>(), a.as_matrix());
        KokkosBlas::axpy(T(1), a.flat(), bf.mid.flat());
        bf.ln2 = block->ln2.forward(bf.mid, c.norm_eps);
      } else {
        bf.ln2.y = Tensor<T>("moe_lm::normed", {0, D});
      }
      LayerInputs<T> moe_in;
      moe_in.x = bf.ln2.y.reshape({B, Tn, D});
      bf.moe = block->moe->forward(moe_in, training, rng);
      aux += bf.moe.aux_loss;
      add_counts(counts, bf.moe.expert_counts);
      for (const auto& [name, value] : bf.moe.losses) losses[name] += value;
      h = bf.mid.clone("moe_lm::h");
      if (N > 0) KokkosBlas::axpy(T(1), bf.moe.out.flat(), h.flat());
      f.blocks.push_back(std::move(bf));
    }
    auto logits = Tensor<T>::uninitialized("moe_lm::logits", {B, Tn, c.n_tokens});
    if (N > 0) {
      f.out_norm = out_norm_.forward(h, c.norm_eps);
      ops::linear_forward<T>(f.out_norm.y.as_matrix(), lm_head_.as_matrix(), View1<const T>(),
                             logits.reshape({N, c.n_tokens}).as_matrix());
    }
    LayerForward<T> out;
    out.out = logits;
    out.training = training;
    out.aux_loss = aux;
    out.losses = losses;
    out.expert_counts = counts;
    out.state = std::make_shared<const Forward>(std::move(f));
    return out;
  }

  Tensor<T> backward(const LayerForward<T>& forward, const Tensor<T>& dout, T aux_weight) override {
    const C& c = config_;
    const Forward& f = forward.template state_as<Forward>();
    const index_t B = f.B, Tn = f.Tn, N = B * Tn, D = c.d_model, H = c.n_heads, Dh = D / H;
    dout.require_shape({B, Tn, c.n_tokens}, "moe_lm::backward: dlogits");
    Tensor<T> dh("moe_lm::dh", {N, D});
    if (N > 0) {
      auto dnormed = Tensor<T>::uninitialized("moe_lm::dnormed", {N, D});
      ops::linear_backward<T>(f.out_norm.y.as_matrix(), lm_head_.as_matrix(), dout.reshape({N, c.n_tokens}).as_matrix(),
                              dnormed.as_matrix(), lm_head_grad_.as_matrix(), View1<T>());
      out_norm_.backward(f.out_norm, dnormed, dh);
    }
    const T scale = static_cast<T>(1 / std::sqrt(static_cast<double>(Dh)));
    for (std::size_t b = blocks_.size(); b-- > 0;) {
      Block& block = *blocks_[b];
      const BlockForward& bf = f.blocks[b];
      // h = mid + moe(LN2(mid)): dmid = dh + LN2ᵀ · moeᵀ · dh.
      const Tensor<T> dmoe_in = block.moe->backward(bf.moe, dh.reshape({B, Tn, D}), aux_weight);
      if (N == 0) continue;
      block.ln2.backward(bf.ln2, dmoe_in.reshape({N, D}), dh);
      // mid = h + Wo · attention(...): dh += (the attention's input gradient through LN1).
      auto dattended = Tensor<T>::uninitialized("moe_lm::dattended", {N, D});
      ops::linear_backward<T>(bf.attended.as_matrix(), block.w[3].as_matrix(), dh.as_matrix(), dattended.as_matrix(),
                              block.w_grad[3].as_matrix(), View1<T>());
      auto dout_heads = Tensor<T>::uninitialized("moe_lm::dout_heads", {B, H, Tn, Dh});
      to_heads(dattended, B, Tn, H, dout_heads);
      Tensor<T> dheads[3];
      for (auto& d : dheads) d = Tensor<T>::uninitialized("moe_lm::dheads", {B, H, Tn, Dh});
      ops::attention_backward<T>(bf.q.template view<4>(), bf.k.template view<4>(), bf.v.template view<4>(), scale,
                                 bf.probs.template view<4>(), dout_heads.template view<4>(),
                                 dheads[0].template view<4>(), dheads[1].template view<4>(), dheads[2].template view<4>());
      Tensor<T> dln1("moe_lm::dln1", {N, D});
      for (int i = 0; i < 3; ++i) {
        auto drows = Tensor<T>::uninitialized("moe_lm::drows", {N, D});
        from_heads(dheads[i], B, Tn, H, drows);
        auto dx = Tensor<T>::uninitialized("moe_lm::dx", {N, D});
        ops::linear_backward<T>(bf.ln1.y.as_matrix(), block.w[i].as_matrix(), drows.as_matrix(), dx.as_matrix(),
                                block.w_grad[i].as_matrix(), View1<T>());
        KokkosBlas::axpy(T(1), dx.flat(), dln1.flat());
      }
      block.ln1.backward(bf.ln1, dln1, dh);
    }
    if (N > 0) {
      ops::embedding_backward<T>(f.ids.flat(), dh.as_matrix(), embedding_grad_.as_matrix());
      // position[t] += Σ_b dh[b·T + t], in batch order.
      const View2<const T> d = dh.as_matrix();
      const View2<T> dpos = position_grad_.as_matrix();
      Kokkos::parallel_for(
          "kmoe::moe_lm::position_grad", md_range<2>({0, 0}, {Tn, D}),
          KOKKOS_LAMBDA(const index_t t, const index_t j) {
            T sum = T(0);
            for (index_t bb = 0; bb < B; ++bb) sum += d(bb * Tn + t, j);
            dpos(t, j) += sum;
          });
    }
    return Tensor<T>();
  }

 protected:
  void* concrete(const std::type_info&) override { return nullptr; }

 private:
  struct Block {
    explicit Block(index_t D) : ln1(D), ln2(D) {}
    Norm<T> ln1, ln2;
    Tensor<T> w[4], w_grad[4];  // q, k, v, o [D, D]
    std::unique_ptr<Layer<T>> moe;
  };

  C config_;
  dist::Communicator comm_;
  nlohmann::json json_;
  Tensor<T> embedding_, position_, lm_head_, embedding_grad_, position_grad_, lm_head_grad_;
  Norm<T> out_norm_;
  std::vector<std::unique_ptr<Block>> blocks_;
};

}  // namespace

MoELMConfig read_moe_lm_config(const nlohmann::json& json) {
  MoELMConfig c = read_fields(moe_lm_fields(), json, "moe_lm config");
  (void)with_model_width(c.moe_kind, c.moe, c.d_model, "moe_lm config");
  return c;
}

template <class T>
std::unique_ptr<Layer<T>> make_moe_lm(const MoELMConfig& config, std::uint64_t seed, ParameterInit init,
                                      const dist::Communicator& comm) {
  return std::make_unique<MoELM<T>>(config, seed, init, comm);
}

template std::unique_ptr<Layer<float>> make_moe_lm<float>(const MoELMConfig&, std::uint64_t, ParameterInit,
                                                          const dist::Communicator&);
template std::unique_ptr<Layer<double>> make_moe_lm<double>(const MoELMConfig&, std::uint64_t, ParameterInit,
                                                            const dist::Communicator&);

}  // namespace kmoe::model
