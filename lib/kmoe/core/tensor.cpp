#include "kmoe/core/tensor.hpp"

#include "kmoe/core/memory_pool.hpp"
#include "kmoe/core/packet.hpp"

#include <sstream>

namespace kmoe {

Shape::Shape(std::initializer_list<index_t> dims) : Shape(std::vector<index_t>(dims)) {}

Shape::Shape(const std::vector<index_t>& dims) {
  require(dims.size() <= static_cast<size_t>(max_rank), Status::invalid_argument, "tensor rank ", dims.size(),
          " exceeds the maximum of ", max_rank);
  rank_ = static_cast<int>(dims.size());
  for (int i = 0; i < rank_; ++i) {
    require(dims[i] >= 0, Status::invalid_argument, "negative dimension ", dims[i], " in shape");
    dims_[i] = dims[i];
  }
  // Every product of dimensions (sizes, strides) must be an index_t: a shape whose element count
  // overflows is refused here, once (found by tests/fuzz/fuzz_capi).
  index_t elements = 1;
  for (int i = 0; i < rank_; ++i)
    require(!__builtin_mul_overflow(elements, dims_[i], &elements), Status::invalid_argument, "shape ", str(),
            " has more than 2^63 - 1 elements");
}

index_t Shape::operator[](int axis) const {
  require(axis >= 0 && axis < rank_, Status::invalid_argument, "axis ", axis, " out of range for shape ", str());
  return dims_[axis];
}

index_t Shape::product(int begin, int end) const {
  index_t p = 1;
  for (int i = begin; i < end; ++i) p *= dims_[i];
  return p;
}

index_t Shape::size() const { return product(0, rank_); }

bool Shape::operator==(const Shape& other) const {
  if (rank_ != other.rank_) return false;
  for (int i = 0; i < rank_; ++i)
    if (dims_[i] != other.dims_[i]) return false;
  return true;
}

std::string Shape::str() const {
  std::ostringstream out;
  out << '[';
  for (int i = 0; i < rank_; ++i) out << (i ? ", " : "") << dims_[i];
  out << ']';
  return out.str();
}

template <class T>
Tensor<T>::Tensor(const std::string& label, const Shape& shape) : Tensor(label, shape, true) {}

template <class T>
Tensor<T>::Tensor(const std::string& label, const Shape& shape, bool zero_initialise)
    : label_(label), shape_(shape) {
  void* data = nullptr;
  bool zeroed = false;
  block_ = pool_allocate(static_cast<std::size_t>(shape.size()) * sizeof(T), label, &data, &zeroed);
  storage_ = View1<T>(static_cast<T*>(data), static_cast<size_t>(shape.size()));
  // On the execution space's stream: deep_copy without one fences the device before and after.
  if (zero_initialise && !zeroed) Kokkos::deep_copy(ExecSpace(), storage_, T{});  // T{}: zero for every type
}

template <class T>
Tensor<T> Tensor<T>::wrap(const std::string& label, const Shape& shape, T* data) {
  Tensor t;
  t.label_ = label;
  t.shape_ = shape;
  t.block_ = std::shared_ptr<void>(nullptr, [](void*) {});  // owns nothing, but is not empty
  t.storage_ = View1<T>(data, static_cast<size_t>(shape.size()));
  return t;
}

template <class T>
Tensor<T> Tensor<T>::from_host(const std::string& label, const Shape& shape, const std::vector<T>& values) {
  Tensor t(label, shape, false);
  t.copy_from_host(values);
  return t;
}

template <class T>
void Tensor<T>::require_storage(const char* op) const {
  require(!empty(), Status::invalid_argument, "Tensor::", op, ": tensor '", label_,
          "' is empty (default-constructed, no storage)");
}

template <class T>
View2<T> Tensor<T>::as_matrix() const {
  require_storage("as_matrix");
  require(rank() >= 1, Status::shape_mismatch, label_, ": a scalar has no rows");
  return View2<T>(storage_.data(), shape_.product(0, rank() - 1), shape_[rank() - 1]);
}

template <class T>
View3<T> Tensor<T>::as_3d(int axis) const {
  require_storage("as_3d");
  require(axis >= 0 && axis < rank(), Status::invalid_argument, label_, ": axis ", axis, " out of range for shape ",
          shape_.str());
  return View3<T>(storage_.data(), shape_.product(0, axis), shape_[axis], shape_.product(axis + 1, rank()));
}

template <class T>
Tensor<T> Tensor<T>::reshape(const Shape& shape) const {
  // Even to a 0-element shape: an empty tensor keeps the rank-0 shape.
  require_storage("reshape");
  require(shape.size() == size(), Status::shape_mismatch, label_, ": cannot reshape ", shape_.str(), " to ",
          shape.str());
  Tensor t = *this;
  t.shape_ = shape;
  return t;
}

template <class T>
Tensor<T> Tensor<T>::clone(const std::string& label) const {
  if (empty()) {
    Tensor t;
    t.label_ = label;
    return t;
  }
  Tensor t(label, shape_, false);
  Kokkos::deep_copy(ExecSpace(), t.storage_, storage_);
  return t;
}

template <class T>
std::vector<T> Tensor<T>::to_host() const {
  if (empty()) return {};
  std::vector<T> out(static_cast<size_t>(size()));
  Kokkos::View<T*, Layout, HostSpace, Kokkos::MemoryUnmanaged> host(out.data(), out.size());
  Kokkos::deep_copy(host, storage_);
  return out;
}

template <class T>
void Tensor<T>::copy_from_host(const std::vector<T>& values) {
  if (empty()) {
    require(values.empty(), Status::invalid_argument, "Tensor::copy_from_host: tensor '", label_,
            "' is empty (default-constructed, no storage); cannot take ", values.size(), " host values");
    return;
  }
  require(static_cast<index_t>(values.size()) == size(), Status::shape_mismatch, label_, ": ", values.size(),
          " host values for shape ", shape_.str());
  Kokkos::View<const T*, Layout, HostSpace, Kokkos::MemoryUnmanaged> host(values.data(), values.size());
  Kokkos::deep_copy(storage_, host);
}

template <class T>
void Tensor<T>::fill(T value) {
  if (empty()) return;
  Kokkos::deep_copy(ExecSpace(), storage_, value);
}

template <class T>
void Tensor<T>::require_shape(const Shape& expected, const std::string& what) const {
  require(!empty(), Status::invalid_argument, what, ": expected shape ", expected.str(), ", got tensor '", label_,
          "', which is empty (default-constructed, no storage)");
  require(shape_ == expected, Status::shape_mismatch, what, ": expected shape ", expected.str(), ", got ",
          shape_.str());
}

template <class To, class From>
Tensor<To> convert_tensor(const Tensor<From>& tensor, const std::string& label) {
  if (tensor.empty()) return Tensor<To>();
  const auto out = Tensor<To>::uninitialized(label, tensor.shape());
  // A packet a thread: the expert weights are rounded to bfloat16 on every forward, and one value
  // a thread ran at 0.5 TB/s on an H100.
  transform_packets("kmoe::convert_tensor", tensor.size(), tensor.flat().data(), out.flat().data(),
                    KOKKOS_LAMBDA(const From v) { return convert<To>(v); });
  return out;
}

template <class T>
bool all_finite(const View1<const T>& values) {
  index_t bad = 0;
  Kokkos::parallel_reduce(
      "kmoe::all_finite", Kokkos::RangePolicy<ExecSpace>(0, values.extent(0)),
      KOKKOS_LAMBDA(const index_t i, index_t& count) {
        // v − v is 0 exactly when v is finite (Inf − Inf and NaN give NaN): a branch-free test
        // that vectorises, unlike a call to isfinite.
        count += static_cast<index_t>(!(values(i) - values(i) == T(0)));
      },
      bad);
  return bad == 0;
}

template <class T>
void require_finite(const Tensor<T>& tensor, const std::string& what) {
  require(all_finite<T>(tensor.flat()), Status::non_finite, what, " contains NaN or Inf");
}

template class Tensor<float>;
template class Tensor<double>;
template class Tensor<int>;
template class Tensor<std::int64_t>;
template class Tensor<bfloat16>;
template Tensor<bfloat16> convert_tensor<bfloat16, float>(const Tensor<float>&, const std::string&);
template Tensor<float> convert_tensor<float, bfloat16>(const Tensor<bfloat16>&, const std::string&);
template bool all_finite<float>(const View1<const float>&);
template bool all_finite<double>(const View1<const double>&);
template void require_finite<float>(const Tensor<float>&, const std::string&);
template void require_finite<double>(const Tensor<double>&, const std::string&);

}  // namespace kmoe
