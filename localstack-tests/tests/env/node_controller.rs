//! The middle tier of the node controllers: their logic against a real API
//! server and the in-memory `FakeNodes` of `providers/core` (no cloud
//! emulator, no kubelet: the test writes the Nodes). The integration tests
//! with real Nodes and the clouds' emulators are `aws/nodes.rs` and
//! `gcp/nodes.rs`.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use cnlb_ccm::nodes::{self, Settings};
use cnlb_localstack_tests::{Env, eventually};
use cnlb_provider_core::fake::FakeNodes;
use cnlb_provider_core::{Instance, InstanceMetadata, InstanceState, NodeAddress, NodeAddressKind};
use k8s_openapi::api::core::v1::Node;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use crate::common::nodes::{SHUTDOWN, UNINITIALIZED, addresses, label, tainted};

const WAIT: Duration = Duration::from_secs(30);

struct Harness {
    client: Client,
    fake: Arc<FakeNodes>,
    task: tokio::task::JoinHandle<()>,
    _env: Env,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The controllers with the lifecycle checked every 500 ms and addresses
/// synced every `address_sync`.
async fn start(name: &str, address_sync: Duration) -> Harness {
    let env = Env::builder(name).kube().start().await.unwrap();
    let client = env.kube().unwrap().admin_client().unwrap();
    let fake = Arc::new(FakeNodes::default());
    let settings = Settings {
        initialize: true,
        lifecycle: true,
        monitor_period: Duration::from_millis(500),
        status_update_frequency: address_sync,
    };
    let task = tokio::spawn(nodes::run(client.clone(), fake.clone(), settings));
    Harness {
        client,
        fake,
        task,
        _env: env,
    }
}

fn instance(i: usize, state: InstanceState) -> Instance {
    Instance {
        metadata: InstanceMetadata {
            provider_id: format!("fake:///zone-a/i-{i}"),
            instance_type: "large".into(),
            addresses: vec![
                NodeAddress {
                    kind: NodeAddressKind::InternalIP,
                    address: format!("10.9.{}.{}", i / 250, i % 250 + 1),
                },
                NodeAddress {
                    kind: NodeAddressKind::Hostname,
                    address: format!("node-{i}"),
                },
            ],
            zone: "zone-a".into(),
            region: "region".into(),
        },
        state,
    }
}

/// Node `node-<i>`, as a kubelet with `--cloud-provider=external`
/// registers it: tainted uninitialized, Ready = `ready`.
async fn register(client: &Client, i: usize, ready: bool) {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": format!("node-{i}")},
        "spec": {"taints": [{"key": UNINITIALIZED, "value": "true", "effect": "NoSchedule"}]},
    }))
    .unwrap();
    nodes.create(&PostParams::default(), &node).await.unwrap();
    set_ready(client, i, ready).await;
}

async fn set_ready(client: &Client, i: usize, ready: bool) {
    let nodes: Api<Node> = Api::all(client.clone());
    let status = if ready { "True" } else { "False" };
    let now =
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    let patch = json!({"status": {"conditions": [{
        "type": "Ready", "status": status, "reason": "Test",
        "lastHeartbeatTime": now, "lastTransitionTime": now,
    }]}});
    nodes
        .patch_status(
            &format!("node-{i}"),
            &PatchParams::default(),
            &Patch::Strategic(patch),
        )
        .await
        .unwrap();
}

async fn node(client: &Client, i: usize) -> Option<Node> {
    common::nodes::get(client, &format!("node-{i}")).await
}

fn initialized(node: &Node, i: usize) -> bool {
    let provider_id = node.spec.as_ref().and_then(|s| s.provider_id.as_deref());
    provider_id == Some(&format!("fake:///zone-a/i-{i}"))
        && label(node, "topology.kubernetes.io/zone") == Some("zone-a")
        && label(node, "topology.kubernetes.io/region") == Some("region")
        && label(node, "node.kubernetes.io/instance-type") == Some("large")
        && addresses(node).iter().any(|(t, _)| t == "InternalIP")
        && !tainted(node, UNINITIALIZED)
}

/// 200 Nodes registering at once are initialized with a few lookups, not
/// one each.
#[tokio::test]
async fn nodes_registering_together_are_initialized_together() {
    let h = start("nodes-init", Duration::from_secs(3600)).await;
    for i in 0..200 {
        h.fake
            .set(&format!("node-{i}"), instance(i, InstanceState::Running));
    }
    for i in 0..200 {
        register(&h.client, i, true).await;
    }
    eventually("200 Nodes initialized", WAIT, || async {
        let list = Api::<Node>::all(h.client.clone())
            .list(&ListParams::default())
            .await?;
        Ok(list.items.len() == 200
            && list.items.iter().all(|n| {
                let i: usize = n.metadata.name.as_deref().unwrap()[5..].parse().unwrap();
                initialized(n, i)
            }))
    })
    .await
    .unwrap();
    let lookups = h.fake.lookups();
    println!("200 Nodes registered one after another: initialized with {lookups} lookups");
    assert!(lookups < 200, "{lookups} lookups: not batched");
}

