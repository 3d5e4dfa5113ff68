#include "kmoe/ops/attention.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/core/profile_region.hpp"
#include "kmoe/core/tensor.hpp"
#include "kmoe/ops/gemm.hpp"
#include "kmoe/ops/softmax.hpp"

#include <cmath>
#include <limits>

namespace kmoe::ops {

namespace impl {

using BoolView2 = Kokkos::View<const bool**, Layout, MemSpace>;

template <class V>
void require_extents(const char* op, const char* name, const V& view, index_t e0, index_t e1, index_t e2,
                     index_t e3) {
  require(static_cast<index_t>(view.extent(0)) == e0 && static_cast<index_t>(view.extent(1)) == e1 &&
              static_cast<index_t>(view.extent(2)) == e2 && static_cast<index_t>(view.extent(3)) == e3,
          Status::shape_mismatch, op, ": ", name, " is [", view.extent(0), ", ", view.extent(1), ", ",
          view.extent(2), ", ", view.extent(3), "], expected [", e0, ", ", e1, ", ", e2, ", ", e3, "]");
  require(view.span_is_contiguous(), Status::invalid_argument, op, ": ", name, " must be contiguous");
}

// The [rows, cols] matrix of head (b, h) of a contiguous [B, H, rows, cols] View.
template <class T>
View2<T> head_matrix(const View4<T>& x, index_t b, index_t h) {
  const index_t rows = x.extent(2), cols = x.extent(3);
  return View2<T>(x.data() + (b * static_cast<index_t>(x.extent(1)) + h) * rows * cols, rows, cols);
}

// Calls body(b, h, matrix of x at (b, h)...) through for_each_independent_gemm: one GEMM set per head.
template <class Body>
void for_each_head(index_t batch, index_t heads, const Body& body) {
  for_each_independent_gemm(static_cast<int>(batch * heads),
                            [&](const int bh) { body(bh / heads, bh % heads); });
}

KOKKOS_INLINE_FUNCTION bool is_masked(const BoolView2& src_length_mask, const BoolView2& position_mask, bool causal,
                                      index_t b, index_t i, index_t j, index_t q_len, index_t k_len) {
  if (src_length_mask.data() != nullptr && src_length_mask(b, j)) return true;
  const index_t query_offset = k_len - q_len;
  if (causal && j > query_offset + i) return true;
  if (position_mask.data() != nullptr) {
    const index_t column = j - (k_len - static_cast<index_t>(position_mask.extent(1)));
    if (column >= 0 && position_mask(i, column)) return true;
  }
  return false;
}

// probs = softmax over keys of the masked scores, in place; rows without a visible key → 0.
template <class T>
void masked_softmax(const View4<T>& probs, const AttentionMask& mask) {
  const index_t batch = probs.extent(0), heads = probs.extent(1), q_len = probs.extent(2), k_len = probs.extent(3);
  const index_t rows = batch * heads * q_len;
  const BoolView2 src = mask.src_length_mask, pos = mask.position_mask;
  const bool causal = mask.causal;
  const bool any_mask = src.data() != nullptr || pos.data() != nullptr || causal;
  const View3<T> lines(probs.data(), rows, k_len, 1);
  if (any_mask) {
    const T minus_inf = -std::numeric_limits<T>::infinity();
    Kokkos::parallel_for(
        "kmoe::attention::apply_mask", md_range<2>({0, 0}, {rows, k_len}),
        KOKKOS_LAMBDA(const index_t row, const index_t j) {
          const index_t i = row % q_len, b = row / (q_len * heads);
          if (is_masked(src, pos, causal, b, i, j, q_len, k_len)) lines(row, j, 0) = minus_inf;
        });
  }
  softmax_forward<T>(lines, lines);
  if (!any_mask) return;
  Kokkos::parallel_for(
      "kmoe::attention::zero_fully_masked_rows", Kokkos::RangePolicy<ExecSpace>(0, rows),
      KOKKOS_LAMBDA(const index_t row) {
        const index_t i = row % q_len, b = row / (q_len * heads);
        for (index_t j = 0; j < k_len; ++j)
          if (!is_masked(src, pos, causal, b, i, j, q_len, k_len)) return;
        for (index_t j = 0; j < k_len; ++j) lines(row, j, 0) = T(0);
      });
}

template <class T>
void check_mask(const char* op, const AttentionMask& mask, index_t batch, index_t q_len, index_t k_len) {
  if (mask.src_length_mask.data() != nullptr) {
    require(static_cast<index_t>(mask.src_length_mask.extent(0)) == batch &&
                static_cast<index_t>(mask.src_length_mask.extent(1)) == k_len,
            Status::shape_mismatch, op, ": src_length_mask is [", mask.src_length_mask.extent(0), ", ",
            mask.src_length_mask.extent(1), "], expected [B, Tk] = [", batch, ", ", k_len, "]");
  }
  if (mask.position_mask.data() != nullptr) {
    const index_t columns = mask.position_mask.extent(1);
    require(static_cast<index_t>(mask.position_mask.extent(0)) == q_len && columns >= 1 && columns <= k_len,
            Status::shape_mismatch, op, ": position_mask is [", mask.position_mask.extent(0), ", ", columns,
            "], expected [Tq, Tm] with Tq = ", q_len, " and 1 ≤ Tm ≤ Tk = ", k_len);
  }
}

// q, k, v and probs agree on batch, heads and lengths (q's batch, heads, q_len and d_head, k's
// k_len, v's d_value); scale is finite.
template <class T, class Probs>
void require_attention_inputs(const char* op, const View4<const T>& q, const View4<const T>& k,
                              const View4<const T>& v, T scale, const Probs& probs) {
  const index_t batch = q.extent(0), heads = q.extent(1), q_len = q.extent(2), d_head = q.extent(3);
  const index_t k_len = k.extent(2), d_value = v.extent(3);
  require_extents(op, "q", q, batch, heads, q_len, d_head);
  require_extents(op, "k", k, batch, heads, k_len, d_head);
  require_extents(op, "v", v, batch, heads, k_len, d_value);
  require_extents(op, "probs", probs, batch, heads, q_len, k_len);
  require(std::isfinite(static_cast<double>(scale)), Status::invalid_argument, op, ": scale = ", scale,
          " is not finite");
}

}  // namespace impl

template <class T>
void attention_forward(const View4<const T>& q, const View4<const T>& k, const View4<const T>& v, T scale,
                       const AttentionMask& mask, const View4<T>& probs, const View4<T>& out) {
  const ProfileRegion region("kmoe::attention_forward");
  const char* op = "attention_forward";
  const index_t batch = q.extent(0), heads = q.extent(1), q_len = q.extent(2), d_head = q.extent(3);
  const index_t k_len = k.extent(2), d_value = v.extent(3);
  impl::require_attention_inputs<T>(op, q, k, v, scale, probs);
  impl::require_extents(op, "out", out, batch, heads, q_len, d_value);
  impl::check_mask<T>(op, mask, batch, q_len, k_len);
  if (batch * heads * q_len == 0) return;
  if (k_len == 0 || d_head == 0) {  // no keys (every row fully masked) or empty dot products
    Kokkos::deep_copy(ExecSpace(), probs, T(0));
    if (k_len == 0) {
      Kokkos::deep_copy(ExecSpace(), out, T(0));
      return;
    }
  } else {
    impl::for_each_head(batch, heads, [&](index_t b, index_t h) {
      gemm<T>(false, true, scale, impl::head_matrix(q, b, h), impl::head_matrix(k, b, h), T(0),
              impl::head_matrix(probs, b, h));
    });
  }
  impl::masked_softmax<T>(probs, mask);
  if (d_value == 0) return;
  impl::for_each_head(batch, heads, [&](index_t b, index_t h) {
    gemm<T>(false, false, T(1), impl::head_matrix(View4<const T>(probs), b, h), impl::head_matrix(v, b, h), T(0),
            impl::head_matrix(out, b, h));
  });
}

template <class T>
void attention_backward(const View4<const T>& q, const View4<const T>& k, const View4<const T>& v, T scale,
                        const View4<const T>& probs, const View4<const T>& dout, const View4<T>& dq,
                        const View4<T>& dk, const View4<T>& dv) {
  const ProfileRegion region("kmoe::attention_backward");
  const char* op = "attention_backward";
  const index_t batch = q.extent(0), heads = q.extent(1), q_len = q.extent(2), d_head = q.extent(3);
  const index_t k_len = k.extent(2), d_value = v.extent(3);
  impl::require_attention_inputs<T>(op, q, k, v, scale, probs);
  impl::require_extents(op, "dout", dout, batch, heads, q_len, d_value);
  impl::require_extents(op, "dq", dq, batch, heads, q_len, d_head);
  impl::require_extents(op, "dk", dk, batch, heads, k_len, d_head);
  impl::require_extents(op, "dv", dv, batch, heads, k_len, d_value);
  Kokkos::deep_copy(ExecSpace(), dq, T(0));
  Kokkos::deep_copy(ExecSpace(), dk, T(0));
  Kokkos::deep_copy(ExecSpace(), dv, T(0));
  if (batch * heads * q_len * k_len == 0) return;
  // dV = Pᵀ dO; dP = dO Vᵀ; dS = softmax'(P) dP; dQ = scale · dS K; dK = scale · dSᵀ Q.
  // From the memory pool: two [B, H, Tq, Tk] Views a call were a cudaMalloc, a fill and a
  // synchronising cudaFree each. dP is written whole by its GEMMs, or stays zero without values.
  const Shape scores_shape{batch, heads, q_len, k_len};
  const Tensor<T> dprobs_storage = d_value > 0 ? Tensor<T>::uninitialized("kmoe::attention::dprobs", scores_shape)
                                               : Tensor<T>("kmoe::attention::dprobs", scores_shape);
  const auto dscores_storage = Tensor<T>::uninitialized("kmoe::attention::dscores", scores_shape);
  const View4<T> dprobs = dprobs_storage.template view<4>(), dscores = dscores_storage.template view<4>();
  if (d_value > 0) {
    impl::for_each_head(batch, heads, [&](index_t b, index_t h) {
      const View2<const T> p = impl::head_matrix(probs, b, h), g = impl::head_matrix(dout, b, h);
      gemm<T>(true, false, T(1), p, g, T(0), impl::head_matrix(dv, b, h));
      gemm<T>(false, true, T(1), g, impl::head_matrix(v, b, h), T(0), impl::head_matrix(dprobs, b, h));
    });
  }
  const index_t rows = batch * heads * q_len;
  softmax_backward<T>(View3<const T>(probs.data(), rows, k_len, 1), View3<const T>(dprobs.data(), rows, k_len, 1),
                      View3<T>(dscores.data(), rows, k_len, 1));
  if (d_head == 0) return;
  impl::for_each_head(batch, heads, [&](index_t b, index_t h) {
    const View2<const T> ds = impl::head_matrix(View4<const T>(dscores), b, h);
    gemm<T>(false, false, scale, ds, impl::head_matrix(k, b, h), T(0), impl::head_matrix(dq, b, h));
    gemm<T>(true, false, scale, ds, impl::head_matrix(q, b, h), T(0), impl::head_matrix(dk, b, h));
  });
}

#define KMOE_INSTANTIATE(T)                                                                                    \
  template void attention_forward<T>(const View4<const T>&, const View4<const T>&, const View4<const T>&, T,   \
                                     const AttentionMask&, const View4<T>&, const View4<T>&);                  \
  template void attention_backward<T>(const View4<const T>&, const View4<const T>&, const View4<const T>&, T,  \
                                      const View4<const T>&, const View4<const T>&, const View4<T>&,           \
                                      const View4<T>&, const View4<T>&);
KMOE_INSTANTIATE(float)
KMOE_INSTANTIATE(double)
#undef KMOE_INSTANTIATE

}  // namespace kmoe::ops
