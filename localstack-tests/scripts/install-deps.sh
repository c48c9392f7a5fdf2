#!/usr/bin/env bash
# Installs the Debian packages the build and the local environment need
# (libnftnl and libmnl headers for vpc-ipam's SNAT table, real CNI plugins,
# HAProxy, iproute2, iptables for the emulated VPC, runc for the Nodes'
# containerd), as root, only when one is missing.
set -euo pipefail
pkgs=(haproxy containernetworking-plugins iproute2 iptables procps runc pkg-config libnftnl-dev libmnl-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && { echo "debian packages: present"; exit 0; }
echo "debian packages: installing ${missing[*]}"
sudo=""
[ "$(id -u)" = 0 ] || sudo=sudo
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
