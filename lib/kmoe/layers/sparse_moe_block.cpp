#include "kmoe/layers/sparse_moe_block.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/ops/norms.hpp"

#include <string>

namespace kmoe::layers {

namespace block_impl {

constexpr double block_rms_eps = 1e-12;    // F.normalize's eps
constexpr double block_ff_hidden_mult = 4;  // Expert(dim, prenorm=True) keeps the default hidden_mult

// a += b, elementwise (same size).
template <class T>
void add_into(const Tensor<T>& a, const Tensor<T>& b) {
  const View1<T> av = a.flat(), bv = b.flat();
  Kokkos::parallel_for(
      "kmoe::sparse_moe_block::add", Kokkos::RangePolicy<ExecSpace>(0, a.size()),
      KOKKOS_LAMBDA(const index_t i) { av(i) += bv(i); });
}

// x + FF(x) as a new tensor, keeping FF's forward for backward.
template <class T>
Tensor<T> residual_feed_forward(const GegluExpert<T>& ff, const Tensor<T>& x,
                                std::optional<GegluExpertForward<T>>& saved) {
  saved = ff.forward(x);
  const Tensor<T> out = saved->y.clone("sparse_moe_block::ff_residual");
  add_into(out, x);
  return out;
}

}  // namespace block_impl

template <class T>
SparseMoEBlock<T>::SparseMoEBlock(const SparseMoEBlockConfig& config, std::uint64_t seed, ParameterInit init,
                                  const dist::Communicator& comm)
    : config_(config), moe_(config.moe, seed, init, comm) {
  comm.require_same(static_cast<std::uint64_t>(config_.add_ff_before) * 2 + config_.add_ff_after,
                    "the SparseMoEBlock's feed-forwards");
  const index_t D = config_.moe.dim;
  gamma_ = Tensor<T>("sparse_moe_block::moe_prenorm_gamma", {D});
  gamma_.fill(T(1));
  dgamma_ = Tensor<T>("sparse_moe_block::moe_prenorm_dgamma", {D});
  if (config_.add_ff_before) ff_before_.emplace(D, block_impl::block_ff_hidden_mult, true, seed + 1, init);
  if (config_.add_ff_after) ff_after_.emplace(D, block_impl::block_ff_hidden_mult, true, seed + 2, init);
}

template <class T>
void SparseMoEBlock<T>::visit_parameters(const model::ParameterVisitor<T>& visit, const std::string& prefix) {
  if (ff_before_) ff_before_->visit_parameters(visit, prefix + "ff_before.");
  auto gamma = model::dense_parameter(prefix + "moe_prenorm.gamma", gamma_, dgamma_);
  visit(gamma);
  moe_.visit_parameters(visit, prefix + "moe.");
  if (ff_after_) ff_after_->visit_parameters(visit, prefix + "ff_after.");
}

template <class T>
void SparseMoEBlock<T>::zero_grad() {
  moe_.zero_grad();
  dgamma_.fill(T(0));
  if (ff_before_) ff_before_->zero_grad();
  if (ff_after_) ff_after_->zero_grad();
}

template <class T>
SparseMoEBlockForward<T> SparseMoEBlock<T>::forward(const Tensor<T>& x, bool training, Generator& rng,
                                                    const StMoECall<T>& call) const {
  const index_t D = config_.moe.dim;
  moe_.communicator().collectively([&] {
    require(x.rank() == 3 && x.dim(2) == D, Status::shape_mismatch, "SparseMoEBlock::forward: x is ",
            x.shape().str(), ", expected [batch, n, dim = ", D, "]");
  });
  const index_t tokens = x.dim(0) * x.dim(1);
  SparseMoEBlockForward<T> f;
  const Tensor<T> x_rows = x.reshape({tokens, D});
  // A rank of several may bring no sequences: it only takes part in the MoE's exchanges.
  const bool rows = tokens > 0;
  f.residual = ff_before_ && rows ? block_impl::residual_feed_forward(*ff_before_, x_rows, f.ff_before) : x_rows;
  f.moe_input = Tensor<T>::uninitialized("sparse_moe_block::moe_input", {tokens, D});
  f.moe_scale = Tensor<T>::uninitialized("sparse_moe_block::moe_scale", {tokens});
  if (rows)
    ops::rms_norm_forward<T>(ops::RmsNormMode::l2_normalize, f.residual.as_matrix(), gamma_.flat(),
                             static_cast<T>(block_impl::block_rms_eps), f.moe_input.as_matrix(), f.moe_scale.flat());
  f.moe = moe_.forward(f.moe_input.reshape(x.shape()), training, rng, call);
  const Tensor<T> after_moe = f.moe.out.clone("sparse_moe_block::after_moe").reshape({tokens, D});
  if (rows) block_impl::add_into(after_moe, f.residual);
  f.out = (ff_after_ && rows ? block_impl::residual_feed_forward(*ff_after_, after_moe, f.ff_after) : after_moe)
              .reshape(x.shape());
  f.total_aux_loss = f.moe.total_aux_loss;
  f.balance_loss = f.moe.balance_loss;
  f.router_z_loss = f.moe.router_z_loss;
  return f;
}

template <class T>
Tensor<T> SparseMoEBlock<T>::backward(const SparseMoEBlockForward<T>& f, const Tensor<T>& dout, T aux_weight) {
  const index_t D = config_.moe.dim;
  moe_.communicator().collectively([&] {
    require(!f.out.empty(), Status::invalid_argument, "SparseMoEBlock::backward: the forward result is empty");
    const bool rows = f.residual.dim(0) > 0;
    require(f.ff_before.has_value() == (ff_before_.has_value() && rows) &&
                f.ff_after.has_value() == (ff_after_.has_value() && rows),
            Status::invalid_argument, "SparseMoEBlock::backward: the forward result comes from another block");
    dout.require_shape(f.out.shape(), "SparseMoEBlock::backward: dout");
  });
  const index_t tokens = f.residual.dim(0);
  const Tensor<T> dout_rows = dout.reshape({tokens, D});
  if (tokens == 0) {  // only the MoE's exchanges
    moe_.backward(f.moe, dout, aux_weight);
    return Tensor<T>("sparse_moe_block::dx", f.out.shape());
  }
  // After the MoE: d(after_moe) = dout + FF_after'ᵀ dout.
  Tensor<T> dafter = dout_rows;
  if (ff_after_) {
    dafter = ff_after_->backward(*f.ff_after, dout_rows);
    block_impl::add_into(dafter, dout_rows);
  }
  // after_moe = MoE(RMSNorm(residual)) + residual.
  const Tensor<T> dmoe_input = moe_.backward(f.moe, dafter.reshape(f.out.shape()), aux_weight).reshape({tokens, D});
  const auto dresidual = Tensor<T>::uninitialized("sparse_moe_block::dresidual", {tokens, D});
  ops::rms_norm_backward<T>(ops::RmsNormMode::l2_normalize, f.residual.as_matrix(), gamma_.flat(),
                            static_cast<T>(block_impl::block_rms_eps), f.moe_scale.flat(), dmoe_input.as_matrix(),
                            dresidual.as_matrix(), dgamma_.flat());
  block_impl::add_into(dresidual, dafter);
  if (!ff_before_) return dresidual.reshape(f.out.shape());
  const Tensor<T> dx = ff_before_->backward(*f.ff_before, dresidual);
  block_impl::add_into(dx, dresidual);
  return dx.reshape(f.out.shape());
}

template class SparseMoEBlock<float>;
template class SparseMoEBlock<double>;

}  // namespace kmoe::layers
