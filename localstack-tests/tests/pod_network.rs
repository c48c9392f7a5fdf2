//! Pods of the harness's Nodes get real networking: a network namespace
//! attached by Debian's ptp plugin, an address from the Node's range in
//! this environment's own /16, and a server inside that the host reaches at
//! the Pod IP. EndpointSlices carry exactly those IPs; a deleted Pod leaves
//! the endpoints at once, serves through its drain time, then its namespace
//! goes; dropping the environment leaves no namespace and no process.

#![allow(clippy::unwrap_used)] // test code: a failed call should fail the test

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use cnlb_localstack_tests::podnet::netns_with_prefix;
use cnlb_localstack_tests::process::is_running;
use cnlb_localstack_tests::{Env, NodeConfig, eventually};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);
const DRAIN: Duration = Duration::from_secs(3);

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

/// Each Node's agent serves metrics; one killed with SIGKILL comes back
/// (new pid, same socket) through `restart_agent`.
async fn agents_serve_and_restart(env: &Env) {
    for node in 0..2 {
        let metrics = env.agent_metrics_addr(node).unwrap();
        get(&format!("http://{metrics}/metrics")).await.unwrap();
        assert!(env.agent_socket(node).unwrap().exists());
        assert!(env.agent_state_dir(node).unwrap().is_dir());
    }
    let old = env.agent_pid(0).unwrap().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    env.restart_agent(0).await.unwrap();
    let new = env.agent_pid(0).unwrap().unwrap();
    assert!(new != old && is_running(new) && !is_running(old));
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

/// Through our vpc-ipam and a vpc-ipam-agent per Node (static backend).
#[tokio::test]
async fn pods_get_addresses_from_vpc_ipam_that_serve_and_leave_with_their_pods() {
    let nodes = vec![NodeConfig::numbered(1), NodeConfig::numbered(2)];
    let env = Env::builder("pod_network")
        .nodes(nodes.clone())
        .pod_network()
        .pod_drain(DRAIN)
        .start()
        .await
        .unwrap();
    agents_serve_and_restart(&env).await;
    let client = env.kube().unwrap().admin_client().unwrap();

    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{
                    "name": "web", "image": "example.invalid/web:1",
                    "ports": [{"containerPort": 8080}],
                }]},
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
    for (name, (node, ip)) in &pods {
        // The address is from the range of the Pod's Node.
        let index = nodes.iter().position(|n| &n.name == node).unwrap();
        let range = env.pod_range(index).unwrap();
        let prefix = range.strip_suffix("0/24").unwrap();
        assert!(
            ip.starts_with(prefix),
            "{name} on {node}: {ip} not in {range} ({cidr})"
        );

        let sandbox = env.pod_sandbox("default", name).unwrap().unwrap();
        assert_eq!(sandbox.ip.map(|a| a.to_string()).as_ref(), Some(ip));
        assert_eq!(sandbox.node, index);
        assert_eq!(sandbox.ports, vec![8080]);
        assert!(env.pod_netns().unwrap().contains(&sandbox.netns));

        // The host reaches the server in the Pod's namespace.
        let body = get(&format!("http://{ip}:8080/")).await.unwrap();
        assert_eq!(body, format!("default/{name} {ip}\n"));
        assert_eq!(
            get(&format!("http://{ip}:8080/healthz")).await.unwrap(),
            "ok\n"
        );
    }

    // Scale to 1: the two deleted Pods leave the ready endpoints at once but
    // keep serving through the drain, then their namespaces go.
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
        "a deleted pod is not Ready and still serves",
        WAIT,
        || async {
            for pod in api
                .list(&ListParams::default().labels("app=web"))
                .await?
                .items
            {
                let ready = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
                    .map(|c| c.status == "True");
                let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone());
                if pod.metadata.deletion_timestamp.is_some()
                    && ready == Some(false)
                    && let Some(ip) = ip
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
    let kept_netns = env.pod_sandbox("default", kept).unwrap().unwrap().netns;
    eventually(
        "only the remaining pod's namespace is left",
        WAIT,
        || async {
            Ok(env.pod_netns()? == vec![kept_netns.clone()] && env.pod_sandboxes()?.len() == 1)
        },
    )
    .await
    .unwrap();
    // Their host routes went with them (this host may accept any TCP
    // connection to an unrouted address, so a connect proves nothing).
    for (name, (_, ip)) in pods.iter().filter(|(name, _)| *name != kept) {
        let routes = std::process::Command::new("ip")
            .args(["route", "show", ip])
            .output()
            .unwrap();
        let routes = String::from_utf8(routes.stdout).unwrap();
        assert_eq!(routes.trim(), "", "deleted pod {name}: route to {ip} left");
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

    // Dropping the environment leaves no namespace and no server or agent.
    let prefix = env.netns_prefix().unwrap();
    let pids = env.pids();
    drop(env);
    assert_eq!(netns_with_prefix(&prefix), Vec::<String>::new());
    assert!(
        pids.iter().all(|p| !is_running(*p)),
        "processes left: {pids:?}"
    );
}
