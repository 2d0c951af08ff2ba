// QedError / QedResult<T>: an error as a positive errno code plus a human-readable message, for
// the QED driver's open, create and chain-opening paths, where "why" matters to the user
// ("QED table offset is invalid") and a bare errno is not enough.
//
// Thread-safety: plain value types; no sharing.
#pragma once

#include <optional>
#include <string>
#include <utility>

namespace spindle::block::qed {

struct QedError {
  int error = 0;  // positive errno; 0 means success
  std::string message;

  bool ok() const noexcept { return error == 0; }
};

template <typename T>
class QedResult {
 public:
  QedResult(T value) : value_(std::move(value)) {}  // NOLINT: implicit on purpose
  QedResult(QedError error) : error_(std::move(error)) {}  // NOLINT: implicit on purpose

  bool ok() const noexcept { return value_.has_value(); }
  explicit operator bool() const noexcept { return ok(); }
  const QedError& error() const noexcept { return error_; }
  T& value() & { return *value_; }
  T&& value() && { return std::move(*value_); }
  T* operator->() { return &*value_; }

 private:
  std::optional<T> value_;
  QedError error_;
};

}  // namespace spindle::block::qed
