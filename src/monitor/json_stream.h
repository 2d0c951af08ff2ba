// JsonStream: cuts a QMP byte stream into whole JSON values, the way QEMU's JSON streamer
// does: a value ends where its outermost brace or bracket closes (or, at the top level, where
// a string, number or keyword ends), whatever whitespace or newlines there are. Strings may be
// single-quoted (a QEMU extension); they are rewritten with double quotes so that a standard
// JSON parser reads the text. Bounded: a value deeper than kMaxNesting or longer than
// kMaxBytes is reported once as an error and skipped to its end, so a hostile peer costs at
// most kMaxBytes of memory and never desynchronises the stream.
//
// Thread-safety: a plain value type; one owner (a monitor session).
#pragma once

#include <cstddef>
#include <functional>
#include <string>
#include <string_view>

namespace spindle::monitor {

class JsonStream {
 public:
  static constexpr std::size_t kMaxNesting = 1024;
  static constexpr std::size_t kMaxBytes = 64u << 20;

  struct Piece {
    bool ok = false;
    std::string text;   // ok: a whole JSON value (double-quoted strings only)
    std::string error;  // !ok: why the value was dropped (QEMU's wording)
  };

  // Consumes `bytes`; calls `on_piece` for every value (or error) completed by them.
  void feed(std::string_view bytes, const std::function<void(Piece)>& on_piece);
  // Whether a value has begun and not yet ended.
  bool in_value() const noexcept { return started_; }

 private:
  void finish(const std::function<void(Piece)>& on_piece);
  void fail(std::string error, const std::function<void(Piece)>& on_piece);

  std::string text_;
  std::size_t depth_ = 0;
  char quote_ = 0;          // inside a string: its quote character
  bool escape_ = false;     // the previous character was a backslash inside a string
  bool started_ = false;    // a value has begun
  bool bare_word_ = false;  // the value is a top-level number or keyword
  bool skipping_ = false;   // dropping the rest of a value already reported as an error
};

}  // namespace spindle::monitor
