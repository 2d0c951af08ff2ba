// BlockError / BlockResult<T>: an error as a positive errno code plus a message for the user,
// for the block layer's open, create, check and chain-opening paths, where "why" matters
// ("qcow2 L1 table offset is not cluster aligned") and a bare errno is not enough.
//
// Thread-safety: plain value types; no sharing.
#pragma once

#include <optional>
#include <string>
#include <utility>

namespace spindle::block {

struct BlockError {
  int error = 0;  // positive errno; 0 means success
  std::string message;

  bool ok() const noexcept { return error == 0; }
};

template <typename T>
class BlockResult {
 public:
  BlockResult(T value) : value_(std::move(value)) {}              // NOLINT: implicit on purpose
  BlockResult(BlockError error) : error_(std::move(error)) {}     // NOLINT: implicit on purpose

  bool ok() const noexcept { return value_.has_value(); }
  explicit operator bool() const noexcept { return ok(); }
  const BlockError& error() const noexcept { return error_; }
  T& value() & { return *value_; }
  T&& value() && { return std::move(*value_); }
  T* operator->() { return &*value_; }

 private:
  std::optional<T> value_;
  BlockError error_;
};

}  // namespace spindle::block
