#include "kmoe/layers/moeut_entropy.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/ops/softmax.hpp"

#include <cmath>

namespace kmoe::layers {

namespace moeut_entropy_impl {

using Range2 = Kokkos::MDRangePolicy<ExecSpace, Kokkos::Rank<2>>;

// Copies call r's [B, T, W] rows into (to_stacked) or out of the stacked [B, R·T, W] tensor at rows r·T … r·T+T−1.
template <class T>
void copy_call(const View3<T>& call, const View3<T>& stacked, index_t r, bool to_stacked) {
  const index_t length = call.extent(1), width = call.extent(2), offset = r * length;
  Kokkos::parallel_for(
      "kmoe::moeut_entropy::copy_call", Range2({0, 0}, {static_cast<index_t>(call.extent(0)) * length, width}),
      KOKKOS_LAMBDA(const index_t row, const index_t w) {
        const index_t b = row / length, t = row % length;
        if (to_stacked) {
          stacked(b, offset + t, w) = call(b, t, w);
        } else {
          call(b, t, w) = stacked(b, offset + t, w);
        }
      });
}

}  // namespace moeut_entropy_impl

template <class T>
EntropyRegForward<T> entropy_reg_forward(const std::vector<Tensor<T>>& logits) {
  require(!logits.empty(), Status::invalid_argument, "entropy_reg_forward: no router logits (no calls)");
  const Shape& shape = logits.front().shape();
  require(shape.rank() == 4 && shape.size() > 0, Status::shape_mismatch, "entropy_reg_forward: logits are ",
          shape.str(), ", expected a non-empty [B, T, G, E]");
  for (const Tensor<T>& call : logits) call.require_shape(shape, "entropy_reg_forward: router logits of a call");
  EntropyRegForward<T> f;
  f.calls = static_cast<index_t>(logits.size());
  f.batch = shape[0];
  f.length = shape[1];
  f.groups = shape[2];
  f.experts = shape[3];
  const index_t rows = f.calls * f.length, width = f.groups * f.experts;
  const auto stacked = Tensor<T>::uninitialized("moeut_entropy::stacked", {f.batch, rows, width});
  for (index_t r = 0; r < f.calls; ++r) {
    moeut_entropy_impl::copy_call<T>(logits[r].reshape({f.batch, f.length, width}).template view<3>(),
                                     stacked.template view<3>(), r, true);
  }
  const Shape lines{f.batch * rows * f.groups, f.experts};
  f.log_probs = Tensor<T>::uninitialized("moeut_entropy::log_probs", stacked.shape());
  ops::log_softmax_forward<T>(stacked.reshape(lines).as_3d(1), f.log_probs.reshape(lines).as_3d(1));
  f.row_lse = Tensor<T>::uninitialized("moeut_entropy::row_lse", {f.batch, width});
  ops::logsumexp_forward<T>(f.log_probs.as_3d(1), f.row_lse.as_matrix());
  // Σ p̄ log p̄ over B·G·E terms, summed on the host in a fixed order.
  const std::vector<T> lse = f.row_lse.to_host();
  const double log_rows = std::log(static_cast<double>(rows));
  double sum = 0;
  for (const T value : lse) {
    const double log_mean = static_cast<double>(value) - log_rows;
    sum += log_mean * std::exp(log_mean);
  }
  f.value = static_cast<T>(sum / static_cast<double>(f.batch * f.groups));
  return f;
}

template <class T>
std::vector<Tensor<T>> entropy_reg_backward(const EntropyRegForward<T>& f, T coef) {
  require(!f.log_probs.empty(), Status::invalid_argument, "entropy_reg_backward: the forward result is empty");
  const index_t rows = f.calls * f.length, width = f.groups * f.experts;
  // d reg / d log p̄ = p̄ (log p̄ + 1) / (B·G); log p̄ = row_lse − log(R·T).
  const auto dlse = Tensor<T>::uninitialized("moeut_entropy::dlse", {f.batch, width});
  const View2<T> lse = f.row_lse.as_matrix(), dl = dlse.as_matrix();
  const T log_rows = static_cast<T>(std::log(static_cast<double>(rows)));
  const T scale = coef / static_cast<T>(f.batch * f.groups);
  Kokkos::parallel_for(
      "kmoe::moeut_entropy::dlog_mean", moeut_entropy_impl::Range2({0, 0}, {f.batch, width}),
      KOKKOS_LAMBDA(const index_t b, const index_t w) {
        const T log_mean = lse(b, w) - log_rows;
        dl(b, w) = scale * Kokkos::Experimental::exp(log_mean) * (log_mean + T(1));
      });
  const auto dlog_probs = Tensor<T>::uninitialized("moeut_entropy::dlog_probs", f.log_probs.shape());
  ops::logsumexp_backward<T>(f.log_probs.as_3d(1), f.row_lse.as_matrix(), dlse.as_matrix(), dlog_probs.as_3d(1));
  const Shape lines{f.batch * rows * f.groups, f.experts};
  const auto dstacked = Tensor<T>::uninitialized("moeut_entropy::dstacked", f.log_probs.shape());
  ops::log_softmax_backward<T>(f.log_probs.reshape(lines).as_3d(1), dlog_probs.reshape(lines).as_3d(1),
                               dstacked.reshape(lines).as_3d(1));
  std::vector<Tensor<T>> grads;
  for (index_t r = 0; r < f.calls; ++r) {
    auto call = Tensor<T>::uninitialized("moeut_entropy::dlogits", {f.batch, f.length, f.groups, f.experts});
    moeut_entropy_impl::copy_call<T>(call.reshape({f.batch, f.length, width}).template view<3>(),
                                     dstacked.template view<3>(), r, false);
    grads.push_back(call);
  }
  return grads;
}

template EntropyRegForward<float> entropy_reg_forward<float>(const std::vector<Tensor<float>>&);
template EntropyRegForward<double> entropy_reg_forward<double>(const std::vector<Tensor<double>>&);
template std::vector<Tensor<float>> entropy_reg_backward<float>(const EntropyRegForward<float>&, float);
template std::vector<Tensor<double>> entropy_reg_backward<double>(const EntropyRegForward<double>&, double);

}  // namespace kmoe::layers
