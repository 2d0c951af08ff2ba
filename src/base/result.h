// Result<T>: a value, or an error as a positive errno code — Spindle's "errors are values" type
// for operations that produce something (a channel, a listener) and can fail.
//
// Thread-safety: a plain value type; no sharing.
#pragma once

#include <optional>
#include <utility>

#include "base/fatal.h"

namespace spindle::base {

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : value_(std::move(value)) {}  // NOLINT: implicit on purpose
  static Result failure(int errno_value) {
    Result result;
    result.error_ = errno_value;
    return result;
  }

  bool ok() const noexcept { return value_.has_value(); }
  explicit operator bool() const noexcept { return ok(); }
  // The errno value of a failure (0 on success).
  int error() const noexcept { return error_; }

  T& value() & {
    if (!value_) fatal("Result::value() on a failure (errno {})", error_);
    return *value_;
  }
  T&& value() && { return std::move(value()); }
  T* operator->() { return &value(); }
  T& operator*() & { return value(); }

 private:
  Result() = default;
  std::optional<T> value_;
  int error_ = 0;
};

}  // namespace spindle::base
