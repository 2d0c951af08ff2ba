#include "export/nbd/buffer_pool.h"

#include <bit>
#include <cstddef>
#include <utility>

namespace spindle::exports::nbd {

void AlignedDelete::operator()(std::byte* block) const noexcept {
  ::operator delete[](block, alignment);
}

AlignedBlock allocate_aligned(std::size_t bytes, std::size_t alignment) {
  const std::align_val_t align{alignment};
  auto* block = static_cast<std::byte*>(::operator new[](bytes, align));
  return AlignedBlock(block, AlignedDelete{align});
}

ByteBuffer& ByteBuffer::operator=(ByteBuffer&& other) noexcept {
  if (this != &other) {
    give_back();
    data_ = std::move(other.data_);
    size_ = std::exchange(other.size_, 0);
    capacity_ = std::exchange(other.capacity_, 0);
    pool_ = std::move(other.pool_);
  }
  return *this;
}

ByteBuffer::~ByteBuffer() { give_back(); }

void ByteBuffer::give_back() noexcept {
  if (pool_ && data_) pool_->recycle(std::move(data_), capacity_);
  data_.reset();
  pool_.reset();
}

ByteBuffer BufferPool::acquire(std::size_t size) {
  ByteBuffer buffer;
  buffer.size_ = size;
  if (size == 0) return buffer;
  const std::size_t capacity = std::bit_ceil(size);
  const int shift = std::countr_zero(capacity);
  if (size < kMinPooledSize || shift > kMaxShift) {
    buffer.data_ = allocate_aligned(size, kSmallAlignment);
    buffer.capacity_ = size;
    return buffer;
  }
  auto& list = free_[static_cast<std::size_t>(shift - kMinShift)];
  if (!list.empty()) {
    buffer.data_ = std::move(list.back());
    list.pop_back();
    cached_bytes_ -= capacity;
  } else {
    buffer.data_ = allocate_aligned(capacity, kPooledAlignment);
  }
  buffer.capacity_ = capacity;
  buffer.pool_ = shared_from_this();
  return buffer;
}

void BufferPool::recycle(AlignedBlock block, std::size_t capacity) noexcept {
  if (cached_bytes_ + capacity > kMaxCachedBytes) return;  // freed here
  const int shift = std::countr_zero(capacity);
  auto& list = free_[static_cast<std::size_t>(shift - kMinShift)];
  try {
    list.push_back(std::move(block));
    cached_bytes_ += capacity;
  } catch (...) {
    // Out of memory for the list itself: the block is simply freed.
  }
}

}  // namespace spindle::exports::nbd
