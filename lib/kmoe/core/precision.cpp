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

}  // namespace kmoe
