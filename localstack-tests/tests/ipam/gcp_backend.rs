//! vpc-ipam end to end with the GCP backend: the real agent process and
//! CNI plugin, Nodes (with their `gce://` providerIDs) in the real
//! kube-apiserver, Compute in cnlb's GCE emulator.
//!
//! - An instance without an alias IP range gets one from the secondary
//!   range (one `instances.updateNetworkInterface`, seen in the emulator),
//!   and ADDs get addresses inside it; kill -9 during churn and restarts
//!   keep the same range with no duplicate and no lost allocation, each
//!   restart reads the instance once and changes nothing, and at rest no
//!   agent calls Compute.
//! - An instance with a range is reused as it is (no update); one with
//!   ranges only from another range is refused, naming the flag.
//! - Fingerprint races: a 412 conditionNotMet is followed by a fresh read
//!   and another try; two agents racing for one instance end with one range.
//! - The harness's GCP mode: a Deployment's Pods get addresses from their
//!   Node's alias range, EndpointSlices list them with the right node and
//!   zone, and the host reaches them.

#![allow(clippy::unwrap_used)] // test code: a failed call should fail the test

use crate::common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use cnlb_localstack_tests::env::GCE_POD_RANGE;
use cnlb_localstack_tests::gce::{Cidr, Fault, NamedRange, SeedAliasRange, SeedInstance};
use cnlb_localstack_tests::ipam::{Churn, IpamAgent, http_get, ipam_add};
use cnlb_localstack_tests::{Env, EnvBuilder, GceEmulator, eventually};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);
/// The secondary range Pods come from in the agent scenarios (no Pod is
/// routed there: only the IPAM plugin runs, so any range will do).
const PODS: &str = "100.96.0.0/16";
/// Another secondary range of the same subnetwork.
const OTHER: &str = "100.97.0.0/16";

fn cidr(s: &str) -> Cidr {
    s.parse().unwrap()
}

/// The nic0 alias ranges of instance `name`, as the emulator has them.
async fn alias_ranges(gce: &GceEmulator, name: &str) -> Vec<(String, Option<String>)> {
    let resources = gce.resources().await.unwrap();
    let instance = resources
        .instances
        .iter()
        .find(|i| i.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no instance {name}"));
    instance.network_interfaces[0]
        .alias_ip_ranges
        .iter()
        .map(|r| {
            (
                r.ip_cidr_range.clone().unwrap(),
                r.subnetwork_range_name.clone(),
            )
        })
        .collect()
}

/// A GCE instance `name` in the emulator's first zone with nic0 at `ip`
/// and `aliases`, and the Node whose providerID names it.
async fn gce_node(
    gce: &GceEmulator,
    kube: &Client,
    name: &str,
    ip: Ipv4Addr,
    aliases: &[(&str, Option<&str>)],
) {
    let zone = gce.zones()[0].clone();
    gce.seed(&SeedInstance {
        zone: zone.clone(),
        name: name.to_string(),
        network_ip: ip.to_string(),
        alias_ip_ranges: aliases
            .iter()
            .map(|(cidr, range)| SeedAliasRange {
                ip_cidr_range: cidr.to_string(),
                subnetwork_range_name: range.map(str::to_string),
            })
            .collect(),
        ..SeedInstance::default()
    })
    .await
    .unwrap();
    let node = json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
        "spec": {"providerID": format!("gce://{}/{zone}/{name}", gce.project())},
    });
    Api::<Node>::all(kube.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(node).unwrap(),
        )
        .await
        .unwrap();
}

/// `vpc-ipam-agent --backend gcp` for Node `node`, its socket and state in `dir`.
async fn start_agent(
    dir: &Path,
    node: &str,
    gce: &GceEmulator,
    kubeconfig: &Path,
) -> anyhow::Result<IpamAgent> {
    IpamAgent::start(
        dir,
        node,
        &[
            "--cluster-name",
            "ipam-gcp",
            "--backend",
            "gcp",
            "--gcp-endpoint",
            gce.endpoint(),
            "--gcp-pod-range-name",
            "pods",
            "--cooldown",
            "0s",
        ],
        &[("KUBECONFIG".into(), kubeconfig.display().to_string())],
    )
    .await
}

async fn add(conf: &Value, id: &str) -> Option<String> {
    let run = ipam_add(conf, id).await.unwrap();
    run.ok().then(|| run.ip().unwrap())
}

/// `cnlb_cloud_api_calls_total` samples of the agent, by operation.
async fn agent_calls(agent: &IpamAgent) -> BTreeMap<String, f64> {
    agent
        .metrics()
        .await
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("cnlb_cloud_api_calls_total{"))
        .filter_map(|l| {
            let operation = l.split("operation=\"").nth(1)?.split('"').next()?;
            let value = l.rsplit(' ').next()?.parse().ok()?;
            Some((operation.to_string(), value))
        })
        .collect()
}

