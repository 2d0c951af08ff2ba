// probe_uring(): whether io_uring works in this process, checked once by a tool at start-up
// (spindle-nbd --aio=auto) before it picks a file I/O engine for every context.
//
// It exercises the three system calls a Context's ring needs — io_uring_setup, io_uring_register
// (the completion eventfd) and io_uring_enter (one NOP submitted and reaped) — on a throw-away
// ring, so a seccomp filter, `kernel.io_uring_disabled` or an old kernel that refuses any of them
// shows up here as an error instead of as ENOSYS from the first read of an image.
//
// Thread-safety: any thread; no shared state (each call probes afresh).
#pragma once

namespace spindle::aio {

struct UringProbe {
  bool available = false;
  int error = 0;              // errno of the failed step (0 if available)
  const char* step = "";      // "io_uring_setup", "io_uring_register", "io_uring_enter", ...
};

UringProbe probe_uring() noexcept;

}  // namespace spindle::aio
