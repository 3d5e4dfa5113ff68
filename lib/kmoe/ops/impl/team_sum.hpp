// A team-wide sum for one-team-per-row kernels (norms, softmax family).
#pragma once

#include <Kokkos_Core.hpp>

namespace kmoe::ops::impl {

// Σ_j term(j) over j in [0, len), reduced across the team; every thread gets the total.
template <class T, class TeamMember, class Term>
KOKKOS_INLINE_FUNCTION T team_sum(const TeamMember& team, int len, const Term& term) {
  T total = 0;
  Kokkos::parallel_reduce(
      Kokkos::TeamThreadRange(team, len), [&](const int j, T& acc) { acc += term(j); }, total);
  return total;
}

}  // namespace kmoe::ops::impl
