// ServedExport: one export as the NBD server serves it: its configuration, its statistics, and
// how many connections have selected it. Connections hold it by shared_ptr, so an export that
// is removed while clients use it stays valid until the last of them closes.
//
// Thread-safety: `config` is immutable and `stats` is atomic (ExportStats). `connections` and
// `removed` and `home` are read and written only under the owning Server's exports_mutex_. `unused`
// is an Event (any thread): set while no connection has the export selected.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "aio/context.h"
#include "block/block_backend.h"
#include "coro/event.h"
#include "export/nbd/export_stats.h"

namespace spindle::exports::nbd {

struct ExportConfig {
  std::string name;
  std::string description;
  std::shared_ptr<block::BlockBackend> backend;
  bool read_only = false;
  bool allow_unmap = false;  // TRIM and WRITE_ZEROES may punch holes (--discard=unmap)
  bool multi_conn = true;    // safe: every connection shares one backend (flush covers all)
  // Where the export's connections run once a client selects it (until Server::move_export);
  // null: on whichever of the server's IoThreads accepted them (spread round-robin).
  aio::Context* home = nullptr;
};

struct ServedExport {
  explicit ServedExport(ExportConfig export_config)
      : config(std::move(export_config)), home(config.home) {}

  const ExportConfig config;
  ExportStats stats;
  std::size_t connections = 0;  // Server::exports_mutex_
  bool removed = false;         // Server::exports_mutex_: no new client may select it
  aio::Context* home;           // Server::exports_mutex_: see ExportConfig::home
  coro::Event unused{true};
};

}  // namespace spindle::exports::nbd
