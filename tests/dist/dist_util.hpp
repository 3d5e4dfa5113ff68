// What the MPI test suites share: kmoe's communicator over mpirun's ranks, and the relative L2
// error the distributed results are judged by.
#pragma once

#include "kmoe/dist/communicator.hpp"

#include <cmath>
#include <vector>

namespace kmoe::test {

inline const dist::Communicator& world() {
  static const dist::Communicator comm(MPI_COMM_WORLD);
  return comm;
}

// ‖got − want‖ / ‖want‖ (the absolute norm when want is zero).
template <class T>
double rel_l2(const std::vector<T>& got, const std::vector<T>& want) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    const double d = static_cast<double>(got[i]) - static_cast<double>(want[i]);
    num += d * d;
    den += static_cast<double>(want[i]) * static_cast<double>(want[i]);
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

}  // namespace kmoe::test
