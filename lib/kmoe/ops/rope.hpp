// Rotary position encoding (RoPE, Su et al. 2021) in the GPT-NeoX "half-split" layout, as
// MoEUT's RotaryPosEncoding (RobertCsordas/moeut@87f04973d3db3ad7cb4ca67a0750241e40210d3c
// moeut/moeut.py, RotaryPosEncoding and SwitchHeadRope.rotate): the first rot_dims channels of
// every head are rotated, channel c < rot_dims/2 paired with channel c + rot_dims/2,
//     y_c      = x_c · cos θ_pc − x_{c+h} · sin θ_pc
//     y_{c+h}  = x_{c+h} · cos θ_pc + x_c · sin θ_pc,      h = rot_dims / 2,
// with θ_pc = p · base^(−2c / rot_dims) at position p; the channels from rot_dims on pass
// through unchanged. Positions are position_offset + t for row t, so a cached decoder rotates its
// new queries at their true positions.
#pragma once

#include "kmoe/core/config.hpp"

namespace kmoe::ops {

// The even number of rotated channels for a head of d_head channels: 2·⌊rotate_fraction·d_head/2⌋.
// (The original's int(rotate_fraction·d_head) is odd for MoEUT_44M's d_head 82 and crashes there;
// the training code rounds down to even, as here.) Throws Status::invalid_argument unless
// d_head ≥ 1 and 0 ≤ rotate_fraction ≤ 1.
int rope_rotary_dims(index_t d_head, double rotate_fraction);

// y [B, H, T, Dh] = RoPE(x) with row t at position position_offset + t; y may alias x. Throws
// Status::invalid_argument unless rot_dims is even with 0 ≤ rot_dims ≤ Dh, base > 0 and
// position_offset ≥ 0; Status::shape_mismatch when y's extents differ from x's.
template <class T>
void rope_forward(const View4<const T>& x, int rot_dims, double base, index_t position_offset, const View4<T>& y);

// dx = RoPE⁻¹(dy) (the rotation by −θ, the transpose of the forward's); dx overwritten, may alias
// dy. Same arguments and errors as rope_forward.
template <class T>
void rope_backward(const View4<const T>& dy, int rot_dims, double base, index_t position_offset,
                   const View4<T>& dx);

}  // namespace kmoe::ops
