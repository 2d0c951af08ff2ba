#include "coro/frame_allocator.h"

#include <new>

namespace spindle::coro::detail {

namespace {

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define SPINDLE_FRAME_POOL 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define SPINDLE_FRAME_POOL 0
#endif
#endif
#ifndef SPINDLE_FRAME_POOL
#define SPINDLE_FRAME_POOL 1
#endif

constexpr std::size_t kGranule = 64;
constexpr std::size_t kClasses = 16;  // frames up to 1 KiB are pooled
// Each size class caches up to 1 MiB of frames per thread (deep await chains reuse them all).
constexpr std::size_t kCacheBytesPerClass = 1 << 20;

struct FreeFrame {
  FreeFrame* next;
};

struct FramePool {
  FreeFrame* heads[kClasses] = {};
  std::size_t counts[kClasses] = {};
  ~FramePool() {
    for (FreeFrame* head : heads) {
      while (head) {
        FreeFrame* next = head->next;
        ::operator delete(head);
        head = next;
      }
    }
  }
};

[[maybe_unused]] thread_local FramePool t_pool;

inline std::size_t size_class(std::size_t size) noexcept { return (size - 1) / kGranule; }

}  // namespace

void* allocate_frame(std::size_t size) {
  if (SPINDLE_FRAME_POOL && size != 0 && size_class(size) < kClasses) {
    const std::size_t cls = size_class(size);
    if (FreeFrame* frame = t_pool.heads[cls]) {
      t_pool.heads[cls] = frame->next;
      --t_pool.counts[cls];
      return frame;
    }
    return ::operator new((cls + 1) * kGranule);
  }
  return ::operator new(size);
}

void free_frame(void* frame, std::size_t size) noexcept {
  if (SPINDLE_FRAME_POOL && size != 0 && size_class(size) < kClasses) {
    const std::size_t cls = size_class(size);
    if (t_pool.counts[cls] < kCacheBytesPerClass / ((cls + 1) * kGranule)) {
      auto* node = static_cast<FreeFrame*>(frame);
      node->next = t_pool.heads[cls];
      t_pool.heads[cls] = node;
      ++t_pool.counts[cls];
      return;
    }
  }
  ::operator delete(frame);
}

}  // namespace spindle::coro::detail