/// Every ADD address is a usable one of `range`: not its network
/// address, its first host (the gateway) or its broadcast address.
fn assert_usable(range: &Cidr, ips: &[String]) {
    let base = u32::from(range.network());
    let last = base + u32::try_from(range.size()).unwrap() - 1;
    for ip in ips {
        let a: Ipv4Addr = ip.parse().unwrap();
        assert!(range.contains_ip(a), "{ip} not in {range}");
        assert!(
            ![base, base + 1, last].contains(&u32::from(a)),
            "{ip} is the network, gateway or broadcast address of {range}"
        );
    }
}

fn the_one_range(ranges: &[(String, Option<String>)]) -> Cidr {
    assert_eq!(ranges.len(), 1, "one alias range: {ranges:?}");
    assert_eq!(ranges[0].1.as_deref(), Some("pods"), "{ranges:?}");
    let range = cidr(&ranges[0].0);
    assert_eq!(range.prefix_len(), 24);
    assert!(cidr(PODS).contains(&range), "{range} not in {PODS}");
    range
}

#[tokio::test]
async fn gcp_agent_assigns_reuses_and_races_alias_ranges() {
    let mut opts = EnvBuilder::default_gce_options();
    opts.secondary_ranges = vec![
        NamedRange::new("pods", PODS).unwrap(),
        NamedRange::new("other", OTHER).unwrap(),
    ];
    let env = Env::builder("vpc-ipam-gcp")
        .kube()
        .gce_options(opts)
        .start()
        .await
        .unwrap();
    let gce = env.gce().unwrap();
    let kubeconfig = env.kube().unwrap().kubeconfig.clone();
    let kube = env.kube().unwrap().admin_client().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut running = Vec::new();

    // --- No alias range: one is assigned, from the secondary range.
    eprintln!("--- assign");
    gce_node(&gce, &kube, "gcp-assign", Ipv4Addr::new(10, 0, 1, 10), &[]).await;
    gce.reset_calls().await.unwrap();
    let mut agent = start_agent(&dir.path().join("assign"), "gcp-assign", &gce, &kubeconfig)
        .await
        .unwrap();
    let range = the_one_range(&alias_ranges(&gce, "gcp-assign").await);
    let calls = gce.calls().await.unwrap();
    assert_eq!(
        calls.get("instances.updateNetworkInterface"),
        1,
        "{calls:?}"
    );
    assert_eq!(calls.get("subnetworks.get"), 1, "{calls:?}");
    assert_eq!(calls.get("instances.get"), 2, "{calls:?}");
    assert_eq!(
        agent
            .metric("vpc_ipam_addresses{state=\"free\"}")
            .await
            .unwrap(),
        253.0
    );
    let conf = agent.netconf("1.1.0", "vpc-ipam");
    let ids: Vec<String> = (0..60).map(|i| format!("assign-{i}")).collect();
    let ips: Vec<String> = futures::future::join_all(ids.iter().map(|id| add(&conf, id)))
        .await
        .into_iter()
        .map(Option::unwrap)
        .collect();
    assert_eq!(
        ips.iter().collect::<HashSet<_>>().len(),
        60,
        "duplicates: {ips:?}"
    );
    assert_usable(&range, &ips);
    // A retried ADD gets its address again.
    assert_eq!(add(&conf, &ids[0]).await.as_ref(), Some(&ips[0]));

    // Churn with kill -9s; a failed ADD is followed by DEL, as kubelet does.
    let churn = Churn::start(&conf, "churn", 3);
    agent
        .crash_repeatedly(2, Duration::from_millis(1000))
        .await
        .unwrap();
    let mut live: BTreeMap<String, String> = ids.iter().cloned().zip(ips.iter().cloned()).collect();
    live.extend(churn.stop().await.unwrap().live);
    gce.reset_calls().await.unwrap();
    agent.restart().await.unwrap();
    // The same range, read once, nothing changed.
    assert_eq!(
        the_one_range(&alias_ranges(&gce, "gcp-assign").await),
        range
    );
    let calls = gce.calls().await.unwrap();
    assert_eq!(calls.get("instances.get"), 1, "{calls:?}");
    assert_eq!(calls.total, 1, "{calls:?}");
    agent.check_holds_exactly(&live).await.unwrap();
    let values: Vec<String> = live.values().cloned().collect();
    assert_usable(&range, &values);
    let fresh = add(&conf, "after-crashes").await.unwrap();
    assert!(!values.contains(&fresh), "{fresh} handed out twice");
    running.push(agent);

    // --- A range from the configured secondary range is reused as it is;
    // one from another range beside it is left alone.
    eprintln!("--- reuse");
    gce_node(
        &gce,
        &kube,
        "gcp-reuse",
        Ipv4Addr::new(10, 0, 1, 11),
        &[
            ("100.96.200.0/24", Some("pods")),
            ("100.97.5.0/28", Some("other")),
        ],
    )
    .await;
    gce.reset_calls().await.unwrap();
    let agent = start_agent(&dir.path().join("reuse"), "gcp-reuse", &gce, &kubeconfig)
        .await
        .unwrap();
    let calls = gce.calls().await.unwrap();
    assert_eq!(
        calls.get("instances.updateNetworkInterface"),
        0,
        "{calls:?}"
    );
    assert_eq!(calls.get("instances.get"), 1, "{calls:?}");
    assert_eq!(
        agent_calls(&agent).await,
        BTreeMap::from([("instances.get".to_string(), 1.0)])
    );
    let ip = add(&agent.netconf("1.1.0", "vpc-ipam"), "reuse-0")
        .await
        .unwrap();
    assert_usable(&cidr("100.96.200.0/24"), &[ip]);
    assert_eq!(alias_ranges(&gce, "gcp-reuse").await.len(), 2);
    running.push(agent);

    // --- Ranges only from another range: refused, nothing changed.
    eprintln!("--- foreign");
    gce_node(
        &gce,
        &kube,
        "gcp-foreign",
        Ipv4Addr::new(10, 0, 1, 12),
        &[("100.97.7.0/24", Some("other"))],
    )
    .await;
    gce.reset_calls().await.unwrap();
    let err = start_agent(
        &dir.path().join("foreign"),
        "gcp-foreign",
        &gce,
        &kubeconfig,
    )
    .await
    .err()
    .expect("an agent must refuse ranges only from another secondary range");
    let err = format!("{err:#}");
    assert!(err.contains("--gcp-pod-range-name"), "{err}");
    assert!(err.contains("100.97.7.0/24"), "{err}");
    assert_eq!(
        gce.calls()
            .await
            .unwrap()
            .get("instances.updateNetworkInterface"),
        0
    );
    assert_eq!(
        alias_ranges(&gce, "gcp-foreign").await,
        [("100.97.7.0/24".to_string(), Some("other".to_string()))]
    );

    // --- 412 conditionNotMet twice: read again, try again, one range.
    eprintln!("--- conditionNotMet");
    gce_node(&gce, &kube, "gcp-412", Ipv4Addr::new(10, 0, 1, 13), &[]).await;
    gce.reset_calls().await.unwrap();
    gce.inject(&Fault::error(
        Some("instances.updateNetworkInterface"),
        2,
        412,
        "conditionNotMet",
    ))
    .await
    .unwrap();
    let agent = start_agent(&dir.path().join("412"), "gcp-412", &gce, &kubeconfig)
        .await
        .unwrap();
    the_one_range(&alias_ranges(&gce, "gcp-412").await);
    let calls = gce.calls().await.unwrap();
    assert_eq!(
        calls.get("instances.updateNetworkInterface"),
        3,
        "{calls:?}"
    );
    assert_eq!(calls.get("instances.get"), 4, "{calls:?}");
    assert_eq!(calls.get("subnetworks.get"), 1, "{calls:?}");
    running.push(agent);

    // --- A real race: two agents read the same fingerprint; while the
    // first one's update is pending the second one's is accepted too, and
    // fails when it is applied. The loser reads again and takes the
    // winner's range.
    eprintln!("--- race");
    gce_node(&gce, &kube, "gcp-race", Ipv4Addr::new(10, 0, 1, 14), &[]).await;
    gce.set_operation_delay(Duration::from_secs(3))
        .await
        .unwrap();
    gce.reset_calls().await.unwrap();
    let (dir_a, dir_b) = (dir.path().join("race-a"), dir.path().join("race-b"));
    let (a, b) = tokio::join!(
        start_agent(&dir_a, "gcp-race", &gce, &kubeconfig),
        start_agent(&dir_b, "gcp-race", &gce, &kubeconfig),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    gce.set_operation_delay(Duration::from_millis(100))
        .await
        .unwrap();
    let range = the_one_range(&alias_ranges(&gce, "gcp-race").await);
    let calls = gce.calls().await.unwrap();
    assert_eq!(
        calls.get("instances.updateNetworkInterface"),
        2,
        "{calls:?}"
    );
    for (agent, id) in [(&a, "race-a"), (&b, "race-b")] {
        let ip = add(&agent.netconf("1.1.0", "vpc-ipam"), id).await.unwrap();
        assert_usable(&range, &[ip]);
    }
    let logs: String = [&a, &b]
        .iter()
        .map(|agent| std::fs::read_to_string(agent.log().unwrap()).unwrap())
        .collect();
    assert!(
        logs.contains("changed since it was read"),
        "neither agent saw the fingerprint change"
    );
    running.extend([a, b]);

    // --- At rest, no agent calls Compute.
    tokio::time::sleep(Duration::from_secs(1)).await;
    gce.reset_calls().await.unwrap();
    let before: Vec<_> = futures::future::join_all(running.iter().map(agent_calls)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(gce.calls().await.unwrap().total, 0, "Compute calls at rest");
    let after: Vec<_> = futures::future::join_all(running.iter().map(agent_calls)).await;
    assert_eq!(before, after, "Compute calls at rest");
    for mut agent in running {
        agent.kill9();
    }
}

// ---------------------------------------------------------------- harness

/// Real Nodes with `AgentBackend::Gcp`: every Node is a GCE instance whose
/// alias range is its pod CIDR, and its agent (vpc-ipam's DaemonSet) hands
/// out that range.
#[tokio::test]
async fn harness_pods_get_addresses_from_their_nodes_alias_ranges() {
    let common::gcp::GcpCluster { gce, client, env } =
        common::gcp::cluster("vpc-ipam-gcp-pods", 3).await;
    let pod_cidr = cidr(&env.pod_cidr().unwrap());
    assert_eq!(gce.secondary_range(GCE_POD_RANGE), Some(pod_cidr));

    // Nodes and instances agree: providerID, zone (round-robin), alias
    // range = spec.podCIDR, from the `pods` range.
    let mut node_ranges = BTreeMap::new();
    let mut zones = BTreeSet::new();
    for (i, node) in Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .enumerate()
    {
        let name = node.name_any();
        let zone = node.labels()["topology.kubernetes.io/zone"].clone();
        assert_eq!(node.labels()["topology.kubernetes.io/region"], gce.region());
        let spec = node.spec.unwrap();
        assert_eq!(
            spec.provider_id.as_deref(),
            Some(format!("gce://{}/{zone}/{name}", gce.project()).as_str())
        );
        let ranges = alias_ranges(&gce, &name).await;
        let pod_range = spec.pod_cidr.unwrap();
        assert_eq!(
            ranges,
            [(pod_range.clone(), Some(GCE_POD_RANGE.to_string()))]
        );
        assert!(pod_cidr.contains(&cidr(&pod_range)));
        assert_eq!(env.pod_range(i).ok(), Some(pod_range.clone()), "{name}");
        zones.insert(zone.clone());
        node_ranges.insert(name, (cidr(&pod_range), zone));
    }
    assert_eq!(zones.len(), 3, "zones round-robin: {zones:?}");
    assert_eq!(
        zones.iter().collect::<Vec<_>>(),
        gce.zones().iter().collect::<Vec<_>>()
    );

    common::ccm::create_web(&client, 6).await;
    Api::<Service>::namespaced(client.clone(), "default")
        .create(
            &PostParams::default(),
            &common::ccm::service("web", json!({})),
        )
        .await
        .unwrap();
    eventually("6 ready endpoints", WAIT, || async {
        Ok(common::ccm::ready_endpoints(&client).await.len() == 6)
    })
    .await
    .unwrap();

    let pods: BTreeMap<String, (String, String)> =
        Api::<Pod>::namespaced(client.clone(), "default")
            .list(&ListParams::default().labels("app=web"))
            .await
            .unwrap()
            .items
            .iter()
            .map(|p| {
                let status = p.status.as_ref().unwrap();
                (
                    status.pod_ip.clone().unwrap(),
                    (
                        p.name_any(),
                        p.spec.as_ref().unwrap().node_name.clone().unwrap(),
                    ),
                )
            })
            .collect();
    for (ip, node, zone) in common::ccm::ready_endpoints(&client).await {
        let (pod, pod_node) = &pods[&ip];
        assert_eq!(&node, pod_node, "{pod}: endpoint nodeName");
        let (range, node_zone) = &node_ranges[&node];
        assert_eq!(&zone, node_zone, "{pod}: endpoint zone");
        assert_usable(range, std::slice::from_ref(&ip));
        assert_eq!(
            http_get(&ip, 8080).await.unwrap(),
            format!("default/{pod} {ip}\n")
        );
    }
    // The agents called Compute at start only.
    for node in env.nodes() {
        let metrics = format!("{}:9971", node.config.internal_ip);
        let text = reqwest::get(format!("http://{metrics}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let calls: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("cnlb_cloud_api_calls_total{"))
            .collect();
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert!(
            calls[0].contains("operation=\"instances.get\""),
            "{calls:?}"
        );
        assert!(calls[0].ends_with(" 1"), "{calls:?}");
    }
}
