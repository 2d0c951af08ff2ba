#include "block/drivers/nbd/nbd_node.h"

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <thread>

#include "aio/timer.h"
#include "coro/coroutine.h"
#include "io/tls_credentials.h"

namespace spindle::block::nbd {

namespace proto = spindle::nbd;

namespace {

constexpr std::int64_t kExtentCacheLifetimeNs = 1'000'000'000;

NbdOpenResult open_failure(int error, std::string message) {
  return NbdOpenResult{nullptr, error, std::move(message)};
}

}  // namespace

coro::Task<NbdOpenResult> open_nbd(std::string text, bool read_only) {
  std::string error;
  std::optional<NbdUri> uri = parse_nbd_uri(text, error);
  if (!uri) co_return open_failure(EINVAL, error);

  std::shared_ptr<const io::TlsCredentials> credentials;
  if (uri->tls) {
    credentials = uri->tls_psk_file.empty()
                      ? io::TlsCredentials::client_x509(uri->tls_certificates, error)
                      : io::TlsCredentials::client_psk(uri->tls_psk_file,
                                                       uri->user.empty() ? "qemu" : uri->user, error);
    if (!credentials) co_return open_failure(EACCES, describe(*uri) + ": " + error);
  }

  ConnectOutcome first = co_await ClientConnection::connect(*uri, credentials);
  if (!first.connection) co_return open_failure(first.error, first.message);
  const ExportDetails& details = first.connection->details();
  if (!read_only && (details.flags & proto::kFlagReadOnly)) {
    co_await first.connection->disconnect();
    co_return open_failure(EACCES, describe(*uri) + ": the export is read-only");
  }

  std::vector<std::shared_ptr<ClientConnection>> connections{first.connection};
  std::vector<std::unique_ptr<aio::IoThread>> threads;
  if (uri->connections > 1 && (details.flags & proto::kFlagCanMultiConn)) {
    aio::Context* origin = aio::current_context();
    for (unsigned i = 1; i < uri->connections; ++i) {
      threads.push_back(std::make_unique<aio::IoThread>(fmt::format("nbd-client-{}", i)));
      co_await coro::switch_to(threads.back()->context());
      ConnectOutcome more = co_await ClientConnection::connect(*uri, credentials);
      co_await coro::switch_to(*origin);
      if (!more.connection || more.connection->details().size != details.size) {
        for (auto& connection : connections) co_await connection->disconnect();
        if (more.connection) co_await more.connection->disconnect();
        co_return open_failure(more.connection ? EPROTO : more.error,
                               more.connection ? describe(*uri) + ": connections disagree on the size"
                                               : more.message);
      }
      connections.push_back(std::move(more.connection));
    }
  }
  const bool node_read_only = read_only || (details.flags & proto::kFlagReadOnly);
  co_return NbdOpenResult{std::make_shared<NbdNode>(std::move(text), std::move(connections),
                                                    std::move(threads), node_read_only),
                          0, {}};
}

NbdNode::NbdNode(std::string filename, std::vector<std::shared_ptr<ClientConnection>> connections,
                 std::vector<std::unique_ptr<aio::IoThread>> threads, bool read_only)
    : filename_(std::move(filename)),
      connections_(std::move(connections)),
      threads_(std::move(threads)),
      details_(connections_.front()->details()),
      read_only_(read_only) {
  const proto::BlockSizeInfo& sizes = details_.block_size;
  limits_.request_alignment = std::max<std::uint32_t>(sizes.minimum, 1);
  std::uint64_t maximum = std::min<std::uint64_t>(sizes.maximum, proto::kMaxPayloadLength);
  maximum -= maximum % limits_.request_alignment;
  limits_.max_transfer = std::max<std::uint64_t>(maximum, limits_.request_alignment);
}

NbdNode::~NbdNode() {
  // Best-effort NBD_CMD_DISC and close (posted to each connection's home when not ours).
  for (auto& connection : connections_) connection->abort();
  // Readers on our IoThreads must finish before the threads stop (they hold the connections).
  // Bounded: a reader only needs its thread's next loop iterations to run the abort.
  for (std::size_t i = 1; i < connections_.size(); ++i) {
    for (int spins = 0; spins < 5000 && !connections_[i]->reader_finished(); ++spins) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }
}

ClientConnection& NbdNode::pick() noexcept {
  if (connections_.size() == 1) return *connections_.front();
  aio::Context* here = aio::current_context();
  for (const auto& connection : connections_) {
    if (&connection->context() == here) return *connection;  // no hop
  }
  return *connections_[next_.fetch_add(1, std::memory_order_relaxed) % connections_.size()];
}

std::uint64_t NbdNode::max_effect_length() const noexcept {
  const std::uint64_t limit = 0xffffffffu;
  return limit - limit % std::max<std::uint64_t>(limits_.request_alignment, 1u << 20);
}

coro::Task<int> NbdNode::read(std::uint64_t offset, std::span<std::byte> buffer,
                              std::uint32_t flags) {
  if (buffer.empty()) co_return 0;
  co_return co_await pick().read(offset, buffer);
}

coro::Task<int> NbdNode::write(std::uint64_t offset, std::span<const std::byte> buffer,
                               std::uint32_t flags) {
  if (read_only_) co_return -EROFS;
  if (buffer.empty()) co_return 0;
  const bool fua = (flags & kFua) != 0;
  const bool native_fua = fua && has(proto::kFlagSendFua);
  const int result = co_await pick().write(offset, buffer, native_fua ? proto::kCmdFlagFua : 0);
  drop_extents();
  if (result < 0 || !fua || native_fua) co_return result;
  co_return co_await flush();
}

coro::Task<int> NbdNode::flush() {
  if (read_only_ || !has(proto::kFlagSendFlush)) co_return 0;
  co_return co_await pick().command(proto::Command::kFlush, 0, 0, 0);
}

coro::Task<int> NbdNode::write_zeroes(std::uint64_t offset, std::uint64_t bytes,
                                      std::uint32_t flags) {
  if (read_only_) co_return -EROFS;
  if (!has(proto::kFlagSendWriteZeroes)) co_return co_await BlockNode::write_zeroes(offset, bytes, flags);
  const bool fast = (flags & kNoFallback) != 0;
  if (fast && !has(proto::kFlagSendFastZero)) co_return -ENOTSUP;
  std::uint16_t command_flags = 0;
  if (!(flags & kMayUnmap)) command_flags |= proto::kCmdFlagNoHole;
  if (fast) command_flags |= proto::kCmdFlagFastZero;
  const bool fua = (flags & kFua) != 0;
  if (fua && has(proto::kFlagSendFua)) command_flags |= proto::kCmdFlagFua;
  while (bytes > 0) {
    const std::uint64_t length = std::min(bytes, max_effect_length());
    const int result = co_await pick().command(proto::Command::kWriteZeroes, command_flags, offset,
                                               static_cast<std::uint32_t>(length));
    drop_extents();
    if (result < 0) co_return result;
    offset += length;
    bytes -= length;
  }
  if (fua && !has(proto::kFlagSendFua)) co_return co_await flush();
  co_return 0;
}

coro::Task<int> NbdNode::discard(std::uint64_t offset, std::uint64_t bytes) {
  if (read_only_) co_return -EROFS;
  if (!has(proto::kFlagSendTrim)) co_return 0;
  while (bytes > 0) {
    const std::uint64_t length = std::min(bytes, max_effect_length());
    const int result = co_await pick().command(proto::Command::kTrim, 0, offset,
                                               static_cast<std::uint32_t>(length));
    drop_extents();
    if (result < 0) co_return result;
    offset += length;
    bytes -= length;
  }
  co_return 0;
}

bool NbdNode::cached_extent(std::uint64_t offset, ExtentStatus& extent) {
  std::lock_guard lock(cache_mutex_);
  if (offset < cache_offset_ ||
      aio::now_ns(aio::Clock::monotonic) - cache_time_ns_ > kExtentCacheLifetimeNs) {
    return false;
  }
  // Walks go forward: start from the last hit, so a walk over N extents costs O(N), not O(N²).
  if (offset < cache_hint_start_ || cache_hint_ >= cache_extents_.size()) {
    cache_hint_ = 0;
    cache_hint_start_ = cache_offset_;
  }
  for (; cache_hint_ < cache_extents_.size(); ++cache_hint_) {
    const ExtentStatus& cached = cache_extents_[cache_hint_];
    if (offset < cache_hint_start_ + cached.length) {
      extent = ExtentStatus{cached.flags, cache_hint_start_ + cached.length - offset};
      return true;
    }
    cache_hint_start_ += cached.length;
  }
  return false;
}

void NbdNode::store_extents(std::uint64_t offset, std::uint64_t generation,
                            std::vector<ExtentStatus> extents) {
  std::lock_guard lock(cache_mutex_);
  if (generation != cache_generation_) return;  // a change of ours raced with the query
  cache_offset_ = offset;
  cache_hint_ = 0;
  cache_hint_start_ = offset;
  cache_time_ns_ = aio::now_ns(aio::Clock::monotonic);
  cache_extents_ = std::move(extents);
}

void NbdNode::drop_extents() noexcept {
  std::lock_guard lock(cache_mutex_);
  ++cache_generation_;
  cache_extents_.clear();
}

coro::Task<BlockStatus> NbdNode::block_status(std::uint64_t offset, std::uint64_t bytes) {
  BlockStatus status;
  status.flags = kStatusData | kStatusAllocated | kStatusOffsetValid;
  status.file_offset = offset;
  status.bytes = std::min(bytes, size() - std::min(offset, size()));
  if (details_.base_allocation && status.bytes > 0) {
    ExtentStatus extent;
    bool known = cached_extent(offset, extent);
    if (!known) {
      // Ask for everything up to the end (the server answers as far as it likes), not just
      // `bytes`: the next query usually starts where this one ends.
      std::uint64_t generation;
      {
        std::lock_guard lock(cache_mutex_);
        generation = cache_generation_;
      }
      const std::uint64_t rest = size() - offset;
      const auto length = static_cast<std::uint32_t>(std::min(rest, max_effect_length()));
      std::vector<ExtentStatus> extents;
      const int result = co_await pick().block_status(offset, length, extents);
      if (result == 0 && !extents.empty()) {
        extent = extents.front();
        known = true;
        store_extents(offset, generation, std::move(extents));
      } else if (result < 0) {
        status.error = result;  // the server cannot say (e.g. EIO for corrupt metadata)
        co_return status;
      }
    }
    if (known) {
      const std::uint64_t alignment = limits_.request_alignment;
      std::uint64_t run = std::min<std::uint64_t>(extent.length, status.bytes);
      // Keep runs aligned: a sub-block extent reports its block as data (the safe answer).
      if (run >= alignment) {
        run -= run % alignment;
        status.flags = kStatusAllocated | kStatusOffsetValid;
        if (!(extent.flags & proto::kStateHole)) status.flags |= kStatusData;
        if (extent.flags & proto::kStateZero) status.flags |= kStatusZero;
      } else {
        run = std::min<std::uint64_t>(alignment, status.bytes);
      }
      status.bytes = run;
    }
    // An empty answer leaves the safe one: data, as far as asked.
  }
  if (offset + status.bytes >= size()) status.flags |= kStatusEof;
  co_return status;
}

coro::Task<int> NbdNode::close() {
  if (closed_.exchange(true)) co_return 0;
  const int flushed = co_await flush();
  for (const auto& connection : connections_) co_await connection->disconnect();
  co_return flushed;
}

}  // namespace spindle::block::nbd
