#!/usr/bin/env bash
# Builds containerd, its runc shim and ctr from the Go module proxy at the
# version pinned in containerd/go.mod, once per version, into
# $CNLB_CACHE/containerd/<version>/bin (outside the checkout). runc comes
# from Debian (install-deps.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")/../containerd" && pwd)
cache=${CNLB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cnlb}
version=$(awk '$1 == "require" && $2 == "github.com/containerd/containerd/v2" { print $3 }' "$here/go.mod")
out="$cache/containerd/$version/bin"
bins=(containerd containerd-shim-runc-v2 ctr)
pkg=github.com/containerd/containerd/v2
ldflags="-s -w -X $pkg/version.Version=$version -X $pkg/version.Package=$pkg"
stamp="bins=${bins[*]} ldflags=$ldflags gosum=$(sha256sum "$here/go.sum" | cut -c1-16)"

if [ "$(cat "$out/.stamp" 2>/dev/null)" = "$stamp" ]; then
  echo "containerd $version: cached in $out"
  exit 0
fi

command -v go >/dev/null || { echo "go is not installed: it is needed to build containerd" >&2; exit 1; }
echo "containerd $version: building ${bins[*]} (first time only, about 1 minute; cached in $out)"
rm -rf "$out.tmp" && mkdir -p "$out.tmp"
cd "$here"
start=$SECONDS
GOFLAGS="-buildvcs=false -mod=readonly" go build -p "${CNLB_GO_JOBS:-2}" -trimpath -ldflags="$ldflags" -o "$out.tmp/" \
  "$pkg/cmd/containerd" "$pkg/cmd/containerd-shim-runc-v2" "$pkg/cmd/ctr"
echo "$stamp" > "$out.tmp/.stamp"
rm -rf "$out" && mv "$out.tmp" "$out"
echo "containerd $version: built in $((SECONDS - start)) s"
