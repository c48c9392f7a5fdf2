#!/usr/bin/env bash
# Regenerates src/<kinds>.rs from the Gateway API CRDs at the version
# pinned in localstack-tests/scripts/fetch-gateway-api.sh (standard
# channel), with kopium:
#   cargo install kopium --version 0.24.1 --locked   # once
#   gateway-api/generate.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
"$here/../localstack-tests/scripts/fetch-gateway-api.sh"
cache=${CNLB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cnlb}
version=$(readlink "$cache/gateway-api/current")
cd "$cache/gateway-api/current/crd/standard"
for kind in gatewayclasses gateways tcproutes udproutes tlsroutes referencegrants; do
  out="$here/src/$kind.rs"
  {
    echo "// Gateway API $version, standard channel: gateway-api/generate.sh"
    kopium -f "gateway.networking.k8s.io_$kind.yaml" --api-version v1 \
      --derive Default --derive PartialEq --smart-derive-elision
  } > "$out.tmp"
  mv "$out.tmp" "$out"
done
rustfmt --edition 2024 "$here"/src/*.rs
