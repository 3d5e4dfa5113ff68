#include "kmoe/dist/gradients.hpp"

namespace kmoe::dist {

template <class T>
void all_reduce_dense_gradients(const Communicator& comm, const model::ParameterList<T>& parameters) {
  if (!comm.distributed()) return;
  // One reduction for all of them, packed in registry order (the same on every rank).
  std::vector<T> packed;
  for (const model::Parameter<T>& p : parameters) {
    if (p.partial() || p.grad == nullptr || p.grad->empty()) continue;
    const std::vector<T> g = p.grad->to_host();
    packed.insert(packed.end(), g.begin(), g.end());
  }
  comm.all_reduce_sum(packed.data(), packed.size());
  std::size_t at = 0;
  for (const model::Parameter<T>& p : parameters) {
    if (p.partial() || p.grad == nullptr || p.grad->empty()) continue;
    const std::size_t n = static_cast<std::size_t>(p.grad->size());
    p.grad->copy_from_host(std::vector<T>(packed.begin() + static_cast<std::ptrdiff_t>(at),
                                          packed.begin() + static_cast<std::ptrdiff_t>(at + n)));
    at += n;
  }
}

template void all_reduce_dense_gradients<float>(const Communicator&, const model::ParameterList<float>&);
template void all_reduce_dense_gradients<double>(const Communicator&, const model::ParameterList<double>&);

}  // namespace kmoe::dist
