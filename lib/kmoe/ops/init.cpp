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
void fill_uniform(const View1<T>& out, const RngStream& stream, T lo, T hi) {
  if (!stream.draws) return;
  Kokkos::parallel_for(
      "kmoe::fill_uniform", Kokkos::RangePolicy<ExecSpace>(0, out.extent(0)), KOKKOS_LAMBDA(const index_t i) {
        out(i) = lo + (hi - lo) * stream.uniform<T>(static_cast<std::uint64_t>(i));
      });
}

#define KMOE_INSTANTIATE(T)                                                      \
  template void fill_normal<T>(const View1<T>&, const RngStream&, T, T);        \
  template void fill_uniform<T>(const View1<T>&, const RngStream&, T, T);
KMOE_INSTANTIATE(float)
KMOE_INSTANTIATE(double)
#undef KMOE_INSTANTIATE

}  // namespace kmoe::ops
