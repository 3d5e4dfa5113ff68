// Tensor<T>: a LayoutRight device allocation of rank 1-4 with its shape, for shape checks,
// reshapes and host transfers. Copies share the storage (reference counted); the storage comes
// from the caching allocator (memory_pool.hpp). Kernels take plain Kokkos Views obtained from it
// (view<R>(), as_matrix(), as_3d()); those Views alias the tensor's storage and do not own it, so
// the Tensor must outlive them.
//
// A default-constructed Tensor is empty: it has no storage, size() 0 and the rank-0 shape [].
// to_host() of it returns no values, fill() and copy_from_host({}) do nothing and clone() gives
// another empty tensor; reshape, the views (view<R>, as_matrix, as_3d), require_shape and copying
// host values into it throw Status::invalid_argument. A tensor constructed with a shape that has
// a 0 dimension ([0, 5]) is not empty: it owns a block and holds 0 elements.
#pragma once

#include "kmoe/core/bfloat16.hpp"
#include "kmoe/core/config.hpp"
#include "kmoe/core/error.hpp"

#include <array>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

namespace kmoe {

class Shape {
 public:
  static constexpr int max_rank = 4;

  Shape() = default;
  Shape(std::initializer_list<index_t> dims);
  explicit Shape(const std::vector<index_t>& dims);

  int rank() const { return rank_; }
  index_t operator[](int axis) const;
  index_t size() const;  // product of the dimensions (1 for rank 0)
  std::vector<index_t> dims() const { return {dims_.begin(), dims_.begin() + rank_}; }
  // Product of the dimensions in [begin, end).
  index_t product(int begin, int end) const;

  bool operator==(const Shape& other) const;
  bool operator!=(const Shape& other) const { return !(*this == other); }
  std::string str() const;  // "[2, 3, 4]"

 private:
  std::array<index_t, max_rank> dims_{};
  int rank_ = 0;
};

template <class T>
class Tensor {
 public:
  Tensor() = default;
  // A zero-initialised tensor in the default memory space.
  Tensor(const std::string& label, const Shape& shape);
  // A tensor with uninitialised contents, for outputs that a kernel overwrites entirely (no
  // memset over the allocation).
  static Tensor uninitialized(const std::string& label, const Shape& shape) { return Tensor(label, shape, false); }
  // Memory kmoe does not own as a tensor, not copied: shape.size() row-major elements at data, in
  // the default memory space (device memory on a CUDA build). The caller keeps the memory alive
  // (and, for an input, unchanged) while the tensor or a copy of it lives. For the C ABI.
  static Tensor wrap(const std::string& label, const Shape& shape, T* data);
  // A tensor holding a copy of host data (row-major, shape.size() elements).
  static Tensor from_host(const std::string& label, const Shape& shape, const std::vector<T>& values);

  const Shape& shape() const { return shape_; }
  int rank() const { return shape_.rank(); }
  index_t dim(int axis) const { return shape_[axis]; }
  // The number of elements: shape().size(), or 0 for an empty tensor (whose rank-0 shape would
  // otherwise count as one element).
  index_t size() const { return empty() ? 0 : shape_.size(); }
  // True for a default-constructed (or moved-from) tensor: no storage. Tested on the owner, not on
  // data(), so that a 0-element tensor from a shape such as [0, 5] is never empty.
  bool empty() const { return block_.use_count() == 0; }
  T* data() const { return storage_.data(); }
  const std::string& label() const { return label_; }

  View1<T> flat() const& { return storage_; }
  // The storage is a memory-pool block that a temporary Tensor gives back when it dies, while an
  // unmanaged View of it would live on (the CUDA test helper doing so read reused memory).
  View1<T> flat() const&& = delete;

  // The storage as a View of rank R; the tensor's rank must be R.
  template <int R>
  typename ViewOfRank<T, R>::type view() const {
    require_storage("view");
    require(rank() == R, Status::shape_mismatch, label_, ": expected a rank-", R, " tensor, got shape ",
            shape_.str());
    return make_view<R>();
  }
  // [product of leading dims, last dim]: the row view that row-wise ops take.
  View2<T> as_matrix() const;
  // [outer, dim(axis), inner]: the view that "along an axis" ops take.
  View3<T> as_3d(int axis) const;

  // The same storage under another shape of equal size.
  Tensor reshape(const Shape& shape) const;
  // A new tensor with a copy of the contents.
  Tensor clone(const std::string& label) const;

  std::vector<T> to_host() const;
  void copy_from_host(const std::vector<T>& values);
  void fill(T value);

  // Throws Status::shape_mismatch naming `what` when the shape differs (Status::invalid_argument
  // when the tensor is empty).
  void require_shape(const Shape& expected, const std::string& what) const;

 private:
  Tensor(const std::string& label, const Shape& shape, bool zero_initialise);
  // Throws Status::invalid_argument naming `op` and the label when the tensor is empty.
  void require_storage(const char* op) const;
  template <int R>
  typename ViewOfRank<T, R>::type make_view() const {
    using V = typename ViewOfRank<T, R>::type;
    if constexpr (R == 1) return V(storage_.data(), shape_[0]);
    if constexpr (R == 2) return V(storage_.data(), shape_[0], shape_[1]);
    if constexpr (R == 3) return V(storage_.data(), shape_[0], shape_[1], shape_[2]);
    if constexpr (R == 4) return V(storage_.data(), shape_[0], shape_[1], shape_[2], shape_[3]);
  }

  std::string label_;
  Shape shape_;
  std::shared_ptr<void> block_;  // owns the storage
  View1<T> storage_;             // an unmanaged view of the block
};

// A new tensor of the same shape with every element converted (bfloat16 rounds to nearest even).
template <class To, class From>
Tensor<To> convert_tensor(const Tensor<From>& tensor, const std::string& label);

// True when every element is finite (no NaN, no Inf).
template <class T>
bool all_finite(const View1<const T>& values);

// Throws Status::non_finite naming `what` when a value is NaN or Inf.
template <class T>
void require_finite(const Tensor<T>& tensor, const std::string& what);

extern template class Tensor<float>;
extern template class Tensor<double>;
extern template class Tensor<int>;
extern template class Tensor<std::int64_t>;
extern template class Tensor<bfloat16>;

}  // namespace kmoe
