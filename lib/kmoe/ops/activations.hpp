// Elementwise activations with their derivatives. Backward takes the forward input x.
#pragma once

#include "kmoe/core/config.hpp"

#include <string>

namespace kmoe::ops {

enum class Activation {
  identity,
  relu,
  gelu,  // exact: x · Φ(x) = x/2 · (1 + erf(x/√2)), as torch.nn.functional.gelu
  silu,
  sigmoid,
};

// Parses "identity" / "none", "relu", "gelu", "silu" / "swish", "sigmoid"; anything else throws
// Status::invalid_argument naming the value.
Activation parse_activation(const std::string& name);
const char* activation_name(Activation activation);

// y = f(x); y may alias x.
template <class T>
void activation_forward(Activation activation, const View1<const T>& x, const View1<T>& y);

// dx = dy · f'(x); dx may alias dy.
template <class T>
void activation_backward(Activation activation, const View1<const T>& x, const View1<const T>& dy,
                         const View1<T>& dx);

// The scalar functions, for kernels that fuse an activation into other work.
template <class T>
KOKKOS_INLINE_FUNCTION T activation_value(Activation activation, T x) {
  switch (activation) {
    case Activation::identity: return x;
    case Activation::relu: return x > T(0) ? x : T(0);
    case Activation::gelu: return T(0.5) * x * (T(1) + Kokkos::Experimental::erf(x * T(0.70710678118654752440)));
    case Activation::silu: return x / (T(1) + Kokkos::Experimental::exp(-x));
    case Activation::sigmoid: return T(1) / (T(1) + Kokkos::Experimental::exp(-x));
  }
  return x;
}

template <class T>
KOKKOS_INLINE_FUNCTION T activation_derivative(Activation activation, T x) {
  switch (activation) {
    case Activation::identity: return T(1);
    case Activation::relu: return x > T(0) ? T(1) : T(0);
    case Activation::gelu: {
      const T cdf = T(0.5) * (T(1) + Kokkos::Experimental::erf(x * T(0.70710678118654752440)));
      const T pdf = T(0.39894228040143267794) * Kokkos::Experimental::exp(T(-0.5) * x * x);
      return cdf + x * pdf;
    }
    case Activation::silu: {
      const T s = T(1) / (T(1) + Kokkos::Experimental::exp(-x));
      return s * (T(1) + x * (T(1) - s));
    }
    case Activation::sigmoid: {
      const T s = T(1) / (T(1) + Kokkos::Experimental::exp(-x));
      return s * (T(1) - s);
    }
  }
  return T(1);
}

}  // namespace kmoe::ops
