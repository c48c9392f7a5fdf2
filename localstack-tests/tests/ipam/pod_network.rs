//! Pods on real Nodes get their network from cnlb's vpc-ipam as users
//! install it (the DaemonSet of deploy/): its init container puts the
//! plugin and the conflist on each Node, containerd's CNI runs Debian's ptp
//! with our IPAM plugin, which asks the Node's agent for an address from
//! the Node's `spec.podCIDR`. EndpointSlices carry exactly those IPs; the
//! host reaches the containers there; an agent killed with SIGKILL is
//! restarted by its kubelet and serves again; a deleted Pod leaves the
//! ready endpoints at once, serves through its preStop sleep, then its
//! route goes; dropping the environment leaves no process.

#![allow(clippy::unwrap_used)] // test code: a failed call should fail the test

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use cnlb_localstack_tests::process::is_running;
use cnlb_localstack_tests::{Env, NodeConfig, eventually, sample_app};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);
const DRAIN_SECONDS: u32 = 4;

/// Live (not deleting) Pods of the Deployment: name -> (node, IP).
async fn live_pods(client: &Client) -> BTreeMap<String, (String, String)> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let list = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap();
    list.items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let node = p.spec.as_ref()?.node_name.clone()?;
            let ip = p.status.as_ref()?.pod_ip.clone()?;
            Some((p.name_any(), (node, ip)))
        })
        .collect()
}

async fn ready_endpoint_ips(client: &Client) -> BTreeSet<String> {
    common::ccm::ready_endpoints(client)
        .await
        .into_iter()
        .map(|(ip, _, _)| ip)
        .collect()
}

/// Waits until `n` live Pods have IPs and the ready endpoints are exactly those.
async fn endpoints_are_the_pods(client: &Client, n: usize) -> BTreeMap<String, (String, String)> {
    eventually(
        &format!("{n} pods are the ready endpoints"),
        WAIT,
        || async {
            let pods = live_pods(client).await;
            let ips: BTreeSet<String> = pods.values().map(|(_, ip)| ip.clone()).collect();
            Ok(pods.len() == n && ips.len() == n && ready_endpoint_ips(client).await == ips)
        },
    )
    .await
    .unwrap();
    live_pods(client).await
}

fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn agent_pid(env: &Env, node: usize) -> Option<i32> {
    env.nodes()[node]
        .pids()
        .into_iter()
        .find(|p| comm(*p) == "vpc-ipam-agent")
}

