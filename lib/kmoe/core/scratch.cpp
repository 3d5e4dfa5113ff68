#include "kmoe/core/scratch.hpp"

#include <map>
#include <string>

namespace kmoe {

namespace {

using Bytes = Kokkos::View<unsigned char*, MemSpace>;

std::map<std::string, Bytes>& buffers() {
  static std::map<std::string, Bytes> pool;
  return pool;
}

}  // namespace

template <class T>
View2<T> scratch(const char* name, index_t rows, index_t cols) {
  static const bool hooked = [] {
    // Buffers must go before Kokkos does.
    Kokkos::push_finalize_hook(release_scratch);
    return true;
  }();
  (void)hooked;
  const size_t bytes = static_cast<size_t>(rows) * static_cast<size_t>(cols) * sizeof(T);
  Bytes& buffer = buffers()[name];
  if (buffer.extent(0) < bytes) {
    buffer = Bytes();  // release before allocating the larger one
    buffer = Bytes(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("kmoe::scratch::") + name), bytes);
  }
  return View2<T>(reinterpret_cast<T*>(buffer.data()), rows, cols);
}

void release_scratch() { buffers().clear(); }

template View2<float> scratch<float>(const char*, index_t, index_t);
template View2<double> scratch<double>(const char*, index_t, index_t);
template View2<int> scratch<int>(const char*, index_t, index_t);

}  // namespace kmoe
