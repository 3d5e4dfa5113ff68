#include "kmoe/dist/gradients.hpp"

#include "kmoe/dist/parameter_blocks.hpp"

#include <KokkosBlas1_nrm2.hpp>
#include <KokkosBlas1_scal.hpp>

#include <cmath>

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

template <class T>
double clip_gradients_by_global_norm(const Communicator& comm, const model::ParameterList<T>& parameters,
                                     double max_norm) {
  double dense = 0, placed = 0;
  for (const model::Parameter<T>& p : parameters) {
    if (p.grad == nullptr || p.grad->size() == 0) continue;
    if (p.partial() && hyperslab_of(p).empty) continue;
    const double norm = static_cast<double>(KokkosBlas::nrm2(p.grad->flat()));
    (p.partial() ? placed : dense) += norm * norm;
  }
  // Dense entries are the same on every rank; placed blocks are summed over the ranks.
  comm.all_reduce_sum(&placed, 1);
  const double total = std::sqrt(dense + placed);
  if (max_norm > 0 && total > max_norm) {
    const T scale = static_cast<T>(max_norm / (total + 1e-6));
    for (const model::Parameter<T>& p : parameters)
      if (p.grad != nullptr && p.grad->size() > 0) KokkosBlas::scal(p.grad->flat(), scale, p.grad->flat());
  }
  return total;
}

template double clip_gradients_by_global_norm<float>(const Communicator&, const model::ParameterList<float>&, double);
template double clip_gradients_by_global_norm<double>(const Communicator&, const model::ParameterList<double>&,
                                                      double);
template void all_reduce_dense_gradients<float>(const Communicator&, const model::ParameterList<float>&);
template void all_reduce_dense_gradients<double>(const Communicator&, const model::ParameterList<double>&);

}  // namespace kmoe::dist
