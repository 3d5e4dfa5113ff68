// Seeded parameter initialisation: out[i] comes from draw i of a counter-based stream, so the values
// depend only on the seed and the draw order, not on the thread count or the device. A stream
// that does not draw (ParameterInit::zeros) leaves out as it is.
#pragma once

#include "kmoe/core/config.hpp"
#include "kmoe/core/random.hpp"

namespace kmoe::ops {

// out[i] = mean + stddev · N(0, 1).
template <class T>
void fill_normal(const View1<T>& out, const RngStream& stream, T mean, T stddev);

// out[i] = lo + (hi − lo) · U[0, 1).
template <class T>
void fill_uniform(const View1<T>& out, const RngStream& stream, T lo, T hi);

}  // namespace kmoe::ops
