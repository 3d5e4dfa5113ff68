#include "kmoe/model/config_fields.hpp"

namespace kmoe::model::impl {

void wrong_type(const std::string& where, const char* expected, const nlohmann::json& value) {
  fail(Status::invalid_argument, where, " must be ", expected, ", got ", value.dump());
}

}  // namespace kmoe::model::impl
