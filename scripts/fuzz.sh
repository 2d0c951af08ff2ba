#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (ASan + UBSan, build dir build-fuzz) and runs each
# one for a bounded time. Fails if a build fails or a target finds a crash, leak, sanitizer
# report, hang or broken property (the failing input is left in build-fuzz/artifacts/).
#   scripts/fuzz.sh [seconds per target, default 60]
# Environment: SPINDLE_FUZZ_BUILD_DIR (default build-fuzz), SPINDLE_FUZZ_JOBS (default nproc).
# A target may write seed inputs: run with SPINDLE_FUZZ_WRITE_SEEDS=DIR it fills DIR and exits
# (targets without seeds ignore it and, with -runs=0, do nothing). Seeds are read alongside the
# target's corpus, which collects what it finds across runs.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
dir=${SPINDLE_FUZZ_BUILD_DIR:-build-fuzz}
cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ \
  -DSPINDLE_BUILD_FUZZ=ON -DSPINDLE_BUILD_TESTS=OFF -DSPINDLE_BUILD_BENCH=OFF >/dev/null
ninja -C "$dir" -j "${SPINDLE_FUZZ_JOBS:-$(nproc)}" spindle_fuzz_targets

# Per-target flags: -max_len keeps inputs (and so the time per input) small; -timeout turns a
# slow input into a reported hang well within the run.
target_flags() {
  case $1 in
    qed_open_fuzz) echo "-max_len=65536 -timeout=10" ;;  # an image with 4-32 KiB clusters
    qcow2_open_fuzz) echo "-max_len=65536 -timeout=10 -rss_limit_mb=2048" ;;  # 512 B-16 KiB clusters
    nbd_server_fuzz) echo "-max_len=8192 -timeout=10" ;;  # a handshake and a few requests
    qmp_fuzz) echo "-max_len=16384 -timeout=10" ;;  # a monitor session of a few commands
    *) echo "-timeout=10" ;;
  esac
}

# Runs one target for the time given; its output goes to $dir/logs/NAME.log and its exit status
# to $dir/logs/NAME.rc.
fuzz_one() {  # target
  local target=$1 name
  name=$(basename "$target")
  mkdir -p "$dir/corpus/$name"
  rm -rf "$dir/seeds/$name"
  local inputs=("$dir/corpus/$name")
  if ! SPINDLE_FUZZ_WRITE_SEEDS="$dir/seeds/$name" "$target" -runs=0 >"$dir/logs/$name.log" 2>&1; then
    echo "writing its seeds FAILED" >>"$dir/logs/$name.log"
    echo 1 >"$dir/logs/$name.rc"
    return
  fi
  [[ -d $dir/seeds/$name ]] && inputs+=("$dir/seeds/$name")
  local rc=0
  # shellcheck disable=SC2046  # the flags are words
  "$target" $(target_flags "$name") -max_total_time="$seconds" -print_final_stats=1 \
    -artifact_prefix="$dir/artifacts/$name-" "${inputs[@]}" >"$dir/logs/$name.log" 2>&1 || rc=$?
  echo $rc >"$dir/logs/$name.rc"
}

# One target per core at a time, so each gets the CPU time it would get alone.
mkdir -p "$dir/artifacts" "$dir/corpus" "$dir/seeds" "$dir/logs"
rm -f "$dir"/logs/*
parallel=$(nproc)
running=0
for target in "$dir"/fuzz/*_fuzz; do
  echo "== $(basename "$target"): ${seconds} s"
  fuzz_one "$target" &
  running=$((running + 1))
  if ((running >= parallel)); then
    wait -n || true
    running=$((running - 1))
  fi
done
wait

status=0
for target in "$dir"/fuzz/*_fuzz; do
  name=$(basename "$target")
  if [[ $(cat "$dir/logs/$name.rc" 2>/dev/null) == 0 ]]; then
    echo "== $name: passed"
    grep -E "^(Done|stat::)" "$dir/logs/$name.log" || true
  else
    echo "== $name: FAILED (inputs in $dir/artifacts/)"
    cat "$dir/logs/$name.log"
    status=1
  fi
done
exit $status
