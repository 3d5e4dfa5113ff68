#include "kmoe/ops/softmax.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/ops/impl/team_reduce.hpp"

#include <climits>

namespace kmoe::ops {
namespace impl {

// One team per line (o, i) of an [outer, len, inner] View; the team reduces along len.
using LinePolicy = Kokkos::TeamPolicy<ExecSpace>;
using LineMember = LinePolicy::member_type;

template <class V>
LinePolicy line_policy(const char* op, const V& x) {
  const index_t outer = x.extent(0), len = x.extent(1), inner = x.extent(2);
  require(outer * inner <= INT_MAX && len <= INT_MAX, Status::invalid_argument, op, ": [", outer, ", ", len, ", ",
          inner, "] exceeds ", INT_MAX, " lines or line length");
  return LinePolicy(static_cast<int>(outer * inner), Kokkos::AUTO);
}

template <class T, class V>
void require_same_extents(const char* op, const char* name, const V& view, const View3<const T>& like) {
  require(view.extent(0) == like.extent(0) && view.extent(1) == like.extent(1) && view.extent(2) == like.extent(2),
          Status::shape_mismatch, op, ": ", name, " is [", view.extent(0), ", ", view.extent(1), ", ", view.extent(2),
          "], expected [", like.extent(0), ", ", like.extent(1), ", ", like.extent(2), "]");
}

template <class T, class V>
void require_line_extents(const char* op, const char* name, const V& view, const View3<const T>& x) {
  require(view.extent(0) == x.extent(0) && view.extent(1) == x.extent(2), Status::shape_mismatch, op, ": ", name,
          " is [", view.extent(0), ", ", view.extent(1), "], expected [outer, inner] = [", x.extent(0), ", ",
          x.extent(2), "]");
}

// Σ_k exp(x − shift) = sum along the line, with shift its maximum so that no exp overflows. A
// line whose maximum is ±inf keeps shift 0 (as torch.logsumexp): an all −inf line then has sum 0,
// so logsumexp = −inf while softmax = 0/0 and log-softmax = −inf + inf are NaN, as in PyTorch.
template <class T>
struct ShiftedSum {
  T shift;
  T sum;
};

template <class T>
KOKKOS_INLINE_FUNCTION ShiftedSum<T> shifted_exp_sum(const LineMember& team, const View3<const T>& x, int o, int i) {
  const int len = static_cast<int>(x.extent(1));
  const T max_value = team_max<T>(team, len, [&](const int k) { return x(o, k, i); });
  const T shift = Kokkos::Experimental::isinf(max_value) ? T(0) : max_value;
  const T sum = team_sum<T>(team, len, [&](const int k) { return Kokkos::Experimental::exp(x(o, k, i) - shift); });
  return {shift, sum};
}

// logsumexp_forward for strided lines (inner > 1) on a host: a line-per-thread walk would read
// one element per cache line, so each thread takes a block of adjacent lines and walks their
// rows together. Same arithmetic as shifted_exp_sum in a sequential order.
template <class T>
void strided_logsumexp_on_host(const View3<const T>& x, const View2<T>& y) {
  constexpr index_t block = 16;
  const index_t outer = x.extent(0), len = x.extent(1), inner = x.extent(2);
  const index_t blocks_per_outer = (inner + block - 1) / block;
  Kokkos::parallel_for(
      "kmoe::logsumexp_forward_strided", Kokkos::RangePolicy<ExecSpace>(0, outer * blocks_per_outer),
      KOKKOS_LAMBDA(const index_t b) {
        const index_t o = b / blocks_per_outer, first = (b % blocks_per_outer) * block;
        const index_t width = inner - first < block ? inner - first : block;
        T shift[block], sum[block];
        for (index_t c = 0; c < width; ++c) shift[c] = -Kokkos::Experimental::infinity<T>::value;
        for (index_t k = 0; k < len; ++k)
          for (index_t c = 0; c < width; ++c) shift[c] = x(o, k, first + c) > shift[c] ? x(o, k, first + c) : shift[c];
        for (index_t c = 0; c < width; ++c) {
          if (Kokkos::Experimental::isinf(shift[c])) shift[c] = T(0);
          sum[c] = T(0);
        }
        for (index_t k = 0; k < len; ++k)
          for (index_t c = 0; c < width; ++c) sum[c] += Kokkos::Experimental::exp(x(o, k, first + c) - shift[c]);
        for (index_t c = 0; c < width; ++c) y(o, first + c) = shift[c] + Kokkos::Experimental::log(sum[c]);
      });
}

// Softmax (log_space false) or log-softmax (true) along the middle extent.
template <class T>
void softmax_family_forward(const char* op, bool log_space, const View3<const T>& x, const View3<T>& y) {
  require_same_extents(op, "y", y, x);
  const index_t inner = x.extent(2);
  const int len = static_cast<int>(x.extent(1));
  Kokkos::parallel_for(
      op, line_policy(op, x), KOKKOS_LAMBDA(const LineMember& team) {
        const int o = static_cast<int>(team.league_rank() / inner), i = static_cast<int>(team.league_rank() % inner);
        const ShiftedSum<T> s = shifted_exp_sum(team, x, o, i);
        const T log_sum = Kokkos::Experimental::log(s.sum);
        Kokkos::parallel_for(Kokkos::TeamThreadRange(team, len), [&](const int k) {
          y(o, k, i) =
              log_space ? x(o, k, i) - s.shift - log_sum : Kokkos::Experimental::exp(x(o, k, i) - s.shift) / s.sum;
        });
      });
}

// softmax: dx = y ⊙ (dy − Σ dy ⊙ y); log-softmax: dx = dy − exp(y) · Σ dy.
template <class T>
void softmax_family_backward(const char* op, bool log_space, const View3<const T>& y, const View3<const T>& dy,
                             const View3<T>& dx) {
  require_same_extents(op, "dy", dy, y);
  require_same_extents(op, "dx", dx, y);
  const index_t inner = y.extent(2);
  const int len = static_cast<int>(y.extent(1));
  Kokkos::parallel_for(
      op, line_policy(op, y), KOKKOS_LAMBDA(const LineMember& team) {
        const int o = static_cast<int>(team.league_rank() / inner), i = static_cast<int>(team.league_rank() % inner);
        const T total =
            team_sum<T>(team, len, [&](const int k) { return log_space ? dy(o, k, i) : dy(o, k, i) * y(o, k, i); });
        Kokkos::parallel_for(Kokkos::TeamThreadRange(team, len), [&](const int k) {
          dx(o, k, i) = log_space ? dy(o, k, i) - Kokkos::Experimental::exp(y(o, k, i)) * total
                                  : y(o, k, i) * (dy(o, k, i) - total);
        });
      });
}

}  // namespace impl

template <class T>
void softmax_forward(const View3<const T>& x, const View3<T>& y) {
  impl::softmax_family_forward<T>("kmoe::softmax_forward", false, x, y);
}

template <class T>
void softmax_backward(const View3<const T>& y, const View3<const T>& dy, const View3<T>& dx) {
  impl::softmax_family_backward<T>("kmoe::softmax_backward", false, y, dy, dx);
}

template <class T>
void log_softmax_forward(const View3<const T>& x, const View3<T>& y) {
  impl::softmax_family_forward<T>("kmoe::log_softmax_forward", true, x, y);
}

template <class T>
void log_softmax_backward(const View3<const T>& y, const View3<const T>& dy, const View3<T>& dx) {
  impl::softmax_family_backward<T>("kmoe::log_softmax_backward", true, y, dy, dx);
}

template <class T>
void logsumexp_forward(const View3<const T>& x, const View2<T>& y) {
  const char* op = "kmoe::logsumexp_forward";
  impl::require_line_extents(op, "y", y, x);
  const index_t inner = x.extent(2);
  if constexpr (Kokkos::SpaceAccessibility<HostSpace, MemSpace>::accessible) {
    if (inner > 1) return impl::strided_logsumexp_on_host<T>(x, y);
  }
  Kokkos::parallel_for(
      op, impl::line_policy(op, x), KOKKOS_LAMBDA(const impl::LineMember& team) {
        const int o = static_cast<int>(team.league_rank() / inner), i = static_cast<int>(team.league_rank() % inner);
        const impl::ShiftedSum<T> s = impl::shifted_exp_sum(team, x, o, i);
        Kokkos::single(Kokkos::PerTeam(team), [&]() { y(o, i) = s.shift + Kokkos::Experimental::log(s.sum); });
      });
}

template <class T>
void logsumexp_backward(const View3<const T>& x, const View2<const T>& y, const View2<const T>& dy,
                        const View3<T>& dx) {
  const char* op = "kmoe::logsumexp_backward";
  impl::require_line_extents(op, "y", y, x);
  impl::require_line_extents(op, "dy", dy, x);
  impl::require_same_extents(op, "dx", dx, x);
  Kokkos::parallel_for(
      op,
      md_range<3>(
          {0, 0, 0},
          {static_cast<index_t>(x.extent(0)), static_cast<index_t>(x.extent(1)), static_cast<index_t>(x.extent(2))}),
      KOKKOS_LAMBDA(const index_t o, const index_t k, const index_t i) {
        dx(o, k, i) = dy(o, i) * Kokkos::Experimental::exp(x(o, k, i) - y(o, i));
      });
}

#define KMOE_INSTANTIATE(T)                                                                                \
  template void softmax_forward<T>(const View3<const T>&, const View3<T>&);                                \
  template void softmax_backward<T>(const View3<const T>&, const View3<const T>&, const View3<T>&);        \
  template void log_softmax_forward<T>(const View3<const T>&, const View3<T>&);                            \
  template void log_softmax_backward<T>(const View3<const T>&, const View3<const T>&, const View3<T>&);    \
  template void logsumexp_forward<T>(const View3<const T>&, const View2<T>&);                              \
  template void logsumexp_backward<T>(const View3<const T>&, const View2<const T>&, const View2<const T>&, \
                                      const View3<T>&);
KMOE_INSTANTIATE(float)
KMOE_INSTANTIATE(double)
#undef KMOE_INSTANTIATE

}  // namespace kmoe::ops
