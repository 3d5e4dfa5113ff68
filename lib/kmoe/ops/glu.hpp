// Gated linear units: out = act(gate) ⊙ value [⊙ mult], where the input row is [value | gate]
// (first half value, second half gate, as lucidrains' GEGLU in st-moe-pytorch and
// soft-moe-pytorch). act = exact GELU gives GEGLU; mult is ST-MoE's learned mult_bias.
#pragma once

#include "kmoe/core/config.hpp"
#include "kmoe/ops/activations.hpp"

namespace kmoe::ops {

// in [rows, 2·h] → out [rows, h]; mult [h] or empty (no multiplier). Throws Status::shape_mismatch
// on an odd or mismatched width.
template <class T>
void glu_forward(Activation activation, const View2<const T>& in, const View1<const T>& mult, const View2<T>& out);

// din [rows, 2·h] (overwritten) from dout [rows, h]; dmult [h] accumulated (deterministic: a fixed
// row order per column), skipped when empty. din may not alias in.
template <class T>
void glu_backward(Activation activation, const View2<const T>& in, const View1<const T>& mult,
                  const View2<const T>& dout, const View2<T>& din, const View1<T>& dmult);

}  // namespace kmoe::ops
