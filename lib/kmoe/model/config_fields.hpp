// One field table per config: each field's JSON name (the original's argument name), type,
// default (the value in a default-constructed config) and check. JSON reading and writing and
// the configs' validate() all come from the table (and, next, the C ABI's setters), so a field
// is described once.
//
// Reading rejects keys the table does not know (naming the key and listing the accepted ones) and
// values of the wrong type (naming the field and the expected type); a required field without a
// value is an error naming it.
#pragma once

#include "kmoe/core/error.hpp"

#include <nlohmann/json.hpp>

#include <cmath>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace kmoe::model {

template <class C>
struct Field {
  std::string name;
  std::string type;   // for messages and documentation: "an integer", "a number or a list of numbers", ...
  bool required = false;
  bool written = true;  // false: accepted on input (with the values `set` allows) but never written back
  std::function<nlohmann::json(const C&)> get;
  // Throws kmoe::Error(Status::invalid_argument) naming `where` when the JSON value has the wrong type.
  std::function<void(C&, const nlohmann::json&, const std::string& where)> set;
  // Throws kmoe::Error(Status::invalid_argument) naming the field when the value is out of range.
  std::function<void(const C&, const std::string& where)> check;
};

template <class C>
using FieldTable = std::vector<Field<C>>;

// ---- reading, writing, checking ------------------------------------------------------------

// The config described by `json` (an object): defaults of C{} for absent fields, then every field's check.
// `context` names the config in messages ("sigma_moe config").
template <class C>
C read_fields(const FieldTable<C>& table, const nlohmann::json& json, const std::string& context, C config = C{});

// Every written field, in table order.
template <class C>
nlohmann::json write_fields(const FieldTable<C>& table, const C& config);

// Runs every field's check; the validate() of a config.
template <class C>
void check_fields(const FieldTable<C>& table, const C& config, const std::string& context) {
  for (const Field<C>& field : table)
    if (field.check) field.check(config, context + ": " + field.name);
}

// "a, b, c": the names of the table, for messages.
template <class C>
std::string field_names(const FieldTable<C>& table) {
  std::string names;
  for (const Field<C>& field : table) names += (names.empty() ? "" : ", ") + field.name;
  return names;
}

namespace impl {

[[noreturn]] void wrong_type(const std::string& where, const char* expected, const nlohmann::json& value);

template <class V>
V json_to(const nlohmann::json& value, const std::string& where) {
  if constexpr (std::is_same_v<V, bool>) {
    if (!value.is_boolean()) wrong_type(where, "a boolean", value);
    return value.get<bool>();
  } else if constexpr (std::is_integral_v<V>) {
    if (!value.is_number_integer()) wrong_type(where, "an integer", value);
    const auto wide = value.is_number_unsigned() && value.get<std::uint64_t>() > std::uint64_t(INT64_MAX)
                          ? std::numeric_limits<std::int64_t>::max()
                          : value.get<std::int64_t>();
    require(wide >= static_cast<std::int64_t>(std::numeric_limits<V>::min()) &&
                wide <= static_cast<std::int64_t>(std::numeric_limits<V>::max()),
            Status::invalid_argument, where, " = ", value.dump(), " is out of range");
    return static_cast<V>(wide);
  } else if constexpr (std::is_floating_point_v<V>) {
    if (!value.is_number()) wrong_type(where, "a number", value);
    return value.get<V>();
  } else {
    static_assert(std::is_same_v<V, std::string>, "fields are booleans, integers, numbers or strings");
    if (!value.is_string()) wrong_type(where, "a string", value);
    return value.get<std::string>();
  }
}

template <class V>
const char* type_name() {
  if constexpr (std::is_same_v<V, bool>) return "a boolean";
  else if constexpr (std::is_integral_v<V>) return "an integer";
  else if constexpr (std::is_floating_point_v<V>) return "a number";
  else return "a string";
}

}  // namespace impl

