#!/usr/bin/env bash
# Installs the Debian 12 packages Spindle needs to build, test and benchmark. Idempotent: when
# everything is already installed it does nothing (and needs no network). Run as root.
set -euo pipefail

packages=(
  cmake ninja-build g++ clang libclang-rt-14-dev   # toolchains (clang for the sanitizer builds)
  pkg-config liburing-dev                          # io_uring
  libfmt-dev                                       # formatting
  zlib1g-dev libzstd-dev libdeflate-dev            # qcow2 compressed clusters (deflate, zstd)
  libgnutls28-dev gnutls-bin                       # TLS; certtool/psktool for the TLS tests
  libgtest-dev libbenchmark-dev                    # tests and micro-benchmarks
  libcli11-dev nlohmann-json3-dev                  # command-line parsing, JSON output (tools)
  libasio-dev                                      # peer in the runtime benchmark
  qemu-utils                                       # qemu-img/qemu-io: QED oracle, NBD peer
  qemu-system-common                               # qemu-storage-daemon: the QMP oracle
  libnbd-bin python3-libnbd nbdkit fio python3     # NBD interop peers (nbdinfo, nbdcopy, nbdsh)
  nbd-server                                       # simple-replies-only peer (NBD client test)
  strace                                           # spindle-img bench flush counts (test)
)

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done

if ((${#missing[@]} == 0)); then
  exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
  echo "install-deps: missing packages: ${missing[*]}; run as root (or: sudo $0)" >&2
  exit 1
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
