#include "kmoe/dist/gradients.hpp"

#include "kmoe/dist/mpi_memory.hpp"
#include "kmoe/dist/parameter_blocks.hpp"

#include <KokkosBlas1_scal.hpp>

#include <cmath>
#include <vector>

namespace kmoe::dist {

template <class T>
void all_reduce_dense_gradients(const Communicator& comm, const model::ParameterList<T>& parameters) {
  if (!comm.distributed()) return;
  // One reduction for all of them, packed on the device in registry order (the same on every rank).
  const auto dense = [](const model::Parameter<T>& p) { return !p.partial() && p.grad != nullptr && !p.grad->empty(); };
  std::size_t total = 0;
  for (const model::Parameter<T>& p : parameters)
    if (dense(p)) total += static_cast<std::size_t>(p.grad->size());
  const auto packed = Tensor<T>::uninitialized("dist::dense_gradients", {static_cast<index_t>(total)});
  const View1<T> all = packed.flat();
  const auto each = [&](auto&& copy) {
    std::size_t at = 0;
    for (const model::Parameter<T>& p : parameters) {
      if (!dense(p)) continue;
      const std::size_t n = static_cast<std::size_t>(p.grad->size());
      copy(Kokkos::subview(all, std::make_pair(at, at + n)), p.grad->flat());
      at += n;
    }
  };
  each([](const auto& slice, const View1<T>& grad) { Kokkos::deep_copy(ExecSpace(), slice, grad); });
  all_reduce_sum(comm, all);
  each([](const auto& slice, const View1<T>& grad) { Kokkos::deep_copy(ExecSpace(), grad, slice); });
}

// sum ← Σ g² of `grad` (in double), a device scalar: no wait for the device here.
template <class T>
void squared_norm_into(const View1<T>& grad, const Kokkos::View<double, MemSpace>& sum) {
  Kokkos::parallel_reduce(
      "kmoe::dist::squared_norm", Kokkos::RangePolicy<ExecSpace>(0, grad.extent(0)),
      KOKKOS_LAMBDA(const index_t i, double& partial) { partial += static_cast<double>(grad(i)) * grad(i); }, sum);
}

template <class T>
double clip_gradients_by_global_norm(const Communicator& comm, const model::ParameterList<T>& parameters,
                                     double max_norm) {
  // Each parameter's squared norm into its own slot of one device array, read back once: a norm
  // returned per parameter (as KokkosBlas::nrm2 does) waits for the device once per parameter.
  std::vector<const model::Parameter<T>*> counted;
  for (const model::Parameter<T>& p : parameters)
    if (p.grad != nullptr && p.grad->size() > 0 && !(p.partial() && hyperslab_of(p).empty)) counted.push_back(&p);
  const auto squared_norms =
      Tensor<double>::uninitialized("kmoe::dist::squared_norms", {static_cast<index_t>(counted.size())});
  for (std::size_t i = 0; i < counted.size(); ++i)
    squared_norm_into(counted[i]->grad->flat(), Kokkos::View<double, MemSpace>(squared_norms.data() + i));
  const std::vector<double> per_parameter = squared_norms.to_host();
  double dense = 0, placed = 0;
  for (std::size_t i = 0; i < counted.size(); ++i) (counted[i]->partial() ? placed : dense) += per_parameter[i];
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
