#include "kmoe/moe/expert_bias.hpp"

#include "kmoe/core/error.hpp"

namespace kmoe::moe {

namespace impl {

template <class T>
void require_bias(const char* op, const DispatchPlan& plan, index_t rows, index_t cols, const View2<const T>& bias) {
  require(rows <= plan.n_pairs(), Status::shape_mismatch, op, ": ", rows, " rows for a plan of ", plan.n_pairs(),
          " pairs");
  require(static_cast<index_t>(bias.extent(0)) == plan.n_experts() && static_cast<index_t>(bias.extent(1)) == cols,
          Status::shape_mismatch, op, ": bias is [", bias.extent(0), ", ", bias.extent(1), "], expected [",
          plan.n_experts(), ", ", cols, "]");
}

}  // namespace impl

template <class T>
void add_expert_bias(const DispatchPlan& plan, PairRows pair_rows, const View2<T>& rows, const View2<const T>& bias) {
  const index_t n = rows.extent(0), cols = rows.extent(1);
  impl::require_bias<T>("add_expert_bias", plan, n, cols, bias);
  const View1<int> sorted_pair = plan.sorted_pair(), expert_of_pair = plan.expert_of_pair();
  const bool sorted = pair_rows == PairRows::sorted;
  Kokkos::parallel_for(
      "kmoe::add_expert_bias", md_range<2>({0, 0}, {n, cols}),
      KOKKOS_LAMBDA(const index_t r, const index_t c) {
        const int e = expert_of_pair(sorted ? sorted_pair(r) : r);
        if (e >= 0) rows(r, c) += bias(e, c);
      });
}

template <class T>
void accumulate_expert_bias_gradient(const DispatchPlan& plan, PairRows pair_rows, const View2<const T>& drows,
                                     const View2<T>& dbias) {
  const index_t cols = drows.extent(1);
  impl::require_bias<T>("accumulate_expert_bias_gradient", plan, drows.extent(0), cols, dbias);
  require(pair_rows == PairRows::sorted ? static_cast<index_t>(drows.extent(0)) >= plan.n_routed_pairs()
                                        : static_cast<index_t>(drows.extent(0)) == plan.n_pairs(),
          Status::shape_mismatch, "accumulate_expert_bias_gradient: drows has ", drows.extent(0), " rows for ",
          plan.n_pairs(), " pairs (", plan.n_routed_pairs(), " routed)");
  const View1<int> offsets = plan.expert_offsets(), sorted_pair = plan.sorted_pair();
  const bool sorted = pair_rows == PairRows::sorted;
  // One thread per (expert, column), the expert's rows in sorted order = ascending pair id.
  Kokkos::parallel_for(
      "kmoe::expert_bias_gradient",
      md_range<2>({0, 0}, {static_cast<index_t>(plan.n_experts()), cols}),
      KOKKOS_LAMBDA(const index_t e, const index_t c) {
        T sum = 0;
        for (index_t s = offsets(e); s < offsets(e + 1); ++s) sum += drows(sorted ? s : sorted_pair(s), c);
        dbias(e, c) += sum;
      });
}

#define KMOE_INSTANTIATE(T)                                                                                   \
  template void add_expert_bias<T>(const DispatchPlan&, PairRows, const View2<T>&, const View2<const T>&); \
  template void accumulate_expert_bias_gradient<T>(const DispatchPlan&, PairRows, const View2<const T>&,  \
                                                   const View2<T>&);
KMOE_INSTANTIATE(float)
KMOE_INSTANTIATE(double)
#undef KMOE_INSTANTIATE

}  // namespace kmoe::moe
