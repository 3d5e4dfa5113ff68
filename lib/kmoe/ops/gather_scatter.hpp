// Row gather and deterministic row scatter-add.
#pragma once

#include "kmoe/core/config.hpp"

namespace kmoe::ops {

// out[i, :] = src[index[i], :]. An index outside [0, src rows) throws Status::invalid_argument.
template <class T>
void gather_rows(const View2<const T>& src, const View1<const int>& index, const View2<T>& out);

// out[index[i], :] += src[i, :] for every i. Rows sharing a destination are summed in increasing
// i (grouped by a stable counting sort), so the result is bit-reproducible; no atomics.
template <class T>
void scatter_add_rows(const View2<const T>& src, const View1<const int>& index, const View2<T>& out);

}  // namespace kmoe::ops
