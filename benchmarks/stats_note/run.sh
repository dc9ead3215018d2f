#!/bin/sh
# Before/after cost of the per-request counting in daemon/native/stats.c: builds
# bench.c against stats.c of BEFORE (a git revision, default: the one before the latency
# histograms) and of the work tree, and runs each three times. Usage: run.sh [BEFORE]
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
before=${1:-d514314~1}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/old"
for f in pyvfs.h internal.h stats.c; do
    git -C "$repo" show "$before:daemon/native/$f" > "$tmp/old/$f"
done
gcc -O3 -I"$tmp/old" -I"$repo/shm_table" -o "$tmp/before" "$here/bench.c" "$tmp/old/stats.c"
gcc -O3 -DNEW -I"$repo/daemon/native" -I"$repo/shm_table" -o "$tmp/after" "$here/bench.c" \
    "$repo/daemon/native/stats.c"
for i in 1 2 3; do
    echo "before: $("$tmp/before" | tail -1)    after: $("$tmp/after" | tail -1)"
done
