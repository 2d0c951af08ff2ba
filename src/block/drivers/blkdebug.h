// The `blkdebug` filter driver: a BlockNode over a child node that fails chosen requests with a
// chosen errno, for testing error paths (the NBD server's error replies, QED's recovery,
// retries). Everything it does not fail it forwards to the child unchanged; it is transparent
// for size, limits, block status and the backing chain.
//
// A rule matches a request when
//   * its `op` is the request's kind (or BlkdebugOp::any; block_status and truncate are never
//     failed),
//   * its range, if `length` > 0, overlaps the request's [offset, offset + bytes) — a flush
//     has no range, so only rules without a range match it,
// and fires on every matching request, or with `nth` = N only on the Nth matching request
// (1-based; it never fires again). A `once` rule is removed after it first fires. Each rule
// counts its own matches, whether or not another rule failed the request; rules are tried in
// the order they were added and the first one that fires decides the errno.
//
// Thread-safety: any number of coroutines on any contexts may send requests while any thread
// adds or removes rules. `mutex_` (a std::mutex, held only to walk the rule list, never across
// a suspension or while the child runs) protects `rules_`, `next_id_` and `injected_`. The
// child is a ChildLink (FilterNode).
#pragma once

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <vector>

#include "block/drivers/filter_node.h"

namespace spindle::block {

enum class BlkdebugOp { read, write, flush, write_zeroes, discard, any };

struct BlkdebugRule {
  BlkdebugOp op = BlkdebugOp::any;
  int error = EIO;           // positive errno; the request fails with -error
  std::uint64_t offset = 0;  // with length > 0: the request must overlap [offset, offset+length)
  std::uint64_t length = 0;  // 0: any offset
  std::uint64_t nth = 0;     // 0: every matching request; N: only the Nth (1-based)
  bool once = false;         // remove the rule after it first fires
};

class BlkdebugNode final : public FilterNode {
 public:
  explicit BlkdebugNode(BlockNodeRef child) : FilterNode(std::move(child)) {}

  // Adds a rule and returns its id (for remove_rule). Any thread. An `error` that is not a
  // positive errno is replaced by EIO.
  int add_rule(BlkdebugRule rule);
  // Removes a rule; false if there is no such rule (removed, or a `once` rule that fired).
  bool remove_rule(int id);
  void clear_rules();
  std::size_t rule_count() const;
  // How many requests this node has failed so far.
  std::uint64_t injected() const;

  const char* driver_name() const noexcept override { return "blkdebug"; }
  coro::Task<int> read(std::uint64_t offset, std::span<std::byte> buffer,
                       std::uint32_t flags) override;
  coro::Task<int> write(std::uint64_t offset, std::span<const std::byte> buffer,
                        std::uint32_t flags) override;
  coro::Task<int> flush() override;
  coro::Task<int> write_zeroes(std::uint64_t offset, std::uint64_t bytes,
                               std::uint32_t flags) override;
  coro::Task<int> discard(std::uint64_t offset, std::uint64_t bytes) override;

 private:
  struct Entry {
    int id;
    BlkdebugRule rule;
    std::uint64_t matches = 0;
  };

  // The -errno to fail this request with, or 0 to forward it. `range` is empty for flush.
  struct Range {
    std::uint64_t offset;
    std::uint64_t bytes;
  };
  int check(BlkdebugOp op, std::optional<Range> range);

  mutable std::mutex mutex_;
  std::vector<Entry> rules_;  // in the order they were added
  int next_id_ = 1;
  std::uint64_t injected_ = 0;
};

}  // namespace spindle::block
