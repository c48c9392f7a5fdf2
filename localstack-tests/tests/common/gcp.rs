//! `cnlb-ccm --provider=gcp` against an environment with the GCE emulator
//! and GKE-style real Nodes: each Node is a GCE instance whose alias IP
//! range (from the subnetwork's secondary range `pods`) holds its Pods' IPs,
//! given out by vpc-ipam's DaemonSet with `--backend gcp`; Pods are real
//! containers, so the emulator's health checks probe them for real.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::Command;

use cnlb_localstack_tests::gce::GceEmulator;
use cnlb_localstack_tests::podnet::AgentBackend;
use cnlb_localstack_tests::process::{Proc, free_port};
use cnlb_localstack_tests::{Env, NodeConfig};
use k8s_openapi::api::core::v1::Service;
use kube::{Api, Client};

pub struct GcpCluster {
    pub gce: GceEmulator,
    pub client: Client,
    // Dropped last: the environment outlives the clients.
    pub env: Env,
}

pub async fn cluster(name: &str, nodes: u8) -> GcpCluster {
    let nodes = (1..=nodes).map(NodeConfig::numbered).collect();
    let env = Env::builder(name)
        .nodes(nodes)
        .gce()
        .agent_backend(AgentBackend::Gcp)
        .start()
        .await
        .unwrap();
    let gce = env.gce().unwrap();
    let client = env.kube().unwrap().admin_client().unwrap();
    GcpCluster { gce, client, env }
}

/// `cnlb-ccm --provider=gcp` for cluster `test` against the environment's
/// API server and emulator; callers add leader election and metrics.
pub fn command(env: &Env) -> Command {
    command_at(env, env.gce().unwrap().endpoint())
}

/// [`command`] with the Compute API at `endpoint` (e.g. a fault proxy's).
pub fn command_at(env: &Env, endpoint: &str) -> Command {
    let gce = env.gce().unwrap();
    let mut cmd = super::ccm::provider_command(env, "gcp");
    cmd.args([
        &format!("--gcp-project={}", gce.project()),
        &format!("--gcp-region={}", gce.region()),
        &format!("--gcp-network={}", gce.network()),
        &format!("--gcp-subnetwork={}", gce.subnetwork()),
        &format!("--gcp-endpoint={endpoint}"),
    ]);
    cmd
}

/// Starts the controller (leader election off) with its metrics on a free
/// port, returned with it.
pub fn spawn(env: &Env, name: &str, extra: &[&str]) -> (Proc, SocketAddr) {
    spawn_at(env, name, env.gce().unwrap().endpoint(), extra)
}

/// [`spawn`] with the Compute API at `endpoint` (e.g. a fault proxy's).
pub fn spawn_at(env: &Env, name: &str, endpoint: &str, extra: &[&str]) -> (Proc, SocketAddr) {
    let port = free_port().unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut cmd = command_at(env, endpoint);
    cmd.args([
        "--leader-elect=false",
        &format!("--metrics-bind-address={addr}"),
    ])
    .args(extra);
    (Proc::spawn(name, cmd, &env.dir).unwrap(), addr)
}

/// `ip:port` of every endpoint of every NEG, by NEG name.
pub async fn neg_endpoints(gce: &GceEmulator) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for neg in gce.resources().await.unwrap().network_endpoint_groups {
        let set = out
            .entry(neg.network_endpoint_group.name.clone().unwrap_or_default())
            .or_default();
        for ep in neg.endpoints {
            set.insert(format!(
                "{}:{}",
                ep.ip_address.unwrap_or_default(),
                ep.port.unwrap_or_default()
            ));
        }
    }
    out
}

/// Every endpoint of every NEG.
pub async fn all_endpoints(gce: &GceEmulator) -> BTreeSet<String> {
    neg_endpoints(gce).await.into_values().flatten().collect()
}

/// Endpoints the emulator's health checks find HEALTHY.
pub async fn healthy_endpoints(gce: &GceEmulator) -> BTreeSet<String> {
    gce.health()
        .await
        .unwrap()
        .into_iter()
        .filter(|h| h.forced.as_deref().unwrap_or(&h.probed) == "HEALTHY")
        .map(|h| format!("{}:{}", h.ip, h.port))
        .collect()
}

/// Load balancing resources in the emulator: (NEGs, health checks, backend
/// services, proxies, forwarding rules, addresses, firewalls).
pub async fn counts(gce: &GceEmulator) -> [usize; 7] {
    let r = gce.resources().await.unwrap();
    [
        r.network_endpoint_groups.len(),
        r.health_checks.len(),
        r.backend_services.len(),
        r.target_tcp_proxies.len(),
        r.forwarding_rules.len(),
        r.addresses.len(),
        r.firewalls.len(),
    ]
}

/// The IP in `status.loadBalancer.ingress`, once there.
pub async fn ingress_ip(services: &Api<Service>, name: &str) -> Option<String> {
    let svc = services.get(name).await.ok()?;
    svc.status?.load_balancer?.ingress?.into_iter().next()?.ip
}
