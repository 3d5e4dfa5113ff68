// Counter-based random numbers (Philox-4x32-10, Salmon et al. 2011): a draw is a pure function
// of (seed, counter), so kernels draw in parallel without shared state and every run, thread
// count and device gives the same numbers. A Generator hands out disjoint counter ranges, which
// is how a caller controls all of a layer's randomness with one seed.
#pragma once

#include <Kokkos_Core.hpp>

#include <cstdint>

namespace kmoe {

namespace impl {
KOKKOS_INLINE_FUNCTION void philox_round(std::uint32_t (&ctr)[4], const std::uint32_t (&key)[2]) {
  constexpr std::uint32_t m0 = 0xD2511F53u, m1 = 0xCD9E8D57u;
  const std::uint64_t p0 = static_cast<std::uint64_t>(m0) * ctr[0];
  const std::uint64_t p1 = static_cast<std::uint64_t>(m1) * ctr[2];
  const std::uint32_t hi0 = static_cast<std::uint32_t>(p0 >> 32), lo0 = static_cast<std::uint32_t>(p0);
  const std::uint32_t hi1 = static_cast<std::uint32_t>(p1 >> 32), lo1 = static_cast<std::uint32_t>(p1);
  ctr[0] = hi1 ^ ctr[1] ^ key[0];
  ctr[1] = lo1;
  ctr[2] = hi0 ^ ctr[3] ^ key[1];
  ctr[3] = lo0;
}

// Philox-4x32-10 (Random123's philox4x32 with 10 rounds) of a full 128-bit counter under a 64-bit key.
KOKKOS_INLINE_FUNCTION void philox4x32(const std::uint32_t (&counter)[4], const std::uint32_t (&key)[2],
                                       std::uint32_t (&out)[4]) {
  std::uint32_t round_key[2] = {key[0], key[1]};
  for (int word = 0; word < 4; ++word) out[word] = counter[word];
  for (int round = 0; round < 10; ++round) {
    philox_round(out, round_key);
    if (round < 9) {
      round_key[0] += 0x9E3779B9u;
      round_key[1] += 0xBB67AE85u;
    }
  }
}

// Philox-4x32-10 of the 128-bit counter (counter, 0) under the 64-bit key seed.
KOKKOS_INLINE_FUNCTION void philox4x32(std::uint64_t seed, std::uint64_t counter, std::uint32_t (&out)[4]) {
  const std::uint32_t key[2] = {static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32)};
  const std::uint32_t full_counter[4] = {static_cast<std::uint32_t>(counter),
                                         static_cast<std::uint32_t>(counter >> 32), 0u, 0u};
  philox4x32(full_counter, key, out);
}
}  // namespace impl

// A contiguous range of counters under one seed: element i of a kernel draws uniform(i).
struct RngStream {
  std::uint64_t seed = 0;
  std::uint64_t offset = 0;
  bool draws = true;  // false: from a Generator of ParameterInit::zeros; the fills skip it

  // Uniform in [0, 1) with 24 random bits (float) or 53 (double).
  template <class T>
  KOKKOS_INLINE_FUNCTION T uniform(std::uint64_t i) const {
    std::uint32_t r[4];
    impl::philox4x32(seed, offset + i, r);
    if constexpr (sizeof(T) == 4) {
      return static_cast<T>(r[0] >> 8) * T(1.0f / 16777216.0f);
    } else {
      const std::uint64_t bits = (static_cast<std::uint64_t>(r[0]) << 21) ^ (r[1] >> 11);
      return static_cast<T>(bits & ((std::uint64_t(1) << 53) - 1)) * T(1.0 / 9007199254740992.0);
    }
  }

  // Standard normal by Box-Muller from the same counter's words: u1 in (0, 1] (so log u1 is
  // finite) and u2 in [0, 1), each with 24 random bits (float) or 53 (double).
  template <class T>
  KOKKOS_INLINE_FUNCTION T normal(std::uint64_t i) const {
    std::uint32_t r[4];
    impl::philox4x32(seed, offset + i, r);
    T u1, u2;
    if constexpr (sizeof(T) == 4) {
      u1 = static_cast<T>((r[0] >> 8) + 1u) * T(1.0f / 16777216.0f);
      u2 = static_cast<T>(r[1] >> 8) * T(1.0f / 16777216.0f);
    } else {
      const std::uint64_t mask = (std::uint64_t(1) << 53) - 1;
      const std::uint64_t bits1 = ((static_cast<std::uint64_t>(r[0]) << 21) ^ (r[1] >> 11)) & mask;
      const std::uint64_t bits2 = ((static_cast<std::uint64_t>(r[2]) << 21) ^ (r[3] >> 11)) & mask;
      u1 = static_cast<T>(bits1 + 1) * T(1.0 / 9007199254740992.0);
      u2 = static_cast<T>(bits2) * T(1.0 / 9007199254740992.0);
    }
    return Kokkos::Experimental::sqrt(T(-2) * Kokkos::Experimental::log(u1)) *
           Kokkos::Experimental::cos(T(6.28318530717958647692) * u2);
  }
};

// How a layer's constructor fills its parameters: drawn from its seed as the original does, or
// left zero. Zeros are for building a layer only to learn its parameters' names and shapes (as
// kmoe-inspect --verify does): the draws dominate building a large model.
enum class ParameterInit { drawn, zeros };

// The caller-controlled source of every random draw: each take(n) returns a fresh, disjoint
// stream of n counters. A generator of ParameterInit::zeros hands out streams that ops::fill_*
// skip, so initialisation code needs no branches of its own.
class Generator {
 public:
  explicit Generator(std::uint64_t seed = 0, ParameterInit init = ParameterInit::drawn)
      : seed_(seed), draws_(init == ParameterInit::drawn) {}
  RngStream take(std::uint64_t n) {
    RngStream stream{seed_, next_, draws_};
    next_ += n;
    return stream;
  }
  std::uint64_t seed() const { return seed_; }
  std::uint64_t position() const { return next_; }
  bool draws() const { return draws_; }
  // A generator continuing from a saved (seed, position), as checkpoints store it.
  static Generator restore(std::uint64_t seed, std::uint64_t position) {
    Generator g(seed);
    g.next_ = position;
    return g;
  }

 private:
  std::uint64_t seed_;
  std::uint64_t next_ = 0;
  bool draws_;
};

}  // namespace kmoe
