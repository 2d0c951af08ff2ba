// to_qmp_text(): a JSON value as QEMU's monitor writes it, byte for byte: one line, ": " after
// keys and ", " between members and elements; members in the order of QEMU's QDict (a hash
// table of 512 buckets, walked in bucket order, the key inserted last first within a bucket),
// so that an object built by inserting members in the order QEMU's visitor does comes out as
// QEMU prints it; strings with non-ASCII and DEL as \uXXXX (upper-case hex, UTF-16 surrogate
// pairs); non-integer numbers as %.17g. Scripts that compare QEMU's text see the same bytes.
//
// Thread-safety: a pure function.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace spindle::monitor {

using Json = nlohmann::ordered_json;

std::string to_qmp_text(const Json& value);

// QEMU's QDict bucket for a key (its tdb_hash modulo 512).
std::uint32_t qdict_bucket(std::string_view key);

}  // namespace spindle::monitor
