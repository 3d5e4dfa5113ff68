#include "kmoe/ops/dropout.hpp"

#include "kmoe/core/error.hpp"

namespace kmoe::ops {

namespace impl {

// out[i] = in[i] / (1 − p) where rng.uniform(i) ≥ p, else 0. Forward and backward are this same map,
// so backward recomputes exactly the forward mask.
template <class T>
void apply_dropout_mask(const char* op, const View1<const T>& in, T p, const RngStream& rng, const View1<T>& out) {
  require(p >= T(0) && p < T(1), Status::invalid_argument, op, ": dropout probability p = ", p, " is outside [0, 1)");
  require(in.extent(0) == out.extent(0), Status::shape_mismatch, op, ": input has ", in.extent(0), " elements, output ",
          out.extent(0));
  const T scale = T(1) / (T(1) - p);
  const RngStream stream = rng;
  Kokkos::parallel_for(
      op, Kokkos::RangePolicy<ExecSpace>(0, in.extent(0)), KOKKOS_LAMBDA(const index_t i) {
        const bool keep = stream.uniform<T>(static_cast<std::uint64_t>(i)) >= p;
        out(i) = keep ? in(i) * scale : T(0);
      });
}

}  // namespace impl

template <class T>
void dropout_forward(const View1<const T>& x, T p, const RngStream& rng, const View1<T>& y) {
  impl::apply_dropout_mask<T>("kmoe::dropout_forward", x, p, rng, y);
}

template <class T>
void dropout_backward(const View1<const T>& dy, T p, const RngStream& rng, const View1<T>& dx) {
  impl::apply_dropout_mask<T>("kmoe::dropout_backward", dy, p, rng, dx);
}

template <class T>
void dropout_rows(const View2<const T>& x, T p, const RngStream& rng, const View1<const std::int64_t>& row_keys,
                  const View2<T>& y) {
  require(p >= T(0) && p < T(1), Status::invalid_argument, "kmoe::dropout_rows: dropout probability p = ", p,
          " is outside [0, 1)");
  require(x.extent(0) == y.extent(0) && x.extent(1) == y.extent(1) && row_keys.extent(0) == x.extent(0),
          Status::shape_mismatch, "kmoe::dropout_rows: x [", x.extent(0), ", ", x.extent(1), "], y [", y.extent(0),
          ", ", y.extent(1), "], ", row_keys.extent(0), " row keys");
  const T scale = T(1) / (T(1) - p);
  const RngStream stream = rng;
  Kokkos::parallel_for(
      "kmoe::dropout_rows",
      md_range<2>({0, 0}, {static_cast<index_t>(x.extent(0)),
                                                                  static_cast<index_t>(x.extent(1))}),
      KOKKOS_LAMBDA(const index_t r, const index_t c) {
        const bool keep = stream.uniform<T>(static_cast<std::uint64_t>(row_keys(r) + c)) >= p;
        y(r, c) = keep ? x(r, c) * scale : T(0);
      });
}

template <class T>
void drop_to_minus_infinity(const View1<T>& scores, T p, const RngStream& rng) {
  require(p >= T(0) && p < T(1), Status::invalid_argument, "kmoe::drop_to_minus_infinity: p = ", p,
          " is outside [0, 1)");
  const RngStream stream = rng;
  const T minus_inf = -Kokkos::Experimental::infinity<T>::value;
  Kokkos::parallel_for(
      "kmoe::drop_to_minus_infinity", Kokkos::RangePolicy<ExecSpace>(0, scores.extent(0)),
      KOKKOS_LAMBDA(const index_t i) {
        if (stream.uniform<T>(static_cast<std::uint64_t>(i)) < p) scores(i) = minus_inf;
      });
}

#define KMOE_INSTANTIATE(T)                                                                      \
  template void dropout_forward<T>(const View1<const T>&, T, const RngStream&, const View1<T>&); \
  template void dropout_backward<T>(const View1<const T>&, T, const RngStream&, const View1<T>&); \
  template void drop_to_minus_infinity<T>(const View1<T>&, T, const RngStream&);                \
  template void dropout_rows<T>(const View2<const T>&, T, const RngStream&, const View1<const std::int64_t>&, \
                                const View2<T>&);
KMOE_INSTANTIATE(float)
KMOE_INSTANTIATE(double)
#undef KMOE_INSTANTIATE

}  // namespace kmoe::ops
