//! `cnlb-ccm --provider=gcp` against a faulty Compute API: every call goes
//! through the fault proxy in front of the GCE emulator.
//!
//! - With 30 % of calls failing (429 `rateLimitExceeded`, 403
//!   `userRateLimitExceeded`, 500, 503, connections dropped before the call
//!   or after it, so its answer is lost), every Service converges to
//!   exactly one of each part with every Pod in its zone's NEG, deletion
//!   leaves nothing, and the calls stay within the configured client-side
//!   buckets. Timed against a fault-free run.
//! - Crash trials: create, update and delete churn, cnlb-ccm killed with
//!   SIGKILL at a seeded random moment with lost answers on, restarted;
//!   every Service converges within 30 s with nothing duplicated or left.
//!
//! `make test` runs them small; `make chaos` with CNLB_CHAOS_SERVICES=50 and
//! CNLB_CHAOS_TRIALS=100.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::ccm;
use crate::common::chaos::{self, Live};
use crate::common::gcp::{self, GcpCluster};
use cnlb_localstack_tests::fault_proxy::{Cloud, FaultProxy, Faults, chaos_services, chaos_trials};
use cnlb_provider_gcp::calls::group_of;
use k8s_openapi::api::core::v1::Service;
use kube::Api;

/// An environment with 3 Nodes (one per zone) and 3 Pods of app=web, and
/// a fault proxy (seeded with `seed`) in front of its GCE emulator.
async fn setup(name: &str, seed: u64) -> (GcpCluster, FaultProxy) {
    let cluster = gcp::cluster(name, 3).await;
    ccm::create_web(&cluster.client, 3).await;
    ccm::wait_web_ready(&cluster.client, 3, Duration::from_secs(120)).await;
    let proxy = FaultProxy::start(Cloud::Gce, cluster.gce.endpoint(), seed).unwrap();
    (cluster, proxy)
}

#[test]
fn chaos_converges_with_30_percent_of_calls_failing() {
    runtime().block_on(async {
        let n = chaos_services(4);
        let (cluster, proxy) = setup("gcp-faults", 40).await;
        let services: Api<Service> = Api::namespaced(cluster.client.clone(), "default");
        let spawn = |name: &str| gcp::spawn_at(&cluster.env, name, proxy.url(), &[]).0;
        let converged = |live| converged(&cluster, live);
        let clean = chaos::round_trip(
            &services,
            &proxy,
            n,
            "fault-free",
            spawn,
            group_of,
            converged,
        )
        .await;
        proxy.set_faults(Faults::failing(0.3));
        let faulty = chaos::round_trip(
            &services,
            &proxy,
            n,
            "30 % failing",
            spawn,
            group_of,
            converged,
        )
        .await;
        println!(
            "gcp faults: {n} Services; fault-free: {clean}; 30 % failing: {faulty}; proxy: {}",
            proxy.summary()
        );
    });
}

#[test]
fn chaos_sigkill_trials_with_lost_answers() {
    runtime().block_on(async {
        let (trials, pool) = (chaos_trials(3), chaos_services(4).min(8));
        let (cluster, proxy) = setup("gcp-kills", 41).await;
        proxy.set_faults(Faults::lost_answers(0.1));
        let services: Api<Service> = Api::namespaced(cluster.client.clone(), "default");
        let figures = chaos::kill_trials(
            &services,
            (trials, pool, 18),
            |name| gcp::spawn_at(&cluster.env, name, proxy.url(), &[]).0,
            |live| converged(&cluster, live),
            || async { format!("GCE: {:?}", cluster.gce.resources().await.unwrap()) },
        )
        .await;
        println!("gcp crash trials: {figures}; proxy: {}", proxy.summary());
    });
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The emulator matches `live` (Service name -> ports) exactly: just these
/// Services exist, each with an IP of its own; per Service one address,
/// health check and firewall rule, per port one backend service, proxy,
/// forwarding rule and a NEG in every zone; each port's NEGs hold exactly
/// the Pods, each Pod once.
async fn converged(cluster: &GcpCluster, live: Live) -> anyhow::Result<bool> {
    let services: Api<Service> = Api::namespaced(cluster.client.clone(), "default");
    if !chaos::just_these(&services, &live).await? {
        return Ok(false);
    }
    let mut ips = BTreeSet::new();
    for name in live.keys() {
        match gcp::ingress_ip(&services, name).await {
            Some(ip) => ips.insert(ip),
            None => return Ok(false),
        };
    }
    let gce = &cluster.gce;
    let (s, p) = (
        live.len(),
        live.values().map(|p| *p as usize).sum::<usize>(),
    );
    let zones = gce.zones().len();
    if ips.len() != s || gcp::counts(gce).await != [p * zones, s, p, p, p, s, s] {
        return Ok(false);
    }
    let pods = ccm::pod_targets(&cluster.client).await;
    let r = gce.resources().await?;
    let attached: usize = r
        .network_endpoint_groups
        .iter()
        .map(|n| n.endpoints.len())
        .sum();
    let negs = gcp::neg_endpoints(gce).await;
    Ok(pods.len() == 3 && attached == p * 3 && negs.values().all(|eps| *eps == pods))
}
