#include "kmoe/moe/cvmm.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/core/packet.hpp"
#include "kmoe/core/profile_region.hpp"
#include "kmoe/core/tensor.hpp"
#include "kmoe/ops/gemm.hpp"
#include "kmoe/ops/impl/team_reduce.hpp"

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

namespace kmoe::moe {

namespace impl {

template <class V>
std::string extents(const V& v) {
  std::string s = "[";
  for (unsigned axis = 0; axis < V::rank; ++axis) s += (axis ? ", " : "") + std::to_string(v.extent(axis));
  return s + "]";
}

template <class V>
void require_matrix(const char* op, const char* name, const V& v, index_t rows, index_t cols) {
  require(static_cast<index_t>(v.extent(0)) == rows && static_cast<index_t>(v.extent(1)) == cols,
          Status::shape_mismatch, op, ": ", name, " is ", extents(v), ", expected [", rows, ", ", cols, "]");
}

// Calls f(e, rows) for every expert with rows, rows being its range of sorted positions. Each
// call runs GEMMs on that expert's block alone, so experts may run concurrently.
template <class F>
void for_each_expert_block(const DispatchPlan& plan, const F& f) {
  const auto& offsets = plan.expert_offsets_host();
  ops::for_each_independent_gemm(plan.n_experts(), [&](const int e) {
    if (offsets[e + 1] > offsets[e]) f(e, Kokkos::make_pair(offsets[e], offsets[e + 1]));
  });
}

// Zeroes the rows of a sorted per-pair matrix past the routed pairs (dropped pairs: no expert
// writes them).
template <class T>
void zero_dropped_rows(const DispatchPlan& plan, const View2<T>& sorted) {
  const index_t routed = plan.n_routed_pairs(), pairs = plan.n_pairs();
  if (routed < pairs) Kokkos::deep_copy(ExecSpace(), Kokkos::subview(sorted, Kokkos::make_pair(routed, pairs), Kokkos::ALL), T(0));
}

// Where the rows of an input matrix are: one per token (row of pair p = p / k), one per pair in
// pair order (p), or one per pair already in sorted order (s, nothing to gather).
enum class RowSource { token, pair, sorted };

// The row of src that sorted position s (pair p) reads.
KOKKOS_INLINE_FUNCTION index_t source_row(RowSource source, index_t s, index_t p, index_t k) {
  return source == RowSource::token ? p / k : source == RowSource::pair ? p : s;
}

// C = op(A) · op(B) + beta · C on the GEMM operand type W: ops::gemm for float and double,
// ops::gemm_bf16 (float accumulation, into a bfloat16 or a float C) for bfloat16.
// (C named, not deduced, so that subviews convert.)
template <class W, class C = W>
void operand_gemm(bool transpose_a, bool transpose_b, const View2<const W>& a, const View2<const W>& b, float beta,
                  const View2<std::common_type_t<C>>& c) {
  if constexpr (std::is_same_v<W, bfloat16>) {
    ops::gemm_bf16(transpose_a, transpose_b, 1.0f, a, b, beta, c);
  } else {
    ops::gemm<W>(transpose_a, transpose_b, W(1), a, b, static_cast<W>(beta), c);
  }
}

// Checks x against the plan and W and says where its rows are: as x_rows names them, or (from_shape)
// by x's row count. With k = 1 a per-token and a per-pair x have the same shape; in pair order they
// are also the same rows, but in sorted order they are not, so there the caller must name them.
template <class T, class W>
RowSource x_row_source(const char* op, const DispatchPlan& plan, const View2<const T>& x, const View3<const W>& w,
                       PairRows pair_rows, XRows x_rows) {
  const index_t rows = x.extent(0);
  require(static_cast<index_t>(w.extent(0)) == plan.n_experts() && w.extent(1) == x.extent(1), Status::shape_mismatch,
          op, ": w is ", extents(w), ", expected [experts = ", plan.n_experts(), ", x columns = ", x.extent(1),
          ", M]");
  if (x_rows == XRows::from_shape) {
    require(rows == plan.n_tokens() || rows == plan.n_pairs(), Status::shape_mismatch, op, ": x is ", extents(x),
            ", but the plan has ", plan.n_tokens(), " tokens and ", plan.n_pairs(),
            " pairs: x needs one row per token or one per pair");
    require(pair_rows == PairRows::pair_order || plan.k() > 1, Status::invalid_argument, op,
            ": with k = 1 and PairRows::sorted a per-token x and a sorted per-pair x look alike; name x's rows "
            "(XRows::per_token or XRows::per_pair)");
    x_rows = rows == plan.n_tokens() ? XRows::per_token : XRows::per_pair;
  }
  const bool per_token = x_rows == XRows::per_token;
  require(rows == (per_token ? plan.n_tokens() : plan.n_pairs()), Status::shape_mismatch, op, ": x is ", extents(x),
          ", expected one row per ", per_token ? "token (" : "pair (", per_token ? plan.n_tokens() : plan.n_pairs(),
          " rows)");
  if (per_token) return RowSource::token;
  return pair_rows == PairRows::sorted ? RowSource::sorted : RowSource::pair;
}

// dst(r, :) = scale(r) · src(from(r), :) for every row r of dst, converted to Dst (the product
// taken in T), or 0 where from(r) < 0: CVMM's row gathers, unsorts and gated copies. A thread per
// (row, packet of N columns): coalesced 16-byte accesses on GPUs whether rows are wide (d_model)
// or narrow (a 128-wide expert row is 16 packets, which left most of a team per row idle).
template <int N, class T, class Src, class Dst, class From, class Scale>
void map_rows_packets(const char* label, const View2<const Src>& src, const View2<Dst>& dst, const From& from,
                      const Scale& scale) {
  const index_t packets = static_cast<index_t>(dst.extent(1)) / N;
  Kokkos::parallel_for(
      label, md_range<2>({0, 0}, {static_cast<index_t>(dst.extent(0)), packets}),
      KOKKOS_LAMBDA(const index_t r, const index_t u) {
        const index_t row = from(r);
        Packet<Dst, N> out;
        if (row < 0) {
          for (int j = 0; j < N; ++j) out.value[j] = convert<Dst>(T(0));
        } else {
          const T factor = scale(r);
          const Packet<Src, N> in = load_packet<N>(&src(row, u * N));
          for (int j = 0; j < N; ++j) out.value[j] = convert<Dst>(factor * convert<T>(in.value[j]));
        }
        store_packet<N>(&dst(r, u * N), out);
      });
}

template <class T, class Src, class Dst, class From, class Scale>
void map_rows(const char* label, const View2<const Src>& src, const View2<Dst>& dst, const From& from,
              const Scale& scale) {
  constexpr int N = packet_width<Src, Dst>;
  if (rows_in_packets<N>(src) && rows_in_packets<N>(dst))
    map_rows_packets<N, T>(label, src, dst, from, scale);
  else
    map_rows_packets<1, T>(label, src, dst, from, scale);
}

// dst(s, :) = [gate of pair p ·] src(row of pair p = sorted_pair(s), :), converted to Dst; no
// gates means weight 1 (a product with 1 is exact).
template <class T, class Dst>
void gather_sorted(const DispatchPlan& plan, RowSource source, const View2<const T>& src, const View2<const T>& gates,
                   const View2<Dst>& dst) {
  const View1<int> sorted_pair = plan.sorted_pair();
  const index_t k = plan.k();
  const bool gated = gates.data() != nullptr;
  map_rows<T>(
      "kmoe::cvmm::gather_sorted", src, View2<Dst>(Kokkos::subview(dst, Kokkos::make_pair(index_t(0), plan.n_pairs()),
                                                                  Kokkos::ALL)),
      KOKKOS_LAMBDA(const index_t s) { return source_row(source, s, sorted_pair(s), k); },
      KOKKOS_LAMBDA(const index_t s) {
        const index_t p = sorted_pair(s);
        return gated ? gates(p / k, p % k) : T(1);
      });
}

// The rows of src in the plan's sorted order as the GEMM operand type W, a block per expert:
// for_each(f) calls f(e, rows, a) for every expert with rows, a [rows, cols]. A sorted source
// already of type W is used in place. Otherwise, on a device all rows are gathered once, at
// construction, into the temporary `name` (a block of the caching allocator), so that several
// GEMM passes share one gather; on the host each expert's rows are copied into the running
// thread's own buffer right before f, so its GEMMs read them from cache rather than after a round
// trip through memory.
template <class W, class T>
class ExpertRows {
 public:
  ExpertRows(const DispatchPlan& plan, RowSource source, const View2<const T>& src, const char* name)
      : plan_(plan), source_(source), src_(src) {
    if (in_place() || on_host) return;
    storage_ = Tensor<W>::uninitialized(name, {plan.n_pairs(), static_cast<index_t>(src.extent(1))});
    gather_sorted<T, W>(plan, source, src, View2<const T>(), storage_.as_matrix());
  }