// ---- checks --------------------------------------------------------------------------------
// Each returns a check for Field::check on the member; messages name the field and the value.

// The string member must be one of `allowed`; the message names `who` and lists them.
template <class C>
std::function<void(const C&, const std::string&)> one_of(std::string C::*member, std::vector<std::string> allowed,
                                                         std::string who) {
  return [member, allowed = std::move(allowed), who = std::move(who)](const C& c, const std::string& where) {
    std::string names;
    for (const std::string& a : allowed) {
      if (c.*member == a) return;
      names += (names.empty() ? "" : ", ") + a;
    }
    fail(Status::invalid_argument, where, " = '", c.*member, "'; ", who, " takes: ", names);
  };
}

template <class C, class V>
std::function<void(const C&, const std::string&)> at_least(V C::*member, V minimum) {
  return [member, minimum](const C& c, const std::string& where) {
    require(c.*member >= minimum, Status::invalid_argument, where, " = ", c.*member, " must be at least ", minimum);
  };
}

// [0, 1): dropout probabilities. Written as "inside" tests so that NaN is rejected too.
template <class C>
std::function<void(const C&, const std::string&)> probability(double C::*member) {
  return [member](const C& c, const std::string& where) {
    require(c.*member >= 0 && c.*member < 1, Status::invalid_argument, where, " = ", c.*member,
            " is outside [0, 1)");
  };
}

template <class C>
std::function<void(const C&, const std::string&)> finite_positive(double C::*member) {
  return [member](const C& c, const std::string& where) {
    require(std::isfinite(c.*member) && c.*member > 0, Status::invalid_argument, where, " = ", c.*member,
            " must be finite and positive");
  };
}

template <class C>
std::function<void(const C&, const std::string&)> finite_non_negative(double C::*member) {
  return [member](const C& c, const std::string& where) {
    require(std::isfinite(c.*member) && c.*member >= 0, Status::invalid_argument, where, " = ", c.*member,
            " must be finite and not negative");
  };
}

template <class C>
std::function<void(const C&, const std::string&)> finite(double C::*member) {
  return [member](const C& c, const std::string& where) {
    require(std::isfinite(c.*member), Status::invalid_argument, where, " = ", c.*member, " must be finite");
  };
}

// ---- field constructors --------------------------------------------------------------------

// A boolean, integer, floating-point or string member.
template <class C, class V>
Field<C> field(const std::string& name, V C::*member, std::function<void(const C&, const std::string&)> check = {}) {
  Field<C> f;
  f.name = name;
  f.type = impl::type_name<V>();
  f.get = [member](const C& c) { return nlohmann::json(c.*member); };
  f.set = [member](C& c, const nlohmann::json& v, const std::string& where) { c.*member = impl::json_to<V>(v, where); };
  f.check = std::move(check);
  return f;
}

template <class C, class V>
Field<C> required_field(const std::string& name, V C::*member,
                        std::function<void(const C&, const std::string&)> check = {}) {
  Field<C> f = field(name, member, std::move(check));
  f.required = true;
  return f;
}

// An integer member where the original's None is stored as 0 (null on output when 0).
template <class C, class V>
Field<C> nullable_field(const std::string& name, V C::*member,
                        std::function<void(const C&, const std::string&)> check = {}) {
  Field<C> f;
  f.name = name;
  f.type = "an integer or null";
  f.get = [member](const C& c) { return c.*member == V(0) ? nlohmann::json(nullptr) : nlohmann::json(c.*member); };
  f.set = [member](C& c, const nlohmann::json& v, const std::string& where) {
    c.*member = v.is_null() ? V(0) : impl::json_to<V>(v, where);
  };
  f.check = std::move(check);
  return f;
}

