#!/usr/bin/env bash
# Builds (g++ -O2) and runs the benchmarks: the runtime against Asio; locks, thread pool, file
# I/O and channels; then the peer comparisons (NBD servers, spindle-img bench against qemu-img
# bench, the NBD client). Google Benchmark flags pass through to the first two programs.
# About 15 minutes; run it on a quiet machine (docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
ninja -C build spindle-runtime-bench spindle-io-bench spindle-nbd spindle-img
build/bench/spindle-runtime-bench "$@"
build/bench/spindle-io-bench "$@"
python3 bench/nbd_bench.py --spindle-nbd build/tools/spindle-nbd --repeat 5  # NBD servers
python3 bench/img_bench.py --spindle-img build/tools/spindle-img          # vs qemu-img bench
python3 bench/nbd_client_bench.py --spindle-img build/tools/spindle-img   # NBD client
