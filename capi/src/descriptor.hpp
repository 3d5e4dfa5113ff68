// kmoe_tensor descriptors (caller memory) to and from kmoe Tensors: checked (struct_size, dtype,
// rank, shape, data), wrapped in place when row-major contiguous in kmoe's memory space, copied
// (with the descriptor's strides) otherwise.
#pragma once

#include "kmoe.h"

#include "kmoe/core/tensor.hpp"

#include <Kokkos_Core.hpp>

#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace kmoe::capi {

// An enum field as the caller stored it. A C caller may store any int in it; loading a value
// outside the enum's range as the C++ enum type is undefined behaviour (UBSan's -fsanitize=enum,
// found by tests/fuzz/fuzz_capi), so fields are checked as ints before they are used as enums.
template <class E>
int raw_enum(const E& field) {
  static_assert(std::is_enum_v<E> && sizeof(E) == sizeof(int), "C enums are int-sized");
  int value = 0;
  std::memcpy(&value, &field, sizeof value);
  return value;
}

template <class V>
constexpr kmoe_dtype dtype_of() {
  if constexpr (std::is_same_v<V, float>) return KMOE_FLOAT32;
  if constexpr (std::is_same_v<V, double>) return KMOE_FLOAT64;
  return KMOE_INT32;
}

inline const char* dtype_text(int dtype) {
  switch (dtype) {
    case KMOE_FLOAT32: return "KMOE_FLOAT32";
    case KMOE_FLOAT64: return "KMOE_FLOAT64";
    case KMOE_INT32: return "KMOE_INT32";
    default: return "an unknown dtype";
  }
}

using DeviceSpace = Kokkos::DefaultExecutionSpace::memory_space;
// Whether memory of this kind is kmoe's own memory space (read and written in place).
inline bool in_kmoe_space(kmoe_memory memory) {
  constexpr bool host_is_kmoe = Kokkos::SpaceAccessibility<Kokkos::HostSpace, DeviceSpace>::accessible;
  return memory == KMOE_DEVICE || host_is_kmoe;
}

// The descriptor's shape, after every check; V is the element type wanted.
template <class V>
Shape check_descriptor(const kmoe_tensor* t, const char* what) {
  require(t != nullptr, Status::invalid_argument, what, " is NULL");
  require(t->struct_size >= sizeof(kmoe_tensor), Status::invalid_argument, what, "->struct_size is ", t->struct_size,
          ", below the oldest known size ", sizeof(kmoe_tensor), " (set it to sizeof(kmoe_tensor))");
  require(raw_enum(t->dtype) == dtype_of<V>(), Status::invalid_argument, what, " is ", dtype_text(raw_enum(t->dtype)), ", expected ",
          dtype_text(dtype_of<V>()));
  require(t->rank >= 1 && t->rank <= Shape::max_rank, Status::shape_mismatch, what, " has rank ", t->rank,
          "; kmoe takes ranks 1 to ", Shape::max_rank);
  const int memory = raw_enum(t->memory);
  require(memory == KMOE_HOST || memory == KMOE_DEVICE, Status::invalid_argument, what, "->memory is ", memory,
          ", not KMOE_HOST (0) or KMOE_DEVICE (1)");
  std::vector<index_t> dims;
  for (int i = 0; i < t->rank; ++i) {
    require(t->shape[i] >= 0, Status::shape_mismatch, what, "->shape[", i, "] is ", t->shape[i]);
    dims.push_back(static_cast<index_t>(t->shape[i]));
  }
  const Shape shape(dims);
  require(t->data != nullptr || shape.size() == 0, Status::invalid_argument, what, "->data is NULL");
  return shape;
}

