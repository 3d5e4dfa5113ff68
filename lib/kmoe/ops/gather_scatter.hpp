// Row gather and deterministic row scatter-add.
#pragma once

#include "kmoe/core/config.hpp"

#include <string>

namespace kmoe::ops {

// out[i, :] = src[index[i], :]. An index outside [0, src rows) throws Status::invalid_argument, its
// message starting with index_name (callers name their own input: one range check, one wait).
template <class T>
void gather_rows(const View2<const T>& src, const View1<const int>& index, const View2<T>& out,
                 const std::string& index_name = "gather_rows: index");

// out[index[i], :] += src[i, :] for every i. Rows sharing a destination are summed in increasing
// i (grouped by a stable counting sort), so the result is bit-reproducible; no atomics. An index
// outside [0, out rows) throws as gather_rows does.
template <class T>
void scatter_add_rows(const View2<const T>& src, const View1<const int>& index, const View2<T>& out,
                      const std::string& index_name = "scatter_add_rows: index");

}  // namespace kmoe::ops
