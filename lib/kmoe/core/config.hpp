// Execution/memory spaces and the View types every kmoe kernel uses.
#pragma once

#include <Kokkos_Core.hpp>

#include <cstdint>

namespace kmoe {

// All kernels run in the default execution space, so the same source runs on OpenMP and CUDA.
using ExecSpace = Kokkos::DefaultExecutionSpace;
using MemSpace = ExecSpace::memory_space;
using HostSpace = Kokkos::HostSpace;
using Layout = Kokkos::LayoutRight;

// Element counts and offsets; kernels index rows with int where sizes are known to fit.
using index_t = std::int64_t;

template <class T>
using View1 = Kokkos::View<T*, Layout, MemSpace>;
template <class T>
using View2 = Kokkos::View<T**, Layout, MemSpace>;
template <class T>
using View3 = Kokkos::View<T***, Layout, MemSpace>;
template <class T>
using View4 = Kokkos::View<T****, Layout, MemSpace>;

// A View of any rank R (1..4) in kmoe's layout and memory space.
template <class T, int R>
struct ViewOfRank;
template <class T>
struct ViewOfRank<T, 1> { using type = View1<T>; };
template <class T>
struct ViewOfRank<T, 2> { using type = View2<T>; };
template <class T>
struct ViewOfRank<T, 3> { using type = View3<T>; };
template <class T>
struct ViewOfRank<T, 4> { using type = View4<T>; };

}  // namespace kmoe
