# QED image format driver (src/block/formats/qed). Included from the top-level CMakeLists.txt.
set(SPINDLE_QED_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/format.cc
  ${CMAKE_CURRENT_LIST_DIR}/tables.cc
  ${CMAKE_CURRENT_LIST_DIR}/l2_cache.cc
  ${CMAKE_CURRENT_LIST_DIR}/qed_node.cc
  ${CMAKE_CURRENT_LIST_DIR}/check.cc
  ${CMAKE_CURRENT_LIST_DIR}/create.cc
  ${CMAKE_CURRENT_LIST_DIR}/qed_format.cc
  ${CMAKE_CURRENT_LIST_DIR}/backing_change.cc
)
