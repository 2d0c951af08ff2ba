// Arguments: reads a QMP command's arguments (a JSON object) member by member, checking each
// against the type the command expects, with QEMU's messages for what is wrong: "Parameter
// 'x' is missing", "Invalid parameter type for 'x', expected: boolean", "Parameter 'x' does
// not accept value 'y'", and, once every member was read, "Parameter 'z' is unexpected".
// Members of nested objects are named by their path ("file.filename"), as QEMU names them.
//
// From the command line (qemu-storage-daemon's --blockdev driver=file,read-only=on ...) every
// value arrives as a string: with `from_keyval` strings are accepted for booleans ("on"/"off",
// "yes"/"no", "true"/"false"), integers and sizes (with k/M/G/T suffixes), as QEMU's keyval
// visitor accepts them.
//
// Only the first error is kept: QEMU reports the first member that fails, in the order the
// command reads them; readers return an empty value after it.
//
// Thread-safety: a plain value type over a borrowed object; one user.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>

#include "monitor/qmp_error.h"
#include "monitor/qmp_text.h"

namespace spindle::monitor {

class Arguments {
 public:
  // `object` must outlive this reader. A non-object (null included) reads as an empty object.
  Arguments(const Json& object, bool from_keyval, std::string path = {});

  // Whether the member is present (reading it is still needed for finish()).
  bool has(std::string_view key) const;
  // Typed readers: nullopt when absent (an error too if `required`) or wrong.
  std::optional<std::string> string(std::string_view key, bool required = false);
  std::optional<bool> boolean(std::string_view key, bool required = false);
  std::optional<std::int64_t> integer(std::string_view key, bool required = false);
  std::optional<std::uint64_t> size(std::string_view key, bool required = false);
  // A string from `values` (a QAPI enum).
  std::optional<std::string> choice(std::string_view key, std::initializer_list<const char*> values,
                                    bool required = false);
  // A nested object, read by the returned reader; its errors become this reader's error when
  // it is finished (pass it to finish_nested()).
  std::optional<Arguments> object(std::string_view key, bool required = false);
  // The raw member (for alternates: a node name or an inline object), marked as read.
  const Json* raw(std::string_view key, bool required = false);

  void finish_nested(Arguments& nested);
  // Checks for members nobody read; returns the first error, or nullopt when all was well.
  std::optional<QmpError> finish();
  const std::optional<QmpError>& error() const noexcept { return error_; }
  void set_error(QmpError error);
  std::string name_of(std::string_view key) const;  // "file.filename"

 private:
  const Json* lookup(std::string_view key, bool required);
  void wrong_type(std::string_view key, const char* expected);

  const Json* object_;
  const bool from_keyval_;
  const std::string path_;
  std::set<std::string, std::less<>> read_;
  std::optional<QmpError> error_;
};

}  // namespace spindle::monitor
