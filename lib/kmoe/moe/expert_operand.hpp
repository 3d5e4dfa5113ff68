// An expert weight [experts, K, M] as CVMM's GEMMs read it under a layer's Precision: the
// parameter itself (Precision::native, the parity path) or its bfloat16 copy (Precision::bfloat16,
// a float32 layer only), rounded once per forward and kept with the forward result so that
// backward multiplies by the very operand forward used. Gradients and master weights stay T.
#pragma once

#include "kmoe/core/bfloat16.hpp"
#include "kmoe/core/precision.hpp"
#include "kmoe/core/tensor.hpp"

#include <type_traits>

namespace kmoe::moe {

template <class T>
class ExpertOperand {
 public:
  ExpertOperand() = default;
  // Throws Status::unsupported for bfloat16 on a non-float32 weight (its masters are float32).
  ExpertOperand(const Tensor<T>& weight, Precision precision, const char* name) : weight_(weight) {
    require_precision_supported<T>(precision, name);
    if (precision == Precision::native) return;
    if constexpr (std::is_same_v<T, float>) rounded_ = convert_tensor<bfloat16>(weight, name);
  }

  bool empty() const { return weight_.empty(); }
  bool is_bfloat16() const { return !rounded_.empty(); }

  // run(w) with w the View3<const W> the GEMMs take: W = bfloat16 (rounded) or T.
  template <class Run>
  void visit(const Run& run) const {
    if constexpr (std::is_same_v<T, float>) {
      if (is_bfloat16()) return run(View3<const bfloat16>(rounded_.template view<3>()));
    }
    run(View3<const T>(weight_.template view<3>()));
  }

 private:
  Tensor<T> weight_;
  Tensor<bfloat16> rounded_;
};

// The operand type W of a View that ExpertOperand::visit passes.
template <class V>
using OperandType = typename std::decay_t<V>::non_const_value_type;

}  // namespace kmoe::moe
