// dist/placement.hpp: whole experts in contiguous blocks for W ≤ E (the first E mod W ranks one
// more), hidden-unit shards of one expert per rank for W > E (⌈W/E⌉ ranks for the first W mod E
// experts), every expert's units covered exactly once, and the printed form.
#include "kmoe/dist/placement.hpp"

#include "kmoe/core/error.hpp"

#include <gtest/gtest.h>

using kmoe::dist::Placement;

TEST(Placement, WholeExpertsInContiguousBlocks) {
  const Placement p(10, 4, 16);
  EXPECT_FALSE(p.sharded());
  const int first[] = {0, 3, 6, 8}, count[] = {3, 3, 2, 2};
  for (int r = 0; r < 4; ++r) {
    EXPECT_EQ(p.first_expert(r), first[r]) << r;
    EXPECT_EQ(p.local_experts(r), count[r]) << r;
    EXPECT_EQ(p.hidden_begin(r), 0);
    EXPECT_EQ(p.hidden_end(r), 16);
  }
  for (int e = 0; e < 10; ++e) {
    EXPECT_EQ(p.owner_end(e) - p.owner_begin(e), 1) << e;
    const int r = p.owner_begin(e);
    EXPECT_GE(e, p.first_expert(r));
    EXPECT_LT(e, p.first_expert(r) + p.local_experts(r));
  }
}

TEST(Placement, MoreRanksThanExpertsShardTheHiddenUnits) {
  for (const int world : {4, 5, 7, 8, 20}) {
    for (const int experts : {1, 3}) {
      if (world <= experts) continue;
      const Placement p(experts, world, 10);
      EXPECT_TRUE(p.sharded());
      std::vector<int> covered(static_cast<std::size_t>(experts) * 10, 0);
      for (int r = 0; r < world; ++r) {
        EXPECT_EQ(p.local_experts(r), 1);
        const int e = p.first_expert(r);
        EXPECT_GE(r, p.owner_begin(e));
        EXPECT_LT(r, p.owner_end(e));
        for (kmoe::index_t h = p.hidden_begin(r); h < p.hidden_end(r); ++h) ++covered[e * 10 + h];
      }
      for (const int c : covered) EXPECT_EQ(c, 1) << "W " << world << " E " << experts;
      for (int e = 0; e < experts; ++e) {
        const int shards = p.owner_end(e) - p.owner_begin(e);
        EXPECT_EQ(shards, world / experts + (e < world % experts ? 1 : 0)) << "W " << world << " E " << experts;
      }
    }
  }
}

TEST(Placement, DescribesEveryRankAndRejectsBadSizes) {
  EXPECT_EQ(Placement(3, 2, 8).describe(), "rank 0: experts 0-1, hidden 0-7\nrank 1: expert 2, hidden 0-7\n");
  EXPECT_EQ(Placement(1, 3, 2).describe(),
            "rank 0: expert 0, hidden 0-0 of 2\nrank 1: expert 0, hidden 1-1 of 2\nrank 2: expert 0, no hidden units\n");
  EXPECT_THROW(Placement(0, 2, 8), kmoe::Error);
  EXPECT_THROW(Placement(2, 0, 8), kmoe::Error);
}
