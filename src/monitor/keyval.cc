#include "monitor/keyval.h"

#include <vector>

namespace spindle::monitor {

namespace {

bool valid_key_fragment(std::string_view part) {
  if (part.empty()) return false;
  for (char c : part) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '-' || c == '_';
    if (!ok) return false;
  }
  return true;
}

}  // namespace

QmpResult parse_keyval(std::string_view text, std::string_view implied_key) {
  Json root = Json::object();
  std::size_t pos = 0;
  bool first = true;
  while (pos < text.size()) {
    // The key runs to '=' (or, for an implied key, to ',' or the end).
    const std::size_t key_end = text.find_first_of("=,", pos);
    std::string key;
    if (key_end == std::string_view::npos || text[key_end] == ',') {
      if (!(first && !implied_key.empty())) {
        const std::string name(text.substr(
            pos, key_end == std::string_view::npos ? std::string_view::npos : key_end - pos));
        return generic_error("Expected '=' after parameter '" + name + "'");
      }
      key = implied_key;  // the value starts at `pos`
    } else {
      key = std::string(text.substr(pos, key_end - pos));
      pos = key_end + 1;
    }
    first = false;
    // The value runs to a single ',' (",," is a literal comma).
    std::string value;
    while (pos < text.size()) {
      if (text[pos] == ',') {
        if (pos + 1 < text.size() && text[pos + 1] == ',') {
          value += ',';
          pos += 2;
          continue;
        }
        break;
      }
      value += text[pos++];
    }
    if (pos < text.size()) ++pos;  // the separating comma
    // Dotted keys make nested objects.
    std::vector<std::string> parts;
    for (std::size_t start = 0;;) {
      const std::size_t dot = key.find('.', start);
      parts.push_back(
          key.substr(start, dot == std::string::npos ? std::string::npos : dot - start));
      if (dot == std::string::npos) break;
      start = dot + 1;
    }
    Json* node = &root;
    std::string path;
    for (std::size_t i = 0; i < parts.size(); ++i) {
      if (!valid_key_fragment(parts[i])) return generic_error("Invalid parameter '" + key + "'");
      path += (i ? "." : "") + parts[i];
      Json& member = (*node)[parts[i]];
      if (i + 1 == parts.size()) {
        if (!member.is_null()) {
          if (member.is_string()) {
            member = value;  // a repeated key: the last value wins, as in QEMU
            break;
          }
          return generic_error("Parameter '" + path + "' used inconsistently");
        }
        member = value;
      } else {
        if (member.is_null()) member = Json::object();
        if (!member.is_object())
          return generic_error("Parameter '" + path + "' used inconsistently");
        node = &member;
      }
    }
  }
  return root;
}

}  // namespace spindle::monitor
