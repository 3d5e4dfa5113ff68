#include "kmoe/ops/activations.hpp"

#include "kmoe/core/error.hpp"

namespace kmoe::ops {

Activation parse_activation(const std::string& name) {
  if (name == "identity" || name == "none") return Activation::identity;
  if (name == "relu") return Activation::relu;
  if (name == "gelu") return Activation::gelu;
  if (name == "silu" || name == "swish") return Activation::silu;
  if (name == "sigmoid") return Activation::sigmoid;
  fail(Status::invalid_argument, "unknown activation '", name, "' (identity, relu, gelu, silu, sigmoid)");
}

const char* activation_name(Activation activation) {
  switch (activation) {
    case Activation::identity: return "identity";
    case Activation::relu: return "relu";
    case Activation::gelu: return "gelu";
    case Activation::silu: return "silu";
    case Activation::sigmoid: return "sigmoid";
  }
  return "unknown";
}

template <class T>
void activation_forward(Activation activation, const View1<const T>& x, const View1<T>& y) {
  require(x.extent(0) == y.extent(0), Status::shape_mismatch, "activation_forward: x has ", x.extent(0),
          " elements, y ", y.extent(0));
  Kokkos::parallel_for(
      "kmoe::activation_forward", Kokkos::RangePolicy<ExecSpace>(0, x.extent(0)),
      KOKKOS_LAMBDA(const index_t i) { y(i) = activation_value(activation, x(i)); });
}

template <class T>
void activation_backward(Activation activation, const View1<const T>& x, const View1<const T>& dy,
                         const View1<T>& dx) {
  require(x.extent(0) == dy.extent(0) && x.extent(0) == dx.extent(0), Status::shape_mismatch,
          "activation_backward: x, dy, dx sizes ", x.extent(0), ", ", dy.extent(0), ", ", dx.extent(0), " differ");
  Kokkos::parallel_for(
      "kmoe::activation_backward", Kokkos::RangePolicy<ExecSpace>(0, x.extent(0)),
      KOKKOS_LAMBDA(const index_t i) { dx(i) = dy(i) * activation_derivative(activation, x(i)); });
}

#define KMOE_INSTANTIATE(T)                                                                           \
  template void activation_forward<T>(Activation, const View1<const T>&, const View1<T>&);            \
  template void activation_backward<T>(Activation, const View1<const T>&, const View1<const T>&, \
                                       const View1<T>&);
KMOE_INSTANTIATE(float)
KMOE_INSTANTIATE(double)
#undef KMOE_INSTANTIATE

}  // namespace kmoe::ops
