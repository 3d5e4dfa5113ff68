#include "kmoe/core/bfloat16.hpp"

#include <cstring>

namespace kmoe {

namespace {

std::uint32_t bits_of(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

float float_of(std::uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

constexpr std::uint32_t float_abs_mask = 0x7FFFFFFFu;
constexpr std::uint32_t float_inf_bits = 0x7F800000u;

}  // namespace

std::uint16_t float_to_bfloat16_bits(float value) {
  const std::uint32_t bits = bits_of(value);
  // A NaN keeps its sign and top payload bits; the quiet bit makes sure truncation cannot turn it
  // into an infinity. (torch itself is not consistent here: 0x7FC0 in scalar code, 0xFFFF in its
  // AVX code, 0x7FFF on CUDA.)
  if ((bits & float_abs_mask) > float_inf_bits) return static_cast<std::uint16_t>((bits >> 16) | 0x0040u);
  // torch's round_to_nearest_even: adding 0x7FFF plus the kept part's lowest bit rounds ties to
  // even, and a carry out of the mantissa correctly bumps the exponent (up to infinity).
  const std::uint32_t rounding_bias = 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<std::uint16_t>((bits + rounding_bias) >> 16);
}

float bfloat16_bits_to_float(std::uint16_t bits) { return float_of(static_cast<std::uint32_t>(bits) << 16); }

std::uint16_t float_to_half_bits(float value) {
  const std::uint32_t bits = bits_of(value);
  const auto sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000u);
  const std::uint32_t abs = bits & float_abs_mask;

  if (abs > float_inf_bits)  // NaN: quiet, sign and top payload bits kept (as F16C does)
    return static_cast<std::uint16_t>(sign | 0x7E00u | ((abs >> 13) & 0x03FFu));
  // 65520 is halfway between 65504 (the largest half) and 65536; the tie goes to the even
  // neighbour, infinity.
  if (abs >= 0x477FF000u) return static_cast<std::uint16_t>(sign | 0x7C00u);
  if (abs >= 0x38800000u) {  // a normal half (>= 2^-14): rebias the exponent from 127 to 15
    const std::uint32_t rebiased = abs - (112u << 23);
    // Round away the 13 low mantissa bits to nearest even; a carry bumps the exponent.
    return static_cast<std::uint16_t>(sign | ((rebiased + 0x0FFFu + ((rebiased >> 13) & 1u)) >> 13));
  }
  // A half subnormal counts units of 2^-24. With the implicit bit, |value| = mantissa * 2^(e-150),
  // i.e. mantissa >> (126 - e) units. From a shift of 25 on, the value is below half a unit (float
  // subnormals included) and rounds to zero.
  const std::uint32_t exponent = abs >> 23;
  if (exponent < 102) return sign;
  const std::uint32_t mantissa = (abs & 0x007FFFFFu) | 0x00800000u;
  const std::uint32_t shift = 126 - exponent;  // 14..24
  std::uint32_t units = mantissa >> shift;
  const std::uint32_t remainder = mantissa & ((1u << shift) - 1u);
  const std::uint32_t half_unit = 1u << (shift - 1);
  if (remainder > half_unit || (remainder == half_unit && (units & 1u) != 0)) ++units;  // may reach 0x400, the smallest normal
  return static_cast<std::uint16_t>(sign | units);
}

float half_bits_to_float(std::uint16_t bits) {
  const std::uint32_t sign = static_cast<std::uint32_t>(bits & 0x8000u) << 16;
  const std::uint32_t exponent = (bits >> 10) & 0x1Fu;
  std::uint32_t mantissa = bits & 0x03FFu;
  if (exponent == 0x1F) return float_of(sign | float_inf_bits | (mantissa << 13));  // inf, NaN with its payload
  if (exponent != 0) return float_of(sign | ((exponent + 112) << 23) | (mantissa << 13));
  if (mantissa == 0) return float_of(sign);
  // Subnormal: mantissa * 2^-24 is a normal float; shift the leading one into the implicit bit.
  std::uint32_t float_exponent = 113;  // 2^-14, the subnormals' scale, as a biased float exponent
  while ((mantissa & 0x0400u) == 0) {
    mantissa <<= 1;
    --float_exponent;
  }
  return float_of(sign | (float_exponent << 23) | ((mantissa & 0x03FFu) << 13));
}

}  // namespace kmoe
