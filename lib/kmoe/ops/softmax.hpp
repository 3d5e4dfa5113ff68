// Softmax, log-softmax and logsumexp along one axis. A tensor of any rank is viewed as
// [outer, axis, inner] (Tensor::as_3d(axis)) and the op runs along the middle extent, numerically
// stable (max subtracted). As in PyTorch, a row that is entirely −inf gives NaN from softmax and
// log-softmax and −inf from logsumexp.
#pragma once

#include "kmoe/core/config.hpp"

namespace kmoe::ops {

template <class T>
void softmax_forward(const View3<const T>& x, const View3<T>& y);
// dx = y ⊙ (dy − Σ_axis dy ⊙ y); dx overwritten.
template <class T>
void softmax_backward(const View3<const T>& y, const View3<const T>& dy, const View3<T>& dx);

template <class T>
void log_softmax_forward(const View3<const T>& x, const View3<T>& y);
// dx = dy − exp(y) · Σ_axis dy; dx overwritten.
template <class T>
void log_softmax_backward(const View3<const T>& y, const View3<const T>& dy, const View3<T>& dx);

// y [outer, inner] = log Σ_axis exp(x).
template <class T>
void logsumexp_forward(const View3<const T>& x, const View2<T>& y);
// dx = dy · exp(x − y); dx overwritten.
template <class T>
void logsumexp_backward(const View3<const T>& x, const View2<const T>& y, const View2<const T>& dy,
                        const View3<T>& dx);

}  // namespace kmoe::ops
