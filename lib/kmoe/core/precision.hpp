// The arithmetic a layer's hot path runs in, a per-layer config option ("precision").
//   native:   the layer's own type throughout (float32 or float64): the parity path.
//   bfloat16: mixed precision: the expert GEMMs take bfloat16 operands (tensor cores on CUDA) and
//             accumulate in float; master weights, gradients, optimizer state, router logits and
//             selection, losses and regularisers stay float32. Needs a float32 layer.
#pragma once

#include <string>
#include <type_traits>

namespace kmoe {

enum class Precision { native, bfloat16 };

// "native", "bfloat16"; anything else throws Status::invalid_argument naming both.
Precision parse_precision(const std::string& name);
const char* precision_name(Precision precision);

// Throws Status::unsupported naming `who` when a layer of value type T cannot run `precision`
// (bfloat16 keeps float32 master weights, so it needs T = float).
void require_precision_supported(Precision precision, bool float32_layer, const char* who);
template <class T>
void require_precision_supported(Precision precision, const char* who) {
  require_precision_supported(precision, std::is_same_v<T, float>, who);
}

}  // namespace kmoe
