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

// The block of a [A, B, C] fill_normal at offsets (a0, b0, c0) with out's shape [a, b, c]: out
// holds exactly the values fill_normal gives the whole tensor there (one rank's experts and
// hidden units of a distributed layer draw their part of the one-rank initialisation).
template <class T>
void fill_normal_block(const View3<T>& out, const RngStream& stream, T mean, T stddev, index_t B, index_t C,
                       index_t a0, index_t b0, index_t c0);

// out[i] = lo + (hi − lo) · U[0, 1).
template <class T>
void fill_uniform(const View1<T>& out, const RngStream& stream, T lo, T hi);

}  // namespace kmoe::ops
