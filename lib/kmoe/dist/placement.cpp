#include "kmoe/dist/placement.hpp"

#include "kmoe/core/error.hpp"

#include <sstream>

namespace kmoe::dist {

index_t piece_begin(index_t total, index_t parts, index_t i) {
  const index_t base = total / parts, extra = total % parts;
  return i * base + (i < extra ? i : extra);
}

Placement::Placement(int n_experts, int world, index_t hidden) : n_experts_(n_experts), world_(world), hidden_(hidden) {
  require(n_experts >= 1, Status::invalid_argument, "Placement: n_experts = ", n_experts, " must be at least 1");
  require(world >= 1, Status::invalid_argument, "Placement: world size ", world, " must be at least 1");
  require(hidden >= 0, Status::invalid_argument, "Placement: hidden = ", hidden, " must not be negative");
  ranks_.resize(static_cast<std::size_t>(world));
  owner_begin_.resize(static_cast<std::size_t>(n_experts));
  owner_end_.resize(static_cast<std::size_t>(n_experts));
  if (world <= n_experts) {
    for (int r = 0; r < world; ++r) {
      const int first = static_cast<int>(piece_begin(n_experts, world, r));
      const int next = static_cast<int>(piece_begin(n_experts, world, r + 1));
      ranks_[r] = {first, next - first, 0, hidden};
      for (int e = first; e < next; ++e) {
        owner_begin_[e] = r;
        owner_end_[e] = r + 1;
      }
    }
    return;
  }
  for (int e = 0; e < n_experts; ++e) {
    owner_begin_[e] = static_cast<int>(piece_begin(world, n_experts, e));
    owner_end_[e] = static_cast<int>(piece_begin(world, n_experts, e + 1));
    const index_t shards = owner_end_[e] - owner_begin_[e];
    for (int r = owner_begin_[e]; r < owner_end_[e]; ++r) {
      const index_t s = r - owner_begin_[e];
      ranks_[r] = {e, 1, piece_begin(hidden, shards, s), piece_begin(hidden, shards, s + 1)};
    }
  }
}

std::string Placement::describe() const {
  std::ostringstream out;
  for (int r = 0; r < world_; ++r) {
    const RankShare& s = ranks_[r];
    out << "rank " << r << ": ";
    if (s.experts == 0) {
      out << "no experts";
    } else if (s.experts == 1) {
      out << "expert " << s.first_expert;
    } else {
      out << "experts " << s.first_expert << "-" << s.first_expert + s.experts - 1;
    }
    if (s.hidden_end > s.hidden_begin) {
      out << ", hidden " << s.hidden_begin << "-" << s.hidden_end - 1;
      if (sharded()) out << " of " << hidden_;
    } else {
      out << ", no hidden units";
    }
    out << '\n';
  }
  return out.str();
}

}  // namespace kmoe::dist
