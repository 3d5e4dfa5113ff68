#include "kmoe/moe/entropy_regulariser.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/core/profile_region.hpp"
#include "kmoe/ops/impl/team_reduce.hpp"
#include "kmoe/ops/softmax.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace kmoe::moe {

namespace impl {

// Copies call r's [B, T, W] rows into the stacked [B, R·T, W] tensor at rows r·T … r·T+T−1.
template <class T>
void stack_call(const View3<const T>& call, const View3<T>& stacked, index_t r) {
  const index_t length = call.extent(1), width = call.extent(2), offset = r * length;
  Kokkos::parallel_for(
      "kmoe::entropy_reg::stack_call",
      md_range<2>({0, 0}, {static_cast<index_t>(call.extent(0)) * length, width}),
      KOKKOS_LAMBDA(const index_t row, const index_t w) {
        const index_t b = row / length, t = row % length;
        stacked(b, offset + t, w) = call(b, t, w);
      });
}

}  // namespace impl

template <class T>
EntropyRegForward<T> entropy_reg_forward(const std::vector<Tensor<T>>& logits, const dist::Communicator* pool,
                                         SplitOver split) {
  const ProfileRegion region("kmoe::entropy_reg_forward");
  require(!logits.empty(), Status::invalid_argument, "entropy_reg_forward: no router logits (no calls)");
  const Shape& shape = logits.front().shape();
  // No rows here (T = 0 when the ranks split the rows, B = 0 when they split the sequences) only
  // when other ranks bring some.
  const bool distributed = pool != nullptr && pool->distributed();
  const bool none_here = distributed && shape.rank() == 4 && shape[2] > 0 && shape[3] > 0 &&
                         (split == SplitOver::rows ? shape[1] == 0 && shape[0] > 0 : shape[0] == 0 && shape[1] > 0);
  require(shape.rank() == 4 && (shape.size() > 0 || none_here), Status::shape_mismatch,
          "entropy_reg_forward: logits are ", shape.str(), ", expected a non-empty [B, T, G, E]");
  for (const Tensor<T>& call : logits) call.require_shape(shape, "entropy_reg_forward: router logits of a call");
  EntropyRegForward<T> f;
  f.calls = static_cast<index_t>(logits.size());
  f.batch = shape[0];
  f.length = shape[1];
  f.groups = shape[2];
  f.experts = shape[3];
  const index_t rows = f.calls * f.length, width = f.groups * f.experts;
  // A single call is already "stacked".
  Tensor<T> stacked = f.calls == 1 ? logits.front().reshape({f.batch, rows, width})
                                   : Tensor<T>::uninitialized("entropy_reg::stacked", {f.batch, rows, width});
  if (f.calls > 1) {
    for (index_t r = 0; r < f.calls; ++r) {
      impl::stack_call<T>(logits[r].reshape({f.batch, f.length, width}).template view<3>(), stacked.template view<3>(),
                          r);
    }
  }
  const Shape lines{f.batch * rows * f.groups, f.experts};
  f.log_probs = Tensor<T>::uninitialized("entropy_reg::log_probs", stacked.shape());
  const bool any = rows > 0 && f.batch > 0;
  if (any) ops::log_softmax_forward<T>(stacked.reshape(lines).as_3d(1), f.log_probs.reshape(lines).as_3d(1));
  f.row_lse = Tensor<T>::uninitialized("entropy_reg::row_lse", {f.batch, width});
  if (any) {
    ops::logsumexp_forward<T>(f.log_probs.as_3d(1), f.row_lse.as_matrix());
  } else if (f.batch > 0) {
    f.row_lse.fill(-Kokkos::Experimental::infinity<T>::value);  // the empty sum
  }
  // Σ p̄ log p̄ over B·G·E terms, summed on the host in a fixed order.
  std::vector<T> lse = f.row_lse.to_host();
  f.total_rows = rows;
  f.total_batch = f.batch;
  const bool over_rows = pool != nullptr && pool->distributed() && split == SplitOver::rows;
  const bool over_sequences = pool != nullptr && pool->distributed() && split == SplitOver::sequences;
  if (over_rows) {
    // logsumexp over the ranks' row logsumexps, in rank order: m + log Σ_r exp(lse_r − m).
    const std::size_t n = lse.size();
    const std::vector<double> all = pool->all_gather(std::vector<double>(lse.begin(), lse.end()));
    for (std::size_t i = 0; i < n; ++i) {
      double m = -std::numeric_limits<double>::infinity();
      for (int r = 0; r < pool->size(); ++r) m = std::max(m, all[static_cast<std::size_t>(r) * n + i]);
      double sum = 0;
      for (int r = 0; r < pool->size(); ++r) sum += std::exp(all[static_cast<std::size_t>(r) * n + i] - m);
      lse[i] = static_cast<T>(m + std::log(sum));
    }
    f.row_lse.copy_from_host(lse);
    f.total_rows = pool->sum(rows);
  }
  const double log_rows = std::log(static_cast<double>(f.total_rows));
  double sum = 0;
  for (const T value : lse) {
    const double log_mean = static_cast<double>(value) - log_rows;
    sum += log_mean * std::exp(log_mean);
  }
  if (over_sequences) {
    pool->all_reduce_sum(&sum, 1);
    f.total_batch = pool->sum(f.batch);
  }
  f.value = static_cast<T>(sum / static_cast<double>(f.total_batch * f.groups));
  return f;
}

