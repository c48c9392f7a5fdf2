//! cnlb-ccm as the cloud controller manager of an on-prem cluster: real
//! Nodes whose kubelets run with `--cloud-provider=external`. With the
//! HAProxy plugin's inventory (the plugin protocol's Node part) a Node is
//! initialized from its machine's entry, and one the inventory does not
//! list keeps its taint with a Warning Event; with a plugin that has no
//! Node part, Nodes are initialized from the addresses they report.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::Path;
use std::time::Duration;

use cnlb_localstack_tests::onprem::LbHost;
use cnlb_localstack_tests::process::Proc;
use cnlb_localstack_tests::{Env, NodeConfig, eventually};
use cnlb_provider_onprem::PluginEndpoint;
use k8s_openapi::api::core::v1::Node;
use kube::Client;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(90);

async fn node(client: &Client, name: &str) -> Node {
    common::nodes::get(client, name).await.unwrap()
}

fn tainted(node: &Node) -> bool {
    common::nodes::tainted(node, common::nodes::UNINITIALIZED)
}

/// Two real Nodes with an external cloud provider, the HAProxy plugin
/// (with `plugin_args`) and cnlb-ccm talking to it.
async fn start(name: &str, plugin_args: &[&str]) -> (Env, LbHost, Proc) {
    let env = Env::builder(name)
        .nodes(vec![NodeConfig::numbered(1), NodeConfig::numbered(2)])
        .external_cloud_provider()
        .start()
        .await
        .unwrap();
    let k = env
        .pod_cidr()
        .unwrap()
        .split('.')
        .nth(1)
        .unwrap()
        .to_string();
    let socket = env.dir.join("lb").join("plugin.sock");
    let mut lb = LbHost::new(
        &env.dir.join("lb"),
        &format!("127.{k}.0.0/28"),
        plugin_args,
        PluginEndpoint::Unix(socket.clone()),
        WAIT,
        Some(&env.dir),
    )
    .unwrap();
    lb.start_plugin().await.unwrap();
    let mut cmd = common::ccm::provider_command(&env, "onprem");
    cmd.arg("--leader-elect=false")
        .args([
            "--metrics-bind-address=0",
            "--load-balancer-class=cnlb.dev/onprem",
        ])
        .arg(format!("--onprem-plugin=unix://{}", socket.display()));
    let ccm = Proc::spawn("cnlb-ccm", cmd, &env.dir).unwrap();
    (env, lb, ccm)
}

fn write_inventory(path: &Path, ip: &str) {
    let inventory = json!({"nodes": [{
        "name": "node-1",
        "addresses": {"InternalIP": [ip], "Hostname": "node-1"},
        "zone": "rack-1", "region": "dc-1", "instanceType": "r640",
    }]});
    std::fs::write(path, serde_json::to_vec(&inventory).unwrap()).unwrap();
}

#[tokio::test]
async fn nodes_are_initialized_from_the_plugins_inventory() {
    let dir = tempfile::tempdir().unwrap();
    let inventory = dir.path().join("inventory.json");
    // The plugin reads the file on every lookup: it is written once the
    // Nodes' addresses are known.
    let flag = format!("--inventory={}", inventory.display());
    let (env, _lb, _ccm) = start("onprem-nodes", &["--converge-interval-secs=1", &flag]).await;
    let ip = env.nodes()[0].config.internal_ip.to_string();
    write_inventory(&inventory, &ip);
    let client = env.kube().unwrap().admin_client().unwrap();
    eventually("node-1 is initialized from the inventory", WAIT, || async {
        let n = node(&client, "node-1").await;
        let labels = n.metadata.labels.clone().unwrap_or_default();
        let addresses = n
            .status
            .clone()
            .and_then(|s| s.addresses)
            .unwrap_or_default();
        Ok(!tainted(&n)
            && n.spec.as_ref().and_then(|s| s.provider_id.as_deref()) == Some("onprem://node-1")
            && labels
                .get("topology.kubernetes.io/zone")
                .map(String::as_str)
                == Some("rack-1")
            && labels
                .get("node.kubernetes.io/instance-type")
                .map(String::as_str)
                == Some("r640")
            && addresses
                .iter()
                .any(|a| a.type_ == "InternalIP" && a.address == ip))
    })
    .await
    .unwrap();
    common::nodes::wait_init_warning(&client, "node-2", WAIT).await;
    assert!(tainted(&node(&client, "node-2").await));
}

#[tokio::test]
async fn without_a_node_part_nodes_are_initialized_from_their_addresses() {
    let (env, _lb, _ccm) = start("onprem-nodes-plain", &["--converge-interval-secs=1"]).await;
    let client = env.kube().unwrap().admin_client().unwrap();
    for n in env.nodes() {
        let ip = n.config.internal_ip.to_string();
        let name = n.config.name.clone();
        eventually(&format!("{name} is initialized"), WAIT, || async {
            let node = node(&client, &name).await;
            let addresses = node
                .status
                .clone()
                .and_then(|s| s.addresses)
                .unwrap_or_default();
            Ok(!tainted(&node)
                && addresses
                    .iter()
                    .any(|a| a.type_ == "InternalIP" && a.address == ip)
                && addresses
                    .iter()
                    .any(|a| a.type_ == "Hostname" && a.address == name))
        })
        .await
        .unwrap();
    }
}
