// parse_keyval(): QEMU's command-line option syntax ("driver=file,node-name=f0,cache.direct=on")
// as a JSON object with string values, dotted keys making nested objects, ",," standing for a
// comma inside a value, and an optional implied key for a first item without "=" (the
// "iothread" of "--object iothread,id=io0" is its "qom-type"). Arguments(from_keyval = true)
// then reads the strings as the types the command expects, as QEMU's keyval visitor does.
//
// Thread-safety: a pure function.
#pragma once

#include <string>
#include <string_view>

#include "monitor/qmp_error.h"
#include "monitor/qmp_text.h"

namespace spindle::monitor {

// A JSON object, or the QmpError QEMU gives ("Invalid parameter 'x'", "Expected '=' after
// parameter 'x'", "Parameter 'a.b' used inconsistently").
QmpResult parse_keyval(std::string_view text, std::string_view implied_key = {});

}  // namespace spindle::monitor
