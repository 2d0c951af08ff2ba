// Whether a file range is resident in the kernel's page cache, so that code on an event loop
// can hand those pages on (sendfile) knowing the kernel will not stop to read the disk.
//
// Thread-safety: any thread; stateless apart from a process-wide "the kernel lacks it" flag.
#pragma once

#include <cstdint>

namespace spindle::aio {

// True when every page of [offset, offset + bytes) of `fd` is in the page cache, as
// cachestat(2) (Linux 6.5+) reports it. False when any page is missing, when the kernel has no
// cachestat or a sandbox forbids it (remembered: later calls cost nothing) and on any error. A page may still be
// evicted right after the answer; callers use it to avoid blocking, not for correctness.
bool range_in_page_cache(int fd, std::uint64_t offset, std::uint64_t bytes) noexcept;

}  // namespace spindle::aio
