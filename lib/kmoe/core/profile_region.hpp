// A named span of work for Kokkos profiling tools (kmoe-kernel-timer, or any kokkos-tools
// connector): Kokkos::Profiling::pushRegion when constructed, popRegion when destroyed. With no
// tool loaded it costs one check, not a string.
#pragma once

#include <Kokkos_Core.hpp>

namespace kmoe {

class ProfileRegion {
 public:
  explicit ProfileRegion(const char* name) : pushed_(Kokkos::Profiling::profileLibraryLoaded()) {
    if (pushed_) Kokkos::Profiling::pushRegion(name);
  }
  ~ProfileRegion() {
    if (pushed_) Kokkos::Profiling::popRegion();
  }
  ProfileRegion(const ProfileRegion&) = delete;
  ProfileRegion& operator=(const ProfileRegion&) = delete;

 private:
  bool pushed_;
};

}  // namespace kmoe
