// 16-bit floating-point formats on the host: bfloat16 (the GPU path's storage type; Kokkos 3.4
// has no bhalf_t) and IEEE binary16, as bit patterns. float → 16 bits rounds to nearest even as
// torch does (NaN stays NaN); 16 bits → float is exact.
#pragma once

#include <cstdint>

namespace kmoe {

std::uint16_t float_to_bfloat16_bits(float value);
float bfloat16_bits_to_float(std::uint16_t bits);
// The float nearest to value that bfloat16 can hold (round to nearest even).
inline float round_to_bfloat16(float value) { return bfloat16_bits_to_float(float_to_bfloat16_bits(value)); }

std::uint16_t float_to_half_bits(float value);
float half_bits_to_float(std::uint16_t bits);

}  // namespace kmoe
