// this_thread_id(): the calling thread's id, safe to call from coroutines that move between
// threads. std::this_thread::get_id() is not: glibc declares pthread_self() `const`, so clang
// may reuse the id it computed before a co_await after the coroutine has resumed on another
// thread. This function is defined in its own translation unit, out of the optimizer's sight.
//
// Thread-safety: callable from any thread.
#pragma once

#include <thread>

namespace spindle::testing_support {

std::thread::id this_thread_id() noexcept;

}  // namespace spindle::testing_support
