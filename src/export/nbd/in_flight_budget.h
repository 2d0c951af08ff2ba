// InFlightBudget: the server-wide budget of bytes that admitted requests may hold at once (READ
// data, WRITE payloads, working memory), shared by every connection on every IoThread, so that
// many connections cannot multiply the per-connection budget.
//
// Admission rule: a request costing `cost` bytes is admitted when the server-wide total stays
// within the limit, or when its connection, counting this request, holds at most `reserve`
// bytes. The reserve keeps a client with little in flight (a 4 KiB reader) from being starved
// by clients that hold the budget (and may never read their replies); the total held is thus at
// most limit + reserve x connections. A connection refused is woken (its event set) at the next
// give_back() anywhere, and then tries again.
//
// Thread-safety: every member function from any thread; `mutex_` guards total_ and waiters_.
// An event passed to try_take() must stay alive until forget() for it has returned.
#pragma once

#include <cstdint>
#include <mutex>
#include <vector>

#include "coro/event.h"

namespace spindle::exports::nbd {

class InFlightBudget {
 public:
  InFlightBudget(std::uint64_t limit, std::uint64_t reserve) noexcept
      : limit_(limit), reserve_(reserve) {}

  // Takes `cost` if the rule above allows it. Otherwise registers `wake` (if not null) to be
  // set once bytes are given back, and returns false.
  bool try_take(std::uint64_t cost, std::uint64_t connection_held, coro::Event* wake);
  void give_back(std::uint64_t cost);
  // Unregisters `wake`: after this returns, the budget no longer touches it.
  void forget(coro::Event* wake);

  std::uint64_t held() const;
  std::uint64_t limit() const noexcept { return limit_; }

 private:
  const std::uint64_t limit_;
  const std::uint64_t reserve_;
  mutable std::mutex mutex_;
  std::uint64_t total_ = 0;
  std::vector<coro::Event*> waiters_;
};

}  // namespace spindle::exports::nbd
