// Scaled dot-product attention over [batch, heads, length, channels] Views, as
// torch.nn.functional.scaled_dot_product_attention with a boolean mask (MoEUT's SwitchHead,
// RobertCsordas/moeut@87f04973d3db3ad7cb4ca67a0750241e40210d3c moeut/moeut.py, SwitchHeadCore):
//     S = scale · Q Kᵀ,   S[i, j] = −inf where the mask says so,   P = softmax_j(S),   O = P V.
// Forward keeps P for backward. The per-(batch, head) products are dense GEMMs (ops::gemm),
// issued independently per head (ops::for_each_independent_gemm), so results do not depend on the
// thread count.
//
// A query row whose keys are all masked out gives P = 0 and O = 0 (and zero gradients), not the
// NaN of a plain softmax over −inf (PyTorch ≥ 2.5's math backend does the same).
#pragma once

#include "kmoe/core/config.hpp"

namespace kmoe::ops {

// MoEUT's AttentionMask; True = masked OUT. Empty Views mean "absent"; both absent and causal
// false = no masking (the original crashes on AttentionMask(None, None); here it attends fully).
struct AttentionMask {
  // [B, Tk]: key j of sequence b is padding.
  Kokkos::View<const bool**, Layout, MemSpace> src_length_mask;
  // [Tq, Tm], 1 ≤ Tm ≤ Tk: aligned to the LAST Tm keys, the earlier Tk − Tm keys (a KV cache's)
  // visible, as the original left-pads the position mask with False.
  Kokkos::View<const bool**, Layout, MemSpace> position_mask;
  // Also mask key j for query i when j > (Tk − Tq) + i: the causal mask with the queries at the
  // last Tq positions (cached decoding), without materialising it.
  bool causal = false;
};

// q [B, H, Tq, Dh], k [B, H, Tk, Dh], v [B, H, Tk, Dv] → out [B, H, Tq, Dv]; probs [B, H, Tq, Tk]
// receives P (saved for backward). All Views contiguous. Throws Status::shape_mismatch naming the
// argument whose extents disagree (including the masks'), Status::invalid_argument when a View
// is not contiguous or scale is not finite.
template <class T>
void attention_forward(const View4<const T>& q, const View4<const T>& k, const View4<const T>& v, T scale,
                       const AttentionMask& mask, const View4<T>& probs, const View4<T>& out);

// From dout [B, H, Tq, Dv] and the forward's probs: dq, dk, dv overwritten (same extents as q, k, v).
// Masked and fully masked entries get no gradient. Same errors as attention_forward.
template <class T>
void attention_backward(const View4<const T>& q, const View4<const T>& k, const View4<const T>& v, T scale,
                        const View4<const T>& probs, const View4<const T>& dout, const View4<T>& dq,
                        const View4<T>& dk, const View4<T>& dv);

}  // namespace kmoe::ops
