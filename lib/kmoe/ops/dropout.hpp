// Inverted dropout driven by the counter-based RNG: the mask is a pure function of
// (seed, offset, element index), so backward recomputes it instead of storing it, and results do
// not depend on the thread count or the device.
#pragma once

#include "kmoe/core/config.hpp"
#include "kmoe/core/random.hpp"

namespace kmoe::ops {

// y[i] = x[i] / (1 − p) when rng.uniform(i) ≥ p, else 0. p in [0, 1), otherwise
// Status::invalid_argument. y may alias x.
template <class T>
void dropout_forward(const View1<const T>& x, T p, const RngStream& rng, const View1<T>& y);

// dx[i] = dy[i] / (1 − p) where the forward kept element i, else 0. dx may alias dy.
template <class T>
void dropout_backward(const View1<const T>& dy, T p, const RngStream& rng, const View1<T>& dx);

// Dropout of a [rows, width] matrix whose element (r, c) draws counter row_keys[r] + c instead
// of its own position: for rows that are some of a larger matrix's rows in another order (σ-MoE's
// hidden units of the pairs a rank computes, in expert order), keyed so that each unit's mask is
// the one it has in the whole batch. Forward and backward are the same map; y may alias x.
template <class T>
void dropout_rows(const View2<const T>& x, T p, const RngStream& rng, const View1<const std::int64_t>& row_keys,
                  const View2<T>& y);

// Expert dropout of σ-MoE and SwitchHead selection scores: scores[i] = −inf where rng.uniform(i)
// < p (the expert cannot be selected), in place. p in [0, 1).
template <class T>
void drop_to_minus_infinity(const View1<T>& scores, T p, const RngStream& rng);

}  // namespace kmoe::ops
