# Source lists of the libraries, one per layer (ARCHITECTURE.md, "Layers and where they live"),
# kept in one place: the top-level CMakeLists.txt builds the libraries from them, and fuzz/
# compiles the same sources again with fuzzer instrumentation.
include(${CMAKE_CURRENT_LIST_DIR}/block/formats/qed/sources.cmake)
include(${CMAKE_CURRENT_LIST_DIR}/block/formats/qcow2/sources.cmake)

# spindle_base: what every layer shares.
set(SPINDLE_BASE_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/base/fatal.cc
)

# spindle_aio: event loops, bottom halves, timers, IoThread, thread pool, io_uring.
set(SPINDLE_AIO_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/aio/bottom_half.cc
  ${CMAKE_CURRENT_LIST_DIR}/aio/context.cc
  ${CMAKE_CURRENT_LIST_DIR}/aio/event_notifier.cc
  ${CMAKE_CURRENT_LIST_DIR}/aio/file_backend.cc
  ${CMAKE_CURRENT_LIST_DIR}/aio/io_thread.cc
  ${CMAKE_CURRENT_LIST_DIR}/aio/page_cache.cc
  ${CMAKE_CURRENT_LIST_DIR}/aio/thread_pool.cc
  ${CMAKE_CURRENT_LIST_DIR}/aio/timer_heap.cc
  ${CMAKE_CURRENT_LIST_DIR}/aio/uring.cc
  ${CMAKE_CURRENT_LIST_DIR}/aio/uring_probe.cc
)

# spindle_coro: coroutines, their locks, and the awaitables over aio (file I/O, thread pool).
set(SPINDLE_CORO_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/coro/cancellation.cc
  ${CMAKE_CURRENT_LIST_DIR}/coro/coroutine.cc
  ${CMAKE_CURRENT_LIST_DIR}/coro/event.cc
  ${CMAKE_CURRENT_LIST_DIR}/coro/file_io.cc
  ${CMAKE_CURRENT_LIST_DIR}/coro/frame_allocator.cc
  ${CMAKE_CURRENT_LIST_DIR}/coro/mutex.cc
  ${CMAKE_CURRENT_LIST_DIR}/coro/queue.cc
  ${CMAKE_CURRENT_LIST_DIR}/coro/rw_lock.cc
  ${CMAKE_CURRENT_LIST_DIR}/coro/sleep.cc
)

# spindle_io: channels (sockets, pipes, child processes, files, TLS).
set(SPINDLE_IO_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/io/byte_stream.cc
  ${CMAKE_CURRENT_LIST_DIR}/io/channel.cc
  ${CMAKE_CURRENT_LIST_DIR}/io/command.cc
  ${CMAKE_CURRENT_LIST_DIR}/io/socket.cc
  ${CMAKE_CURRENT_LIST_DIR}/io/tls_credentials.cc
  ${CMAKE_CURRENT_LIST_DIR}/io/tls_session.cc
)

# spindle_nbd_protocol: the NBD wire protocol only (pure parse/encode, no I/O), used by the
# client driver in the block layer and by the server export above it.
set(SPINDLE_NBD_PROTOCOL_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/nbd/protocol.cc
)

# spindle_block: the node graph, BlockBackend, the format registry and formats (raw, QED,
# qcow2), protocol drivers (file, NBD client) and filters.
set(SPINDLE_BLOCK_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/block/block_backend.cc
  ${CMAKE_CURRENT_LIST_DIR}/block/block_node.cc
  ${CMAKE_CURRENT_LIST_DIR}/block/image_format.cc
  ${CMAKE_CURRENT_LIST_DIR}/block/cache_mode.cc
  ${CMAKE_CURRENT_LIST_DIR}/block/format_registry.cc
  ${CMAKE_CURRENT_LIST_DIR}/block/image_chain.cc
  ${CMAKE_CURRENT_LIST_DIR}/block/snapshot_param.cc
  ${CMAKE_CURRENT_LIST_DIR}/block/formats/raw/raw_format.cc
  ${CMAKE_CURRENT_LIST_DIR}/block/formats/raw/probed_raw_node.cc
  ${CMAKE_CURRENT_LIST_DIR}/block/drivers/blkdebug.cc
  ${CMAKE_CURRENT_LIST_DIR}/block/drivers/direct_file.cc
  ${CMAKE_CURRENT_LIST_DIR}/block/drivers/flush_mode.cc
  ${CMAKE_CURRENT_LIST_DIR}/block/drivers/file.cc
  ${CMAKE_CURRENT_LIST_DIR}/block/drivers/throttle.cc
  ${CMAKE_CURRENT_LIST_DIR}/block/drivers/nbd/client_connection.cc
  ${CMAKE_CURRENT_LIST_DIR}/block/drivers/nbd/nbd_node.cc
  ${CMAKE_CURRENT_LIST_DIR}/block/drivers/nbd/uri.cc
  ${SPINDLE_QED_SOURCES}
  ${SPINDLE_QCOW2_SOURCES}
)

# spindle_export: what serves block backends to clients; today the NBD server (export/nbd).
set(SPINDLE_EXPORT_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/export/nbd/buffer_pool.cc
  ${CMAKE_CURRENT_LIST_DIR}/export/nbd/connection.cc
  ${CMAKE_CURRENT_LIST_DIR}/export/nbd/export_stats.cc
  ${CMAKE_CURRENT_LIST_DIR}/export/nbd/in_flight_budget.cc
  ${CMAKE_CURRENT_LIST_DIR}/export/nbd/mapped_file_cache.cc
  ${CMAKE_CURRENT_LIST_DIR}/export/nbd/reply_writer.cc
  ${CMAKE_CURRENT_LIST_DIR}/export/nbd/server.cc
)

# spindle_monitor: QMP (protocol, argument checking, error classes) and the storage daemon's
# commands over nodes, IoThreads and exports (spindle-storaged).
set(SPINDLE_MONITOR_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/monitor/arguments.cc
  ${CMAKE_CURRENT_LIST_DIR}/monitor/blockdev.cc
  ${CMAKE_CURRENT_LIST_DIR}/monitor/json_stream.cc
  ${CMAKE_CURRENT_LIST_DIR}/monitor/keyval.cc
  ${CMAKE_CURRENT_LIST_DIR}/monitor/node_table.cc
  ${CMAKE_CURRENT_LIST_DIR}/monitor/qmp_server.cc
  ${CMAKE_CURRENT_LIST_DIR}/monitor/qmp_session.cc
  ${CMAKE_CURRENT_LIST_DIR}/monitor/qmp_text.cc
  ${CMAKE_CURRENT_LIST_DIR}/monitor/socket_address.cc
  ${CMAKE_CURRENT_LIST_DIR}/monitor/storage_daemon.cc
)

# Every layer's sources in dependency order (the fuzz targets compile them all into one
# instrumented library).
set(SPINDLE_ALL_SOURCES
  ${SPINDLE_BASE_SOURCES} ${SPINDLE_AIO_SOURCES} ${SPINDLE_CORO_SOURCES} ${SPINDLE_IO_SOURCES}
  ${SPINDLE_NBD_PROTOCOL_SOURCES} ${SPINDLE_BLOCK_SOURCES} ${SPINDLE_EXPORT_SOURCES}
  ${SPINDLE_MONITOR_SOURCES}
)
