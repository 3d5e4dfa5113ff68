#include "kmoe/model/moe_stack.hpp"

#include "kmoe/model/builder.hpp"
#include "kmoe/model/config_fields.hpp"
#include "kmoe/ops/init.hpp"
#include "kmoe/ops/linear.hpp"
#include "kmoe/ops/norms.hpp"

#include <KokkosBlas1_axpby.hpp>

#include <cmath>

namespace kmoe::model {

namespace {

using C = MoEStackConfig;

const FieldTable<C>& moe_stack_fields() {
  static const FieldTable<C> table = [] {
    FieldTable<C> t = {
        required_field("d_in", &C::d_in, at_least(&C::d_in, index_t(1))),
        required_field("d_out", &C::d_out, at_least(&C::d_out, index_t(1))),
        required_field("d_model", &C::d_model, at_least(&C::d_model, index_t(1))),
        field("n_blocks", &C::n_blocks, at_least(&C::n_blocks, 1)),
        field("moe_kind", &C::moe_kind, one_of(&C::moe_kind, {"sigma_moe", "st_moe", "soft_moe_lite"}, "moe_stack")),
        field("norm_eps", &C::norm_eps, finite_positive(&C::norm_eps)),
    };
    t.push_back(object_field("moe", &C::moe));
    return t;
  }();
  return table;
}

template <class T>
class MoEStack final : public Layer<T> {
 public:
  MoEStack(const C& c, std::uint64_t seed, ParameterInit init, const dist::Communicator& comm)
      : config_(c), comm_(comm), json_(write_moe_stack_config(c)) {
    const index_t D = c.d_model;
    w_in_ = Tensor<T>("moe_stack::input.weight", {D, c.d_in});
    b_in_ = Tensor<T>("moe_stack::input.bias", {D});
    w_out_ = Tensor<T>("moe_stack::output.weight", {c.d_out, D});
    b_out_ = Tensor<T>("moe_stack::output.bias", {c.d_out});
    for (Tensor<T>* t : {&w_in_, &b_in_, &w_out_, &b_out_}) grads_.emplace_back(t->label() + ".grad", t->shape());
    // torch.nn.Linear's default: U(-1/√in, 1/√in) for weight and bias.
    Generator rng(seed, init);
    const auto uniform = [&](Tensor<T>& t, index_t fan_in) {
      const T bound = static_cast<T>(1 / std::sqrt(static_cast<double>(fan_in)));
      ops::fill_uniform<T>(t.flat(), rng.take(static_cast<std::uint64_t>(t.size())), -bound, bound);
    };
    uniform(w_in_, c.d_in);
    uniform(b_in_, c.d_in);
    uniform(w_out_, D);
    uniform(b_out_, D);
    const nlohmann::json moe = with_model_width(c.moe_kind, c.moe, c.d_model, "moe_stack config");
    for (int b = 0; b < c.n_blocks; ++b) {
      Block block;
      block.norm_weight = Tensor<T>("moe_stack::norm.weight", {D});
      block.norm_weight.fill(T(1));
      block.norm_bias = Tensor<T>("moe_stack::norm.bias", {D});
      block.norm_weight_grad = Tensor<T>("moe_stack::norm.weight.grad", {D});
      block.norm_bias_grad = Tensor<T>("moe_stack::norm.bias.grad", {D});
      block.moe = build_layer<T>(c.moe_kind, moe, seed * 1000003 + static_cast<std::uint64_t>(b) + 1, init, comm);
      blocks_.push_back(std::move(block));
    }
    json_["moe"] = blocks_.front().moe->config();  // complete: every key of the MoE, defaults included
  }

  const std::string& kind() const override {
    static const std::string name = "moe_stack";
    return name;
  }
  nlohmann::json config() const override { return json_; }
  const dist::Communicator& communicator() const override { return comm_; }

