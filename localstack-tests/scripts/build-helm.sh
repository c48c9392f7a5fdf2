#!/usr/bin/env bash
# Builds helm from the Go module proxy, once per version, into
# $CNLB_CACHE/helm/<version>/ (outside the checkout); $CNLB_CACHE/helm/current
# points at it. The deploy tests render the chart with it and compare the
# result with the plain manifests in deploy/ccm/.
set -euo pipefail
version=v3.22.0
cache=${CNLB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cnlb}
dir="$cache/helm/$version"
if [ ! -x "$dir/helm" ]; then
  command -v go >/dev/null || { echo "go is not installed: it is needed to build helm" >&2; exit 1; }
  echo "helm $version: building (first time only, about 1 minute)"
  start=$SECONDS
  GOFLAGS="-buildvcs=false" GOBIN="$dir.tmp" go install -trimpath -ldflags="-s -w" "helm.sh/helm/v3/cmd/helm@$version"
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
  echo "helm $version: built in $((SECONDS - start)) s"
else
  echo "helm $version: cached in $dir"
fi
ln -sfn "$version" "$cache/helm/current"
