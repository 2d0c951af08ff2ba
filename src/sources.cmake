# Source lists of the libraries, kept in one place: the top-level CMakeLists.txt builds the
# libraries from them, and fuzz/ compiles the same sources again with fuzzer instrumentation.
include(${CMAKE_CURRENT_LIST_DIR}/block/formats/qed/sources.cmake)
include(${CMAKE_CURRENT_LIST_DIR}/block/formats/qcow2/sources.cmake)

# spindle_nbd_protocol: the pure protocol layer (part of spindle_runtime, which the NBD client
# driver needs; the fuzz target compiles it alone).
set(SPINDLE_NBD_PROTOCOL_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/nbd/protocol.cc
)

# The NBD client block driver (block/drivers/nbd).
set(SPINDLE_NBD_CLIENT_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/block/drivers/nbd/client_connection.cc
  ${CMAKE_CURRENT_LIST_DIR}/block/drivers/nbd/nbd_node.cc
  ${CMAKE_CURRENT_LIST_DIR}/block/drivers/nbd/uri.cc
)

# spindle_runtime: base, aio, coro, block (with the QED and NBD client drivers), io, and the
# NBD protocol layer.
set(SPINDLE_RUNTIME_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/base/fatal.cc
  ${CMAKE_CURRENT_LIST_DIR}/aio/bottom_half.cc
  ${CMAKE_CURRENT_LIST_DIR}/aio/context.cc
  ${CMAKE_CURRENT_LIST_DIR}/aio/event_notifier.cc
  ${CMAKE_CURRENT_LIST_DIR}/aio/file_io.cc
  ${CMAKE_CURRENT_LIST_DIR}/aio/io_thread.cc
  ${CMAKE_CURRENT_LIST_DIR}/aio/page_cache.cc
  ${CMAKE_CURRENT_LIST_DIR}/aio/thread_pool.cc
  ${CMAKE_CURRENT_LIST_DIR}/aio/timer_heap.cc
  ${CMAKE_CURRENT_LIST_DIR}/aio/uring.cc
  ${CMAKE_CURRENT_LIST_DIR}/aio/uring_probe.cc
  ${CMAKE_CURRENT_LIST_DIR}/coro/coroutine.cc
  ${CMAKE_CURRENT_LIST_DIR}/coro/event.cc
  ${CMAKE_CURRENT_LIST_DIR}/coro/frame_allocator.cc
  ${CMAKE_CURRENT_LIST_DIR}/coro/mutex.cc
  ${CMAKE_CURRENT_LIST_DIR}/coro/queue.cc
  ${CMAKE_CURRENT_LIST_DIR}/coro/rw_lock.cc
  ${CMAKE_CURRENT_LIST_DIR}/coro/sleep.cc
  ${CMAKE_CURRENT_LIST_DIR}/block/block_backend.cc
  ${CMAKE_CURRENT_LIST_DIR}/block/block_node.cc
  ${CMAKE_CURRENT_LIST_DIR}/block/image_format.cc
  ${CMAKE_CURRENT_LIST_DIR}/block/cache_mode.cc
  ${CMAKE_CURRENT_LIST_DIR}/block/format_registry.cc
  ${CMAKE_CURRENT_LIST_DIR}/block/image_chain.cc
  ${CMAKE_CURRENT_LIST_DIR}/block/formats/raw/raw_format.cc
  ${CMAKE_CURRENT_LIST_DIR}/block/formats/raw/probed_raw_node.cc
  ${CMAKE_CURRENT_LIST_DIR}/block/drivers/blkdebug.cc
  ${CMAKE_CURRENT_LIST_DIR}/block/drivers/direct_file.cc
  ${CMAKE_CURRENT_LIST_DIR}/block/drivers/flush_mode.cc
  ${CMAKE_CURRENT_LIST_DIR}/block/drivers/file.cc
  ${CMAKE_CURRENT_LIST_DIR}/block/drivers/throttle.cc
  ${CMAKE_CURRENT_LIST_DIR}/io/byte_stream.cc
  ${CMAKE_CURRENT_LIST_DIR}/io/channel.cc
  ${CMAKE_CURRENT_LIST_DIR}/io/command.cc
  ${CMAKE_CURRENT_LIST_DIR}/io/socket.cc
  ${CMAKE_CURRENT_LIST_DIR}/io/tls_credentials.cc
  ${CMAKE_CURRENT_LIST_DIR}/io/tls_session.cc
  ${SPINDLE_QED_SOURCES}
  ${SPINDLE_QCOW2_SOURCES}
  ${SPINDLE_NBD_PROTOCOL_SOURCES}
  ${SPINDLE_NBD_CLIENT_SOURCES}
)

# spindle_nbd: the server.
set(SPINDLE_NBD_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/nbd/buffer_pool.cc
  ${CMAKE_CURRENT_LIST_DIR}/nbd/connection.cc
  ${CMAKE_CURRENT_LIST_DIR}/nbd/export_stats.cc
  ${CMAKE_CURRENT_LIST_DIR}/nbd/in_flight_budget.cc
  ${CMAKE_CURRENT_LIST_DIR}/nbd/mapped_file_cache.cc
  ${CMAKE_CURRENT_LIST_DIR}/nbd/reply_writer.cc
  ${CMAKE_CURRENT_LIST_DIR}/nbd/server.cc
)
