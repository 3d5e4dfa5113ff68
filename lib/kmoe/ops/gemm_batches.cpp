#include "kmoe/ops/impl/gemm_batches.hpp"

#include <algorithm>
#include <map>
#include <tuple>

namespace kmoe::ops::impl {

std::int64_t bytes_of(GemmType type) { return type == GemmType::f64 ? 8 : type == GemmType::f32 ? 4 : 2; }

namespace {

// The largest pieces: 1024 rows keep a batched GEMM's tiles busy; an inner dimension of 4096
// keeps the rounds (passes over C) few.
constexpr std::int64_t row_piece_cap = 1024, inner_piece_cap = 4096;

// extent as powers of two, largest first: whole caps, then the binary digits of the remainder.
std::vector<std::int64_t> pieces(std::int64_t extent, std::int64_t cap) {
  std::vector<std::int64_t> out(static_cast<std::size_t>(extent / cap), cap);
  for (std::int64_t bit = cap / 2; bit > 0; bit /= 2)
    if ((extent % cap) & bit) out.push_back(bit);
  return out;
}

const void* offset(const void* base, std::int64_t elements, GemmType type) {
  return static_cast<const char*>(base) + elements * bytes_of(type);
}

// What GEMMs must share to be cut into one set of batches.
using FamilyKey = std::tuple<GemmType, GemmType, bool, bool, std::int64_t, std::int64_t, std::int64_t, std::int64_t,
                             double>;
FamilyKey family_of(const RecordedGemm& g) {
  return {g.type, g.c_type, g.transpose_first, g.transpose_second, g.m, g.ld_first, g.ld_second, g.ld_c, g.alpha};
}

// Adds one piece to the batch of its shape, made on first use.
struct BatchSet {
  // (−round, n, k, beta) → batch: in descending order, rounds run in order, larger pieces first.
  std::map<std::tuple<int, std::int64_t, std::int64_t, double>, GemmBatch, std::greater<>> by_key;

  void add(const RecordedGemm& g, int round, std::int64_t n, std::int64_t k, double beta, const void* first,
           const void* second, void* c) {
    auto [it, fresh] = by_key.try_emplace({-round, n, k, beta});
    GemmBatch& b = it->second;
    if (fresh) {
      b = GemmBatch{g.transpose_first, g.transpose_second, g.m, n, k, g.alpha, beta, g.ld_first, g.ld_second,
                    g.ld_c, g.type, g.c_type, {}, {}, {}};
    }
    b.first.push_back(first);
    b.second.push_back(second);
    b.c.push_back(c);
  }
};

}  // namespace

std::vector<GemmBatch> uniform_batches(const std::vector<RecordedGemm>& gemms, std::vector<RecordedGemm>& rest) {
  std::map<FamilyKey, std::vector<const RecordedGemm*>> families;
  for (const RecordedGemm& g : gemms) families[family_of(g)].push_back(&g);
  std::vector<GemmBatch> batches;
  for (const auto& [key, family] : families) {
    const RecordedGemm& front = *family.front();
    const bool same_n = std::all_of(family.begin(), family.end(), [&](auto* g) { return g->n == front.n; });
    const bool same_k = std::all_of(family.begin(), family.end(), [&](auto* g) { return g->k == front.k; });
    BatchSet set;
    if (family.size() < 2 || (!same_n && !same_k) || (!same_k && front.c_type == GemmType::bf16)) {
      for (const RecordedGemm* g : family) rest.push_back(*g);
      continue;
    }
    if (same_k) {
      // Cut along n (the row-major rows of C): the columns j0.. of C and of op(second).
      // (GEMMs of one shape stay whole: one batch.)
      for (const RecordedGemm* g : family) {
        std::int64_t j0 = 0;
        for (const std::int64_t n : same_n ? std::vector<std::int64_t>{g->n} : pieces(g->n, row_piece_cap)) {
          const std::int64_t second_offset = g->transpose_second ? j0 : j0 * g->ld_second;
          set.add(*g, 0, n, g->k, g->beta, g->first, offset(g->second, second_offset, g->type),
                  const_cast<void*>(offset(g->c, j0 * g->ld_c, g->c_type)));
          j0 += n;
        }
      }
    } else {
      // Cut along k: round r adds every GEMM's r-th piece into its C.
      for (const RecordedGemm* g : family) {
        std::int64_t k0 = 0;
        int round = 0;
        for (const std::int64_t k : pieces(g->k, inner_piece_cap)) {
          const std::int64_t first_offset = g->transpose_first ? k0 : k0 * g->ld_first;
          const std::int64_t second_offset = g->transpose_second ? k0 * g->ld_second : k0;
          set.add(*g, round, g->n, k, round == 0 ? g->beta : 1.0, offset(g->first, first_offset, g->type),
                  offset(g->second, second_offset, g->type), g->c);
          k0 += k;
          ++round;
        }
      }
    }
    for (auto& [batch_key, batch] : set.by_key) batches.push_back(std::move(batch));
  }
  return batches;
}

}  // namespace kmoe::ops::impl
