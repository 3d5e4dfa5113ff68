#include "kmoe/ops/norms.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/ops/impl/column_reduce.hpp"
#include "kmoe/ops/impl/team_reduce.hpp"

#include <climits>
#include <cmath>

namespace kmoe::ops {
namespace impl {

// One team per row; the team reduces along the row, so long rows (D in the thousands) use the
// whole team on a GPU.
using RowPolicy = Kokkos::TeamPolicy<ExecSpace>;
using RowMember = RowPolicy::member_type;

// Runs row_kernel(team, r) for every row r in [0, rows), one team per row.
template <class RowKernel>
void for_each_row(const char* op, index_t rows, const RowKernel& row_kernel) {
  require(rows <= INT_MAX, Status::invalid_argument, op, ": ", rows, " rows exceed the league size limit ", INT_MAX);
  Kokkos::parallel_for(
      op, RowPolicy(static_cast<int>(rows), Kokkos::AUTO),
      KOKKOS_LAMBDA(const RowMember& team) { row_kernel(team, team.league_rank()); });
}

template <class V>
bool present(const V& view) {
  return view.data() != nullptr;
}

template <class V, class W>
void require_extents_2d(const char* op, const char* name, const V& view, const W& like) {
  require(view.extent(0) == like.extent(0) && view.extent(1) == like.extent(1), Status::shape_mismatch, op, ": ", name,
          " is [", view.extent(0), ", ", view.extent(1), "], expected [", like.extent(0), ", ", like.extent(1), "]");
}

template <class V>
void require_length(const char* op, const char* name, const V& view, index_t expected, const char* meaning) {
  require(static_cast<index_t>(view.extent(0)) == expected, Status::shape_mismatch, op, ": ", name, " has ",
          view.extent(0), " elements, expected ", expected, " (", meaning, ")");
}

// Rows of x must be non-empty and short enough for int column indices.
template <class T>
void require_rows(const char* op, const View2<const T>& x) {
  require(x.extent(1) > 0, Status::shape_mismatch, op, ": x is [", x.extent(0), ", ", x.extent(1),
          "]; rows need at least one column");
  require(x.extent(1) <= INT_MAX, Status::invalid_argument, op, ": row length ", x.extent(1), " exceeds ", INT_MAX);
}

template <class T>
void require_eps(const char* op, T eps) {
  require(eps >= T(0) && std::isfinite(eps), Status::invalid_argument, op, ": eps must be finite and >= 0, got ", eps);
}

// A per-column parameter (gamma, beta, dgamma, dbeta) is absent or has one entry per column of x.
template <class V, class T>
void require_optional_column_param(const char* op, const char* name, const V& param, const View2<const T>& x) {
  if (present(param)) require_length(op, name, param, x.extent(1), "columns of x");
}

// The arguments every norm's forward shares: x, eps, gamma, and y shaped like x.
template <class T>
void require_forward_args(const char* op, const View2<const T>& x, T eps, const View1<const T>& gamma,
                          const View2<T>& y) {
  require_rows(op, x);
  require_eps(op, eps);
  require_optional_column_param(op, "gamma", gamma, x);
  require_extents_2d(op, "y", y, x);
}

// The arguments every norm's backward shares: x, gamma and dgamma as in the forward, dy and dx shaped like x.
template <class T>
void require_backward_args(const char* op, const View2<const T>& x, const View1<const T>& gamma,
                           const View2<const T>& dy, const View2<T>& dx, const View1<T>& dgamma) {
  require_rows(op, x);
  require_optional_column_param(op, "gamma", gamma, x);
  require_optional_column_param(op, "dgamma", dgamma, x);
  require_extents_2d(op, "dy", dy, x);
  require_extents_2d(op, "dx", dx, x);
}

inline void require_rms_mode(const char* op, RmsNormMode mode) {
  require(mode == RmsNormMode::mean_square || mode == RmsNormMode::l2_normalize, Status::invalid_argument, op,
          ": unknown RmsNormMode ", static_cast<int>(mode));
}

// dgamma[j] += Σ_r dy(r,j)·(x(r,j) − center[r])·scale[r] (center absent: 0) and dbeta[j] +=
// Σ_r dy(r,j), each skipped when absent; a deterministic column reduction (impl/column_reduce.hpp).
template <class T>
void accumulate_affine_gradients(const char* op, const View2<const T>& x, const View1<const T>& center,
                                 const View1<const T>& scale, const View2<const T>& dy, const View1<T>& dgamma,
                                 const View1<T>& dbeta) {
  const bool has_dgamma = present(dgamma), has_dbeta = present(dbeta), has_center = present(center);
  if (!has_dgamma && !has_dbeta) return;
  column_reduce<T, 2>(
      op, x.extent(0), x.extent(1),
      KOKKOS_LAMBDA(const index_t r, const index_t j) {
        return Kokkos::Array<T, 2>{dy(r, j) * (x(r, j) - (has_center ? center(r) : T(0))) * scale(r), dy(r, j)};
      },
      KOKKOS_LAMBDA(const index_t j, const Kokkos::Array<T, 2>& sums) {
        if (has_dgamma) dgamma(j) += sums[0];
        if (has_dbeta) dbeta(j) += sums[1];
      });
}

}  // namespace impl

template <class T>
void layer_norm_forward(const View2<const T>& x, const View1<const T>& gamma, const View1<const T>& beta, T eps,
                        const View2<T>& y, const View1<T>& mean, const View1<T>& rstd) {
  const char* op = "kmoe::layer_norm_forward";
  impl::require_forward_args(op, x, eps, gamma, y);
  impl::require_optional_column_param(op, "beta", beta, x);
  impl::require_length(op, "mean", mean, x.extent(0), "rows of x");
  impl::require_length(op, "rstd", rstd, x.extent(0), "rows of x");
  const bool has_gamma = impl::present(gamma), has_beta = impl::present(beta);
  const int cols = static_cast<int>(x.extent(1));
  impl::for_each_row(
      op, x.extent(0), KOKKOS_LAMBDA(const impl::RowMember& team, const int r) {
        const T mu = impl::team_sum<T>(team, cols, [&](const int j) { return x(r, j); }) / T(cols);
        // Two passes (mean, then squared deviations): no cancellation for rows with a large mean.
        const T var =
            impl::team_sum<T>(team, cols, [&](const int j) { return (x(r, j) - mu) * (x(r, j) - mu); }) / T(cols);
        const T inv_std = T(1) / Kokkos::Experimental::sqrt(var + eps);
        Kokkos::parallel_for(Kokkos::TeamThreadRange(team, cols), [&](const int j) {
          const T normalised = (x(r, j) - mu) * inv_std;
          y(r, j) = normalised * (has_gamma ? gamma(j) : T(1)) + (has_beta ? beta(j) : T(0));
        });
        Kokkos::single(Kokkos::PerTeam(team), [&]() {
          mean(r) = mu;
          rstd(r) = inv_std;
        });
      });
}

template <class T>
void layer_norm_backward(const View2<const T>& x, const View1<const T>& gamma, const View1<const T>& mean,
                         const View1<const T>& rstd, const View2<const T>& dy, const View2<T>& dx,
                         const View1<T>& dgamma, const View1<T>& dbeta) {
  const char* op = "kmoe::layer_norm_backward";
  impl::require_backward_args(op, x, gamma, dy, dx, dgamma);
  impl::require_optional_column_param(op, "dbeta", dbeta, x);
  impl::require_length(op, "mean", mean, x.extent(0), "rows of x");
  impl::require_length(op, "rstd", rstd, x.extent(0), "rows of x");
  const bool has_gamma = impl::present(gamma);
  const int cols = static_cast<int>(x.extent(1));
  // With g = dy·gamma and x̂ = (x − mean)·rstd: dx = rstd · (g − mean(g) − x̂ · mean(g ⊙ x̂)).
  impl::for_each_row(
      op, x.extent(0), KOKKOS_LAMBDA(const impl::RowMember& team, const int r) {
        const T mu = mean(r), inv_std = rstd(r);
        const auto g = [&](const int j) { return has_gamma ? dy(r, j) * gamma(j) : dy(r, j); };
        const T mean_g = impl::team_sum<T>(team, cols, g) / T(cols);
        const T mean_g_xhat =
            impl::team_sum<T>(team, cols, [&](const int j) { return g(j) * (x(r, j) - mu) * inv_std; }) / T(cols);
        Kokkos::parallel_for(Kokkos::TeamThreadRange(team, cols), [&](const int j) {
          dx(r, j) = inv_std * (g(j) - mean_g - (x(r, j) - mu) * inv_std * mean_g_xhat);
        });
      });
  impl::accumulate_affine_gradients<T>("kmoe::layer_norm_backward(parameters)", x, mean, rstd, dy, dgamma, dbeta);
}

template <class T>
void rms_norm_forward(RmsNormMode mode, const View2<const T>& x, const View1<const T>& gamma, T eps, const View2<T>& y,
                      const View1<T>& scale) {
  const char* op = "kmoe::rms_norm_forward";
  impl::require_rms_mode(op, mode);
  impl::require_forward_args(op, x, eps, gamma, y);
  impl::require_length(op, "scale", scale, x.extent(0), "rows of x");
  const bool has_gamma = impl::present(gamma);
  const int cols = static_cast<int>(x.extent(1));
  const T sqrt_cols = static_cast<T>(std::sqrt(static_cast<double>(cols)));
  impl::for_each_row(
      op, x.extent(0), KOKKOS_LAMBDA(const impl::RowMember& team, const int r) {
        const T sum_squares = impl::team_sum<T>(team, cols, [&](const int j) { return x(r, j) * x(r, j); });
        const T s = mode == RmsNormMode::mean_square
                        ? T(1) / Kokkos::Experimental::sqrt(sum_squares / T(cols) + eps)
                        : sqrt_cols / Kokkos::Experimental::fmax(Kokkos::Experimental::sqrt(sum_squares), eps);
        Kokkos::parallel_for(Kokkos::TeamThreadRange(team, cols),
                             [&](const int j) { y(r, j) = x(r, j) * s * (has_gamma ? gamma(j) : T(1)); });
        Kokkos::single(Kokkos::PerTeam(team), [&]() { scale(r) = s; });
      });
}

template <class T>
void rms_norm_backward(RmsNormMode mode, const View2<const T>& x, const View1<const T>& gamma, T eps,
                       const View1<const T>& scale, const View2<const T>& dy, const View2<T>& dx,
                       const View1<T>& dgamma) {
  const char* op = "kmoe::rms_norm_backward";
  impl::require_rms_mode(op, mode);
  impl::require_backward_args(op, x, gamma, dy, dx, dgamma);
  impl::require_eps(op, eps);
  impl::require_length(op, "scale", scale, x.extent(0), "rows of x");
  const bool has_gamma = impl::present(gamma);
  const int cols = static_cast<int>(x.extent(1));
  // y = x·s·gamma. In both modes ∂s/∂x = −s³·x/D (mean_square: s = (Σx²/D + eps)^−½; l2: s = √D/‖x‖),
  // except where l2_normalize clamps ‖x‖ < eps to eps, which makes s constant there.
  // So with g = dy·gamma: dx = s·g − [not clamped]·s³/D · x · Σ(g ⊙ x).
  impl::for_each_row(
      op, x.extent(0), KOKKOS_LAMBDA(const impl::RowMember& team, const int r) {
        const T s = scale(r);
        const auto g = [&](const int j) { return has_gamma ? dy(r, j) * gamma(j) : dy(r, j); };
        // The branches below depend on team-wide values only, so the whole team takes the same one.
        bool clamped = false;
        if (mode == RmsNormMode::l2_normalize) {
          const T sum_squares = impl::team_sum<T>(team, cols, [&](const int j) { return x(r, j) * x(r, j); });
          clamped = Kokkos::Experimental::sqrt(sum_squares) < eps;
        }
        T coefficient = 0;
        if (!clamped) {
          const T g_dot_x = impl::team_sum<T>(team, cols, [&](const int j) { return g(j) * x(r, j); });
          coefficient = s * s * s / T(cols) * g_dot_x;
        }
        Kokkos::parallel_for(Kokkos::TeamThreadRange(team, cols),
                             [&](const int j) { dx(r, j) = s * g(j) - coefficient * x(r, j); });
      });
  impl::accumulate_affine_gradients<T>("kmoe::rms_norm_backward(gamma)", x, View1<const T>(), scale, dy, dgamma,
                                       View1<T>());
}

#define KMOE_INSTANTIATE(T)                                                                                            \
  template void layer_norm_forward<T>(const View2<const T>&, const View1<const T>&, const View1<const T>&, T,          \
                                      const View2<T>&, const View1<T>&, const View1<T>&);                              \
  template void layer_norm_backward<T>(const View2<const T>&, const View1<const T>&, const View1<const T>&,            \
                                       const View1<const T>&, const View2<const T>&, const View2<T>&, const View1<T>&, \
                                       const View1<T>&);                                                               \
  template void rms_norm_forward<T>(RmsNormMode, const View2<const T>&, const View1<const T>&, T, const View2<T>&,     \
                                    const View1<T>&);                                                                  \
  template void rms_norm_backward<T>(RmsNormMode, const View2<const T>&, const View1<const T>&, T,                     \
                                     const View1<const T>&, const View2<const T>&, const View2<T>&, const View1<T>&);
KMOE_INSTANTIATE(float)
KMOE_INSTANTIATE(double)
#undef KMOE_INSTANTIATE

}  // namespace kmoe::ops
