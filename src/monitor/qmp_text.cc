#include "monitor/qmp_text.h"

#include <algorithm>
#include <cstdio>
#include <vector>

namespace spindle::monitor {

namespace {

constexpr std::uint32_t kQdictBuckets = 512;

void append_escape(std::string& out, std::uint32_t unit) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  out += "\\u";
  for (int shift = 12; shift >= 0; shift -= 4) out += kHex[(unit >> shift) & 0xf];
}

// Decodes one UTF-8 sequence at `s[i]`; an invalid byte reads as U+FFFD, as in QEMU.
std::uint32_t next_code_point(std::string_view s, std::size_t& i) {
  const auto byte = [&](std::size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char lead = byte(i);
  int length = lead < 0x80           ? 1
               : (lead >> 5) == 0x6  ? 2
               : (lead >> 4) == 0xe  ? 3
               : (lead >> 3) == 0x1e ? 4
                                     : 0;
  if (length == 0 || i + length > s.size()) {
    ++i;
    return 0xfffd;
  }
  std::uint32_t cp = length == 1 ? lead : lead & (0x7f >> length);
  for (int k = 1; k < length; ++k) {
    if ((byte(i + k) & 0xc0) != 0x80) {
      ++i;
      return 0xfffd;
    }
    cp = (cp << 6) | (byte(i + k) & 0x3f);
  }
  i += length;
  return cp;
}

void append_string(std::string& out, std::string_view s) {
  out += '"';
  for (std::size_t i = 0; i < s.size();) {
    const std::uint32_t cp = next_code_point(s, i);
    switch (cp) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (cp >= 0x20 && cp < 0x7f) {
          out += static_cast<char>(cp);
        } else if (cp >= 0x10000) {
          const std::uint32_t v = cp - 0x10000;
          append_escape(out, 0xd800 | (v >> 10));
          append_escape(out, 0xdc00 | (v & 0x3ff));
        } else {
          append_escape(out, cp);
        }
    }
  }
  out += '"';
}

void append(std::string& out, const Json& value) {
  switch (value.type()) {
    case Json::value_t::object: {
      // QDict order: by bucket; within one, the member inserted last first (listed newest
      // first, the stable sort keeps that order within a bucket).
      std::vector<std::pair<std::uint32_t, Json::const_iterator>> order;
      for (auto it = value.begin(); it != value.end(); ++it) {
        order.emplace_back(qdict_bucket(it.key()), it);
      }
      std::reverse(order.begin(), order.end());
      std::stable_sort(order.begin(), order.end(),
                       [](const auto& a, const auto& b) { return a.first < b.first; });
      out += '{';
      bool first = true;
      for (const auto& [bucket, it] : order) {
        if (!first) out += ", ";
        first = false;
        append_string(out, it.key());
        out += ": ";
        append(out, it.value());
      }
      out += '}';
      break;
    }
    case Json::value_t::array: {
      out += '[';
      bool first = true;
      for (const Json& element : value) {
        if (!first) out += ", ";
        first = false;
        append(out, element);
      }
      out += ']';
      break;
    }
    case Json::value_t::string:
      append_string(out, value.get_ref<const std::string&>());
      break;
    case Json::value_t::number_float: {
      char text[32];
      std::snprintf(text, sizeof text, "%.17g", value.get<double>());
      out += text;
      break;
    }
    default:
      out += value.dump();
      break;
  }
}

}  // namespace

std::uint32_t qdict_bucket(std::string_view key) {
  std::uint32_t v = 0x238F13AFu * static_cast<std::uint32_t>(key.size());
  for (std::size_t i = 0; i < key.size(); ++i) {
    v += static_cast<std::uint32_t>(static_cast<unsigned char>(key[i])) << (i * 5 % 24);
  }
  return (1103515243u * v + 12345u) % kQdictBuckets;
}

std::string to_qmp_text(const Json& value) {
  std::string out;
  append(out, value);
  return out;
}

}  // namespace spindle::monitor