/// Each Node's agent serves metrics on the Node's address, its socket and
/// state where the DaemonSet puts them on the node; one killed with
/// SIGKILL is restarted by its kubelet and serves again.
async fn agents_serve_and_restart(env: &Env) {
    for node in env.nodes() {
        let metrics = format!("http://{}:9971/metrics", node.config.internal_ip);
        eventually("the agent serves its metrics", WAIT, || async {
            get(&metrics).await.map(|_| true)
        })
        .await
        .unwrap();
        assert!(node.host_path("/run/cnlb").join("vpc-ipam.sock").exists());
        assert!(node.host_path("/var/lib/cnlb").join("vpc-ipam").is_dir());
        assert!(node.host_path("/opt/cni/bin").join("vpc-ipam").is_file());
        assert!(
            node.host_path("/etc/cni/net.d")
                .join("10-cnlb.conflist")
                .is_file()
        );
    }
    let old = agent_pid(env, 0).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let metrics = format!("http://{}:9971/readyz", env.nodes()[0].config.internal_ip);
    eventually("the kubelet restarts the agent", WAIT, || async {
        let new = agent_pid(env, 0);
        Ok(new.is_some_and(|p| p != old) && get(&metrics).await.is_ok())
    })
    .await
    .unwrap();
    assert!(!is_running(old));
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

async fn get(url: &str) -> anyhow::Result<String> {
    Ok(http()
        .get(url)
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?)
}

#[tokio::test]
async fn pods_get_addresses_from_vpc_ipam_that_serve_and_leave_with_their_pods() {
    let nodes = vec![NodeConfig::numbered(1), NodeConfig::numbered(2)];
    let env = Env::builder("pod_network")
        .nodes(nodes.clone())
        .start()
        .await
        .unwrap();
    agents_serve_and_restart(&env).await;
    let client = env.kube().unwrap().admin_client().unwrap();

    let mut container = sample_app::container("web", &[8080]);
    container["lifecycle"] = json!({"preStop": {"sleep": {"seconds": DRAIN_SECONDS}}});
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [container]},
            },
        },
    }))
    .unwrap();
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }))
    .unwrap();
    let pp = PostParams::default();
    Api::<Deployment>::namespaced(client.clone(), "default")
        .create(&pp, &deployment)
        .await
        .unwrap();
    Api::<Service>::namespaced(client.clone(), "default")
        .create(&pp, &service)
        .await
        .unwrap();

    let pods = endpoints_are_the_pods(&client, 3).await;
    let cidr = env.pod_cidr().unwrap();
    let node_api: Api<Node> = Api::all(client.clone());
    for (name, (node, ip)) in &pods {
        // The address is from the range kube-controller-manager gave the Pod's Node.
        let range = node_api
            .get(node)
            .await
            .unwrap()
            .spec
            .unwrap()
            .pod_cidr
            .unwrap();
        let prefix = range.strip_suffix("0/24").unwrap();
        assert!(
            ip.starts_with(prefix),
            "{name} on {node}: {ip} not in {range} ({cidr})"
        );
        // The host reaches the Pod's container.
        let body = get(&format!("http://{ip}:8080/")).await.unwrap();
        assert_eq!(body, format!("default/{name} {ip}\n"));
        assert_eq!(
            get(&format!("http://{ip}:8080/healthz")).await.unwrap(),
            "ok\n"
        );
    }

    // Scale to 1: the two deleted Pods leave the ready endpoints at once but
    // keep serving through their preStop sleep, then their routes go.
    Api::<Deployment>::namespaced(client.clone(), "default")
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 1}})),
        )
        .await
        .unwrap();
    let api: Api<Pod> = Api::namespaced(client.clone(), "default");
    eventually(
        "a deleted pod is no ready endpoint and still serves",
        WAIT,
        || async {
            let ready = ready_endpoint_ips(&client).await;
            for pod in api
                .list(&ListParams::default().labels("app=web"))
                .await?
                .items
            {
                let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone());
                if pod.metadata.deletion_timestamp.is_some()
                    && let Some(ip) = ip
                    && !ready.contains(&ip)
                    && get(&format!("http://{ip}:8080/")).await?
                        == format!("default/{} {ip}\n", pod.name_any())
                {
                    return Ok(true);
                }
            }
            Ok(false)
        },
    )
    .await
    .unwrap();
    let left = endpoints_are_the_pods(&client, 1).await;
    let (kept, _) = left.iter().next().unwrap();
    eventually("the deleted Pods are gone", WAIT, || async {
        Ok(api
            .list(&ListParams::default().labels("app=web"))
            .await?
            .items
            .len()
            == 1)
    })
    .await
    .unwrap();
    // Their host routes went with them, by CNI DEL (this host may accept
    // any TCP connection to an unrouted address, so a connect proves nothing).
    for (name, (_, ip)) in pods.iter().filter(|(name, _)| *name != kept) {
        eventually(&format!("{name}'s route to {ip} is gone"), WAIT, || async {
            let routes = std::process::Command::new("ip")
                .args(["route", "show", ip])
                .output()?;
            Ok(String::from_utf8(routes.stdout)?.trim().is_empty())
        })
        .await
        .unwrap();
    }
    let routes = std::process::Command::new("ip")
        .args(["route", "show", &left[kept].1])
        .output()
        .unwrap();
    assert!(
        String::from_utf8(routes.stdout)
            .unwrap()
            .contains("dev veth")
    );

    // Dropping the environment leaves no container, agent or other process.
    let mut pids = env.pids();
    pids.extend(env.nodes().iter().flat_map(|n| n.pids()));
    drop(env);
    assert!(
        pids.iter().all(|p| !is_running(*p)),
        "processes left: {pids:?}"
    );
}
