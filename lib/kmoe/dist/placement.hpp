// Where the experts live: every rank of a world of W works for any expert count E.
//   W ≤ E: contiguous blocks of whole experts; the first E mod W ranks hold one more.
//   W > E: every rank holds one shard of one expert's hidden units: expert e is split over
//          ⌈W/E⌉ ranks for the first W mod E experts and ⌊W/E⌋ for the rest, contiguous ranks
//          per expert, each shard a contiguous range of hidden units (the first H mod n shards
//          one unit more; a shard may be empty when an expert has fewer units than ranks).
// Partial outputs of an expert's shards are summed on the way back (ExpertExchange), so a shard
// is computed exactly as its slice of the whole expert.
#pragma once

#include "kmoe/core/config.hpp"

#include <string>
#include <utility>
#include <vector>

namespace kmoe::dist {

// Where piece i of `total` items split into `parts` contiguous pieces starts; the first
// total mod parts pieces are one larger. Experts over ranks, hidden units over shards, and a
// batch's rows over ranks (kmoe-parity --distributed, kmoe-train, kmoe-infer) split this way.
index_t piece_begin(index_t total, index_t parts, index_t i);
// Piece i as [first, first + count).
inline std::pair<index_t, index_t> piece(index_t total, index_t parts, index_t i) {
  const index_t first = piece_begin(total, parts, i);
  return {first, piece_begin(total, parts, i + 1) - first};
}

class Placement {
 public:
  Placement() = default;
  // Throws Status::invalid_argument for n_experts, world < 1 or hidden < 0.
  Placement(int n_experts, int world, index_t hidden);
  // The single-rank placement: everything on rank 0.
  static Placement single(int n_experts, index_t hidden) { return Placement(n_experts, 1, hidden); }

  int n_experts() const { return n_experts_; }
  int world() const { return world_; }
  index_t hidden() const { return hidden_; }
  bool sharded() const { return world_ > n_experts_; }

  // Rank r holds experts [first_expert(r), first_expert(r) + local_experts(r)) and of each the
  // hidden units [hidden_begin(r), hidden_end(r)).
  int first_expert(int rank) const { return ranks_[rank].first_expert; }
  int local_experts(int rank) const { return ranks_[rank].experts; }
  index_t hidden_begin(int rank) const { return ranks_[rank].hidden_begin; }
  index_t hidden_end(int rank) const { return ranks_[rank].hidden_end; }
  index_t local_hidden(int rank) const { return hidden_end(rank) - hidden_begin(rank); }
  // The ranks holding (a shard of) expert e: [owner_begin(e), owner_end(e)).
  int owner_begin(int expert) const { return owner_begin_[expert]; }
  int owner_end(int expert) const { return owner_end_[expert]; }

  // One line per rank: "rank 2: experts 6-8, hidden 0-127" / "rank 5: expert 1, hidden 64-95 of 128".
  std::string describe() const;

 private:
  struct RankShare {
    int first_expert = 0;
    int experts = 0;
    index_t hidden_begin = 0;
    index_t hidden_end = 0;
  };
  int n_experts_ = 0;
  int world_ = 0;
  index_t hidden_ = 0;
  std::vector<RankShare> ranks_;
  std::vector<int> owner_begin_, owner_end_;  // [E]
};

}  // namespace kmoe::dist
