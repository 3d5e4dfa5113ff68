#include "kmoe/ops/init.hpp"

namespace kmoe::ops {

template <class T>
void fill_normal(const View1<T>& out, const RngStream& stream, T mean, T stddev) {
  if (!stream.draws) return;
  Kokkos::parallel_for(
      "kmoe::fill_normal", Kokkos::RangePolicy<ExecSpace>(0, out.extent(0)), KOKKOS_LAMBDA(const index_t i) {
        out(i) = mean + stddev * stream.normal<T>(static_cast<std::uint64_t>(i));
      });
}

template <class T>
void fill_normal_block(const View3<T>& out, const RngStream& stream, T mean, T stddev, index_t B, index_t C,
                       index_t a0, index_t b0, index_t c0) {
  if (!stream.draws) return;
  Kokkos::parallel_for(
      "kmoe::fill_normal_block",
      md_range<3>({0, 0, 0}, {static_cast<index_t>(out.extent(0)),
                                                                     static_cast<index_t>(out.extent(1)),
                                                                     static_cast<index_t>(out.extent(2))}),
      KOKKOS_LAMBDA(const index_t a, const index_t b, const index_t c) {
        const index_t i = ((a0 + a) * B + b0 + b) * C + c0 + c;
        out(a, b, c) = mean + stddev * stream.normal<T>(static_cast<std::uint64_t>(i));
      });
}

template <class T>
void fill_uniform(const View1<T>& out, const RngStream& stream, T lo, T hi) {
  if (!stream.draws) return;
  Kokkos::parallel_for(
      "kmoe::fill_uniform", Kokkos::RangePolicy<ExecSpace>(0, out.extent(0)), KOKKOS_LAMBDA(const index_t i) {
        out(i) = lo + (hi - lo) * stream.uniform<T>(static_cast<std::uint64_t>(i));
      });
}

#define KMOE_INSTANTIATE(T)                                                      \
  template void fill_normal<T>(const View1<T>&, const RngStream&, T, T);        \
  template void fill_uniform<T>(const View1<T>&, const RngStream&, T, T);                 \
  template void fill_normal_block<T>(const View3<T>&, const RngStream&, T, T, index_t, index_t, index_t, index_t, \
                                     index_t);
KMOE_INSTANTIATE(float)
KMOE_INSTANTIATE(double)
#undef KMOE_INSTANTIATE

}  // namespace kmoe::ops
