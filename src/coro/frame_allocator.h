// Coroutine frame allocation: per-thread size-class free lists in front of operator new, so the
// create/finish cycle of a short coroutine costs a few loads and stores instead of malloc+free.
//
// Thread-safety: each thread has its own lists (thread_local); a frame freed on a different
// thread than it was allocated on simply joins the freeing thread's list. Lists are capped and
// released at thread exit. Sanitizer builds bypass the lists so use-after-free stays visible.
#pragma once

#include <cstddef>

namespace spindle::coro::detail {

void* allocate_frame(std::size_t size);
void free_frame(void* frame, std::size_t size) noexcept;

}  // namespace spindle::coro::detail