  void visit_parameters(const ParameterVisitor<T>& visit, const std::string& prefix) override {
    const char* names[] = {"input.weight", "input.bias", "output.weight", "output.bias"};
    Tensor<T>* tensors[] = {&w_in_, &b_in_, &w_out_, &b_out_};
    for (int i = 0; i < 2; ++i) {
      auto p = dense_parameter(prefix + names[i], *tensors[i], grads_[static_cast<std::size_t>(i)]);
      visit(p);
    }
    for (std::size_t b = 0; b < blocks_.size(); ++b) {
      const std::string at = prefix + "blocks." + std::to_string(b) + ".";
      auto w = dense_parameter(at + "norm.weight", blocks_[b].norm_weight, blocks_[b].norm_weight_grad);
      auto bias = dense_parameter(at + "norm.bias", blocks_[b].norm_bias, blocks_[b].norm_bias_grad);
      visit(w);
      visit(bias);
      blocks_[b].moe->visit_parameters(visit, at + "moe.");
    }
    for (int i = 2; i < 4; ++i) {
      auto p = dense_parameter(prefix + names[i], *tensors[i], grads_[static_cast<std::size_t>(i)]);
      visit(p);
    }
  }

  struct BlockForward {
    Tensor<T> h, normed, mean, rstd;  // the block's input [N, D], LN(h) and its statistics
    LayerForward<T> moe;
  };
  struct Forward {
    Tensor<T> x, h_out;  // the input, and the last block's output [N, D]
    std::vector<BlockForward> blocks;
  };

  // y for x; with `out` (a forward for backward) also its losses, counts and records (state).
  Tensor<T> run(const LayerInputs<T>& in, bool training, Generator& rng, LayerForward<T>* out) const {
    const C& c = config_;
    require(!in.x.empty(), Status::invalid_argument, "moe_stack: the input x is missing");
    require(in.mask.empty() && !in.attention_mask.has_value() && in.tokens.empty(), Status::invalid_argument,
            "moe_stack takes only x");
    require(in.x.rank() == 2 && in.x.dim(1) == c.d_in, Status::shape_mismatch, "moe_stack: x is ",
            in.x.shape().str(), ", expected [rows, d_in = ", c.d_in, "]");
    const index_t N = in.x.dim(0), D = c.d_model;
    Forward f;
    f.x = in.x;
    Tensor<T> h = Tensor<T>::uninitialized("moe_stack::h", {N, D});
    if (N > 0) ops::linear_forward<T>(in.x.as_matrix(), w_in_.as_matrix(), b_in_.flat(), h.as_matrix());
    for (const Block& block : blocks_) {
      BlockForward bf;
      bf.h = h;
      bf.normed = Tensor<T>::uninitialized("moe_stack::normed", {N, D});
      bf.mean = Tensor<T>::uninitialized("moe_stack::mean", {N});
      bf.rstd = Tensor<T>::uninitialized("moe_stack::rstd", {N});
      if (N > 0)
        ops::layer_norm_forward<T>(h.as_matrix(), block.norm_weight.flat(), block.norm_bias.flat(),
                                   static_cast<T>(c.norm_eps), bf.normed.as_matrix(), bf.mean.flat(), bf.rstd.flat());
      LayerInputs<T> moe_in;
      moe_in.x = sequences() ? bf.normed.reshape({N, 1, D}) : bf.normed;
      Tensor<T> moe_out;
      if (out != nullptr) {
        bf.moe = block.moe->forward(moe_in, training, rng);
        out->aux_loss += bf.moe.aux_loss;
        add_counts(out->expert_counts, bf.moe.expert_counts);
        for (const auto& [name, value] : bf.moe.losses) out->losses[name] += value;
        moe_out = bf.moe.out;
      } else {
        moe_out = block.moe->infer(moe_in, rng);
      }
      Tensor<T> next = h.clone("moe_stack::h");
      if (N > 0) KokkosBlas::axpy(T(1), moe_out.flat(), next.flat());
      h = next;
      if (out != nullptr) f.blocks.push_back(std::move(bf));
    }
    f.h_out = h;
    auto y = Tensor<T>::uninitialized("moe_stack::y", {N, c.d_out});
    if (N > 0) ops::linear_forward<T>(h.as_matrix(), w_out_.as_matrix(), b_out_.flat(), y.as_matrix());
    if (out != nullptr) out->state = std::make_shared<const Forward>(std::move(f));
    return y;
  }

  LayerForward<T> forward(const LayerInputs<T>& in, bool training, Generator& rng) const override {
    LayerForward<T> out;
    out.out = run(in, training, rng, &out);
    out.training = training;
    return out;
  }
  // Keeps no block's records (each block's own inference forward): one block's memory at a time.
  Tensor<T> infer(const LayerInputs<T>& in, Generator& rng) const override {
    return run(in, false, rng, nullptr);
  }

