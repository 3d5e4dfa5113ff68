// Gated linear units: out = act(gate) ⊙ value [⊙ mult], where the input row is [value | gate]
// (first half value, second half gate, as lucidrains' GEGLU in st-moe-pytorch and
// soft-moe-pytorch). act = exact GELU gives GEGLU; mult is ST-MoE's learned mult_bias.
#pragma once

#include "kmoe/core/config.hpp"
#include "kmoe/ops/activations.hpp"

namespace kmoe::ops {

// The element formulas, shared by glu_forward/backward and the per-expert GEGLU of ST-MoE's experts.
// Their operand order fixes the rounding, so both callers give the same bits.
namespace impl {

template <class T>
KOKKOS_INLINE_FUNCTION T glu_gated(Activation activation, T value, T gate) {
  return activation_value(activation, gate) * value;
}

// The input gradients of one element from g = dout (times mult, where there is one).
template <class T>
struct GluInputGradient {
  T value, gate;
};

template <class T>
KOKKOS_INLINE_FUNCTION GluInputGradient<T> glu_input_gradient(Activation activation, T g, T value, T gate) {
  return {g * activation_value(activation, gate), g * value * activation_derivative(activation, gate)};
}

// One row's term of dmult: (dout · act(gate)) · value.
template <class T>
KOKKOS_INLINE_FUNCTION T glu_mult_gradient_term(Activation activation, T dout, T value, T gate) {
  return dout * activation_value(activation, gate) * value;
}

}  // namespace impl

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
