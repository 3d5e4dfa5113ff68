// CVMM, σ-MoE's "conditional vector-matrix multiply": every (token, slot) pair of a DispatchPlan
// multiplies one input row by the weight matrix of its expert,
//     y_pair[p, :] = x[row(p), :] · W[expert(p)],        W [experts, K, M],
// with row(p) = token(p) when x has one row per token ([tokens, K]) and row(p) = p when x has one
// row per pair ([tokens · k, K], e.g. σ-MoE's hidden activations). Rows are gathered in expert
// order and each expert's block is one dense GEMM (KokkosBlas::gemm). The reduced form sums the
// pairs of a token with per-pair weights (σ-MoE's gates): y[t, :] = Σ_slot g[t, slot] · y_pair[p].
//
// Per-pair matrices (y_pairs, per-pair x, dy_pairs, per-pair dx) have their rows in pair order
// (row p = pair p) by default, or in the plan's sorted order (PairRows::sorted: row s = pair
// sorted_pair(s), each expert's rows contiguous). A layer that keeps per-pair activations in sorted
// order between two CVMMs (σ-MoE's hidden units) saves a gather and a scatter per call.
//
// Every reduction has a fixed order: slots of a token are summed in slot order and each expert's
// weight gradient is one GEMM over that expert's rows (a segmented reduction, no atomics), so
// results are bit-reproducible from run to run and across thread counts.
//
// W is the GEMM operand type: T itself (the parity path), or bfloat16 for a float T (mixed
// precision: rows are rounded to bfloat16 as they are gathered, the GEMMs accumulate in float and
// write bfloat16, and the slot sums, gates and gradients dx, dgates, dW stay in T).
#pragma once

#include "kmoe/core/bfloat16.hpp"
#include "kmoe/core/config.hpp"
#include "kmoe/moe/dispatch_plan.hpp"
#include "kmoe/moe/expert_operand.hpp"

namespace kmoe::moe {

enum class PairRows { pair_order, sorted };

// What x's rows are: one per token (row of pair p = p / k) or one per pair (in pair_rows' order).
// from_shape reads it from x's row count, which is unambiguous except for k = 1 in sorted order
// (a per-token x and a sorted per-pair x then have the same shape): there the caller names it.
enum class XRows { from_shape, per_token, per_pair };

// W, in a form that template argument deduction skips: callers name T (W defaults to it) and pass
// non-const weight Views, which then convert.
template <class W>
using OperandOf = typename std::enable_if<true, W>::type;

// y_pairs [pairs, M].
template <class T, class W = T>
void cvmm_forward(const DispatchPlan& plan, const View2<const T>& x, const View3<const OperandOf<W>>& w,
                  const View2<T>& y_pairs, PairRows pair_rows = PairRows::pair_order,
                  XRows x_rows = XRows::from_shape);

// y [tokens, M] = Σ_slot gates[t, slot] · y_pair. The per-pair products are not kept: backward
// recomputes what it needs at the width of x (as the original's CVMM backward does).
template <class T, class W = T>
void cvmm_forward_reduced(const DispatchPlan& plan, const View2<const T>& x, const View3<const OperandOf<W>>& w,
                          const View2<const T>& gates, const View2<T>& y, PairRows pair_rows = PairRows::pair_order,
                          XRows x_rows = XRows::from_shape);

// From dy_pairs [pairs, M]: dx overwritten (per-token x: the sum over slots, in slot order),
// dw accumulated (dw[e] += Σ_{p of e} x_row(p)ᵀ · dy_pair[p]); either is skipped when empty.
template <class T, class W = T>
void cvmm_backward(const DispatchPlan& plan, const View2<const T>& x, const View3<const OperandOf<W>>& w,
                   const View2<const T>& dy_pairs, const View2<T>& dx, const View3<T>& dw,
                   PairRows pair_rows = PairRows::pair_order, XRows x_rows = XRows::from_shape);

// Backward of cvmm_forward_reduced from dy [tokens, M]. With g_pair[p] = dy[t] · W[e]ᵀ (the
// unweighted input gradient of pair p): dgates[t, slot] = ⟨g_pair[p], x_row(p)⟩ (overwritten,
// skipped when empty); dx overwritten with gates[p] · g_pair[p] (per-pair x) or its sum over
// slots (per-token x); dw[e] += Σ_{p of e} gates[p] · x_row(p)ᵀ · dy[t] (accumulated).
template <class T, class W = T>
void cvmm_backward_reduced(const DispatchPlan& plan, const View2<const T>& x, const View3<const OperandOf<W>>& w,
                           const View2<const T>& gates, const View2<const T>& dy, const View2<T>& dx,
                           const View3<T>& dw, const View2<T>& dgates, PairRows pair_rows = PairRows::pair_order,
                           XRows x_rows = XRows::from_shape);

// The same four on a layer's ExpertOperand: W is the operand's type (T, or bfloat16 when the
// layer runs in mixed precision).
template <class T>
void cvmm_forward(const DispatchPlan& plan, const View2<const T>& x, const ExpertOperand<T>& w, const View2<T>& y_pairs,
                  PairRows pair_rows = PairRows::pair_order, XRows x_rows = XRows::from_shape) {
  w.visit([&](const auto& v) { cvmm_forward<T, OperandType<decltype(v)>>(plan, x, v, y_pairs, pair_rows, x_rows); });
}
template <class T>
void cvmm_forward_reduced(const DispatchPlan& plan, const View2<const T>& x, const ExpertOperand<T>& w,
                          const View2<const T>& gates, const View2<T>& y, PairRows pair_rows = PairRows::pair_order,
                          XRows x_rows = XRows::from_shape) {
  w.visit([&](const auto& v) {
    cvmm_forward_reduced<T, OperandType<decltype(v)>>(plan, x, v, gates, y, pair_rows, x_rows);
  });
}
template <class T>
void cvmm_backward(const DispatchPlan& plan, const View2<const T>& x, const ExpertOperand<T>& w,
                   const View2<const T>& dy_pairs, const View2<T>& dx, const View3<T>& dw,
                   PairRows pair_rows = PairRows::pair_order, XRows x_rows = XRows::from_shape) {
  w.visit([&](const auto& v) {
    cvmm_backward<T, OperandType<decltype(v)>>(plan, x, v, dy_pairs, dx, dw, pair_rows, x_rows);
  });
}
template <class T>
void cvmm_backward_reduced(const DispatchPlan& plan, const View2<const T>& x, const ExpertOperand<T>& w,
                           const View2<const T>& gates, const View2<const T>& dy, const View2<T>& dx,
                           const View3<T>& dw, const View2<T>& dgates, PairRows pair_rows = PairRows::pair_order,
                           XRows x_rows = XRows::from_shape) {
  w.visit([&](const auto& v) {
    cvmm_backward_reduced<T, OperandType<decltype(v)>>(plan, x, v, gates, dy, dx, dw, dgates, pair_rows, x_rows);
  });
}

}  // namespace kmoe::moe
