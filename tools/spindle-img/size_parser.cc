#include "size_parser.h"

#include <cctype>

namespace spindle::img {

namespace {

std::optional<unsigned> suffix_shift(char suffix) {
  switch (std::toupper(static_cast<unsigned char>(suffix))) {
    case 'B': return 0;
    case 'K': return 10;
    case 'M': return 20;
    case 'G': return 30;
    case 'T': return 40;
    case 'P': return 50;
    case 'E': return 60;
    default: return std::nullopt;
  }
}

}  // namespace

std::optional<std::uint64_t> parse_size(std::string_view text) {
  std::size_t pos = 0;
  unsigned __int128 whole = 0;
  const std::size_t digits_start = pos;
  while (pos < text.size() && std::isdigit(static_cast<unsigned char>(text[pos]))) {
    whole = whole * 10 + static_cast<unsigned>(text[pos] - '0');
    if (whole > UINT64_MAX) return std::nullopt;
    ++pos;
  }
  if (pos == digits_start) return std::nullopt;
  // The fraction, as numerator / denominator (at most 18 digits are significant).
  std::uint64_t numerator = 0, denominator = 1;
  if (pos < text.size() && text[pos] == '.') {
    ++pos;
    const std::size_t fraction_start = pos;
    while (pos < text.size() && std::isdigit(static_cast<unsigned char>(text[pos]))) {
      if (denominator < 1000000000000000000ull) {
        numerator = numerator * 10 + static_cast<unsigned>(text[pos] - '0');
        denominator *= 10;
      }
      ++pos;
    }
    if (pos == fraction_start) return std::nullopt;
  }
  unsigned shift = 0;
  if (pos < text.size()) {
    const std::optional<unsigned> found = suffix_shift(text[pos]);
    if (!found) return std::nullopt;
    shift = *found;
    ++pos;
  }
  if (pos != text.size()) return std::nullopt;
  const unsigned __int128 unit = static_cast<unsigned __int128>(1) << shift;
  const unsigned __int128 total = whole * unit + numerator * unit / denominator;
  if (total > UINT64_MAX) return std::nullopt;
  return static_cast<std::uint64_t>(total);
}

}  // namespace spindle::img
