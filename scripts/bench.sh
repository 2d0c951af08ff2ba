#!/usr/bin/env bash
# Builds (g++ -O2) and runs the benchmarks: the runtime against Asio, then locks, thread pool,
# file I/O and channels. Google Benchmark flags pass through to both programs.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
ninja -C build spindle-runtime-bench spindle-io-bench
build/bench/spindle-runtime-bench "$@"
build/bench/spindle-io-bench "$@"
