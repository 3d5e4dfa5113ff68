// Shared by the libFuzzer harnesses (tests/fuzz/fuzz_*.cpp) that call kmoe's C++ API: Kokkos for the
// whole run, and the rule every harness checks: bad input may only end in a kmoe::Error (a status
// and a message). Any other exception escapes LLVMFuzzerTestOneInput and libFuzzer reports it as a
// crash, like a sanitizer report, a hang or a leak.
#pragma once

#include "fuzz_input.hpp"
#include "kmoe/core/error.hpp"

#include <Kokkos_Core.hpp>

#include <cstdlib>
#include <new>
#include <string>

namespace kmoe::fuzz {

inline void initialize_once(int* argc, char*** argv) {
  if (!Kokkos::is_initialized()) Kokkos::initialize(*argc, *argv);
  std::atexit([] {
    if (Kokkos::is_initialized() && !Kokkos::is_finalized()) Kokkos::finalize();
  });
}

// Runs body; a kmoe::Error is the expected outcome of bad input, anything else propagates. So is
// std::bad_alloc (the C ABI's KMOE_OUT_OF_MEMORY): a config may ask for more memory than there is,
// and the harnesses run with ASan's allocations capped (ASAN_OPTIONS=allocator_may_return_null=1,
// max_allocation_size_mb) so that asking fails at once.
template <class Body>
void expect_only_kmoe_errors(Body&& body) {
  try {
    body();
  } catch (const Error&) {
  } catch (const std::bad_alloc&) {
  }
}

}  // namespace kmoe::fuzz
