#!/usr/bin/env bash
# The README's second command: install dependencies, then build and run every test.
#   1. g++ -O2 build of everything (library, tests, benchmarks); all tests under CTest.
#   2. clang ASan+UBSan build (-O1); the runtime tests.
#   3. clang TSan build (-O1); the runtime tests.
# SPINDLE_SANITIZERS=0 skips steps 2 and 3. Exits non-zero if any build or test fails.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
jobs=$(nproc)
start=$SECONDS

configure_and_build() {  # build-dir, extra cmake args...
  local dir=$1
  shift
  cmake -S . -B "$dir" -G Ninja "$@" >/dev/null
  ninja -C "$dir" -j "$jobs"
}

run_tests() {  # build-dir, ctest args...
  local dir=$1
  shift
  (cd "$dir" && ctest --output-on-failure --timeout 300 -j "$jobs" "$@")
}

echo "== g++ -O2: build and run all tests"
configure_and_build build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=g++
run_tests build

if [[ ${SPINDLE_SANITIZERS:-1} != 0 ]]; then
  echo "== clang ASan+UBSan: runtime tests"
  configure_and_build build-asan -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_COMPILER=clang++ \
    -DCMAKE_CXX_FLAGS=-O1 -DSPINDLE_SANITIZE=address,undefined -DSPINDLE_BUILD_BENCH=OFF
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
    run_tests build-asan -L runtime

  echo "== clang TSan: runtime tests"
  configure_and_build build-tsan -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_COMPILER=clang++ \
    -DCMAKE_CXX_FLAGS=-O1 -DSPINDLE_SANITIZE=thread -DSPINDLE_BUILD_BENCH=OFF
  TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 run_tests build-tsan -L runtime
fi

echo "== all test runs passed in $((SECONDS - start)) s"