// The element offsets of a descriptor in row-major order of its shape. Strides that reach past
// 2^63 bytes cannot describe a real array: refused (found by tests/fuzz/fuzz_capi).
inline std::vector<std::int64_t> element_offsets(const kmoe_tensor& t, const Shape& shape, std::size_t element_size,
                                                 const char* what) {
  if (shape.size() == 0) return {};
  std::vector<std::int64_t> strides(static_cast<std::size_t>(shape.rank()));
  bool contiguous = true;
  for (int i = 0; i < shape.rank(); ++i) contiguous = contiguous && t.strides[i] == 0;
  std::int64_t step = 1, reach = 0;
  for (int i = shape.rank() - 1; i >= 0; --i) {
    const std::int64_t stride = contiguous ? step : t.strides[i];
    strides[static_cast<std::size_t>(i)] = stride;
    step *= shape[i];  // no overflow: every partial product divides shape.size()
    std::int64_t axis_reach = 0;
    require(stride != std::numeric_limits<std::int64_t>::min() &&
                !__builtin_mul_overflow(shape[i] - 1, stride < 0 ? -stride : stride, &axis_reach) &&
                !__builtin_add_overflow(reach, axis_reach, &reach),
            Status::invalid_argument, what, "'s strides reach past 2^63 bytes");
  }
  std::int64_t reach_bytes = 0;
  require(!__builtin_mul_overflow(reach + 1, static_cast<std::int64_t>(element_size), &reach_bytes),
          Status::invalid_argument, what, "'s strides reach past 2^63 bytes");
  std::vector<std::int64_t> offsets(static_cast<std::size_t>(shape.size()));
  std::vector<index_t> index(static_cast<std::size_t>(shape.rank()), 0);
  for (std::size_t n = 0; n < offsets.size(); ++n) {
    std::int64_t at = 0;
    for (int i = 0; i < shape.rank(); ++i) at += index[static_cast<std::size_t>(i)] * strides[static_cast<std::size_t>(i)];
    offsets[n] = at;
    for (int i = shape.rank() - 1; i >= 0; --i) {
      if (++index[static_cast<std::size_t>(i)] < shape[i]) break;
      index[static_cast<std::size_t>(i)] = 0;
    }
  }
  return offsets;
}

// Row-major contiguous: strides all zero, or the row-major ones (axes of extent 1 any).
inline bool row_major(const kmoe_tensor& t, const Shape& shape) {
  if (shape.size() == 0) return true;  // nothing to lay out (and the products below may overflow)
  bool zero = true;
  for (int i = 0; i < shape.rank(); ++i) zero = zero && t.strides[i] == 0;
  if (zero) return true;
  std::int64_t step = 1;
  for (int i = shape.rank() - 1; i >= 0; --i) {
    if (shape[i] != 1 && t.strides[i] != step) return false;
    step *= shape[i];
  }
  return true;
}

// The caller's array as a Tensor: wrapped when allowed and in place (row-major, kmoe's memory
// space), else copied.
template <class V>
Tensor<V> read_tensor(const kmoe_tensor* t, const char* what, bool allow_wrap) {
  const Shape shape = check_descriptor<V>(t, what);
  V* data = static_cast<V*>(t->data);
  const bool in_place = row_major(*t, shape) && in_kmoe_space(t->memory);
  if (in_place && allow_wrap) return Tensor<V>::wrap(what, shape, data);
  if (in_place) {
    Tensor<V> copy = Tensor<V>::uninitialized(what, shape);
    Kokkos::deep_copy(copy.flat(), Kokkos::View<const V*, DeviceSpace, Kokkos::MemoryUnmanaged>(
                                       data, static_cast<std::size_t>(shape.size())));
    return copy;
  }
  require(t->memory == KMOE_HOST, Status::unsupported, what,
          ": device arrays must be row-major contiguous (strides all zero or row-major)");
  const std::vector<std::int64_t> offsets = element_offsets(*t, shape, sizeof(V), what);
  std::vector<V> values(offsets.size());
  for (std::size_t i = 0; i < offsets.size(); ++i) values[i] = data[offsets[i]];
  return Tensor<V>::from_host(what, shape, values);
}

// source into the caller's array of the same shape and dtype.
template <class V>
void write_tensor(const Tensor<V>& source, const kmoe_tensor* t, const char* what) {
  const Shape shape = check_descriptor<V>(t, what);
  require(shape == source.shape(), Status::shape_mismatch, what, " is ", shape.str(), ", expected ",
          source.shape().str());
  if (shape.size() == 0) return;
  V* data = static_cast<V*>(t->data);
  if (row_major(*t, shape) && in_kmoe_space(t->memory)) {
    Kokkos::deep_copy(Kokkos::View<V*, DeviceSpace, Kokkos::MemoryUnmanaged>(data, static_cast<std::size_t>(shape.size())),
                      source.flat());
    Kokkos::fence();
    return;
  }
  require(t->memory == KMOE_HOST, Status::unsupported, what,
          ": device arrays must be row-major contiguous (strides all zero or row-major)");
  const std::vector<V> values = source.to_host();
  const std::vector<std::int64_t> offsets = element_offsets(*t, shape, sizeof(V), what);
  for (std::size_t i = 0; i < offsets.size(); ++i) data[offsets[i]] = values[i];
}

}  // namespace kmoe::capi
