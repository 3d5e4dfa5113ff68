// Team-wide reductions for one-team-per-row kernels (norms, softmax family).
//
// Each ends with a team barrier: Kokkos 3.4's CUDA team reduction reuses shared memory, and a
// second reduction that starts before every thread has read the first one's result corrupts it
// (kokkos/kokkos#5475, fixed in Kokkos 3.7). Seen here as non-repeatable LayerNorm gradients on
// an H100.
#pragma once

#include <Kokkos_Core.hpp>

namespace kmoe::ops::impl {

// Σ_j term(j) over j in [0, len); every thread of the team gets the total.
template <class T, class TeamMember, class Term>
KOKKOS_INLINE_FUNCTION T team_sum(const TeamMember& team, int len, const Term& term) {
  T total = 0;
  Kokkos::parallel_reduce(
      Kokkos::TeamThreadRange(team, len), [&](const int j, T& acc) { acc += term(j); }, total);
  team.team_barrier();
  return total;
}

// max_j term(j) over j in [0, len) (−∞ ordering as operator>); every thread gets the maximum.
template <class T, class TeamMember, class Term>
KOKKOS_INLINE_FUNCTION T team_max(const TeamMember& team, int len, const Term& term) {
  T result;
  Kokkos::parallel_reduce(
      Kokkos::TeamThreadRange(team, len),
      [&](const int j, T& m) {
        const T v = term(j);
        if (v > m) m = v;
      },
      Kokkos::Max<T>(result));
  team.team_barrier();
  return result;
}

}  // namespace kmoe::ops::impl
