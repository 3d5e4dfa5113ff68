#include "kmoe/ops/topk.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/ops/counting_sort.hpp"

#include <algorithm>
#include <limits>
#include <type_traits>

namespace kmoe::ops {

namespace impl {
// torch.topk's order: NaN above every number, then larger values, then the lower column.
template <class T>
KOKKOS_INLINE_FUNCTION bool ranks_above(T a, int a_col, T b, int b_col) {
  const bool a_nan = Kokkos::Experimental::isnan(a), b_nan = Kokkos::Experimental::isnan(b);
  if (a_nan != b_nan) return a_nan;
  if (!a_nan && a != b) return a > b;
  return a_col < b_col;
}

// A Kokkos reducer for the best (value, column) of a team under ranks_above; column −1 is empty.
template <class T>
struct BestEntry {
  struct value_type {
    T value;
    int col;
  };
  using reducer = BestEntry;
  using result_view_type = Kokkos::View<value_type, Kokkos::HostSpace, Kokkos::MemoryUnmanaged>;
  value_type& result;

  KOKKOS_INLINE_FUNCTION explicit BestEntry(value_type& r) : result(r) {}
  KOKKOS_INLINE_FUNCTION static bool better(T v, int col, T than_v, int than_col) {
    return col >= 0 && (than_col < 0 || ranks_above(v, col, than_v, than_col));
  }
  KOKKOS_INLINE_FUNCTION void join(value_type& dest, const value_type& src) const {
    if (better(src.value, src.col, dest.value, dest.col)) dest = src;
  }
  KOKKOS_INLINE_FUNCTION void join(volatile value_type& dest, const volatile value_type& src) const {
    if (better(src.value, src.col, dest.value, dest.col)) {
      dest.value = src.value;
      dest.col = src.col;
    }
  }
  KOKKOS_INLINE_FUNCTION void init(value_type& v) const {
    v.value = T(0);
    v.col = -1;
  }
  KOKKOS_INLINE_FUNCTION value_type& reference() const { return result; }
  KOKKOS_INLINE_FUNCTION result_view_type view() const { return result_view_type(&result); }
  KOKKOS_INLINE_FUNCTION bool references_scalar() const { return true; }
};
}  // namespace impl

template <class T>
void topk_forward(const View2<const T>& x, int k, TopkOrder order, const View2<T>& values,
                  const View2<int>& indices) {
  const index_t rows = x.extent(0), cols = x.extent(1);
  require(k >= 1 && k <= std::min<index_t>(cols, topk_max_k), Status::invalid_argument, "topk_forward: k = ", k,
          " must lie in [1, min(cols = ", cols, ", ", topk_max_k, ")]");
  require(values.extent(0) == x.extent(0) && values.extent(1) == static_cast<std::size_t>(k) &&
              indices.extent(0) == x.extent(0) && indices.extent(1) == static_cast<std::size_t>(k),
          Status::shape_mismatch, "topk_forward: x [", rows, ", ", cols, "] with k = ", k,
          " needs values and indices [", rows, ", ", k, "], got values [", values.extent(0), ", ", values.extent(1),
          "], indices [", indices.extent(0), ", ", indices.extent(1), "]");
  const bool by_index = order == TopkOrder::by_index;
  // A team per row: thread t keeps the best k of columns t, t + team, ... in registers, then k
  // team-wide rounds take the best head among the threads. The order is strict (ties go to the
  // lower column), so the result does not depend on the team size: one thread on the host (the
  // plain serial scan), a warp on a GPU.
  using Member = Kokkos::TeamPolicy<ExecSpace>::member_type;
  const int team_size = std::is_same_v<ExecSpace, Kokkos::DefaultHostExecutionSpace> ? 1 : 32;
  Kokkos::parallel_for(
      "kmoe::topk_forward",
      Kokkos::TeamPolicy<ExecSpace>(static_cast<int>(rows), team_size)
          .set_scratch_size(0, Kokkos::PerTeam(sizeof(typename impl::BestEntry<T>::value_type) * team_size)),
      KOKKOS_LAMBDA(const Member& team) {
        const index_t r = team.league_rank();
        const int lane = team.team_rank(), lanes = team.team_size();
        // This thread's best `kept` entries, best first; its columns arrive in ascending order.
        T best[topk_max_k];
        int best_col[topk_max_k];
        int kept = 0;
        for (int c = lane; c < static_cast<int>(cols); c += lanes) {
          const T v = x(r, c);
          // Later columns lose ties, so once k are kept only a larger value or a NaN gets in.
          if (kept == k && !(v > best[k - 1]) && !Kokkos::Experimental::isnan(v)) continue;
          if (kept == k && !impl::ranks_above(v, c, best[k - 1], best_col[k - 1])) continue;
          int pos = kept < k ? kept++ : k - 1;
          for (; pos > 0 && impl::ranks_above(v, c, best[pos - 1], best_col[pos - 1]); --pos) {
            best[pos] = best[pos - 1];
            best_col[pos] = best_col[pos - 1];
          }
          best[pos] = v;
          best_col[pos] = c;
        }
        // Each round every thread posts its head (column −1: none left) and the team takes the best.
        using Entry = typename impl::BestEntry<T>::value_type;
        Entry* const heads = static_cast<Entry*>(team.team_shmem().get_shmem(sizeof(Entry) * lanes));
        int head = 0;  // this thread's next candidate
        for (int j = 0; j < k; ++j) {
          heads[lane] = head < kept ? Entry{best[head], best_col[head]} : Entry{T(0), -1};
          team.team_barrier();
          Entry winner;
          Kokkos::parallel_reduce(
              Kokkos::TeamThreadRange(team, lanes),
              [&](const int t, Entry& acc) {
                if (impl::BestEntry<T>::better(heads[t].value, heads[t].col, acc.value, acc.col)) acc = heads[t];
              },
              impl::BestEntry<T>(winner));
          team.team_barrier();  // heads and the reduction's shared memory are reused next round
          if (head < kept && best_col[head] == winner.col) ++head;
          Kokkos::single(Kokkos::PerTeam(team), [&] {
            values(r, j) = winner.value;
            indices(r, j) = winner.col;
          });
        }
        if (by_index) {  // insertion sort of the k winners by column, in place
          team.team_barrier();
          Kokkos::single(Kokkos::PerTeam(team), [&] {
            for (int i = 1; i < k; ++i) {
              const T v = values(r, i);
              const int col = indices(r, i);
              int pos = i;
              for (; pos > 0 && indices(r, pos - 1) > col; --pos) {
                values(r, pos) = values(r, pos - 1);
                indices(r, pos) = indices(r, pos - 1);
              }
              values(r, pos) = v;
              indices(r, pos) = col;
            }
          });
        }
      });
}

template <class T>
void topk_backward(const View2<const int>& indices, const View2<const T>& dvalues, const View2<T>& dx) {
  const index_t rows = dx.extent(0), cols = dx.extent(1), k = indices.extent(1);
  require(indices.extent(0) == dx.extent(0) && dvalues.extent(0) == dx.extent(0) &&
              dvalues.extent(1) == indices.extent(1),
          Status::shape_mismatch, "topk_backward: indices [", indices.extent(0), ", ", k, "] and dvalues [",
          dvalues.extent(0), ", ", dvalues.extent(1), "] must both be [rows of dx = ", rows, ", k]");
  require(indices.span_is_contiguous(), Status::invalid_argument, "topk_backward: indices must be contiguous");
  require(cols <= std::numeric_limits<int>::max(), Status::invalid_argument, "topk_backward: dx has ", cols,
          " columns, beyond int indices");
  require_keys_in_range(View1<const int>(indices.data(), indices.size()), static_cast<int>(cols),
                        "topk_backward: indices (flattened)");
  // A repeated index sums its gradients in slot order (the adjoint of the gather), the same sum
  // either way: on a device a thread per entry of dx reads its row's k indices (dx written once,
  // coalesced, no zero fill); on the host a row's slots scatter into the zeroed row.
  if constexpr (Kokkos::SpaceAccessibility<HostSpace, MemSpace>::accessible) {
    Kokkos::deep_copy(ExecSpace(), dx, T(0));
    Kokkos::parallel_for(
        "kmoe::topk_backward", Kokkos::RangePolicy<ExecSpace>(0, rows), KOKKOS_LAMBDA(const index_t r) {
          for (index_t j = 0; j < k; ++j) dx(r, indices(r, j)) += dvalues(r, j);
        });
  } else {
    Kokkos::parallel_for(
        "kmoe::topk_backward", md_range<2>({0, 0}, {rows, cols}), KOKKOS_LAMBDA(const index_t r, const index_t c) {
          T sum = 0;
          for (index_t j = 0; j < k; ++j)
            if (indices(r, j) == c) sum += dvalues(r, j);
          dx(r, c) = sum;
        });
  }
}

#define KMOE_INSTANTIATE(T)                                                                               \
  template void topk_forward<T>(const View2<const T>&, int, TopkOrder, const View2<T>&, const View2<int>&); \
  template void topk_backward<T>(const View2<const int>&, const View2<const T>&, const View2<T>&);
KMOE_INSTANTIATE(float)
KMOE_INSTANTIATE(double)
#undef KMOE_INSTANTIATE

}  // namespace kmoe::ops
