#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (ASan + UBSan, build dir build-fuzz) and runs each
# one for a bounded time. Fails if a build fails or a target finds a crash, leak, sanitizer
# report or broken property (the crashing input is left in build-fuzz/artifacts/).
#   scripts/fuzz.sh [seconds per target, default 60]
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
dir=build-fuzz
cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ \
  -DSPINDLE_BUILD_FUZZ=ON -DSPINDLE_BUILD_TESTS=OFF -DSPINDLE_BUILD_BENCH=OFF >/dev/null
ninja -C "$dir" -j "$(nproc)" spindle_fuzz_targets

mkdir -p "$dir/artifacts" "$dir/corpus"
status=0
for target in "$dir"/fuzz/*_fuzz; do
  name=$(basename "$target")
  mkdir -p "$dir/corpus/$name"
  echo "== $name: ${seconds} s"
  if ! "$target" -max_total_time="$seconds" -print_final_stats=1 \
      -artifact_prefix="$dir/artifacts/$name-" "$dir/corpus/$name"; then
    echo "== $name: FAILED (inputs in $dir/artifacts/)"
    status=1
  fi
done
exit $status
