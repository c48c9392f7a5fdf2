#!/usr/bin/env bash
# Creates the AWS emulator venvs (moto server; LocalStack in host mode) from
# the pinned requirements in localstack-tests/pins/, cached outside the
# checkout in $CNLB_CACHE/venv/<name>. A venv is rebuilt when its pins change.
set -euo pipefail
pins=$(cd "$(dirname "$0")/../pins" && pwd)
cache=${CNLB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cnlb}
python=${CNLB_PYTHON:-python3}

build() {
  local name=$1 dir="$cache/venv/$1"
  if [ -f "$dir/.pins" ] && cmp -s "$dir/.pins" "$pins/$name.txt"; then
    echo "venv $name: cached in $dir"
    return
  fi
  echo "venv $name: installing pinned requirements into $dir"
  rm -rf "$dir"
  "$python" -m venv "$dir"
  "$dir/bin/pip" install --quiet --disable-pip-version-check -r "$pins/$name.txt"
  # Written last: a venv without it (an interrupted install) is rebuilt.
  cat "$pins/$name.txt" > "$dir/.pins"
  echo "venv $name: ready"
}

build moto &
m=$!
build localstack &
l=$!
wait $m
wait $l
