//! cnlb-ccm as the cluster's cloud controller manager on GCP, GKE style:
//! real Nodes whose kubelets run with `--cloud-provider=external`, each a
//! GCE instance of the emulator (with the Node's address and its pod range
//! as alias IP range). cnlb-ccm initializes them (provider ID, addresses,
//! zone labels), which vpc-ipam's GCP agents wait for; Pods then run. A
//! stopped instance taints its Node, a started one untaints it, a deleted
//! one deletes it.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::Duration;

use cnlb_localstack_tests::{AgentBackend, Env, NodeConfig, eventually};

use crate::common::nodes::{SHUTDOWN, UNINITIALIZED, tainted};

const WAIT: Duration = Duration::from_secs(120);

/// `POST .../instances/<name>/<verb>` (stop, start) or `DELETE`, as
/// `gcloud compute instances` would, on the emulator's Compute API.
async fn instance_call(env: &Env, zone: &str, name: &str, verb: Option<&str>) {
    let gce = env.gce().unwrap();
    let url = format!(
        "{}/compute/v1/projects/{}/zones/{zone}/instances/{name}{}",
        gce.endpoint(),
        gce.project(),
        verb.map(|v| format!("/{v}")).unwrap_or_default()
    );
    let http = reqwest::Client::new();
    let request = match verb {
        Some(_) => http.post(url),
        None => http.delete(url),
    };
    request.send().await.unwrap().error_for_status().unwrap();
}

#[test]
fn gke_style_nodes_are_initialized_and_follow_their_instances() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let env = Env::builder("gcp-nodes")
            .nodes(vec![NodeConfig::numbered(1), NodeConfig::numbered(2)])
            .external_cloud_provider()
            .gce()
            .agent_backend(AgentBackend::Gcp)
            .start()
            .await
            .unwrap();
        let client = env.kube().unwrap().admin_client().unwrap();
        let gce = env.gce().unwrap();
        assert!(tainted(
            &common::nodes::get(&client, "node-1").await.unwrap(),
            UNINITIALIZED
        ));
        common::ccm::create_web(&client, 2).await;

        let (_ccm, _) = common::gcp::spawn(&env, "cnlb-ccm", &["--node-monitor-period=1s"]);
        for n in env.nodes() {
            let (name, zone, ip) = (
                &n.config.name,
                &n.config.zone,
                n.config.internal_ip.to_string(),
            );
            eventually(&format!("{name} is initialized"), WAIT, || async {
                let Some(node) = common::nodes::get(&client, name).await else {
                    return Ok(false);
                };
                let labels = node.metadata.labels.clone().unwrap_or_default();
                let addresses = node
                    .status
                    .as_ref()
                    .and_then(|s| s.addresses.clone())
                    .unwrap_or_default();
                let has = |kind: &str, value: &str| {
                    addresses
                        .iter()
                        .any(|a| a.type_ == kind && a.address == value)
                };
                Ok(node.spec.as_ref().and_then(|s| s.provider_id.as_deref())
                    == Some(&format!("gce://{}/{zone}/{name}", gce.project()))
                    && labels.get("topology.kubernetes.io/zone") == Some(zone)
                    && labels
                        .get("topology.kubernetes.io/region")
                        .map(String::as_str)
                        == Some(gce.region())
                    && labels.contains_key("node.kubernetes.io/instance-type")
                    && has("InternalIP", &ip)
                    && has(
                        "InternalDNS",
                        &format!("{name}.{zone}.c.{}.internal", gce.project()),
                    )
                    && !tainted(&node, UNINITIALIZED))
            })
            .await
            .unwrap();
        }
        // The GCP agents had waited for the provider IDs; now Pods get
        // addresses from their Nodes' alias ranges and run.
        common::ccm::wait_web_ready(&client, 2, WAIT).await;

        let node_2 = &env.nodes()[1];
        let zone = node_2.config.zone.clone();
        instance_call(&env, &zone, "node-2", Some("stop")).await;
        node_2.stop_kubelet();
        eventually("node-2 is tainted shut down", WAIT, || async {
            Ok(common::nodes::get(&client, "node-2")
                .await
                .is_some_and(|n| tainted(&n, SHUTDOWN)))
        })
        .await
        .unwrap();
        instance_call(&env, &zone, "node-2", Some("start")).await;
        node_2.start_kubelet().unwrap();
        eventually("node-2 runs again, untainted", WAIT, || async {
            Ok(common::nodes::get(&client, "node-2")
                .await
                .is_some_and(|n| {
                    !tainted(&n, SHUTDOWN) && cnlb_localstack_tests::node::is_ready(&n)
                }))
        })
        .await
        .unwrap();
        instance_call(&env, &zone, "node-2", None).await;
        node_2.stop_kubelet();
        eventually("node-2 is deleted", WAIT, || async {
            Ok(common::nodes::get(&client, "node-2").await.is_none())
        })
        .await
        .unwrap();
        assert!(common::nodes::get(&client, "node-1").await.is_some());
    });
}
