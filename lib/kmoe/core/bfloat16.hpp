// bfloat16, kmoe's one 16-bit compute type (Kokkos 3.4 has no bhalf_t; a Kokkos with one makes
// this file the only one to change), and IEEE binary16 as host bit patterns for file formats.
// float → bfloat16 rounds to nearest even as torch does (NaN stays NaN); bfloat16 → float is
// exact. In a CUDA build kmoe::bfloat16 is CUDA's __nv_bfloat16, so cuBLAS and the kernels see
// the native type; elsewhere it is a 16-bit storage type converted in software.
#pragma once

#include <Kokkos_Macros.hpp>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(KOKKOS_ENABLE_CUDA)
#include <cuda_bf16.h>
#endif

namespace kmoe {

std::uint16_t float_to_bfloat16_bits(float value);
float bfloat16_bits_to_float(std::uint16_t bits);
// The float nearest to value that bfloat16 can hold (round to nearest even).
inline float round_to_bfloat16(float value) { return bfloat16_bits_to_float(float_to_bfloat16_bits(value)); }

std::uint16_t float_to_half_bits(float value);
float half_bits_to_float(std::uint16_t bits);

#if defined(KOKKOS_ENABLE_CUDA)
using bfloat16 = __nv_bfloat16;
KOKKOS_INLINE_FUNCTION bfloat16 to_bfloat16(float value) { return __float2bfloat16_rn(value); }
KOKKOS_INLINE_FUNCTION float to_float(bfloat16 value) { return __bfloat162float(value); }
#else
struct bfloat16 {
  std::uint16_t bits = 0;  // +0
};
// The same rounding as float_to_bfloat16_bits, inline for kernels.
KOKKOS_INLINE_FUNCTION bfloat16 to_bfloat16(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return {static_cast<std::uint16_t>((bits >> 16) | 0x0040u)};  // quiet NaN
  return {static_cast<std::uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16)};
}
KOKKOS_INLINE_FUNCTION float to_float(bfloat16 value) {
  const std::uint32_t bits = static_cast<std::uint32_t>(value.bits) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
#endif
static_assert(sizeof(bfloat16) == 2, "bfloat16 is 16 bits");

// value as To: bfloat16 goes through float; the same type is passed through unchanged.
template <class To, class From>
KOKKOS_INLINE_FUNCTION To convert(const From& value) {
  if constexpr (std::is_same_v<To, From>) {
    return value;
  } else if constexpr (std::is_same_v<To, bfloat16>) {
    return to_bfloat16(static_cast<float>(value));
  } else if constexpr (std::is_same_v<From, bfloat16>) {
    return static_cast<To>(to_float(value));
  } else {
    return static_cast<To>(value);
  }
}

}  // namespace kmoe
