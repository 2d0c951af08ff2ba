#!/usr/bin/env bash
# The README's first command: install dependencies, build Spindle (g++ -O2), and run the main
# job: serve a demo disk image over NBD on a Unix socket, printing how to connect. Ctrl-C stops
# the server cleanly. The benchmarks are `bash scripts/bench.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
ninja -C build spindle-nbd

demo_dir=${SPINDLE_DEMO_DIR:-/tmp/spindle-demo}
mkdir -p "$demo_dir"
image=$demo_dir/demo.img
socket=$demo_dir/nbd.sock
if [[ ! -f $image ]]; then
  # A sparse 1 GiB raw disk with a greeting in its first sector.
  truncate -s 1G "$image"
  printf 'Hello from Spindle! This disk is served by spindle-nbd.\n' |
    dd of="$image" conv=notrunc status=none
fi

cat <<EOM

Serving $image (1 GiB, sparse) as export 'demo'. In another terminal, try:

  nbdinfo 'nbd+unix:///demo?socket=$socket'
  nbdinfo --map 'nbd+unix:///demo?socket=$socket'
  qemu-img info 'nbd+unix:///demo?socket=$socket'
  qemu-io -f raw -c 'read -v 0 64' 'nbd+unix:///demo?socket=$socket'
  nbdcopy 'nbd+unix:///demo?socket=$socket' /tmp/copy.img

Press Ctrl-C to stop (statistics are printed at exit).
EOM
exec build/tools/spindle-nbd -t --stats -x demo -D "Spindle demo disk" -f raw -k "$socket" "$image"
