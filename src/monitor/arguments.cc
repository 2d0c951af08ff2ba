#include "monitor/arguments.h"

#include <cerrno>
#include <cstdlib>

namespace spindle::monitor {

namespace {

const Json& empty_object() {
  static const Json empty = Json::object();
  return empty;
}

std::optional<bool> parse_keyval_bool(const std::string& text) {
  if (text == "on" || text == "yes" || text == "true" || text == "y") return true;
  if (text == "off" || text == "no" || text == "false" || text == "n") return false;
  return std::nullopt;
}

std::optional<std::int64_t> parse_keyval_integer(const std::string& text) {
  if (text.empty()) return std::nullopt;
  char* end = nullptr;
  errno = 0;
  const long long value = std::strtoll(text.c_str(), &end, 0);
  if (errno != 0 || *end != '\0') return std::nullopt;
  return value;
}

// QEMU's qemu_strtosz: a number with an optional B/k/M/G/T/P/E suffix (powers of 1024).
std::optional<std::uint64_t> parse_keyval_size(const std::string& text) {
  if (text.empty() || text[0] == '-') return std::nullopt;
  char* end = nullptr;
  errno = 0;
  const unsigned long long value = std::strtoull(text.c_str(), &end, 10);
  if (errno != 0 || end == text.c_str()) return std::nullopt;
  std::string_view suffix(end);
  unsigned shift = 0;
  if (!suffix.empty()) {
    if (suffix.size() != 1) return std::nullopt;
    switch (suffix[0]) {
      case 'b':
      case 'B':
        shift = 0;
        break;
      case 'k':
      case 'K':
        shift = 10;
        break;
      case 'm':
      case 'M':
        shift = 20;
        break;
      case 'g':
      case 'G':
        shift = 30;
        break;
      case 't':
      case 'T':
        shift = 40;
        break;
      case 'p':
      case 'P':
        shift = 50;
        break;
      case 'e':
      case 'E':
        shift = 60;
        break;
      default:
        return std::nullopt;
    }
  }
  if (shift && value > (UINT64_MAX >> shift)) return std::nullopt;
  return static_cast<std::uint64_t>(value) << shift;
}

}  // namespace

Arguments::Arguments(const Json& object, bool from_keyval, std::string path)
    : object_(object.is_object() ? &object : &empty_object()),
      from_keyval_(from_keyval),
      path_(std::move(path)) {}

std::string Arguments::name_of(std::string_view key) const {
  return path_.empty() ? std::string(key) : path_ + "." + std::string(key);
}

void Arguments::set_error(QmpError error) {
  if (!error_) error_ = std::move(error);
}

bool Arguments::has(std::string_view key) const {
  return object_->find(std::string(key)) != object_->end();
}

const Json* Arguments::lookup(std::string_view key, bool required) {
  if (error_) return nullptr;
  read_.insert(std::string(key));
  const auto it = object_->find(std::string(key));
  if (it == object_->end()) {
    if (required) set_error(generic_error("Parameter '" + name_of(key) + "' is missing"));
    return nullptr;
  }
  return &*it;
}

void Arguments::wrong_type(std::string_view key, const char* expected) {
  set_error(
      generic_error("Invalid parameter type for '" + name_of(key) + "', expected: " + expected));
}

const Json* Arguments::raw(std::string_view key, bool required) {
  return lookup(key, required);
}

std::optional<std::string> Arguments::string(std::string_view key, bool required) {
  const Json* value = lookup(key, required);
  if (!value) return std::nullopt;
  if (!value->is_string()) {
    wrong_type(key, "string");
    return std::nullopt;
  }
  return value->get<std::string>();
}

std::optional<bool> Arguments::boolean(std::string_view key, bool required) {
  const Json* value = lookup(key, required);
  if (!value) return std::nullopt;
  if (value->is_boolean()) return value->get<bool>();
  if (from_keyval_ && value->is_string()) {
    if (auto parsed = parse_keyval_bool(value->get<std::string>())) return parsed;
    set_error(generic_error("Parameter '" + name_of(key) + "' expects 'on' or 'off'"));
    return std::nullopt;
  }
  wrong_type(key, "boolean");
  return std::nullopt;
}

std::optional<std::int64_t> Arguments::integer(std::string_view key, bool required) {
  const Json* value = lookup(key, required);
  if (!value) return std::nullopt;
  if (value->is_number_integer()) return value->get<std::int64_t>();
  if (from_keyval_ && value->is_string()) {
    if (auto parsed = parse_keyval_integer(value->get<std::string>())) return parsed;
    set_error(generic_error("Parameter '" + name_of(key) + "' expects integer"));
    return std::nullopt;
  }
  wrong_type(key, "integer");
  return std::nullopt;
}

std::optional<std::uint64_t> Arguments::size(std::string_view key, bool required) {
  const Json* value = lookup(key, required);
  if (!value) return std::nullopt;
  if (value->is_number_unsigned()) return value->get<std::uint64_t>();
  if (value->is_number_integer() && value->get<std::int64_t>() >= 0) {
    return static_cast<std::uint64_t>(value->get<std::int64_t>());
  }
  if (from_keyval_ && value->is_string()) {
    if (auto parsed = parse_keyval_size(value->get<std::string>())) return parsed;
    set_error(generic_error("Parameter '" + name_of(key) +
                            "' expects a non-negative value "
                            "below 2^64"));
    return std::nullopt;
  }
  wrong_type(key, "size");
  return std::nullopt;
}

std::optional<std::string> Arguments::choice(std::string_view key,
                                             std::initializer_list<const char*> values,
                                             bool required) {
  std::optional<std::string> text = string(key, required);
  if (!text) return std::nullopt;
  for (const char* value : values) {
    if (*text == value) return text;
  }
  set_error(
      generic_error("Parameter '" + name_of(key) + "' does not accept value '" + *text + "'"));
  return std::nullopt;
}

std::optional<Arguments> Arguments::object(std::string_view key, bool required) {
  const Json* value = lookup(key, required);
  if (!value) return std::nullopt;
  if (!value->is_object()) {
    wrong_type(key, "object");
    return std::nullopt;
  }
  return Arguments(*value, from_keyval_, name_of(key));
}

void Arguments::finish_nested(Arguments& nested) {
  if (std::optional<QmpError> error = nested.finish()) set_error(std::move(*error));
}

std::optional<QmpError> Arguments::finish() {
  if (!error_) {
    for (const auto& [key, value] : object_->items()) {
      if (!read_.contains(key)) {
        set_error(generic_error("Parameter '" + name_of(key) + "' is unexpected"));
        break;
      }
    }
  }
  return error_;
}

}  // namespace spindle::monitor
