// Per-expert bias vectors on a per-pair matrix (the rows of a DispatchPlan's pairs, in pair order
// or in the plan's sorted order, as CVMM's PairRows): the bias that an expert's Linear adds after
// its CVMM product, and that bias's gradient. Dropped pairs (expert −1) get no bias and add to no
// gradient.
#pragma once

#include "kmoe/core/config.hpp"
#include "kmoe/moe/cvmm.hpp"
#include "kmoe/moe/dispatch_plan.hpp"

namespace kmoe::moe {

// rows(r, :) += bias(expert of row r, :); rows [n ≤ pairs, M], bias [experts, M].
template <class T>
void add_expert_bias(const DispatchPlan& plan, PairRows pair_rows, const View2<T>& rows, const View2<const T>& bias);

// dbias(e, :) += Σ over expert e's rows of drows(r, :), in ascending pair order (reproducible, no
// atomics); drows [pairs, M] (sorted: at least the routed rows), dbias [experts, M].
template <class T>
void accumulate_expert_bias_gradient(const DispatchPlan& plan, PairRows pair_rows, const View2<const T>& drows,
                                     const View2<T>& dbias);

}  // namespace kmoe::moe