  template <class F>
  void for_each(const F& f) const {
    if constexpr (std::is_same_v<T, W>) {
      if (in_place()) {
        for_each_expert_block(plan_, [&](int e, auto rows) { f(e, rows, Kokkos::subview(src_, rows, Kokkos::ALL)); });
        return;
      }
    }
    if constexpr (on_host) {
      const View1<int> sorted_pair = plan_.sorted_pair();
      const index_t k = plan_.k(), cols = src_.extent(1);
      for_each_expert_block(plan_, [&](int e, auto rows) {
        thread_local std::vector<W> buffer;
        const index_t n = rows.second - rows.first;
        buffer.resize(static_cast<std::size_t>(n * cols));
        for (index_t r = 0; r < n; ++r) {
          const index_t s = rows.first + r;
          // (by pointer arithmetic: src_(row, 0) is out of bounds when there are no columns, which
          // the debug flavour's bounds check caught at W = 8)
          const T* row = src_.data() + source_row(source_, s, sorted_pair(s), k) * src_.stride(0);
          std::transform(row, row + cols, buffer.data() + r * cols, [](const T v) { return convert<W>(v); });
        }
        f(e, rows, View2<const W>(buffer.data(), n, cols));
      });
    } else {
      const View2<const W> sorted = storage_.as_matrix();
      for_each_expert_block(plan_, [&](int e, auto rows) { f(e, rows, Kokkos::subview(sorted, rows, Kokkos::ALL)); });
    }
  }

