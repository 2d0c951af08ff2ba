// MappedFileCache: read-only shared mappings of a host file, in fixed windows, so that a READ
// reply to a client on this machine can be written with one kernel copy (page cache → socket,
// by writev from the mapping) instead of two (page cache → buffer by io_uring, buffer →
// socket). Unlike sendfile, the client then reads socket buffers the server just wrote, which
// are still in the CPU cache (see docs/spindle-nbd.md).
//
// Only the kernel may read the mapped bytes (as sendmsg does): a file truncated by someone
// else makes such a read fail with EFAULT, whereas a user-space read would raise SIGBUS. So
// leases go to plain sockets only, never to TLS, which encrypts in user space. Callers check
// that the pages are resident first (aio::range_in_page_cache), so the copy does not stall
// the event loop on the disk.
//
// Windows are kWindowBytes long and aligned; at most kMaxWindows are mapped (address space,
// and page tables only for pages actually touched). A range that crosses a window boundary, or
// finds every window leased, is not mapped: the caller reads it the ordinary way.
//
// Thread-safety: one cache per connection, used only on the connection's context; a Lease is
// released there too.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>

namespace spindle::exports::nbd {

class MappedFileCache {
 public:
  static constexpr std::uint64_t kWindowBytes = 256u << 20;
  static constexpr std::size_t kMaxWindows = 16;

 private:
  struct Window {
    int fd = -1;
    std::uint64_t base = 0;  // file offset of the first mapped byte
    std::byte* address = nullptr;
    int leases = 0;
    std::uint64_t last_use = 0;
  };

 public:
  // Keeps a window mapped while bytes from it are being written.
  class Lease {
   public:
    Lease() = default;
    Lease(Lease&& other) noexcept;
    Lease& operator=(Lease&&) = delete;
    ~Lease();
    explicit operator bool() const noexcept { return window_ != nullptr; }
    const std::byte* data() const noexcept { return data_; }

   private:
    friend class MappedFileCache;
    Lease(Window& window, const std::byte* data) noexcept : window_(&window), data_(data) {}
    Window* window_ = nullptr;
    const std::byte* data_ = nullptr;
  };

  MappedFileCache() = default;
  ~MappedFileCache();
  MappedFileCache(const MappedFileCache&) = delete;
  MappedFileCache& operator=(const MappedFileCache&) = delete;

  // [offset, offset + bytes) of `fd` as memory, or an empty lease (see above).
  Lease map(int fd, std::uint64_t offset, std::uint64_t bytes);
  std::size_t mapped_windows() const noexcept;

 private:
  std::array<Window, kMaxWindows> windows_{};  // fixed: leases point into it
  std::uint64_t clock_ = 0;
};

}  // namespace spindle::exports::nbd
