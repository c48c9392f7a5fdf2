#!/usr/bin/env bash
# Installs the Debian packages the local environment needs (real CNI plugins,
# HAProxy, iproute2, runc for the Nodes' containerd), as root, only when one is
# missing.
set -euo pipefail
pkgs=(haproxy containernetworking-plugins iproute2 procps runc)
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
