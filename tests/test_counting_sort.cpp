#include "kmoe/ops/counting_sort.hpp"
#include "test_util.hpp"

#include <numeric>

using namespace kmoe;
using namespace kmoe::test;

namespace {

View1<int> device_ints(const std::vector<int>& values) {
  return Tensor<int>::from_host("keys", {static_cast<index_t>(values.size())}, values).flat();
}

std::vector<int> host_ints(const View1<int>& view) {
  const auto mirror = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), view);
  return std::vector<int>(mirror.data(), mirror.data() + mirror.extent(0));
}

std::vector<int> random_keys(std::size_t n, int n_keys, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::vector<int> keys(n);
  for (auto& k : keys) k = random_int(gen, 0, n_keys - 1);
  return keys;
}

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
  EXPECT_EQ(host_ints(groups.order), order) << "n " << keys.size() << " keys " << n_keys;
  EXPECT_EQ(host_ints(groups.offsets), offsets) << "n " << keys.size() << " keys " << n_keys;
}

template <class Fn>
void expect_invalid_argument(Fn&& fn, const std::string& needle) {
  try {
    fn();
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::invalid_argument);
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

}  // namespace

TEST(CountingSort, MatchesStableSortAcrossChunkBoundaries) {
  std::uint64_t seed = 100;
  for (std::size_t n : {1, 7, 255, 256, 257, 1000, 5003})
    for (int n_keys : {1, 3, 37, 1500}) expect_matches_stable_sort(random_keys(n, n_keys, ++seed), n_keys);
}

TEST(CountingSort, OneKeySpanningManyChunksKeepsIndexOrder) {
  // Almost every element shares key 2: its group is assembled from every chunk.
  auto keys = std::vector<int>(3 * 256 + 5, 2);
  keys[0] = 0;
  keys[300] = 4;
  keys[900] = 0;
  expect_matches_stable_sort(keys, 5);
}

TEST(CountingSort, EmptyInputGivesZeroOffsets) {
  expect_matches_stable_sort({}, 4);
  expect_matches_stable_sort({}, 0);
}

TEST(CountingSort, KeysOutOfRangeAreRejected) {
  auto keys = random_keys(600, 9, 7);
  keys[517] = 9;
  expect_invalid_argument([&] { ops::counting_sort(device_ints(keys), 9); }, "value 9 at element 517");
  keys[517] = 3;
  keys[20] = -1;
  expect_invalid_argument([&] { ops::counting_sort(device_ints(keys), 9); }, "value -1 at element 20");
  expect_invalid_argument([&] { ops::counting_sort(device_ints({}), -1); }, "n_keys");
}

TEST(CountingSort, ManyMoreKeysThanElements) {
  // A vocabulary-sized key range: the sort bounds its (key, chunk) table by using larger chunks.
  expect_matches_stable_sort(random_keys(5003, 1500000, 8), 1500000);
  expect_matches_stable_sort(random_keys(70000, 300000, 9), 300000);
}
