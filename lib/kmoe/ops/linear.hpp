// Linear layer in PyTorch's layout: y = x · Wᵀ + b with W [out, in]. Dense GEMMs go through
// KokkosBlas::gemm (BLAS / cuBLAS TPLs).
#pragma once

#include "kmoe/core/config.hpp"

namespace kmoe::ops {

// y [n, out] = x [n, in] · weight[out, in]ᵀ + bias[out]. An empty bias View means no bias.
template <class T>
void linear_forward(const View2<const T>& x, const View2<const T>& weight, const View1<const T>& bias,
                    const View2<T>& y);

// dx = dy · weight (overwritten; skipped when dx is empty); dweight += dyᵀ · x; dbias += Σₙ dy
// (skipped when dbias is empty). Parameter gradients accumulate so shared weights sum over uses.
template <class T>
void linear_backward(const View2<const T>& x, const View2<const T>& weight, const View2<const T>& dy,
                     const View2<T>& dx, const View2<T>& dweight, const View1<T>& dbias);

}  // namespace kmoe::ops
