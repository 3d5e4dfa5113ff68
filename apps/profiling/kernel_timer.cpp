// A Kokkos profiling tool (KOKKOS_PROFILE_LIBRARY=libkmoe-kernel-timer.so) that times every
// Kokkos kernel by its name, synchronising the device around each one, and prints the heaviest
// ones at exit. Synchronising per kernel removes overlap, so the totals are an upper
// bound on a kernel's share. kmoe's profile regions (kmoe::ProfileRegion: each layer's forward
// and backward, the CVMMs, the dispatch plan, the expert GEMMs, attention) are timed the same way,
// each split into the time of the Kokkos kernels inside it and the rest (cuBLAS, copies, host
// work and waits). Per-call times leave out each first call (CUDA loads modules lazily: the first
// call holds the load). It also counts, by the innermost region they happen in, the deep copies (a copy
// to the host is a read-back the host waits for) and the device allocations (a cudaMalloc and
// a wait each, unless the memory pool serves them). For finding hot spots only, never for the
// bench tables.
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
// The first call of a kernel or region is kept apart: CUDA loads modules lazily, so it holds the
// module's load (milliseconds) and would swamp the per-call time of a kernel called a few times.
struct Entry {
  double seconds = 0, first_seconds = 0;
  std::uint64_t calls = 0;
  void add(double s) {
    if (calls++ == 0) first_seconds = s;
    seconds += s;
  }
  double later_per_call() const { return calls > 1 ? (seconds - first_seconds) / (calls - 1) : seconds; }
};
std::map<std::string, Entry> entries;
std::vector<std::pair<std::string, Clock::time_point>> open_kernels;
struct Region {
  Entry total, kernels;
};
struct OpenRegion {
  std::string name;
  Clock::time_point begun;
  double kernel_seconds = 0;  // of the Kokkos kernels that ran inside it so far
};
std::map<std::string, Region> regions;
// Counted events (copies, allocations) by "what · where".
struct Count {
  std::uint64_t calls = 0, bytes = 0;
};
std::map<std::string, Count> copies, allocations;
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
  entries[open_kernels[id].first].add(s);
  inside += s;
  for (OpenRegion& r : open_regions) r.kernel_seconds += s;
  open_kernels.pop_back();
}
std::string innermost_region() { return open_regions.empty() ? "(no region)" : open_regions.back().name; }

void print_counts(const char* title, const std::map<std::string, Count>& counts, int shown) {
  if (counts.empty()) return;
  std::vector<std::pair<std::string, Count>> sorted(counts.begin(), counts.end());
  std::sort(sorted.begin(), sorted.end(), [](auto& a, auto& b) { return a.second.calls > b.second.calls; });
  std::printf("\n%s\n%10s %12s  %s\n", title, "calls", "MB", "what · innermost region");
  for (int i = 0; i < static_cast<int>(sorted.size()) && i < shown; ++i)
    std::printf("%10llu %12.2f  %s\n", static_cast<unsigned long long>(sorted[i].second.calls),
                sorted[i].second.bytes / 1e6, sorted[i].first.c_str());
}
}  // namespace

// The C interface's space handle (impl/Kokkos_Profiling_C_Interface.h), declared here so that the
// tool needs no Kokkos headers.
struct Kokkos_Profiling_SpaceHandle {
  char name[64];
};

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
  r.total.add(std::chrono::duration<double>(Clock::now() - open.begun).count());
  r.kernels.add(open.kernel_seconds);
  open_regions.pop_back();
}
void kokkosp_begin_deep_copy(Kokkos_Profiling_SpaceHandle dst, const char* dst_name, const void*,
                             Kokkos_Profiling_SpaceHandle src, const char* src_name, const void*, std::uint64_t bytes) {
  Count& c = copies[std::string(src.name) + " → " + dst.name + ": " + (*dst_name ? dst_name : src_name) + " · " +
                    innermost_region()];
  ++c.calls;
  c.bytes += bytes;
}
void kokkosp_end_deep_copy() {}
void kokkosp_allocate_data(Kokkos_Profiling_SpaceHandle space, const char* label, const void*, std::uint64_t bytes) {
  if (std::string(space.name) == "Host") return;
  Count& c = allocations[std::string(space.name) + ": " + label + " · " + innermost_region()];
  ++c.calls;
  c.bytes += bytes;
}
void kokkosp_finalize_library() {
  const double total = std::chrono::duration<double>(Clock::now() - start).count();
  // Sorted by the time of the later calls (the steady state).
  const auto later = [](const Entry& e) { return e.seconds - (e.calls > 1 ? e.first_seconds : 0.0); };
  std::vector<std::pair<std::string, Entry>> sorted(entries.begin(), entries.end());
  std::sort(sorted.begin(), sorted.end(), [&](auto& a, auto& b) { return later(a.second) > later(b.second); });
  const int shown = std::getenv("KMOE_TIMER_TOP") ? std::atoi(std::getenv("KMOE_TIMER_TOP")) : 40;
  std::printf("\nkernel timer: %.3f s in Kokkos kernels of %.3f s run (per call: the calls after the first)\n"
              "%10s %10s %10s %10s  %s\n",
              inside, total, "later ms", "calls", "us/call", "first ms", "kernel");
  for (int i = 0; i < static_cast<int>(sorted.size()) && i < shown; ++i) {
    const Entry& e = sorted[i].second;
    std::printf("%10.2f %10llu %10.1f %10.2f  %s\n", 1e3 * later(e), static_cast<unsigned long long>(e.calls),
                1e6 * e.later_per_call(), 1e3 * e.first_seconds, sorted[i].first.c_str());
  }
  print_counts("deep copies (→ Host: a read-back)", copies, shown);
  print_counts("device allocations (outside the memory pool's blocks)", allocations, shown);
  if (regions.empty()) return;
  std::vector<std::pair<std::string, Region>> by_time(regions.begin(), regions.end());
  std::sort(by_time.begin(), by_time.end(),
            [&](auto& a, auto& b) { return later(a.second.total) > later(b.second.total); });
  std::printf("\nregions (nested ones inside their parents' times; per call: the calls after the first)\n"
              "%10s %10s %12s %10s %10s  %s\n",
              "us/call", "kernels us", "rest us", "calls", "first ms", "region");
  for (const auto& [name, r] : by_time) {
    std::printf("%10.1f %10.1f %12.1f %10llu %10.2f  %s\n", 1e6 * r.total.later_per_call(),
                1e6 * r.kernels.later_per_call(), 1e6 * (r.total.later_per_call() - r.kernels.later_per_call()),
                static_cast<unsigned long long>(r.total.calls), 1e3 * r.total.first_seconds, name.c_str());
  }
}
}