template <class T>
void entropy_reg_backward_add(const EntropyRegForward<T>& f, T coef, const std::vector<Tensor<T>>& dlogits) {
  using Member = Kokkos::TeamPolicy<ExecSpace>::member_type;
  require(!f.log_probs.empty(), Status::invalid_argument, "entropy_reg_backward: the forward result is empty");
  require(static_cast<index_t>(dlogits.size()) == f.calls, Status::shape_mismatch, "entropy_reg_backward: ",
          dlogits.size(), " gradient tensors for ", f.calls, " calls");
  const Shape call_shape{f.batch, f.length, f.groups, f.experts};
  for (const Tensor<T>& d : dlogits) d.require_shape(call_shape, "entropy_reg_backward: a call's logit gradient");
  const index_t rows = f.total_rows, width = f.groups * f.experts, length = f.length, groups = f.groups;
  // ∂(coef · reg)/∂lse[b, w] = coef · p̄ (log p̄ + 1) / (B·G), log p̄ = lse − log(R·T).
  const auto dlse = Tensor<T>::uninitialized("entropy_reg::dlse", {f.batch, width});
  const View2<T> lse = f.row_lse.as_matrix(), dl = dlse.as_matrix();
  const View3<T> logp = f.log_probs.template view<3>();
  const T log_rows = static_cast<T>(std::log(static_cast<double>(rows)));
  const T scale = coef / static_cast<T>(f.total_batch * f.groups);
  Kokkos::parallel_for(
      "kmoe::entropy_reg::dlog_mean", md_range<2>({0, 0}, {f.batch, width}),
      KOKKOS_LAMBDA(const index_t b, const index_t w) {
        const T log_mean = lse(b, w) - log_rows;
        dl(b, w) = scale * Kokkos::Experimental::exp(log_mean) * (log_mean + T(1));
      });
  // Per line (b, t, g) of a call: through logsumexp over rows, g_e = dlse · exp(logp − lse); through
  // log_softmax over E, dz = g − softmax(z) Σ_e g_e.
  const int E = static_cast<int>(f.experts);
  for (index_t r = 0; r < f.calls; ++r) {
    const View3<T> dz = dlogits[r].reshape({f.batch, f.length, width}).template view<3>();
    const index_t offset = r * length;
    Kokkos::parallel_for(
        "kmoe::entropy_reg::backward",
        Kokkos::TeamPolicy<ExecSpace>(static_cast<int>(f.batch * length * groups), Kokkos::AUTO),
        KOKKOS_LAMBDA(const Member& team) {
          const index_t line = team.league_rank();
          const index_t g = line % groups, t = (line / groups) % length, b = line / (groups * length);
          const index_t row = offset + t, first = g * E;
          const auto grad = [&](const int e) {
            return dl(b, first + e) * Kokkos::Experimental::exp(logp(b, row, first + e) - lse(b, first + e));
          };
          const T grad_sum = ops::impl::team_sum<T>(team, E, grad);
          Kokkos::parallel_for(Kokkos::TeamThreadRange(team, E), [&](const int e) {
            dz(b, t, first + e) += grad(e) - Kokkos::Experimental::exp(logp(b, row, first + e)) * grad_sum;
          });
        });
  }
}

template <class T>
std::vector<Tensor<T>> entropy_reg_backward(const EntropyRegForward<T>& f, T coef) {
  std::vector<Tensor<T>> grads;
  for (index_t r = 0; r < f.calls; ++r) grads.emplace_back("entropy_reg::dlogits", Shape{f.batch, f.length, f.groups, f.experts});
  entropy_reg_backward_add<T>(f, coef, grads);
  return grads;
}

#define KMOE_INSTANTIATE(T)                                                                                  \
  template EntropyRegForward<T> entropy_reg_forward<T>(const std::vector<Tensor<T>>&, const dist::Communicator*,  \
                                                       SplitOver);                                                   \
  template void entropy_reg_backward_add<T>(const EntropyRegForward<T>&, T, const std::vector<Tensor<T>>&); \
  template std::vector<Tensor<T>> entropy_reg_backward<T>(const EntropyRegForward<T>&, T);
KMOE_INSTANTIATE(float)
KMOE_INSTANTIATE(double)
#undef KMOE_INSTANTIATE

}  // namespace kmoe::moe
