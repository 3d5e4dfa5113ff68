#include "kmoe/ops/rope.hpp"

#include "kmoe/core/error.hpp"

#include <cmath>

namespace kmoe::ops {

int rope_rotary_dims(index_t d_head, double rotate_fraction) {
  require(d_head >= 1, Status::invalid_argument, "rope_rotary_dims: d_head = ", d_head, " must be at least 1");
  require(rotate_fraction >= 0 && rotate_fraction <= 1, Status::invalid_argument,
          "rope_rotary_dims: rotate_fraction = ", rotate_fraction, " is outside [0, 1]");
  const auto rotated = static_cast<index_t>(rotate_fraction * static_cast<double>(d_head));
  return static_cast<int>(rotated - rotated % 2);
}

namespace impl {

template <class T>
void check_rope_arguments(const char* op, const View4<const T>& x, int rot_dims, double base,
                          index_t position_offset, const View4<T>& y) {
  const index_t d_head = x.extent(3);
  require(rot_dims >= 0 && rot_dims % 2 == 0 && rot_dims <= d_head, Status::invalid_argument, op, ": rot_dims = ",
          rot_dims, " must be even and in [0, d_head = ", d_head, "]");
  require(std::isfinite(base) && base > 0, Status::invalid_argument, op, ": base = ", base, " must be positive");
  require(position_offset >= 0, Status::invalid_argument, op, ": position_offset = ", position_offset,
          " must not be negative");
  for (int axis = 0; axis < 4; ++axis) {
    require(x.extent(axis) == y.extent(axis), Status::shape_mismatch, op, ": output is [", y.extent(0), ", ",
            y.extent(1), ", ", y.extent(2), ", ", y.extent(3), "], input [", x.extent(0), ", ", x.extent(1), ", ",
            x.extent(2), ", ", x.extent(3), "]");
  }
}

// y = rotation of x by sign·θ (sign = +1 forward, −1 backward). Each thread owns one channel pair
// (or one pass-through channel) of one row, so y may alias x. The angle is computed in T as the
// original does in fp32 (inverse frequency first, then position · inverse frequency).
template <class T>
void rotate(const char* op, const View4<const T>& x, int rot_dims, double base, index_t position_offset, T sign,
            const View4<T>& y) {
  check_rope_arguments(op, x, rot_dims, base, position_offset, y);
  const index_t heads = x.extent(1), length = x.extent(2), d_head = x.extent(3);
  const index_t rows = x.extent(0) * heads * length;
  const int half = rot_dims / 2;
  const index_t work_per_row = half + (d_head - rot_dims);
  if (rows == 0 || work_per_row == 0) return;
  const T base_t = static_cast<T>(base);
  Kokkos::parallel_for(
      op, md_range<2>({0, 0}, {rows, work_per_row}),
      KOKKOS_LAMBDA(const index_t row, const index_t w) {
        const index_t t = row % length, h = (row / length) % heads, b = row / (length * heads);
        if (w >= half) {  // pass-through channel
          const index_t c = w - half + rot_dims;
          y(b, h, t, c) = x(b, h, t, c);
          return;
        }
        const T inv_freq = T(1) / Kokkos::Experimental::pow(base_t, T(2 * w) / T(rot_dims));
        const T angle = static_cast<T>(position_offset + t) * inv_freq;
        const T cos_a = Kokkos::Experimental::cos(angle), sin_a = sign * Kokkos::Experimental::sin(angle);
        const T lo = x(b, h, t, w), hi = x(b, h, t, w + half);
        y(b, h, t, w) = lo * cos_a - hi * sin_a;
        y(b, h, t, w + half) = hi * cos_a + lo * sin_a;
      });
}

}  // namespace impl

template <class T>
void rope_forward(const View4<const T>& x, int rot_dims, double base, index_t position_offset, const View4<T>& y) {
  impl::rotate<T>("kmoe::rope_forward", x, rot_dims, base, position_offset, T(1), y);
}

template <class T>
void rope_backward(const View4<const T>& dy, int rot_dims, double base, index_t position_offset,
                   const View4<T>& dx) {
  impl::rotate<T>("kmoe::rope_backward", dy, rot_dims, base, position_offset, T(-1), dx);
}

#define KMOE_INSTANTIATE(T)                                                                               \
  template void rope_forward<T>(const View4<const T>&, int, double, index_t, const View4<T>&);           \
  template void rope_backward<T>(const View4<const T>&, int, double, index_t, const View4<T>&);
KMOE_INSTANTIATE(float)
KMOE_INSTANTIATE(double)
#undef KMOE_INSTANTIATE

}  // namespace kmoe::ops
