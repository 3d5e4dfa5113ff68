// Reusable scratch buffers for the temporaries of kmoe's kernels. A fresh large allocation costs
// page faults on first touch every time (about 0.15 ms per MB on a CPU), so temporaries are
// carved from named buffers that are kept and only grow: repeated calls with the same shapes
// allocate nothing.
//
// A scratch View stays valid until the next scratch() call with the same name, so each name must
// belong to one temporary of one operation. Operations that use scratch are not meant to run
// concurrently from several host threads.
#pragma once

#include "kmoe/core/config.hpp"

namespace kmoe {

// An uninitialised rows × cols matrix backed by the buffer called `name`.
template <class T>
View2<T> scratch(const char* name, index_t rows, index_t cols);

// Frees every scratch buffer (also done automatically at Kokkos::finalize).
void release_scratch();

}  // namespace kmoe
