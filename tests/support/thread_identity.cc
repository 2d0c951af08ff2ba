#include "support/thread_identity.h"

namespace spindle::testing_support {

std::thread::id this_thread_id() noexcept { return std::this_thread::get_id(); }

}  // namespace spindle::testing_support
