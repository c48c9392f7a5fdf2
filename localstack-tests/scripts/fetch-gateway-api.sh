#!/usr/bin/env bash
# Fetches the Gateway API module (sigs.k8s.io/gateway-api) from the Go
# module proxy at the pinned version and copies its CRDs (config/crd:
# standard and experimental channels) into
# $CNLB_CACHE/gateway-api/<version>/crd (outside the checkout);
# $CNLB_CACHE/gateway-api/current points at it. The tests install them;
# gateway-api/generate.sh makes cnlb's Rust types from them.
set -euo pipefail
version=v1.6.3
cache=${CNLB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cnlb}
dir="$cache/gateway-api/$version"
if [ ! -f "$dir/crd/standard/gateway.networking.k8s.io_gateways.yaml" ]; then
  command -v go >/dev/null || { echo "go is not installed: it fetches the Gateway API module" >&2; exit 1; }
  echo "gateway-api $version: fetching"
  module=$(cd /tmp && go mod download -json "sigs.k8s.io/gateway-api@$version" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [ -d "$module/config/crd" ] || { echo "gateway-api $version: no config/crd in $module" >&2; exit 1; }
  rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
  cp -r "$module/config/crd" "$dir.tmp/crd"
  chmod -R u+w "$dir.tmp"
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
else
  echo "gateway-api $version: cached in $dir"
fi
ln -sfn "$version" "$cache/gateway-api/current"
