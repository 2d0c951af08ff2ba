#!/usr/bin/env bash
# The README's first command: install dependencies, build Spindle (g++ -O2), and run the main
# job. Until the NBD server lands, the main job is the runtime benchmark: Spindle against
# Boost-free Asio on the same work, ending in a summary table with ratios.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
ninja -C build spindle-runtime-bench
echo
exec build/bench/spindle-runtime-bench "$@"
