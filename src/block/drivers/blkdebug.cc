#include "block/drivers/blkdebug.h"

#include <algorithm>

namespace spindle::block {

namespace {

std::uint64_t end_of(std::uint64_t offset, std::uint64_t length) noexcept {
  return length > UINT64_MAX - offset ? UINT64_MAX : offset + length;
}

}  // namespace

int BlkdebugNode::add_rule(BlkdebugRule rule) {
  if (rule.error <= 0) rule.error = EIO;
  std::lock_guard lock(mutex_);
  const int id = next_id_++;
  rules_.push_back(Entry{id, rule});
  return id;
}

bool BlkdebugNode::remove_rule(int id) {
  std::lock_guard lock(mutex_);
  const auto it = std::find_if(rules_.begin(), rules_.end(),
                               [id](const Entry& entry) { return entry.id == id; });
  if (it == rules_.end()) return false;
  rules_.erase(it);
  return true;
}

void BlkdebugNode::clear_rules() {
  std::lock_guard lock(mutex_);
  rules_.clear();
}

std::size_t BlkdebugNode::rule_count() const {
  std::lock_guard lock(mutex_);
  return rules_.size();
}

std::uint64_t BlkdebugNode::injected() const {
  std::lock_guard lock(mutex_);
  return injected_;
}

int BlkdebugNode::check(BlkdebugOp op, std::optional<Range> range) {
  std::lock_guard lock(mutex_);
  int error = 0;
  auto fired = rules_.end();
  for (auto it = rules_.begin(); it != rules_.end(); ++it) {
    const BlkdebugRule& rule = it->rule;
    if (rule.op != BlkdebugOp::any && rule.op != op) continue;
    if (rule.length > 0) {
      if (!range) continue;  // a flush has no range to overlap
      // Saturating ends: a rule "from offset to the end" may say length = UINT64_MAX.
      const std::uint64_t rule_end = end_of(rule.offset, rule.length);
      const std::uint64_t request_end = end_of(range->offset, range->bytes);
      if (range->offset >= rule_end || rule.offset >= request_end) continue;
    }
    // Count even when an earlier rule already fired: "the Nth matching request" must not
    // depend on which other rules happen to be installed.
    ++it->matches;
    if (error != 0) continue;
    if (rule.nth == 0 || it->matches == rule.nth) {
      error = rule.error;
      fired = it;
    }
  }
  if (error == 0) return 0;
  ++injected_;
  if (fired->rule.once) rules_.erase(fired);
  return -error;
}

coro::Task<int> BlkdebugNode::read(std::uint64_t offset, std::span<std::byte> buffer,
                                   std::uint32_t flags) {
  const int error = check(BlkdebugOp::read, Range{offset, buffer.size()});
  if (error != 0) co_return error;
  co_return co_await child_->read(offset, buffer, flags);
}

coro::Task<int> BlkdebugNode::write(std::uint64_t offset, std::span<const std::byte> buffer,
                                    std::uint32_t flags) {
  const int error = check(BlkdebugOp::write, Range{offset, buffer.size()});
  if (error != 0) co_return error;
  co_return co_await child_->write(offset, buffer, flags);
}

coro::Task<int> BlkdebugNode::flush() {
  const int error = check(BlkdebugOp::flush, std::nullopt);
  if (error != 0) co_return error;
  co_return co_await child_->flush();
}

coro::Task<int> BlkdebugNode::write_zeroes(std::uint64_t offset, std::uint64_t bytes,
                                           std::uint32_t flags) {
  const int error = check(BlkdebugOp::write_zeroes, Range{offset, bytes});
  if (error != 0) co_return error;
  co_return co_await child_->write_zeroes(offset, bytes, flags);
}

coro::Task<int> BlkdebugNode::discard(std::uint64_t offset, std::uint64_t bytes) {
  const int error = check(BlkdebugOp::discard, Range{offset, bytes});
  if (error != 0) co_return error;
  co_return co_await child_->discard(offset, bytes);
}

}  // namespace spindle::block
