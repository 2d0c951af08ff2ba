// FileBackend: which mechanism file I/O uses (coro/file_io.h performs it). A process-wide
// switch: set_file_backend(), or the environment variable SPINDLE_AIO=io_uring|threads read at
// first use. "automatic" prefers the calling context's io_uring and falls back to its thread
// pool where io_uring is unavailable; "io_uring" forces the ring (operations fail with -ENOSYS
// without one); "threads" always uses the thread pool.
//
// Thread-safety: set_file_backend()/file_backend() from any thread (a relaxed atomic; a change
// takes effect for later operations). file_ring() and active_file_backend() are called in a
// context's own thread (they may create its ring).
#pragma once

namespace spindle::aio {

class Context;
class Uring;

enum class FileBackend { automatic, io_uring, threads };

void set_file_backend(FileBackend backend) noexcept;
FileBackend file_backend() noexcept;

// The ring file I/O on `context` uses now, or null for its thread pool. *unavailable is set
// when io_uring is forced but missing.
Uring* file_ring(Context& context, bool* unavailable);

// The backend the calling thread's context would use right now ("io_uring" or "threads"), or
// "unavailable" if io_uring is forced but missing. Aborts on a thread without a context.
const char* active_file_backend();

}  // namespace spindle::aio
