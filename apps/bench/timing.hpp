// Wall-clock timing for the apps: fences the device so asynchronous kernels are counted.
#pragma once

#include <Kokkos_Core.hpp>

#include <algorithm>
#include <vector>

namespace kmoe::apps {

// Median over `repeats` runs of fn, in seconds.
template <class Fn>
double median_seconds(int repeats, Fn&& fn) {
  std::vector<double> times;
  for (int r = 0; r < repeats; ++r) {
    Kokkos::fence();
    Kokkos::Timer timer;
    fn();
    Kokkos::fence();
    times.push_back(timer.seconds());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

}  // namespace kmoe::apps
