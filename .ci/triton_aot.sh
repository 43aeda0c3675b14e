#!/usr/bin/env bash
# Ahead-of-time compile of every Triton kernel for sm_90 and sm_80 with the Triton of the
# Python given as $1 (scripts/triton_aot.py), one process per target on CI's two cores.
# Prints each target's register/spill/shared-memory table; fails if either check fails.
# usage: bash .ci/triton_aot.sh PYTHON OUT_PREFIX   (tables: OUT_PREFIX-sm90.tsv, -sm80.tsv)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$1
prefix=$2
mkdir -p "$(dirname "$prefix")"
pids=()
for arch in 90 80; do
  "$PY" scripts/triton_aot.py --arch "$arch" --out "$prefix-sm$arch.tsv" \
    > "$prefix-sm$arch.log" 2>&1 &
  pids+=($!)
done
rc=0
for i in 0 1; do
  wait "${pids[$i]}" || rc=1
done
for arch in 90 80; do
  echo "-- $prefix-sm$arch.tsv"
  column -t -s $'\t' "$prefix-sm$arch.tsv" 2>/dev/null || cat "$prefix-sm$arch.tsv"
  grep -v "UserWarning\|warn_once" "$prefix-sm$arch.log" || true
done
exit "$rc"