 private:
  static constexpr bool on_host = Kokkos::SpaceAccessibility<HostSpace, MemSpace>::accessible;
  bool in_place() const { return std::is_same_v<T, W> && source_ == RowSource::sorted; }

  const DispatchPlan& plan_;
  RowSource source_;
  View2<const T> src_;
  Tensor<W> storage_;
};

// pairs(s, :) = src(s, :) converted for the routed sorted positions, 0 past them (dropped pairs).
template <class Src, class T>
void convert_sorted_rows(const DispatchPlan& plan, const View2<const Src>& src, const View2<T>& dst) {
  const index_t routed = plan.n_routed_pairs();
  map_rows<T>(
      "kmoe::cvmm::convert_sorted_rows", src, dst, KOKKOS_LAMBDA(const index_t s) { return s < routed ? s : -1; },
      KOKKOS_LAMBDA(index_t) { return T(1); });
}

// pairs(p, :) = sorted(pair_position(p), :) as T, or 0 for a dropped pair (no expert computed it).
template <class Src, class T>
void unsort_pairs(const DispatchPlan& plan, const View2<const Src>& sorted, const View2<T>& pairs) {
  const View1<int> pair_position = plan.pair_position(), expert_of_pair = plan.expert_of_pair();
  map_rows<T>(
      "kmoe::cvmm::unsort_pairs", sorted,
      View2<T>(Kokkos::subview(pairs, Kokkos::make_pair(index_t(0), plan.n_pairs()), Kokkos::ALL)),
      KOKKOS_LAMBDA(const index_t p) { return expert_of_pair(p) < 0 ? index_t(-1) : index_t(pair_position(p)); },
      KOKKOS_LAMBDA(index_t) { return T(1); });
}

// tokens(t, :) = Σ_slot gates(t, slot) · src(row of pair t · k + slot, :), slots in order, dropped
// pairs left out, summed in T. The row is pair_position(p) when src is in sorted order, else p;
// no gates means weight 1. A thread per (token, packet of N columns) summing the slots in
// registers: the slot rows are read coalesced and the token's row written once.
template <int N, class Src, class T>
void sum_slots_packets(const DispatchPlan& plan, const View2<const Src>& src, bool src_sorted,
                       const View2<const T>& gates, const View2<T>& tokens) {
  const View1<int> pair_position = plan.pair_position(), expert_of_pair = plan.expert_of_pair();
  const int k = plan.k();
  const index_t packets = static_cast<index_t>(tokens.extent(1)) / N;
  const bool gated = gates.data() != nullptr;
  Kokkos::parallel_for(
      "kmoe::cvmm::sum_slots", md_range<2>({0, 0}, {static_cast<index_t>(plan.n_tokens()), packets}),
      KOKKOS_LAMBDA(const index_t t, const index_t u) {
        Packet<T, N> sum;
        for (int j = 0; j < N; ++j) sum.value[j] = T(0);  // stays 0 when every pair of the token was dropped
        bool first = true;  // the first term is the sum (no 0 + term): a token of one slot is that term
        for (int slot = 0; slot < k; ++slot) {
          const index_t p = t * k + slot;
          if (expert_of_pair(p) < 0) continue;
          const Packet<Src, N> in = load_packet<N>(&src(src_sorted ? pair_position(p) : p, u * N));
          const T gate = gated ? gates(t, slot) : T(1);
          for (int j = 0; j < N; ++j) {
            const T term = gate * convert<T>(in.value[j]);
            sum.value[j] = first ? term : sum.value[j] + term;
          }
          first = false;
        }
        store_packet<N>(&tokens(t, u * N), sum);
      });
}

template <class Src, class T>
void sum_slots(const DispatchPlan& plan, const View2<const Src>& src, bool src_sorted, const View2<const T>& gates,
               const View2<T>& tokens) {
  constexpr int N = packet_width<Src, T>;
  if (rows_in_packets<N>(src) && rows_in_packets<N>(tokens))
    sum_slots_packets<N>(plan, src, src_sorted, gates, tokens);
  else
    sum_slots_packets<1>(plan, src, src_sorted, gates, tokens);
}

// The outputs of either backward, each checked when present (not empty).
template <class T, class W>
void require_backward_outputs(const char* op, const View2<const T>& x, const View3<const W>& w, const View2<T>& dx,
                              const View3<T>& dw) {
  if (dx.data() != nullptr) require_matrix(op, "dx", dx, x.extent(0), x.extent(1));
  if (dw.data() != nullptr) {
    require(dw.extent(0) == w.extent(0) && dw.extent(1) == w.extent(1) && dw.extent(2) == w.extent(2),
            Status::shape_mismatch, op, ": dw is ", extents(dw), ", w is ", extents(w));
  }
}

// A [pairs, cols] temporary of the operand type W in sorted order.
template <class W>
Tensor<W> sorted_temporary(const char* name, const DispatchPlan& plan, index_t cols) {
  return Tensor<W>::uninitialized(name, {plan.n_pairs(), cols});
}

// dx and dW from dy in sorted order: per expert, dXs = dYs · Wᵀ and dW += Xsᵀ · dYs.
template <class T, class W>
void backward_from_sorted(const DispatchPlan& plan, RowSource x_source, const View2<const T>& x,
                          const View3<const W>& w, const View2<const W>& dy_sorted, const View2<T>& dx,
                          const View3<T>& dw) {
  const index_t K = x.extent(1);
  if (dx.data() != nullptr) {
    // A per-pair dx of type W in sorted order is written in place; otherwise through a sorted
    // temporary.
    constexpr bool same = std::is_same_v<T, W>;
    const bool in_place = same && x_source == RowSource::sorted;
    const Tensor<W> dx_sorted_storage = in_place ? Tensor<W>() : sorted_temporary<W>("cvmm.dx_sorted", plan, K);
    View2<W> dx_sorted;
    if constexpr (same) dx_sorted = in_place ? dx : dx_sorted_storage.as_matrix();
    else dx_sorted = dx_sorted_storage.as_matrix();
    for_each_expert_block(plan, [&](int e, auto rows) {
      operand_gemm<W>(false, true, Kokkos::subview(dy_sorted, rows, Kokkos::ALL),
                      Kokkos::subview(w, e, Kokkos::ALL, Kokkos::ALL), 0.0f,
                      Kokkos::subview(dx_sorted, rows, Kokkos::ALL));
    });
    if (x_source == RowSource::token) sum_slots<W, T>(plan, dx_sorted, true, View2<const T>(), dx);
    if (x_source == RowSource::pair) unsort_pairs<W, T>(plan, dx_sorted, dx);
    if (x_source == RowSource::sorted) {
      if (in_place) zero_dropped_rows<T>(plan, dx);
      else convert_sorted_rows<W, T>(plan, dx_sorted, dx);
    }
  }
  if (dw.data() != nullptr) {
    // A segmented reduction in a fixed order: one GEMM over each expert's rows, accumulated in
    // float straight into dw; ops::gemm keeps its inner-dimension order independent of the thread
    // count. An expert without rows gets no GEMM, so it adds exactly zero.
    ExpertRows<W, T>(plan, x_source, x, "cvmm.x_sorted").for_each([&](int e, auto rows, const View2<const W>& a) {
      operand_gemm<W, T>(true, false, a, Kokkos::subview(dy_sorted, rows, Kokkos::ALL), 1.0f,
                         Kokkos::subview(dw, e, Kokkos::ALL, Kokkos::ALL));
    });
  }
}

// y_sorted = the products x_row(p) · W[expert(p)] of every pair, in sorted order: one GEMM per
// expert on its gathered rows.
template <class T, class W>
void sorted_products(const DispatchPlan& plan, RowSource x_source, const View2<const T>& x, const View3<const W>& w,
                     const View2<W>& y_sorted) {
  ExpertRows<W, T>(plan, x_source, x, "cvmm.x_sorted").for_each([&](int e, auto rows, const View2<const W>& a) {
    operand_gemm<W>(false, false, a, Kokkos::subview(w, e, Kokkos::ALL, Kokkos::ALL), 0.0f,
                    Kokkos::subview(y_sorted, rows, Kokkos::ALL));
  });
}

}  // namespace impl

template <class T, class W>
void cvmm_forward(const DispatchPlan& plan, const View2<const T>& x, const View3<const OperandOf<W>>& w,
                  const View2<T>& y_pairs, PairRows pair_rows, XRows x_rows) {
  const char* op = "cvmm_forward";
  const ProfileRegion region("kmoe::cvmm_forward");
  const impl::RowSource x_source = impl::x_row_source(op, plan, x, w, pair_rows, x_rows);
  impl::require_matrix(op, "y_pairs", y_pairs, plan.n_pairs(), w.extent(2));
  if constexpr (std::is_same_v<T, W>) {
    if (pair_rows == PairRows::sorted) {
      impl::sorted_products<T, W>(plan, x_source, x, w, y_pairs);
      return impl::zero_dropped_rows<T>(plan, y_pairs);
    }
  }
  const Tensor<W> y_sorted_storage = impl::sorted_temporary<W>("cvmm.y_sorted", plan, w.extent(2));
  const View2<W> y_sorted = y_sorted_storage.as_matrix();
  impl::sorted_products<T, W>(plan, x_source, x, w, y_sorted);
  if (pair_rows == PairRows::sorted) return impl::convert_sorted_rows<W, T>(plan, y_sorted, y_pairs);
  impl::unsort_pairs<W, T>(plan, y_sorted, y_pairs);
}

template <class T, class W>
void cvmm_forward_reduced(const DispatchPlan& plan, const View2<const T>& x, const View3<const OperandOf<W>>& w,
                          const View2<const T>& gates, const View2<T>& y, PairRows pair_rows, XRows x_rows) {
  const char* op = "cvmm_forward_reduced";
  const ProfileRegion region("kmoe::cvmm_forward_reduced");
  const impl::RowSource x_source = impl::x_row_source(op, plan, x, w, pair_rows, x_rows);
  impl::require_matrix(op, "gates", gates, plan.n_tokens(), plan.k());
  impl::require_matrix(op, "y", y, plan.n_tokens(), w.extent(2));
  const Tensor<W> y_sorted_storage = impl::sorted_temporary<W>("cvmm.y_sorted", plan, w.extent(2));
  const View2<W> y_sorted = y_sorted_storage.as_matrix();
  impl::sorted_products<T, W>(plan, x_source, x, w, y_sorted);
  impl::sum_slots<W, T>(plan, y_sorted, true, gates, y);
}

template <class T, class W>
void cvmm_backward(const DispatchPlan& plan, const View2<const T>& x, const View3<const OperandOf<W>>& w,
                   const View2<const T>& dy_pairs, const View2<T>& dx, const View3<T>& dw, PairRows pair_rows,
                   XRows x_rows) {
  const char* op = "cvmm_backward";
  const ProfileRegion region("kmoe::cvmm_backward");
  const impl::RowSource x_source = impl::x_row_source(op, plan, x, w, pair_rows, x_rows);
  impl::require_matrix(op, "dy_pairs", dy_pairs, plan.n_pairs(), w.extent(2));
  impl::require_backward_outputs(op, x, w, dx, dw);
  if constexpr (std::is_same_v<T, W>) {
    if (pair_rows == PairRows::sorted) return impl::backward_from_sorted<T, W>(plan, x_source, x, w, dy_pairs, dx, dw);
  }
  const Tensor<W> dy_sorted_storage = impl::sorted_temporary<W>("cvmm.dy_sorted", plan, w.extent(2));
  const View2<W> dy_sorted = dy_sorted_storage.as_matrix();
  impl::gather_sorted<T, W>(plan, pair_rows == PairRows::sorted ? impl::RowSource::sorted : impl::RowSource::pair,
                            dy_pairs, View2<const T>(), dy_sorted);
  impl::backward_from_sorted<T, W>(plan, x_source, x, w, dy_sorted, dx, dw);
}

template <class T, class W>
void cvmm_backward_reduced(const DispatchPlan& plan, const View2<const T>& x, const View3<const OperandOf<W>>& w,
                           const View2<const T>& gates, const View2<const T>& dy, const View2<T>& dx,
                           const View3<T>& dw, const View2<T>& dgates, PairRows pair_rows, XRows x_rows) {
  const char* op = "cvmm_backward_reduced";
  const ProfileRegion region("kmoe::cvmm_backward_reduced");
  const impl::RowSource x_source = impl::x_row_source(op, plan, x, w, pair_rows, x_rows);
  const index_t tokens = plan.n_tokens(), pairs = plan.n_pairs(), K = x.extent(1), M = w.extent(2);
  const int k = plan.k();
  impl::require_matrix(op, "gates", gates, tokens, k);
  impl::require_matrix(op, "dy", dy, tokens, M);
  const bool want_dgates = dgates.data() != nullptr, want_dx = dx.data() != nullptr;
  if (want_dgates) impl::require_matrix(op, "dgates", dgates, tokens, k);
  impl::require_backward_outputs(op, x, w, dx, dw);
  const View1<int> sorted_pair = plan.sorted_pair();
  const index_t routed = plan.n_routed_pairs();  // sorted positions past it are dropped pairs
  // Each pair's upstream gradient is dy of its token, unweighted: its rows in sorted order, shared
  // by the dx and the dW GEMMs.
  const impl::ExpertRows<W, T> dy_rows(plan, impl::RowSource::token, dy, "cvmm.dy_sorted");

  if (want_dgates || want_dx) {
    // g_sorted = dy_e · W[e]ᵀ per expert: the unweighted input gradient of each pair.
    const Tensor<W> g_sorted_storage = impl::sorted_temporary<W>("cvmm.g_sorted", plan, K);
    const View2<W> g_sorted = g_sorted_storage.as_matrix();
    dy_rows.for_each([&](int e, auto rows, const View2<const W>& dy_e) {
      impl::operand_gemm<W>(false, true, dy_e, Kokkos::subview(w, e, Kokkos::ALL, Kokkos::ALL), 0.0f,
                            Kokkos::subview(g_sorted, rows, Kokkos::ALL));
    });
    if (want_dgates) {
      // One team per pair: a warp reads the pair's two rows coalesced and reduces in a fixed order.
      using Member = Kokkos::TeamPolicy<ExecSpace>::member_type;
      const int cols = static_cast<int>(K);
      Kokkos::parallel_for(
          "kmoe::cvmm::dgates", Kokkos::TeamPolicy<ExecSpace>(static_cast<int>(pairs), Kokkos::AUTO),
          KOKKOS_LAMBDA(const Member& team) {
            const index_t s = team.league_rank();
            const index_t p = sorted_pair(s);
            const index_t row = impl::source_row(x_source, s, p, k);
            // A dropped pair's gate does not reach the output.
            const T sum = s < routed ? ops::impl::team_sum<T>(team, cols,
                                                               [&](const int c) { return convert<T>(g_sorted(s, c)) * x(row, c); })
                                     : T(0);
            Kokkos::single(Kokkos::PerTeam(team), [&]() { dgates(p / k, p % k) = sum; });
          });
    }
    if (want_dx) {
      if (x_source == impl::RowSource::token) {
        impl::sum_slots<W, T>(plan, g_sorted, true, gates, dx);
      } else {
        // Row r of dx is pair r (pair order) or sorted position r; dropped pairs get 0.
        const bool sorted = x_source == impl::RowSource::sorted;
        const View1<int> pair_position = plan.pair_position();
        impl::map_rows<T>(
            "kmoe::cvmm::gated_dx", View2<const W>(g_sorted),
            View2<T>(Kokkos::subview(dx, Kokkos::make_pair(index_t(0), pairs), Kokkos::ALL)),
            KOKKOS_LAMBDA(const index_t r) {
              const index_t position = sorted ? r : pair_position(r);
              return position < routed ? position : index_t(-1);
            },
            KOKKOS_LAMBDA(const index_t r) {
              const index_t p = sorted ? sorted_pair(r) : r;
              return gates(p / k, p % k);
            });
      }
    }
  }
  if (dw.data() != nullptr) {
    // dW[e] += (gates ⊙ x_sorted)ᵀ · dy_e: the gate scales the narrow x rows, not dy.
    const Tensor<W> gated_x_storage = impl::sorted_temporary<W>("cvmm.gated_x_sorted", plan, K);
    const View2<W> gated_x = gated_x_storage.as_matrix();
    impl::gather_sorted<T, W>(plan, x_source, x, gates, gated_x);
    dy_rows.for_each([&](int e, auto rows, const View2<const W>& dy_e) {
      impl::operand_gemm<W, T>(true, false, Kokkos::subview(gated_x, rows, Kokkos::ALL), dy_e, 1.0f,
                               Kokkos::subview(dw, e, Kokkos::ALL, Kokkos::ALL));
    });
  }
}

#define KMOE_INSTANTIATE(T, W)                                                                                     \
  template void cvmm_forward<T, W>(const DispatchPlan&, const View2<const T>&, const View3<const W>&,             \
                                   const View2<T>&, PairRows, XRows);                                             \
  template void cvmm_forward_reduced<T, W>(const DispatchPlan&, const View2<const T>&, const View3<const W>&,     \
                                           const View2<const T>&, const View2<T>&, PairRows, XRows);              \
  template void cvmm_backward<T, W>(const DispatchPlan&, const View2<const T>&, const View3<const W>&,            \
                                    const View2<const T>&, const View2<T>&, const View3<T>&, PairRows, XRows);    \
  template void cvmm_backward_reduced<T, W>(const DispatchPlan&, const View2<const T>&, const View3<const W>&,    \
                                            const View2<const T>&, const View2<const T>&, const View2<T>&,        \
                                            const View3<T>&, const View2<T>&, PairRows, XRows);
KMOE_INSTANTIATE(float, float)
KMOE_INSTANTIATE(double, double)
KMOE_INSTANTIATE(float, bfloat16)
#undef KMOE_INSTANTIATE

}  // namespace kmoe::moe