  Tensor<T> backward(const LayerForward<T>& forward, const Tensor<T>& dout, T aux_weight) override {
    const C& c = config_;
    const Forward& f = forward.template state_as<Forward>();
    const index_t N = f.x.dim(0), D = c.d_model;
    dout.require_shape({N, c.d_out}, "moe_stack::backward: dout");
    Tensor<T> dh("moe_stack::dh", {N, D});
    if (N > 0)
      ops::linear_backward<T>(f.h_out.as_matrix(), w_out_.as_matrix(), dout.as_matrix(), dh.as_matrix(),
                              grads_[2].as_matrix(), grads_[3].flat());
    for (std::size_t b = blocks_.size(); b-- > 0;) {
      const BlockForward& bf = f.blocks[b];
      const Tensor<T> dmoe_out = sequences() ? dh.reshape({N, 1, D}) : dh;
      const Tensor<T> dnormed = blocks_[b].moe->backward(bf.moe, dmoe_out, aux_weight);
      // dh (the residual's) += LN'ᵀ · dnormed.
      auto dfrom_norm = Tensor<T>::uninitialized("moe_stack::dnorm", {N, D});
      if (N > 0) {
        ops::layer_norm_backward<T>(bf.h.as_matrix(), blocks_[b].norm_weight.flat(), bf.mean.flat(), bf.rstd.flat(),
                                    dnormed.reshape({N, D}).as_matrix(), dfrom_norm.as_matrix(),
                                    blocks_[b].norm_weight_grad.flat(), blocks_[b].norm_bias_grad.flat());
        KokkosBlas::axpy(T(1), dfrom_norm.flat(), dh.flat());
      }
    }
    auto dx = Tensor<T>::uninitialized("moe_stack::dx", {N, c.d_in});
    if (N > 0)
      ops::linear_backward<T>(f.x.as_matrix(), w_in_.as_matrix(), dh.as_matrix(), dx.as_matrix(), grads_[0].as_matrix(),
                              grads_[1].flat());
    return dx;
  }

 protected:
  void* concrete(const std::type_info&) override { return nullptr; }

 private:
  struct Block {
    Tensor<T> norm_weight, norm_bias, norm_weight_grad, norm_bias_grad;
    std::unique_ptr<Layer<T>> moe;
  };
  // st_moe and soft_moe_lite take [batch, tokens, d]: each row is a sequence of one token.
  bool sequences() const { return config_.moe_kind != "sigma_moe"; }

  C config_;
  dist::Communicator comm_;
  nlohmann::json json_;
  Tensor<T> w_in_, b_in_, w_out_, b_out_;
  std::vector<Tensor<T>> grads_;  // of w_in, b_in, w_out, b_out
  std::vector<Block> blocks_;
};

}  // namespace

nlohmann::json with_model_width(const std::string& kind, nlohmann::json moe, index_t width,
                                const std::string& context) {
  const char* key = kind == "sigma_moe" ? "dmodel" : kind == "st_moe" ? "dim" : "d_model";
  require(!moe.contains(key) || moe[key] == width, Status::invalid_argument, context, ": moe.", key, " = ",
          moe.contains(key) ? moe[key].dump() : "", " differs from d_model = ", width);
  moe[key] = width;
  return moe;
}

MoEStackConfig read_moe_stack_config(const nlohmann::json& json) {
  MoEStackConfig c = read_fields(moe_stack_fields(), json, "moe_stack config");
  (void)with_model_width(c.moe_kind, c.moe, c.d_model, "moe_stack config");
  return c;
}

nlohmann::json write_moe_stack_config(const MoEStackConfig& config) { return write_fields(moe_stack_fields(), config); }

template <class T>
std::unique_ptr<Layer<T>> make_moe_stack(const MoEStackConfig& config, std::uint64_t seed, ParameterInit init,
                                         const dist::Communicator& comm) {
  return std::make_unique<MoEStack<T>>(config, seed, init, comm);
}

template std::unique_ptr<Layer<float>> make_moe_stack<float>(const MoEStackConfig&, std::uint64_t, ParameterInit,
                                                             const dist::Communicator&);
template std::unique_ptr<Layer<double>> make_moe_stack<double>(const MoEStackConfig&, std::uint64_t, ParameterInit,
                                                               const dist::Communicator&);

}  // namespace kmoe::model
