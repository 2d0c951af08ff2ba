// QmpError and QmpResult: how a QMP command fails, with QEMU's error classes ("GenericError",
// "CommandNotFound", "DeviceNotFound", ...) and a human-readable description, and a command's
// outcome: its return value or such an error.
//
// Thread-safety: plain value types.
#pragma once

#include <optional>
#include <string>
#include <utility>

#include "monitor/qmp_text.h"

namespace spindle::monitor {

struct QmpError {
  std::string error_class = "GenericError";
  std::string desc;
  std::string hint;  // more help for a human (the command line prints it; QMP does not send it)
};

inline QmpError generic_error(std::string desc) {
  return {"GenericError", std::move(desc), {}};
}
inline QmpError device_not_found(std::string desc) {
  return {"DeviceNotFound", std::move(desc), {}};
}
inline QmpError command_not_found(std::string desc) {
  return {"CommandNotFound", std::move(desc), {}};
}

class QmpResult {
 public:
  QmpResult(Json value) : value_(std::move(value)) {}      // NOLINT: implicit on purpose
  QmpResult(QmpError error) : error_(std::move(error)) {}  // NOLINT: implicit on purpose

  bool ok() const noexcept { return !error_.has_value(); }
  const Json& value() const noexcept { return value_; }
  const QmpError& error() const noexcept { return *error_; }

 private:
  Json value_ = Json::object();
  std::optional<QmpError> error_;
};

}  // namespace spindle::monitor
