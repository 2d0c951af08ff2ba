#include "export/nbd/in_flight_budget.h"

#include <algorithm>

namespace spindle::exports::nbd {

bool InFlightBudget::try_take(std::uint64_t cost, std::uint64_t connection_held,
                              coro::Event* wake) {
  std::lock_guard lock(mutex_);
  if (total_ + cost <= limit_ || connection_held + cost <= reserve_) {
    total_ += cost;
    return true;
  }
  if (wake && std::find(waiters_.begin(), waiters_.end(), wake) == waiters_.end()) {
    waiters_.push_back(wake);
  }
  return false;
}

void InFlightBudget::give_back(std::uint64_t cost) {
  std::lock_guard lock(mutex_);
  total_ -= std::min(cost, total_);
  // Every waiter retries: few connections wait at once, and each takes what fits.
  for (coro::Event* waiter : waiters_) waiter->set();
  waiters_.clear();
}

void InFlightBudget::forget(coro::Event* wake) {
  std::lock_guard lock(mutex_);
  std::erase(waiters_, wake);
}

std::uint64_t InFlightBudget::held() const {
  std::lock_guard lock(mutex_);
  return total_;
}

}  // namespace spindle::exports::nbd
