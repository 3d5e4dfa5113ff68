#include "kmoe/core/memory_pool.hpp"
#include "kmoe/core/tensor.hpp"
#include "test_util.hpp"

using namespace kmoe;
using namespace kmoe::test;

TEST(MemoryPool, FreedStorageIsReusedAndZeroedWhenAsked) {
  release_memory_pool();
  const float* first = nullptr;
  {
    Tensor<float> t("t", {1000, 257});
    t.fill(3.f);
    first = t.data();
  }
  EXPECT_GE(pool_cached_bytes(), 1000u * 257u * sizeof(float));
  // The same size (and one a few elements smaller) gets the cached block back, zeroed.
  Tensor<float> again("again", {1000, 256});
  EXPECT_EQ(again.data(), first);
  for (double v : to_double(again)) ASSERT_EQ(v, 0.0);
  EXPECT_EQ(pool_cached_bytes(), 0u);
}

TEST(MemoryPool, CopiesShareTheBlockUntilTheLastGoes) {
  release_memory_pool();
  Tensor<double> kept;
  {
    Tensor<double> t("t", {64, 64});
    kept = t.reshape({4096});
  }
  EXPECT_EQ(pool_cached_bytes(), 0u);  // still owned by `kept`
  kept.fill(1.0);
  kept = Tensor<double>();
  EXPECT_GE(pool_cached_bytes(), 4096u * sizeof(double));
}

TEST(MemoryPool, MuchLargerBlocksAreNotHandedToSmallRequests) {
  release_memory_pool();
  const float* big = nullptr;
  {
    Tensor<float> t = Tensor<float>::uninitialized("big", {1 << 20});
    big = t.data();
  }
  const Tensor<float> small = Tensor<float>::uninitialized("small", {1000});
  EXPECT_NE(small.data(), big);
}

TEST(MemoryPool, TheCacheLimitReleasesOldBlocks) {
  release_memory_pool();
  set_pool_cache_limit(std::size_t(1) << 20);
  { Tensor<float> t = Tensor<float>::uninitialized("t", {1 << 19}); }  // 2 MB: over the limit at once
  EXPECT_EQ(pool_cached_bytes(), 0u);
  { Tensor<float> t = Tensor<float>::uninitialized("t", {1 << 17}); }  // 512 KB: kept
  EXPECT_EQ(pool_cached_bytes(), (std::size_t(1) << 17) * sizeof(float));
  set_pool_cache_limit(std::size_t(4) << 30);
  release_memory_pool();
  EXPECT_EQ(pool_cached_bytes(), 0u);
}
