#include "kmoe/ops/counting_sort.hpp"
#include "test_util.hpp"

#include <numeric>

using namespace kmoe;
using namespace kmoe::test;

namespace {

// The stable sort is unique, so matching it exactly also shows the result cannot depend on how
// chunks were spread over threads.
void expect_matches_stable_sort(const std::vector<int>& keys, int n_keys) {
  std::vector<int> order(keys.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return keys[a] < keys[b]; });
  std::vector<int> offsets(n_keys + 1, 0);
  for (int k : keys) ++offsets[k + 1];
  std::partial_sum(offsets.begin(), offsets.end(), offsets.begin());

  const auto groups = ops::counting_sort(device_ints(keys), n_keys);
  EXPECT_EQ(groups.order.to_host(), order) << "n " << keys.size() << " keys " << n_keys;
  EXPECT_EQ(groups.offsets.to_host(), offsets) << "n " << keys.size() << " keys " << n_keys;
}

}  // namespace

TEST(CountingSort, MatchesStableSortAcrossChunkBoundaries) {
  std::uint64_t seed = 100;
  for (std::size_t n : {1, 7, 255, 256, 257, 1000, 5003})
    for (int n_keys : {1, 3, 37, 1500}) expect_matches_stable_sort(random_index(n, n_keys, ++seed), n_keys);
}

TEST(CountingSort, OneKeySpanningManyChunksKeepsIndexOrder) {
  // Almost every element shares key 2: its group is assembled from every chunk.
  auto keys = std::vector<int>(3 * 256 + 5, 2);
  keys[0] = 0;
  keys[300] = 4;
  keys[700] = 0;
  expect_matches_stable_sort(keys, 5);
}

TEST(CountingSort, EmptyInputGivesZeroOffsets) {
  expect_matches_stable_sort({}, 4);
  expect_matches_stable_sort({}, 0);
}

TEST(CountingSort, KeysOutOfRangeAreRejected) {
  auto keys = random_index(600, 9, 7);
  keys[517] = 9;
  expect_status([&] { ops::counting_sort(device_ints(keys), 9); }, Status::invalid_argument, "value 9 at element 517");
  keys[517] = 3;
  keys[20] = -1;
  expect_status([&] { ops::counting_sort(device_ints(keys), 9); }, Status::invalid_argument, "value -1 at element 20");
  expect_status([&] { ops::counting_sort(device_ints({}), -1); }, Status::invalid_argument, "n_keys");
}

TEST(CountingSort, ManyMoreKeysThanElements) {
  // A vocabulary-sized key range: the sort bounds its (key, chunk) table by using larger chunks.
  expect_matches_stable_sort(random_index(5003, 1500000, 8), 1500000);
  expect_matches_stable_sort(random_index(70000, 300000, 9), 300000);
}
