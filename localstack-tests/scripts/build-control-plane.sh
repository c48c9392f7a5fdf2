#!/usr/bin/env bash
# Builds etcd and the Kubernetes binaries (kube-apiserver,
# kube-controller-manager, kube-scheduler, kubelet, kubectl) from the Go
# module proxy at the version pinned in controlplane/go.mod, once per
# version, into $CNLB_CACHE/k8s/<version>/bin (outside the checkout).
set -euo pipefail
here=$(cd "$(dirname "$0")/../controlplane" && pwd)
cache=${CNLB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cnlb}
version=$(awk '$1 == "k8s.io/kubernetes" { print $2 }' "$here/go.mod")
out="$cache/k8s/$version/bin"
bins=(etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl)

# Without these every binary reports v0.0.0-master+$Format:%H$.
minor=${version#v1.}; minor=${minor%%.*}
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
done
# What the cached binaries were built from: a different list or flags rebuilds.
stamp="bins=${bins[*]} ldflags=$ldflags gosum=$(sha256sum "$here/go.sum" | cut -c1-16)"

if [ "$(cat "$out/.stamp" 2>/dev/null)" = "$stamp" ]; then
  echo "kubernetes $version: cached in $out"
  exit 0
fi

command -v go >/dev/null || { echo "go is not installed: it is needed to build Kubernetes" >&2; exit 1; }
echo "kubernetes $version: building ${bins[*]}"
echo "  (first time only, about 5 minutes on 2 cores; cached in $out)"
rm -rf "$out.tmp" && mkdir -p "$out.tmp"
cd "$here"
start=$SECONDS
# go build is silent for minutes: say that it is still working.
( while sleep 60; do echo "  ... still building ($((SECONDS - start)) s)"; done ) &
ticker=$!
trap 'kill $ticker 2>/dev/null' EXIT
# -p 2 bounds parallel compile jobs on a small machine; -s -w makes smaller binaries.
GOFLAGS="-buildvcs=false -mod=readonly" go build -p "${CNLB_GO_JOBS:-2}" -trimpath -ldflags="$ldflags" -o "$out.tmp/" \
  ./etcd \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler \
  k8s.io/kubernetes/cmd/kubelet \
  k8s.io/kubernetes/cmd/kubectl
echo "$stamp" > "$out.tmp/.stamp"
rm -rf "$out" && mv "$out.tmp" "$out"
echo "kubernetes $version: built in $((SECONDS - start)) s"
