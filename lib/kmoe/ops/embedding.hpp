// Embedding lookup (rows of a table by token id) and its deterministic backward.
#pragma once

#include "kmoe/core/config.hpp"

namespace kmoe::ops {

// y[n, :] = table[ids[n], :]. An id outside [0, rows) throws Status::invalid_argument.
template <class T>
void embedding_forward(const View1<const int>& ids, const View2<const T>& table, const View2<T>& y);

// dtable[ids[n], :] += dy[n, :], summed per table row in token order: deterministic, no atomics.
template <class T>
void embedding_backward(const View1<const int>& ids, const View2<const T>& dy, const View2<T>& dtable);

}  // namespace kmoe::ops
