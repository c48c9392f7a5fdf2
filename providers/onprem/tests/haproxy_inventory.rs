//! `cnlb-onprem-haproxy --inventory`: the plugin binary's Node part over its
//! unix socket, answered from the operator's file, which it reads again on
//! every call. HAProxy need not run (the plugin checks its configuration
//! with `haproxy -c`, so the binary must be installed: `make env-deps`).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cnlb_provider_core::{InstanceState, NodeProvider, NodeRef, RetryPolicy};
use cnlb_provider_onprem::{GrpcProvider, PluginEndpoint};

/// The plugin, killed when dropped.
struct PluginProcess(Child);

impl Drop for PluginProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start(dir: &Path, inventory: Option<&Path>) -> (PluginProcess, GrpcProvider) {
    let socket = dir.join("plugin.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cnlb-onprem-haproxy"));
    cmd.arg(format!("--listen=unix://{}", socket.display()))
        .arg("--config-file")
        .arg(dir.join("haproxy.cfg"))
        .arg("--runtime-socket")
        .arg(dir.join("admin.sock"))
        .arg("--master-socket")
        .arg(dir.join("master.sock"))
        .arg("--address-pool=127.0.0.0/28")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("plugin.log")).unwrap());
    if let Some(path) = inventory {
        cmd.arg("--inventory").arg(path);
    }
    let process = PluginProcess(cmd.spawn().unwrap());
    let endpoint = PluginEndpoint::Unix(socket);
    for _ in 0..200 {
        if let Ok(p) = GrpcProvider::connect(&endpoint).await {
            return (process, p);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = std::fs::read_to_string(dir.join("plugin.log")).unwrap_or_default();
    panic!("the plugin did not come up:\n{log}");
}

#[tokio::test]
async fn haproxy_plugin_answers_nodes_from_its_inventory_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inventory.json");
    // Not there yet: the plugin starts anyway (load balancing does not
    // need it), and GetInstances fails until the file exists.
    let (_process, plugin) = start(dir.path(), Some(&path)).await;
    assert!(plugin.supports_nodes().await.unwrap());
    let nodes = [
        NodeRef::named("worker-1"),
        NodeRef::named("worker-2"),
        NodeRef::named("worker-3"),
    ];
    let err = plugin.instances(&nodes).await.unwrap_err();
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    assert_eq!(err.retry_policy(), RetryPolicy::Backoff);

    std::fs::write(
        &path,
        r#"{"nodes": [
            {"name": "worker-1", "addresses": {"InternalIP": "192.0.2.11"}, "zone": "rack-a", "region": "dc-1", "instanceType": "r650"},
            {"name": "worker-2", "addresses": {"InternalIP": "192.0.2.12"}, "state": "shutdown"}
        ]}"#,
    )
    .unwrap();
    let found = plugin.instances(&nodes).await.unwrap();
    assert_eq!(found.len(), 3);
    let w1 = found[0].as_ref().unwrap();
    assert_eq!(w1.metadata.provider_id, "onprem://worker-1");
    assert_eq!(
        (w1.metadata.zone.as_str(), w1.metadata.region.as_str()),
        ("rack-a", "dc-1")
    );
    assert_eq!(w1.metadata.instance_type, "r650");
    assert_eq!(w1.state, InstanceState::Running);
    assert_eq!(found[1].as_ref().unwrap().state, InstanceState::Shutdown);
    assert_eq!(found[2], None, "not in the file: not found");

    // The operator edits the file: the next call sees it.
    std::fs::write(
        &path,
        r#"{"nodes": [{"name": "worker-3", "addresses": {"InternalIP": "192.0.2.13"}}]}"#,
    )
    .unwrap();
    let found = plugin.instances(&nodes).await.unwrap();
    let present: Vec<bool> = found.iter().map(Option::is_some).collect();
    assert_eq!(present, [false, false, true]);

    // A mistake is an error naming the file and the field, not "not found".
    std::fs::write(
        &path,
        r#"{"nodes": [{"name": "worker-3", "addresses": {"InternalIP": "192.0.2.999"}}]}"#,
    )
    .unwrap();
    let err = plugin.instances(&nodes).await.unwrap_err().to_string();
    assert!(
        err.contains(&path.display().to_string())
            && err.contains("nodes[0].addresses.InternalIP")
            && err.contains("192.0.2.999"),
        "{err}"
    );
}

#[tokio::test]
async fn haproxy_plugin_without_inventory_has_no_node_part() {
    let dir = tempfile::tempdir().unwrap();
    let (_process, plugin) = start(dir.path(), None).await;
    assert!(!plugin.supports_nodes().await.unwrap());
    let err = plugin
        .instances(&[NodeRef::named("worker-1")])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no Node part"), "{err}");
    assert_eq!(err.retry_policy(), RetryPolicy::AwaitChange);
}
