// NodeTable: the daemon's named block nodes (QMP's node-name), each with what blockdev-add was
// told (driver, options, read-only, cache) and who uses it: the nodes that have it as a child
// ("file", "backing") and the exports that serve it. A node in use cannot be deleted; nodes
// made inline for a child (blockdev-add's nested "file": {...}) get a generated name
// ("#block123") and are deleted with their parent.
//
// Thread-safety: used only on the daemon's control context.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "block/block_node.h"
#include "block/image_format.h"
#include "monitor/qmp_text.h"

namespace spindle::monitor {

struct NodeEntry {
  std::string name;
  std::string driver;        // QEMU's driver name ("file", "qcow2", "null-co", ...)
  block::BlockNodeRef node;  // what requests go to
  const block::ImageFormat* format = nullptr;  // format nodes: their format
  std::string filename;                        // the node's filename as QEMU shows it
  bool read_only = false;
  bool cache_direct = false;
  bool cache_no_flush = false;  // file nodes: flushes stop here (a FlushModeNode)
  bool discard_unmap = false;   // discard=unmap: exports pass TRIM and zeroing with holes down
  std::string detect_zeroes = "off";
  bool generated_name = false;  // made inline for a parent's child
  // Children by role ("file", "backing"), by node name.
  std::vector<std::pair<std::string, std::string>> children;
  // Parents: (parent node name, role), and export ids serving this node.
  std::vector<std::pair<std::string, std::string>> parents;
  std::vector<std::string> exports;
  // The IoThread the node's graph (the nodes connected to it) was placed on, by
  // block-export-add's iothread or x-blockdev-set-iothread: "" for the main loop; nullopt if
  // never placed (the main loop for background work, and exports' connections spread over
  // the NBD server's own IoThreads). A new node takes its children's placement.
  std::optional<std::string> iothread;
};

class NodeTable {
 public:
  NodeEntry* find(const std::string& name);
  const std::vector<std::unique_ptr<NodeEntry>>& entries() const { return entries_; }
  // Adds `entry`, recording it as a parent of its children (and placing it with them).
  NodeEntry& add(NodeEntry entry);
  // Removes the node named `name` (it must have no parents and no exports) and the generated
  // children only it used, returning them, children after parents, for closing.
  std::vector<std::unique_ptr<NodeEntry>> remove(const std::string& name);
  std::string generate_name();
  // The nodes connected to `start` by child and parent edges, `start` first: the graph that
  // moves between IoThreads as one.
  std::vector<NodeEntry*> connected(NodeEntry& start);

 private:
  std::vector<std::unique_ptr<NodeEntry>> entries_;  // in the order added
  unsigned next_generated_ = 0;
  std::minstd_rand random_{std::random_device{}()};
};

}  // namespace spindle::monitor