/// A Node whose instance cannot be found keeps its taint, a Warning Event
/// says why, and it is initialized once its instance appears.
#[tokio::test]
async fn a_node_without_an_instance_keeps_its_taint_until_one_appears() {
    let h = start("nodes-missing", Duration::from_secs(3600)).await;
    register(&h.client, 1, true).await;
    common::nodes::wait_init_warning(&h.client, "node-1", WAIT).await;
    assert!(tainted(&node(&h.client, 1).await.unwrap(), UNINITIALIZED));

    h.fake.set("node-1", instance(1, InstanceState::Running));
    eventually("initialized after a retry", WAIT, || async {
        Ok(node(&h.client, 1).await.is_some_and(|n| initialized(&n, 1)))
    })
    .await
    .unwrap();
}

/// NotReady Nodes are checked: a stopped instance taints its Node shut
/// down, running again removes the taint, a gone one deletes the Node.
/// Ready Nodes at rest cost no lookup.
#[tokio::test]
async fn lifecycle_follows_the_instances_of_not_ready_nodes() {
    let h = start("nodes-lifecycle", Duration::from_secs(3600)).await;
    for i in 1..=2 {
        h.fake
            .set(&format!("node-{i}"), instance(i, InstanceState::Running));
        register(&h.client, i, true).await;
    }
    eventually("both initialized", WAIT, || async {
        Ok(node(&h.client, 1).await.is_some_and(|n| initialized(&n, 1))
            && node(&h.client, 2).await.is_some_and(|n| initialized(&n, 2)))
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = h.fake.lookups();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        h.fake.lookups(),
        before,
        "lookups at rest (monitor every 500 ms)"
    );

    // Stopped: NotReady, its instance shut down.
    h.fake.set("node-1", instance(1, InstanceState::Shutdown));
    set_ready(&h.client, 1, false).await;
    eventually("node-1 is tainted shut down", WAIT, || async {
        Ok(node(&h.client, 1)
            .await
            .is_some_and(|n| tainted(&n, SHUTDOWN)))
    })
    .await
    .unwrap();
    h.fake.set("node-1", instance(1, InstanceState::Running));
    set_ready(&h.client, 1, true).await;
    eventually("the taint goes when it runs again", WAIT, || async {
        Ok(node(&h.client, 1)
            .await
            .is_some_and(|n| !tainted(&n, SHUTDOWN)))
    })
    .await
    .unwrap();

    // Terminated: NotReady, no instance.
    h.fake.remove("node-2");
    set_ready(&h.client, 2, false).await;
    eventually("node-2 is deleted", WAIT, || async {
        Ok(node(&h.client, 2).await.is_none())
    })
    .await
    .unwrap();
    assert!(node(&h.client, 1).await.is_some(), "node-1 is kept");
}

/// Every address sync period, one lookup covers the initialized Nodes, and
/// changed addresses are written.
#[tokio::test]
async fn addresses_follow_the_instances() {
    let h = start("nodes-addresses", Duration::from_secs(1)).await;
    for i in 1..=3 {
        h.fake
            .set(&format!("node-{i}"), instance(i, InstanceState::Running));
        register(&h.client, i, true).await;
    }
    eventually("initialized", WAIT, || async {
        Ok(node(&h.client, 3).await.is_some_and(|n| initialized(&n, 3)))
    })
    .await
    .unwrap();
    let mut moved = instance(2, InstanceState::Running);
    moved.metadata.addresses[0].address = "10.9.9.9".into();
    h.fake.set("node-2", moved);
    eventually("node-2's new address is written", WAIT, || async {
        Ok(node(&h.client, 2).await.is_some_and(|n| {
            n.status
                .and_then(|s| s.addresses)
                .unwrap_or_default()
                .iter()
                .any(|a| a.type_ == "InternalIP" && a.address == "10.9.9.9")
        }))
    })
    .await
    .unwrap();
    let before = h.fake.lookups();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let per_period = (h.fake.lookups() - before) as f64 / 3.5;
    println!("address sync: {per_period:.1} lookups per second for 3 Nodes (period 1 s)");
    assert!(per_period <= 1.5, "one lookup per period, not one per Node");
}
