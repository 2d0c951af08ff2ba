#include "aio/file_backend.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "aio/context.h"
#include "base/fatal.h"

namespace spindle::aio {

namespace {

FileBackend backend_from_environment() noexcept {
  const char* value = std::getenv("SPINDLE_AIO");
  if (value == nullptr || *value == '\0') return FileBackend::automatic;
  if (std::strcmp(value, "io_uring") == 0) return FileBackend::io_uring;
  if (std::strcmp(value, "threads") == 0) return FileBackend::threads;
  base::fatal("SPINDLE_AIO='{}': expected 'io_uring' or 'threads'", value);
}

std::atomic<FileBackend>& backend_setting() noexcept {
  static std::atomic<FileBackend> setting{backend_from_environment()};
  return setting;
}

}  // namespace

void set_file_backend(FileBackend backend) noexcept {
  backend_setting().store(backend, std::memory_order_relaxed);
}

FileBackend file_backend() noexcept {
  return backend_setting().load(std::memory_order_relaxed);
}

Uring* file_ring(Context& context, bool* unavailable) {
  *unavailable = false;
  switch (file_backend()) {
    case FileBackend::threads:
      return nullptr;
    case FileBackend::io_uring:
      if (Uring* ring = context.uring()) return ring;
      *unavailable = true;
      return nullptr;
    case FileBackend::automatic:
      return context.uring();
  }
  return nullptr;
}

const char* active_file_backend() {
  Context* context = current_context();
  if (context == nullptr) base::fatal("file I/O from a thread without a context");
  bool unavailable;
  Uring* ring = file_ring(*context, &unavailable);
  return ring ? "io_uring" : unavailable ? "unavailable" : "threads";
}

}  // namespace spindle::aio
