// A Kokkos profiling tool (KOKKOS_PROFILE_LIBRARY=libkmoe-kernel-timer.so) that times every
// Kokkos kernel and fence by its name, synchronising the device around each one, and prints the
// heaviest ones at exit. Synchronising per kernel removes overlap, so the totals are an upper
// bound on a kernel's share. kmoe's profile regions (kmoe::ProfileRegion: each layer's forward
// and backward, the CVMMs, the dispatch plan, the expert GEMMs, attention) are timed the same way,
// each split into the time of the Kokkos kernels inside it and the rest (cuBLAS, copies, host
// work and waits). For finding hot spots only, never for the bench tables.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

namespace {
using Clock = std::chrono::steady_clock;
struct Entry {
  double seconds = 0;
  std::uint64_t calls = 0;
};
std::map<std::string, Entry> entries;
std::vector<std::pair<std::string, Clock::time_point>> open_kernels;
struct Region {
  double seconds = 0, kernel_seconds = 0;
  std::uint64_t calls = 0;
};
struct OpenRegion {
  std::string name;
  Clock::time_point begun;
  double kernel_seconds = 0;  // of the Kokkos kernels that ran inside it so far
};
std::map<std::string, Region> regions;
std::vector<OpenRegion> open_regions;
Clock::time_point start;
double inside = 0;

void begin(const char* name, std::uint64_t* id) {
  cudaDeviceSynchronize();
  open_kernels.emplace_back(name, Clock::now());
  *id = open_kernels.size() - 1;
}
void end(std::uint64_t id) {
  cudaDeviceSynchronize();
  const auto now = Clock::now();
  const double s = std::chrono::duration<double>(now - open_kernels[id].second).count();
  Entry& e = entries[open_kernels[id].first];
  e.seconds += s;
  ++e.calls;
  inside += s;
  for (OpenRegion& r : open_regions) r.kernel_seconds += s;
  open_kernels.pop_back();
}
}  // namespace

extern "C" {
void kokkosp_init_library(int, std::uint64_t, std::uint32_t, void*) { start = Clock::now(); }
void kokkosp_begin_parallel_for(const char* name, std::uint32_t, std::uint64_t* id) { begin(name, id); }
void kokkosp_end_parallel_for(std::uint64_t id) { end(id); }
void kokkosp_begin_parallel_reduce(const char* name, std::uint32_t, std::uint64_t* id) { begin(name, id); }
void kokkosp_end_parallel_reduce(std::uint64_t id) { end(id); }
void kokkosp_begin_parallel_scan(const char* name, std::uint32_t, std::uint64_t* id) { begin(name, id); }
void kokkosp_end_parallel_scan(std::uint64_t id) { end(id); }
void kokkosp_push_profile_region(const char* name) {
  cudaDeviceSynchronize();
  open_regions.push_back({name, Clock::now(), 0});
}
void kokkosp_pop_profile_region() {
  if (open_regions.empty()) return;
  cudaDeviceSynchronize();
  const OpenRegion& open = open_regions.back();
  Region& r = regions[open.name];
  r.seconds += std::chrono::duration<double>(Clock::now() - open.begun).count();
  r.kernel_seconds += open.kernel_seconds;
  ++r.calls;
  open_regions.pop_back();
}
void kokkosp_finalize_library() {
  const double total = std::chrono::duration<double>(Clock::now() - start).count();
  std::vector<std::pair<std::string, Entry>> sorted(entries.begin(), entries.end());
  std::sort(sorted.begin(), sorted.end(), [](auto& a, auto& b) { return a.second.seconds > b.second.seconds; });
  const int shown = std::getenv("KMOE_TIMER_TOP") ? std::atoi(std::getenv("KMOE_TIMER_TOP")) : 40;
  std::printf("\nkernel timer: %.3f s in Kokkos kernels of %.3f s run\n%10s %10s %8s  %s\n", inside, total, "ms",
              "calls", "us/call", "kernel");
  for (int i = 0; i < static_cast<int>(sorted.size()) && i < shown; ++i) {
    const Entry& e = sorted[i].second;
    std::printf("%10.2f %10llu %8.1f  %s\n", 1e3 * e.seconds, static_cast<unsigned long long>(e.calls),
                1e6 * e.seconds / e.calls, sorted[i].first.c_str());
  }
  if (regions.empty()) return;
  std::vector<std::pair<std::string, Region>> by_time(regions.begin(), regions.end());
  std::sort(by_time.begin(), by_time.end(), [](auto& a, auto& b) { return a.second.seconds > b.second.seconds; });
  std::printf("\nregions (nested ones inside their parents' times)\n%10s %10s %10s %10s  %s\n", "ms", "kernels ms",
              "rest ms", "calls", "region");
  for (const auto& [name, r] : by_time) {
    std::printf("%10.2f %10.2f %10.2f %10llu  %s\n", 1e3 * r.seconds, 1e3 * r.kernel_seconds,
                1e3 * (r.seconds - r.kernel_seconds), static_cast<unsigned long long>(r.calls), name.c_str());
  }
}
}