// An enum member stored by name: parse(name) throws for an unknown name, name(value) gives it.
template <class C, class E>
Field<C> enum_field(const std::string& name, E C::*member, E (*parse)(const std::string&), const char* (*to_name)(E)) {
  Field<C> f;
  f.name = name;
  f.type = "a string";
  f.get = [member, to_name](const C& c) { return nlohmann::json(to_name(c.*member)); };
  f.set = [member, parse](C& c, const nlohmann::json& v, const std::string& where) {
    const std::string text = impl::json_to<std::string>(v, where);
    try {
      c.*member = parse(text);
    } catch (const Error& e) {
      fail(Status::invalid_argument, where, ": ", e.what());
    }
  };
  return f;
}

// A JSON object kept as it is (a nested layer's config), checked only to be an object.
template <class C>
Field<C> object_field(const std::string& name, nlohmann::json C::*member) {
  Field<C> f;
  f.name = name;
  f.type = "an object";
  f.get = [member](const C& c) { return c.*member; };
  f.set = [member](C& c, const nlohmann::json& v, const std::string& where) {
    if (!v.is_object()) impl::wrong_type(where, "an object", v);
    c.*member = v;
  };
  return f;
}

// A number or a list of numbers (a Python float or tuple), stored as a vector.
template <class C>
Field<C> number_list_field(const std::string& name, std::vector<double> C::*member,
                           std::function<void(const C&, const std::string&)> check = {}) {
  Field<C> f;
  f.name = name;
  f.type = "a number or a list of numbers";
  f.get = [member](const C& c) {
    const std::vector<double>& v = c.*member;
    return v.size() == 1 ? nlohmann::json(v.front()) : nlohmann::json(v);
  };
  f.set = [member](C& c, const nlohmann::json& v, const std::string& where) {
    std::vector<double> list;
    if (v.is_number()) {
      list.push_back(v.get<double>());
    } else {
      if (!v.is_array() || v.empty()) impl::wrong_type(where, "a number or a non-empty list of numbers", v);
      for (const auto& item : v) list.push_back(impl::json_to<double>(item, where));
    }
    c.*member = list;
  };
  f.check = std::move(check);
  return f;
}

// A key of the original that kmoe accepts only with values that leave the computation as
// implemented (custom expert modules must be null, a distributed flag false, ...); `allowed`
// says which, `why` why others are refused. Never written back.
template <class C>
Field<C> fixed_field(const std::string& name, std::function<bool(const nlohmann::json&)> allowed, const std::string& why) {
  Field<C> f;
  f.name = name;
  f.type = "(fixed)";
  f.written = false;
  f.get = [](const C&) { return nlohmann::json(); };
  f.set = [allowed, why](C&, const nlohmann::json& v, const std::string& where) {
    require(allowed(v), Status::unsupported, where, " = ", v.dump(), " is not supported (", why, ")");
  };
  return f;
}

// ---- template definitions ------------------------------------------------------------------

template <class C>
C read_fields(const FieldTable<C>& table, const nlohmann::json& json, const std::string& context, C config) {
  require(json.is_object(), Status::invalid_argument, context, " must be a JSON object, got ", json.dump());
  for (const auto& item : json.items()) {
    bool known = false;
    for (const Field<C>& field : table) known = known || field.name == item.key();
    require(known, Status::invalid_argument, context, ": unknown key '", item.key(), "' (accepted: ",
            field_names(table), ")");
  }
  for (const Field<C>& field : table) {
    const auto found = json.find(field.name);
    if (found == json.end()) {
      require(!field.required, Status::invalid_argument, context, ": missing required key '", field.name, "'");
      continue;
    }
    field.set(config, *found, context + ": " + field.name);
  }
  check_fields(table, config, context);
  return config;
}

template <class C>
nlohmann::json write_fields(const FieldTable<C>& table, const C& config) {
  nlohmann::json json = nlohmann::json::object();
  for (const Field<C>& field : table)
    if (field.written) json[field.name] = field.get(config);
  return json;
}

}  // namespace kmoe::model
