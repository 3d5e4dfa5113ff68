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

// out[i] = f(in[i]) for i in [0, n): a packet a thread where every pointer is aligned to one,
// then the tail (or everything, where one is not) a value a thread. in may be out.
template <class In, class Out, class F>
void transform_packets(const char* label, index_t n, const In* in, Out* out, const F& f) {
  constexpr int N = packet_width<In, Out>;
  const index_t packets = packet_aligned<N>(in) && packet_aligned<N>(out) ? n / N : 0;
  Kokkos::parallel_for(
      label, Kokkos::RangePolicy<ExecSpace>(0, packets + (n - packets * N)), KOKKOS_LAMBDA(const index_t i) {
        if (i < packets) {
          const Packet<In, N> a = load_packet<N>(in + i * N);
          Packet<Out, N> result;
          for (int j = 0; j < N; ++j) result.value[j] = f(a.value[j]);
          store_packet<N>(out + i * N, result);
        } else {
          const index_t e = packets * N + (i - packets);
          out[e] = f(in[e]);
        }
      });
}

// out[i] = f(first[i], second[i]), the same way.
template <class In, class Out, class F>
void transform_packets(const char* label, index_t n, const In* first, const In* second, Out* out, const F& f) {
  constexpr int N = packet_width<In, Out>;
  const bool aligned = packet_aligned<N>(first) && packet_aligned<N>(second) && packet_aligned<N>(out);
  const index_t packets = aligned ? n / N : 0;
  Kokkos::parallel_for(
      label, Kokkos::RangePolicy<ExecSpace>(0, packets + (n - packets * N)), KOKKOS_LAMBDA(const index_t i) {
        if (i < packets) {
          const Packet<In, N> a = load_packet<N>(first + i * N), b = load_packet<N>(second + i * N);
          Packet<Out, N> result;
          for (int j = 0; j < N; ++j) result.value[j] = f(a.value[j], b.value[j]);
          store_packet<N>(out + i * N, result);
        } else {
          const index_t e = packets * N + (i - packets);
          out[e] = f(first[e], second[e]);
        }
      });
}

}  // namespace kmoe
