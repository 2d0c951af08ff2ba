#!/usr/bin/env bash
# The README's second command: install dependencies, then build and run every test.
#   0. source checks: layers include only the layers below them (scripts/check-layers.sh), and
#      no co_await inside a condition (a g++ 12 miscompilation);
#   1. g++ -O2 build of everything (library, tools, tests, benchmarks); all tests under CTest
#      (runtime, block, nbd, and interop with the real peers);
#   2. clang ASan+UBSan build; the runtime, block, nbd, export and monitor tests;
#   3. clang TSan build; the runtime, block, nbd, export and monitor tests, and the interop tests
#      labelled `tsan` (TSan-built spindle-nbd/spindle-img/spindle-storaged against the peers);
#   4. the libFuzzer targets, SPINDLE_FUZZ_SECONDS each (default 30).
# SPINDLE_SANITIZERS=0 skips steps 2-4. Exits non-zero if any build or test fails.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
# Every peer the interop tests use was just installed: a missing one is a failure, not a skip.
export SPINDLE_REQUIRE_PEERS=1
jobs=$(nproc)
start=$SECONDS

configure_and_build() {  # build-dir, "ninja targets" (empty: all), extra cmake args...
  local dir=$1 targets=$2
  shift 2
  cmake -S . -B "$dir" -G Ninja "$@" >/dev/null
  # shellcheck disable=SC2086  # the targets are words
  ninja -C "$dir" -j "$jobs" $targets
}

# The sanitizer builds compile only what their tests run: the test executables, and for the
# TSan build's interop tests the tools and the io_uring-less preload helper.
sanitizer_test_targets="aio_tests coro_tests io_tests block_tests nbd_tests export_tests monitor_tests"

run_tests() {  # build-dir, ctest args...
  local dir=$1
  shift
  (cd "$dir" && ctest --output-on-failure --timeout 300 -j "$jobs" "$@")
}

stage() { echo "== [$((SECONDS - start)) s] $*"; }

stage "source check: each layer includes only the layers below it"
bash scripts/check-layers.sh

stage "source check: no co_await inside if/while/switch conditions (g++ 12 miscompiles it)"
if grep -rnE '(if|while|switch) \((!)?co_await' src tools tests bench; then
  echo "bind the co_await result to a local first (see docs/locking.md, rule 10)"
  exit 1
fi

stage "g++ -O2: build and run all tests"
configure_and_build build "" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=g++
run_tests build

if [[ ${SPINDLE_SANITIZERS:-1} != 0 ]]; then
  stage "clang ASan+UBSan: runtime, block, nbd, export and monitor tests"
  configure_and_build build-asan "$sanitizer_test_targets" \
    -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_CXX_FLAGS=-O1 -DSPINDLE_SANITIZE=address,undefined -DSPINDLE_BUILD_BENCH=OFF
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
    run_tests build-asan -L 'runtime|block|nbd|export|monitor'

  stage "clang TSan: runtime, block, nbd, export, monitor tests; server/client interop (label tsan)"
  configure_and_build build-tsan "$sanitizer_test_targets spindle-nbd spindle-img spindle-storaged no_io_uring" \
    -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_CXX_FLAGS=-O1 \
    -DSPINDLE_SANITIZE=thread -DSPINDLE_BUILD_BENCH=OFF
  # A race ends the process at once with status 66 (TSan's own default, spelled out because the
  # interop harness fails a test whose spindle-nbd exits 66 or logs a report).
  TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1:exitcode=66 \
    run_tests build-tsan -L 'runtime|block|nbd|export|monitor|tsan'

  stage "libFuzzer targets, ${SPINDLE_FUZZ_SECONDS:-30} s each"
  bash scripts/fuzz.sh "${SPINDLE_FUZZ_SECONDS:-30}"
fi

echo "== all test runs passed in $((SECONDS - start)) s"
