//! Nodes as a user reads them after a cloud controller manager ran.

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::events::v1::Event;
use kube::api::ListParams;
use kube::{Api, Client};

pub const UNINITIALIZED: &str = "node.cloudprovider.kubernetes.io/uninitialized";
pub const SHUTDOWN: &str = "node.cloudprovider.kubernetes.io/shutdown";

/// The Node named `name`, if it exists.
pub async fn get(client: &Client, name: &str) -> Option<Node> {
    Api::<Node>::all(client.clone())
        .get_opt(name)
        .await
        .unwrap()
}

pub fn tainted(node: &Node, key: &str) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|ts| ts.iter().any(|t| t.key == key))
}

pub fn label<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.metadata.labels.as_ref()?.get(key).map(String::as_str)
}

/// `(type, address)` of each of `status.addresses`.
pub fn addresses(node: &Node) -> Vec<(String, String)> {
    node.status
        .as_ref()
        .and_then(|s| s.addresses.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|a| (a.type_, a.address))
        .collect()
}

/// Waits for the Warning Event `FailedToInitialize` about Node `name`.
pub async fn wait_init_warning(client: &Client, name: &str, timeout: std::time::Duration) {
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    cnlb_localstack_tests::eventually(
        &format!("a FailedToInitialize Event about {name}"),
        timeout,
        || async {
            Ok(events
                .list(&ListParams::default())
                .await?
                .items
                .iter()
                .any(|e| {
                    e.reason.as_deref() == Some("FailedToInitialize")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                }))
        },
    )
    .await
    .unwrap();
}
