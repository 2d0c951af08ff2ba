#include "monitor/json_stream.h"

namespace spindle::monitor {

namespace {

bool is_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}
bool ends_bare_word(char c) {
  return is_space(c) || c == '{' || c == '}' || c == '[' || c == ']' || c == ',' || c == ':' ||
         c == '"' || c == '\'';
}

}  // namespace

void JsonStream::finish(const std::function<void(Piece)>& on_piece) {
  Piece piece;
  if (skipping_) {
    skipping_ = false;
  } else {
    piece.ok = true;
    piece.text = std::move(text_);
    on_piece(std::move(piece));
  }
  text_.clear();
  depth_ = 0;
  quote_ = 0;
  escape_ = false;
  started_ = false;
  bare_word_ = false;
}

void JsonStream::fail(std::string error, const std::function<void(Piece)>& on_piece) {
  if (!skipping_) {
    Piece piece;
    piece.error = std::move(error);
    on_piece(std::move(piece));
  }
  skipping_ = true;
  text_.clear();
  text_.shrink_to_fit();
}

void JsonStream::feed(std::string_view bytes, const std::function<void(Piece)>& on_piece) {
  for (std::size_t i = 0; i < bytes.size(); ++i) {
    const char c = bytes[i];
    if (bare_word_) {
      if (!ends_bare_word(c)) {
        if (!skipping_) text_ += c;
        continue;
      }
      finish(on_piece);  // and `c` starts what follows
    }
    if (!started_) {
      if (is_space(c)) continue;
      started_ = true;
      if (c == '}' || c == ']') {
        fail("JSON parse error, expecting value", on_piece);
        finish(on_piece);
        continue;
      }
      if (c != '{' && c != '[' && c != '"' && c != '\'') bare_word_ = true;
    }
    if (!skipping_ && text_.size() >= kMaxBytes) fail("JSON token size limit exceeded", on_piece);
    if (quote_) {
      if (escape_) {
        escape_ = false;
        // \' means ' in a single-quoted string; JSON has no such escape.
        if (!skipping_) {
          if (c == '\'') {
            text_.back() = '\'';
          } else {
            text_ += c;
          }
        }
      } else if (c == '\\') {
        escape_ = true;
        if (!skipping_) text_ += c;
      } else if (c == quote_) {
        quote_ = 0;
        if (!skipping_) text_ += '"';
        if (depth_ == 0) finish(on_piece);
      } else {
        if (!skipping_) {
          if (c == '"') text_ += '\\';  // a double quote inside a single-quoted string
          text_ += c;
        }
      }
      continue;
    }
    switch (c) {
      case '"':
      case '\'':
        quote_ = c;
        if (!skipping_) text_ += '"';
        continue;
      case '{':
      case '[':
        if (++depth_ > kMaxNesting) fail("JSON nesting depth limit exceeded", on_piece);
        break;
      case '}':
      case ']':
        if (!skipping_) text_ += c;
        if (--depth_ == 0) finish(on_piece);
        continue;
      default:
        break;
    }
    if (!skipping_) text_ += c;
  }
}

}  // namespace spindle::monitor
