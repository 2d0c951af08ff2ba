// File I/O for coroutines: positioned reads and writes, vectored variants, fsync/fdatasync and
// fallocate on plain file descriptors. Each operation runs on the calling coroutine's home
// context's io_uring, or — when io_uring is unavailable or switched off — as a blocking call on
// that context's thread pool. Either way the coroutine resumes in its home context with the
// result: the byte count (reads may be short, 0 at end of file) or -errno. An offset of -1
// means the file's current position (for pipes and other unseekable files).
//
// pread/pwrite of any length: a request longer than one operation can carry (1 GiB pieces; the
// kernel moves at most 2 GiB - 4 KiB per call) is issued as consecutive pieces, stopping at the
// first short or failed piece, so the result is what one call would give: the bytes moved, short
// only at end of file / a full disk / a pipe's available data, or -errno if nothing moved.
//
// The backend is aio::file_backend() (aio/file_backend.h). "automatic" prefers io_uring, except
// for buffered (not O_DIRECT) writes of 1 MiB or more, which it runs on the thread pool: io_uring
// would pass them to an io-wq worker that runs one file's buffered writes one at a time.
//
// Thread-safety: the operations are called from coroutines on any context (each uses its own
// context's ring and pool).
#pragma once

#include <sys/types.h>
#include <sys/uio.h>

#include <cstddef>
#include <span>

#include "coro/task.h"

namespace spindle::coro {

Task<ssize_t> pread(int fd, void* buffer, std::size_t length, off_t offset);
Task<ssize_t> pwrite(int fd, const void* buffer, std::size_t length, off_t offset);
Task<ssize_t> preadv(int fd, std::span<const iovec> vectors, off_t offset);
Task<ssize_t> pwritev(int fd, std::span<const iovec> vectors, off_t offset);
Task<int> fsync(int fd);
Task<int> fdatasync(int fd);
Task<int> fallocate(int fd, int mode, off_t offset, off_t length);

}  // namespace spindle::coro
