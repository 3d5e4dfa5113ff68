#include "kmoe/core/scratch.hpp"
#include "test_util.hpp"

using namespace kmoe;

TEST(Scratch, ReusesANamedBufferAndGrowsIt) {
  const auto a = scratch<float>("test.a", 10, 20);
  EXPECT_EQ(a.extent(0), 10u);
  EXPECT_EQ(a.extent(1), 20u);
  const auto smaller = scratch<double>("test.a", 5, 7);  // fits in the same bytes: no allocation
  EXPECT_EQ(static_cast<void*>(smaller.data()), static_cast<void*>(a.data()));
  const auto other = scratch<float>("test.b", 10, 20);
  EXPECT_NE(other.data(), a.data());
  const auto larger = scratch<float>("test.a", 1000, 1000);
  EXPECT_EQ(larger.extent(0), 1000u);
  Kokkos::deep_copy(larger, 3.0f);  // the whole grown buffer is writable
  release_scratch();
}
