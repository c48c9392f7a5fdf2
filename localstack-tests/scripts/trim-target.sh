#!/usr/bin/env bash
# Keeps the shared cargo target dir from filling the disk. Cargo never
# deletes artifacts: every feature set, dependency bump and incremental
# session it ever built stays (70 GiB after a few weeks here), and a full
# disk fails the tests far from the cause (etcd: "no space left on device").
# Past the limit the debug build is dropped and rebuilt from scratch
# (about 25 minutes on 2 cores), which CI's time budget allows.
set -euo pipefail
target=${CARGO_TARGET_DIR:?CARGO_TARGET_DIR is not set}
limit_gib=${CNLB_TARGET_LIMIT_GIB:-30}
[ -d "$target/debug" ] || exit 0
used_kib=$(du -sk "$target/debug" | cut -f1)
if (( used_kib > limit_gib * 1024 * 1024 )); then
  echo "$target/debug holds $(( used_kib / 1024 / 1024 )) GiB, over CNLB_TARGET_LIMIT_GIB=$limit_gib: removing it (full rebuild follows)"
  rm -rf "$target/debug"
fi
