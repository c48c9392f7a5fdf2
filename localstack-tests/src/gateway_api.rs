//! The Gateway API CRDs of the pinned module
//! (`scripts/fetch-gateway-api.sh`), installed on an environment's API
//! server as a cluster operator installs them.

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::PostParams;
use kube::{Api, Client};

use crate::eventually;
use crate::paths::gateway_api_crds;

/// The kinds cnlb serves (standard channel).
pub const KINDS: [&str; 6] = [
    "gatewayclasses",
    "gateways",
    "tcproutes",
    "udproutes",
    "tlsroutes",
    "referencegrants",
];

/// Creates the standard channel's CRDs of [`KINDS`] and waits until the
/// API server serves them (`Established`).
pub async fn install_crds(client: &Client) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let dir = gateway_api_crds()?.join("standard");
    for kind in KINDS {
        let path = dir.join(format!("gateway.networking.k8s.io_{kind}.yaml"));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let crd: CustomResourceDefinition =
            serde_saphyr::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        api.create(&PostParams::default(), &crd)
            .await
            .with_context(|| format!("creating the CRD of {}", path.display()))?;
    }
    eventually(
        "the Gateway API CRDs are established",
        Duration::from_secs(30),
        || async {
            for kind in KINDS {
                let crd = api
                    .get(&format!("{kind}.gateway.networking.k8s.io"))
                    .await?;
                let established = crd
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                if !established {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )
    .await
}
