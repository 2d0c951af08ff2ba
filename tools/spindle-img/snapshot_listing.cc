#include "snapshot_listing.h"

#include <fmt/format.h>

#include <cerrno>
#include <ctime>

#include "coro/block_on.h"
#include "human_size.h"
#include "tool_failure.h"

namespace spindle::img {

namespace {

using block::SnapshotDescription;

coro::Task<block::BlockResult<std::vector<SnapshotDescription>>> list(
    const block::ImageFormat& format, block::BlockNodeRef node) {
  co_return co_await format.list_snapshots(*node);
}

std::string line(const SnapshotDescription& s) {
  char date[64] = "";
  const std::time_t when = s.date_sec;
  std::tm local{};
  if (localtime_r(&when, &local)) std::strftime(date, sizeof date, "%Y-%m-%d %H:%M:%S", &local);
  const std::uint64_t secs = s.vm_clock_nsec / 1000000000;
  const std::string clock = fmt::format("{:02}:{:02}:{:02}.{:03}", secs / 3600, (secs / 60) % 60,
                                        secs % 60, (s.vm_clock_nsec / 1000000) % 1000);
  const std::string icount = s.icount ? std::to_string(*s.icount) : "";
  return fmt::format("{:<9} {:<16} {:>8}{:>20}{:>13}{:>11}\n", s.id, s.name,
                     human_size(s.vm_state_size), date, clock, icount);
}

}  // namespace

std::vector<SnapshotDescription> image_snapshots(const OpenedImage& image) {
  if (!image.format->can_snapshot()) return {};
  auto listed = coro::block_on(list(*image.format, image.root));
  if (!listed) {
    if (listed.error().error == ENOTSUP) return {};
    fail("Could not open '" + image.filename + "': " + listed.error().message);
  }
  return std::move(listed).value();
}

std::string snapshot_table_text(const std::vector<SnapshotDescription>& snapshots) {
  if (snapshots.empty()) return {};
  std::string text = "Snapshot list:\n";
  text += fmt::format("{:<10}{:<17}{:>8}{:>20}{:>13}{:>11}\n", "ID", "TAG", "VM SIZE", "DATE",
                      "VM CLOCK", "ICOUNT");
  for (const SnapshotDescription& s : snapshots) text += line(s);
  return text;
}

nlohmann::ordered_json snapshots_json(const std::vector<SnapshotDescription>& snapshots) {
  nlohmann::ordered_json list = nlohmann::ordered_json::array();
  for (const SnapshotDescription& s : snapshots) {
    nlohmann::ordered_json entry;
    if (s.icount) entry["icount"] = *s.icount;
    entry["vm-clock-nsec"] = s.vm_clock_nsec % 1000000000;
    entry["name"] = s.name;
    entry["date-sec"] = s.date_sec;
    entry["date-nsec"] = s.date_nsec;
    entry["vm-clock-sec"] = s.vm_clock_nsec / 1000000000;
    entry["id"] = s.id;
    entry["vm-state-size"] = s.vm_state_size;
    list.push_back(std::move(entry));
  }
  return list;
}

}  // namespace spindle::img
