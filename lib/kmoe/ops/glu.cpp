#include "kmoe/ops/glu.hpp"

#include "kmoe/core/error.hpp"
#include "kmoe/ops/impl/column_reduce.hpp"

namespace kmoe::ops {

namespace impl {

template <class T>
void check_glu_shapes(const char* op, const View2<const T>& in, const View1<const T>& mult, index_t out_rows,
                      index_t out_cols) {
  const index_t h = in.extent(1) / 2;
  require(in.extent(1) % 2 == 0, Status::shape_mismatch, op, ": input width ", in.extent(1),
          " is odd; a GLU input is [value | gate] of equal halves");
  require(out_rows == static_cast<index_t>(in.extent(0)) && out_cols == h, Status::shape_mismatch, op, ": output is [",
          out_rows, ", ", out_cols, "], expected [", in.extent(0), ", ", h, "] for input [", in.extent(0), ", ",
          in.extent(1), "]");
  require(mult.data() == nullptr || static_cast<index_t>(mult.extent(0)) == h, Status::shape_mismatch, op,
          ": mult has ", mult.extent(0), " entries, expected ", h);
}

}  // namespace impl

template <class T>
void glu_forward(Activation activation, const View2<const T>& in, const View1<const T>& mult, const View2<T>& out) {
  impl::check_glu_shapes("glu_forward", in, mult, out.extent(0), out.extent(1));
  const index_t h = out.extent(1);
  const bool has_mult = mult.data() != nullptr;
  Kokkos::parallel_for(
      "kmoe::glu_forward", md_range<2>({0, 0}, {static_cast<index_t>(out.extent(0)), static_cast<index_t>(out.extent(1))}),
      KOKKOS_LAMBDA(const index_t r, const index_t j) {
        const T gated = impl::glu_gated(activation, in(r, j), in(r, h + j));
        out(r, j) = has_mult ? gated * mult(j) : gated;
      });
}

template <class T>
void glu_backward(Activation activation, const View2<const T>& in, const View1<const T>& mult,
                  const View2<const T>& dout, const View2<T>& din, const View1<T>& dmult) {
  impl::check_glu_shapes("glu_backward", in, mult, dout.extent(0), dout.extent(1));
  require(din.extent(0) == in.extent(0) && din.extent(1) == in.extent(1), Status::shape_mismatch,
          "glu_backward: din is [", din.extent(0), ", ", din.extent(1), "], expected [", in.extent(0), ", ",
          in.extent(1), "]");
  require(dmult.data() == nullptr || mult.data() != nullptr, Status::invalid_argument,
          "glu_backward: dmult given without mult");
  require(dmult.data() == nullptr || dmult.extent(0) == mult.extent(0), Status::shape_mismatch,
          "glu_backward: dmult has ", dmult.extent(0), " entries, expected ", mult.extent(0));
  const index_t h = dout.extent(1);
  const bool has_mult = mult.data() != nullptr;
  Kokkos::parallel_for(
      "kmoe::glu_backward", md_range<2>({0, 0}, {static_cast<index_t>(dout.extent(0)), h}),
      KOKKOS_LAMBDA(const index_t r, const index_t j) {
        const T g = has_mult ? dout(r, j) * mult(j) : dout(r, j);
        const auto d = impl::glu_input_gradient(activation, g, in(r, j), in(r, h + j));
        din(r, j) = d.value;
        din(r, h + j) = d.gate;
      });
  if (dmult.data() == nullptr) return;
  // A deterministic column reduction: the sum does not depend on the thread count.
  impl::column_reduce<T, 1>(
      "kmoe::glu_backward_mult", dout.extent(0), h,
      KOKKOS_LAMBDA(const index_t r, const index_t j) {
        return Kokkos::Array<T, 1>{impl::glu_mult_gradient_term(activation, dout(r, j), in(r, j), in(r, h + j))};
      },
      KOKKOS_LAMBDA(const index_t j, const Kokkos::Array<T, 1>& sum) { dmult(j) += sum[0]; });
}

#define KMOE_INSTANTIATE(T)                                                                                 \
  template void glu_forward<T>(Activation, const View2<const T>&, const View1<const T>&, const View2<T>&); \
  template void glu_backward<T>(Activation, const View2<const T>&, const View1<const T>&,                  \
                                const View2<const T>&, const View2<T>&, const View1<T>&);
KMOE_INSTANTIATE(float)
KMOE_INSTANTIATE(double)
#undef KMOE_INSTANTIATE

}  // namespace kmoe::ops
