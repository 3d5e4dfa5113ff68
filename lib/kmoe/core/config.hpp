// Execution/memory spaces and the View types every kmoe kernel uses.
#pragma once

#include <Kokkos_Core.hpp>

#include <cstdint>
#include <type_traits>

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

// Two- and three-dimensional index ranges over LayoutRight data. Kokkos 3.4's CUDA MDRange puts
// threadIdx.x on the first index whatever the iteration order, with default tiles of 2 × 16: a
// warp then walks down a column of row-major data, one sector per thread. md_range gives the
// last index a tile of up to 256 (rank 3: 64, CUDA's block-z limit) threads and the first index a
// tile of 1, so a warp reads consecutive elements of one row; narrow rows stack a few rows into
// the block. The host keeps Kokkos' tiling (the last index's whole extent per tile).
template <int R>
using MDRange = Kokkos::MDRangePolicy<ExecSpace, Kokkos::Rank<R, Kokkos::Iterate::Right, Kokkos::Iterate::Right>>;

template <int R, class L, class U>
MDRange<R> md_range(const L (&lower_bounds)[R], const U (&upper_bounds)[R]) {
  static_assert(R == 2 || R == 3, "md_range: ranks 2 and 3");
  typename MDRange<R>::point_type lower, upper;
  for (int d = 0; d < R; ++d) {
    lower[d] = static_cast<index_t>(lower_bounds[d]);
    upper[d] = static_cast<index_t>(upper_bounds[d]);
  }
#if defined(KOKKOS_ENABLE_CUDA)
  if constexpr (std::is_same_v<ExecSpace, Kokkos::Cuda>) {
    typename MDRange<R>::tile_type tile;
    for (int d = 0; d < R; ++d) tile[d] = 1;
    constexpr index_t block = 256, last_limit = R == 3 ? 64 : 256;
    index_t width = 1;
    while (width < upper[R - 1] - lower[R - 1] && width < last_limit) width *= 2;
    index_t rows = 1;
    while (rows * width < block && rows < upper[R - 2] - lower[R - 2]) rows *= 2;
    tile[R - 1] = width;
    tile[R - 2] = rows;
    return MDRange<R>(lower, upper, tile);
  }
#endif
  return MDRange<R>(lower, upper);
}

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
