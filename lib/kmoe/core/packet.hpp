// Packets: N consecutive values of one row moved by a thread as one aligned block, so that
// conversions and gathers between float and bfloat16 use 16-byte loads and stores on a GPU
// instead of 2- and 4-byte ones (a warp of scalar bfloat16 accesses moves 64 bytes a step).
// Each value is still converted or summed on its own, in the same order, so a packet path gives
// the same bits as the scalar one it replaces.
#pragma once

#include "kmoe/core/config.hpp"

#include <Kokkos_Core.hpp>

#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace kmoe {

template <class T, int N>
struct alignas(sizeof(T) * N) Packet {
  T value[N];
};

// Values a packet holds when moving From to To: 16 bytes on the narrower side.
template <class From, class To>
constexpr int packet_width = static_cast<int>(16 / (sizeof(From) < sizeof(To) ? sizeof(From) : sizeof(To)));

template <int N, class T>
KOKKOS_INLINE_FUNCTION Packet<std::remove_const_t<T>, N> load_packet(T* first) {
  return *reinterpret_cast<const Packet<std::remove_const_t<T>, N>*>(first);
}

template <int N, class T>
KOKKOS_INLINE_FUNCTION void store_packet(T* first, const Packet<T, N>& packet) {
  *reinterpret_cast<Packet<T, N>*>(first) = packet;
}

// Whether a packet of N values of T can start at first.
template <int N, class T>
bool packet_aligned(const T* first) {
  return reinterpret_cast<std::uintptr_t>(first) % (sizeof(T) * N) == 0;
}

// Whether every row of a [rows, cols] View starts a packet of N (its data and row stride aligned
// to the packet) and cols is a whole number of packets.
template <int N, class View>
bool rows_in_packets(const View& view) {
  using T = typename View::value_type;
  return packet_aligned<N>(view.data()) && view.extent(1) % N == 0 &&
         (view.extent(0) <= 1 || (view.stride(0) * sizeof(T)) % (sizeof(T) * N) == 0);
}

namespace impl {

// f applied to the M input values of one element.
template <class F, class In, std::size_t M>
KOKKOS_INLINE_FUNCTION auto apply_to_inputs(const F& f, const Kokkos::Array<In, M>& v) {
  if constexpr (M == 1) return f(v[0]);
  else return f(v[0], v[1]);
}

// out[i] = f(in[0][i], …, in[M − 1][i]) for i in [0, n): a packet a thread where every pointer is
// aligned to one, then the tail (or everything, where one is not) a value a thread.
template <std::size_t M, class In, class Out, class F>
void transform_packets(const char* label, index_t n, const Kokkos::Array<const In*, M>& in, Out* out, const F& f) {
  static_assert(M == 1 || M == 2, "transform_packets: one or two inputs");
  constexpr int N = packet_width<In, Out>;
  bool aligned = packet_aligned<N>(out);
  for (std::size_t m = 0; m < M; ++m) aligned = aligned && packet_aligned<N>(in[m]);
  const index_t packets = aligned ? n / N : 0;
  Kokkos::parallel_for(
      label, Kokkos::RangePolicy<ExecSpace>(0, packets + (n - packets * N)), KOKKOS_LAMBDA(const index_t i) {
        Kokkos::Array<In, M> v;
        if (i < packets) {
          Packet<In, N> a[M];
          for (std::size_t m = 0; m < M; ++m) a[m] = load_packet<N>(in[m] + i * N);
          Packet<Out, N> result;
          for (int j = 0; j < N; ++j) {
            for (std::size_t m = 0; m < M; ++m) v[m] = a[m].value[j];
            result.value[j] = apply_to_inputs(f, v);
          }
          store_packet<N>(out + i * N, result);
        } else {
          const index_t e = packets * N + (i - packets);
          for (std::size_t m = 0; m < M; ++m) v[m] = in[m][e];
          out[e] = apply_to_inputs(f, v);
        }
      });
}

}  // namespace impl

// out[i] = f(in[i]) for i in [0, n), 16-byte packets a thread where the pointers allow. in may be
// out.
template <class In, class Out, class F>
void transform_packets(const char* label, index_t n, const In* in, Out* out, const F& f) {
  impl::transform_packets<1>(label, n, Kokkos::Array<const In*, 1>{in}, out, f);
}

// out[i] = f(first[i], second[i]), the same way.
template <class In, class Out, class F>
void transform_packets(const char* label, index_t n, const In* first, const In* second, Out* out, const F& f) {
  impl::transform_packets<2>(label, n, Kokkos::Array<const In*, 2>{first, second}, out, f);
}

}  // namespace kmoe
