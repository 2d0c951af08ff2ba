# qcow2 image format driver (src/block/formats/qcow2). Included from src/sources.cmake.
set(SPINDLE_QCOW2_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/format.cc
  ${CMAKE_CURRENT_LIST_DIR}/create.cc
  ${CMAKE_CURRENT_LIST_DIR}/check.cc
  ${CMAKE_CURRENT_LIST_DIR}/qcow2_format.cc
  ${CMAKE_CURRENT_LIST_DIR}/qcow2_node.cc
  ${CMAKE_CURRENT_LIST_DIR}/table_cache.cc
  ${CMAKE_CURRENT_LIST_DIR}/compression.cc
  ${CMAKE_CURRENT_LIST_DIR}/snapshot_table.cc
  ${CMAKE_CURRENT_LIST_DIR}/snapshots.cc
  ${CMAKE_CURRENT_LIST_DIR}/compressed_write.cc
  ${CMAKE_CURRENT_LIST_DIR}/amend.cc
)
