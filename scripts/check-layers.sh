#!/usr/bin/env bash
# Checks that every layer in src/ includes only itself and the layers below it
# (ARCHITECTURE.md, "Layers and where they live"); the libraries in CMakeLists.txt link the
# same way. Prints each offending #include and exits 1 if there is one.
set -euo pipefail
cd "$(dirname "$0")/../src"

declare -A allowed=(
  [base]="base"
  [aio]="base aio"
  [coro]="base aio coro"
  [io]="base aio coro io"
  [nbd]="base nbd"
  [block]="base aio coro io nbd block"
  [export]="base aio coro io nbd block export"
  [monitor]="base aio coro io nbd block export monitor"
)

status=0
for layer in "${!allowed[@]}"; do
  [[ -d $layer ]] || continue
  pattern=$(tr ' ' '|' <<<"${allowed[$layer]}")
  # Quoted includes name a layer as their first path component: "aio/context.h".
  if grep -rnE '^#include "[a-z_]+/' "$layer" | grep -vE "#include \"($pattern)/"; then
    echo "src/$layer may include only: ${allowed[$layer]}" >&2
    status=1
  fi
done
for folder in */; do
  folder=${folder%/}
  if [[ -z ${allowed[$folder]+set} ]]; then
    echo "src/$folder is not a known layer: add it to scripts/check-layers.sh" >&2
    status=1
  fi
done
exit $status
