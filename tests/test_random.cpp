#include "kmoe/core/config.hpp"
#include "kmoe/core/random.hpp"
#include "test_util.hpp"

#include <array>
#include <cmath>
#include <set>

using namespace kmoe;
using namespace kmoe::test;



namespace {

using Words = std::array<std::uint32_t, 4>;

Words philox(const Words& counter, std::uint32_t key0, std::uint32_t key1) {
  const std::uint32_t ctr[4] = {counter[0], counter[1], counter[2], counter[3]};
  const std::uint32_t key[2] = {key0, key1};
  std::uint32_t out[4];
  impl::philox4x32(ctr, key, out);
  return {out[0], out[1], out[2], out[3]};
}

// Range, mean and variance of n draws against U[0, 1) (mean 1/2, variance 1/12), within 5 sigma.
template <class T>
void check_uniform_statistics(std::uint64_t seed) {
  const index_t n = 1 << 20;
  const auto u = draw_on_device<T>(RngStream{seed, 12345}, n);
  double sum = 0, sum_sq = 0, lo = 1, hi = 0;
  for (double v : u) {
    sum += v;
    sum_sq += (v - 0.5) * (v - 0.5);
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  ASSERT_GE(lo, 0.0);  // ASSERT: the histogram below indexes by value
  ASSERT_LT(hi, 1.0);
  EXPECT_LT(lo, 1e-4);  // the whole range is reached
  EXPECT_GT(hi, 1 - 1e-4);
  EXPECT_NEAR(sum / n, 0.5, 5 * std::sqrt(1.0 / 12 / n));
  // Var[(u − ½)²] = 1/80 − 1/144
  EXPECT_NEAR(sum_sq / n, 1.0 / 12, 5 * std::sqrt((1.0 / 80 - 1.0 / 144) / n));
  // a histogram of 16 bins: each bin's count within 5 sigma of n/16
  std::vector<int> bins(16, 0);
  for (double v : u) ++bins[static_cast<int>(v * 16)];
  const double expected = n / 16.0, sigma = std::sqrt(n * (1 / 16.0) * (15 / 16.0));
  for (int b = 0; b < 16; ++b) EXPECT_NEAR(bins[b], expected, 5 * sigma) << "bin " << b;
}

}  // namespace

// Known-answer vectors of Random123's kat_vectors for philox4x32 with 10 rounds.
TEST(Random, PhiloxKnownAnswers) {
  EXPECT_EQ(philox({0, 0, 0, 0}, 0, 0), (Words{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}));
  EXPECT_EQ(philox({0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, 0xffffffffu, 0xffffffffu),
            (Words{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}));
  EXPECT_EQ(philox({0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, 0xa4093822u, 0x299f31d0u),
            (Words{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}));
}

TEST(Random, SeedAndCounterFormTheKeyAndCounterWords) {
  std::uint32_t out[4];
  impl::philox4x32(std::uint64_t(0), std::uint64_t(0), out);
  EXPECT_EQ((Words{out[0], out[1], out[2], out[3]}), (Words{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}));
  // (seed, counter) = key (lo, hi), counter (lo, hi, 0, 0)
  const std::uint64_t seed = 0x0123456789abcdefULL, counter = 0xfedcba9876543210ULL;
  impl::philox4x32(seed, counter, out);
  EXPECT_EQ((Words{out[0], out[1], out[2], out[3]}),
            philox({0x76543210u, 0xfedcba98u, 0, 0}, 0x89abcdefu, 0x01234567u));
}

TEST(Random, UniformFloatIsUniformOnUnitInterval) { check_uniform_statistics<float>(7); }

TEST(Random, UniformDoubleIsUniformOnUnitInterval) { check_uniform_statistics<double>(8); }

TEST(Random, DrawsArePureFunctionsOfSeedAndCounter) {
  const RngStream stream{42, 1000};
  const auto on_device = draw_on_device<double>(stream, 4097);
  EXPECT_EQ(draw_on_device<double>(stream, 4097), on_device);  // same numbers every run
  for (index_t i = 0; i < 4097; i += 97) {
    EXPECT_EQ(stream.uniform<double>(i), on_device[i]);  // host and device agree
    EXPECT_EQ((RngStream{42, 1000 + static_cast<std::uint64_t>(i)}.uniform<double>(0)), on_device[i]);
  }
  EXPECT_NE(draw_on_device<double>(RngStream{43, 1000}, 4097), on_device);  // another seed, other numbers
  // float keeps the top 24 bits of the first word, so it is the double draw rounded down to 24 bits
  const auto as_float = draw_on_device<float>(stream, 4097);
  for (index_t i = 0; i < 4097; ++i) EXPECT_EQ(as_float[i], std::floor(on_device[i] * 16777216.0) / 16777216.0);
}

TEST(Random, GeneratorTakeGivesDisjointStreams) {
  Generator gen(99);
  const RngStream a = gen.take(1000), b = gen.take(1), c = gen.take(5000);
  EXPECT_EQ(gen.seed(), 99u);
  EXPECT_EQ(gen.position(), 6001u);
  EXPECT_EQ(a.seed, 99u);
  EXPECT_EQ(c.seed, 99u);
  EXPECT_EQ(a.offset, 0u);
  EXPECT_EQ(b.offset, 1000u);
  EXPECT_EQ(c.offset, 1001u);
  // no value drawn from one stream reappears in another (53-bit draws collide with probability ~1e-9)
  std::set<double> seen;
  for (const auto& [stream, n] : {std::pair{a, 1000}, std::pair{b, 1}, std::pair{c, 5000}})
    for (const double v : draw_on_device<double>(stream, n)) EXPECT_TRUE(seen.insert(v).second);
  EXPECT_EQ(seen.size(), 6001u);
  Generator same(99);
  EXPECT_EQ(same.take(1000).uniform<double>(17), a.uniform<double>(17));  // same seed, same sequence
}
