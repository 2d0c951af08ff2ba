#include "monitor/node_table.h"

#include <algorithm>
#include <cstdio>

namespace spindle::monitor {

NodeEntry* NodeTable::find(const std::string& name) {
  for (const auto& entry : entries_) {
    if (entry->name == name) return entry.get();
  }
  return nullptr;
}

NodeEntry& NodeTable::add(NodeEntry entry) {
  for (const auto& [role, child] : entry.children) {
    NodeEntry* found = find(child);
    if (!found) continue;
    found->parents.emplace_back(entry.name, role);
    if (found->iothread) entry.iothread = found->iothread;
  }
  entries_.push_back(std::make_unique<NodeEntry>(std::move(entry)));
  return *entries_.back();
}

std::vector<NodeEntry*> NodeTable::connected(NodeEntry& start) {
  std::vector<NodeEntry*> graph{&start};
  for (std::size_t next = 0; next < graph.size(); ++next) {
    const NodeEntry& entry = *graph[next];
    std::vector<std::string> neighbours;
    for (const auto& [role, child] : entry.children) neighbours.push_back(child);
    for (const auto& [parent, role] : entry.parents) neighbours.push_back(parent);
    for (const std::string& name : neighbours) {
      NodeEntry* found = find(name);
      if (found && std::find(graph.begin(), graph.end(), found) == graph.end()) {
        graph.push_back(found);
      }
    }
  }
  return graph;
}

std::vector<std::unique_ptr<NodeEntry>> NodeTable::remove(const std::string& name) {
  std::vector<std::unique_ptr<NodeEntry>> removed;
  std::vector<std::string> pending{name};
  while (!pending.empty()) {
    const std::string next = pending.front();
    pending.erase(pending.begin());
    const auto it = std::find_if(entries_.begin(), entries_.end(),
                                 [&](const auto& e) { return e->name == next; });
    if (it == entries_.end()) continue;
    std::unique_ptr<NodeEntry> entry = std::move(*it);
    entries_.erase(it);
    for (const auto& [role, child_name] : entry->children) {
      NodeEntry* child = find(child_name);
      if (!child) continue;
      auto& parents = child->parents;
      parents.erase(std::remove_if(parents.begin(), parents.end(),
                                   [&](const auto& p) { return p.first == entry->name; }),
                    parents.end());
      if (child->generated_name && parents.empty() && child->exports.empty()) {
        pending.push_back(child_name);
      }
    }
    removed.push_back(std::move(entry));
  }
  return removed;
}

std::string NodeTable::generate_name() {
  // QEMU's form: "#block", a counter, two random digits.
  for (;;) {
    char suffix[4];
    std::snprintf(suffix, sizeof suffix, "%02u", static_cast<unsigned>(random_() % 100));
    std::string name = "#block" + std::to_string(next_generated_++) + suffix;
    if (!find(name)) return name;
  }
}

}  // namespace spindle::monitor
