#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager and kubectl from the Go
# module proxy at the version pinned in controlplane/go.mod, once per version,
# into $CNLB_CACHE/k8s/<version>/bin (outside the checkout).
set -euo pipefail
here=$(cd "$(dirname "$0")/../controlplane" && pwd)
cache=${CNLB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cnlb}
version=$(awk '$1 == "k8s.io/kubernetes" { print $2 }' "$here/go.mod")
out="$cache/k8s/$version/bin"
bins=(etcd kube-apiserver kube-controller-manager kubectl)

missing=0
for b in "${bins[@]}"; do [ -x "$out/$b" ] || missing=1; done
if [ "$missing" = 0 ]; then
  echo "control plane $version: cached in $out"
  exit 0
fi

command -v go >/dev/null || { echo "go is not installed: it is needed to build the Kubernetes control plane" >&2; exit 1; }
echo "control plane $version: building etcd, kube-apiserver, kube-controller-manager, kubectl"
echo "  (first time only, about 15-25 minutes on 2 cores; cached in $out)"
mkdir -p "$out.tmp"
cd "$here"
start=$SECONDS
# go build is silent for minutes: say that it is still working.
( while sleep 60; do echo "  ... still building ($((SECONDS - start)) s)"; done ) &
ticker=$!
trap 'kill $ticker 2>/dev/null' EXIT
# -p 2 bounds parallel compile jobs on a small machine; -s -w makes smaller binaries.
GOFLAGS="-buildvcs=false -mod=readonly" go build -p "${CNLB_GO_JOBS:-2}" -trimpath -ldflags="-s -w" -o "$out.tmp/" \
  ./etcd \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kubectl
rm -rf "$out" && mv "$out.tmp" "$out"
echo "control plane $version: built in $((SECONDS - start)) s"
