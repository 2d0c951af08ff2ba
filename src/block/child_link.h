// ChildLink: a node's edge to one child that the graph may change while other threads use the
// node. Requests and queries follow it with `->` (one acquire load); replace() points it at
// another node inside a drained section (no request of any backend that reaches the owner is in
// flight), so a request never sees the edge change under it, while queries that run outside
// requests (size(), limits(), filename() from a handshake on another thread) read either the
// old child or the new one, both alive: the link keeps every child it has pointed to until it
// is destroyed (graph changes are rare, and a query may still hold the old pointer).
//
// Thread-safety: `->`, get() from any thread; replace() from one thread at a time, inside a
// drained section (see above).
#pragma once

#include <atomic>
#include <utility>
#include <vector>

#include "block/block_node.h"

namespace spindle::block {

class ChildLink {
 public:
  explicit ChildLink(BlockNodeRef child) : current_(child.get()) {
    owned_.push_back(std::move(child));
  }
  ChildLink(const ChildLink&) = delete;
  ChildLink& operator=(const ChildLink&) = delete;

  BlockNode* get() const noexcept { return current_.load(std::memory_order_acquire); }
  BlockNode* operator->() const noexcept { return get(); }
  BlockNode& operator*() const noexcept { return *get(); }
  void replace(BlockNodeRef child) {
    BlockNode* next = child.get();
    owned_.push_back(std::move(child));
    current_.store(next, std::memory_order_release);
  }

 private:
  std::atomic<BlockNode*> current_;
  std::vector<BlockNodeRef> owned_;  // written by replace() only
};

}  // namespace spindle::block
