#include "kmoe/core/precision.hpp"

#include "kmoe/core/error.hpp"

namespace kmoe {

Precision parse_precision(const std::string& name) {
  if (name == "native") return Precision::native;
  if (name == "bfloat16") return Precision::bfloat16;
  fail(Status::invalid_argument, "unknown precision '", name, "' (native, bfloat16)");
}

const char* precision_name(Precision precision) {
  switch (precision) {
    case Precision::native: return "native";
    case Precision::bfloat16: return "bfloat16";
  }
  return "unknown";
}

void require_precision_supported(Precision precision, bool float32_layer, const char* who) {
  require(precision == Precision::native || float32_layer, Status::unsupported, who, ": precision '",
          precision_name(precision), "' needs a float32 layer (its master weights are float32)");
}

}  // namespace kmoe
