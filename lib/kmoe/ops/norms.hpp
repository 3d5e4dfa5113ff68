// Row-wise normalisations over the last axis: LayerNorm and RMSNorm. Forward keeps the per-row
// statistics that backward needs. Parameter gradients are summed over rows column by column
// (fixed order: deterministic) and accumulated.
#pragma once

#include "kmoe/core/config.hpp"

namespace kmoe::ops {

// y = (x − mean) · rstd · gamma + beta, rstd = 1/√(var + eps) with the biased variance (as
// torch.nn.LayerNorm). Empty gamma / beta Views mean no affine part. mean, rstd: [rows].
template <class T>
void layer_norm_forward(const View2<const T>& x, const View1<const T>& gamma, const View1<const T>& beta, T eps,
                        const View2<T>& y, const View1<T>& mean, const View1<T>& rstd);

// dx overwritten; dgamma, dbeta accumulated (each skipped when empty).
template <class T>
void layer_norm_backward(const View2<const T>& x, const View1<const T>& gamma, const View1<const T>& mean,
                         const View1<const T>& rstd, const View2<const T>& dy, const View2<T>& dx,
                         const View1<T>& dgamma, const View1<T>& dbeta);

enum class RmsNormMode {
  mean_square,   // y = x / √(mean(x²) + eps) · gamma          (T5 / LLaMA RMSNorm)
  l2_normalize,  // y = x / max(‖x‖₂, eps) · √D · gamma         (lucidrains: F.normalize(x) · √D · γ)
};

// scale[row] holds the per-row factor that multiplies x (1/√(mean(x²)+eps), or √D / max(‖x‖, eps)).
template <class T>
void rms_norm_forward(RmsNormMode mode, const View2<const T>& x, const View1<const T>& gamma, T eps,
                      const View2<T>& y, const View1<T>& scale);

// dx overwritten; dgamma accumulated (skipped when empty).
template <class T>
void rms_norm_backward(RmsNormMode mode, const View2<const T>& x, const View1<const T>& gamma, T eps,
                       const View1<const T>& scale, const View2<const T>& dy, const View2<T>& dx,
                       const View1<T>& dgamma);

}  // namespace kmoe::ops
