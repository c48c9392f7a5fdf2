//! cnlb-ccm against a faulty AWS: every call goes through the fault proxy
//! in front of moto.
//!
//! - With 30 % of calls failing (throttling, 500, 503, connections dropped
//!   before the call or after it, so its answer is lost), every Service
//!   converges to exactly one NLB, target group and security group with
//!   the right targets, deletion leaves nothing, and the calls stay within
//!   the configured client-side buckets. Timed against a fault-free run.
//! - Crash trials: create, update and delete churn, cnlb-ccm killed with
//!   SIGKILL at a seeded random moment with lost answers on, restarted;
//!   every Service converges within 30 s with nothing duplicated or left.
//!
//! `make test` runs them small; `make chaos` with CNLB_CHAOS_SERVICES=50 and
//! CNLB_CHAOS_TRIALS=100.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::ccm::{self, Cluster};
use crate::common::chaos::{self, Live};
use cnlb_localstack_tests::aws::AwsEndpoints;
use cnlb_localstack_tests::fault_proxy::{Cloud, FaultProxy, Faults, chaos_services, chaos_trials};
use cnlb_provider_aws::{Group, group_of};
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::ListParams;

/// The operation's bucket: `ec2:CreateSecurityGroup` -> write.
fn group(operation: &str) -> Group {
    group_of(operation.split(':').nth(1).unwrap_or_default())
}

/// An environment with 2 Nodes and 3 Pods of app=web, and a fault proxy
/// (seeded with `seed`) in front of its moto.
async fn setup(name: &str, seed: u64) -> (Cluster, FaultProxy) {
    let cluster = ccm::cluster(name, 2).await;
    ccm::create_web(&cluster.client, 3).await;
    ccm::wait_web_ready(&cluster.client, 3, Duration::from_secs(120)).await;
    let proxy = FaultProxy::start(Cloud::Aws, &cluster.env.aws().unwrap().ec2, seed).unwrap();
    (cluster, proxy)
}

#[test]
fn chaos_converges_with_30_percent_of_calls_failing() {
    runtime().block_on(async {
        let n = chaos_services(5);
        let (cluster, proxy) = setup("aws-faults", 30).await;
        let services: Api<Service> = Api::namespaced(cluster.client.clone(), "default");
        let endpoints = AwsEndpoints::single(proxy.url());
        let spawn = |name: &str| ccm::spawn_at(&cluster.env, &cluster.net.vpc, name, &endpoints);
        let converged = |live| converged(&cluster, live);
        let clean =
            chaos::round_trip(&services, &proxy, n, "fault-free", spawn, group, converged).await;
        proxy.set_faults(Faults::failing(0.3));
        let faulty = chaos::round_trip(
            &services,
            &proxy,
            n,
            "30 % failing",
            spawn,
            group,
            converged,
        )
        .await;
        println!(
            "aws faults: {n} Services; fault-free: {clean}; 30 % failing: {faulty}; proxy: {}",
            proxy.summary()
        );
    });
}

#[test]
fn chaos_sigkill_trials_with_lost_answers() {
    runtime().block_on(async {
        let (trials, pool) = (chaos_trials(3), chaos_services(4).min(8));
        let (cluster, proxy) = setup("aws-kills", 31).await;
        proxy.set_faults(Faults::lost_answers(0.1));
        let services: Api<Service> = Api::namespaced(cluster.client.clone(), "default");
        let endpoints = AwsEndpoints::single(proxy.url());
        let figures = chaos::kill_trials(
            &services,
            (trials, pool, 17),
            |name| ccm::spawn_at(&cluster.env, &cluster.net.vpc, name, &endpoints),
            |live| converged(&cluster, live),
            || state(&cluster),
        )
        .await;
        println!("aws crash trials: {figures}; proxy: {}", proxy.summary());
    });
}

pub(super) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The cloud matches `live` (Service name -> ports) exactly: the API server
/// holds just these Services (deleted ones are gone, their finalizer done);
/// each has a hostname of its own; one NLB and one security group per
/// Service, one target group per port, every target group holding exactly
/// the Pods.
pub(super) async fn converged(cluster: &Cluster, live: Live) -> anyhow::Result<bool> {
    let services: Api<Service> = Api::namespaced(cluster.client.clone(), "default");
    if !chaos::just_these(&services, &live).await? {
        return Ok(false);
    }
    let mut hostnames = BTreeSet::new();
    for name in live.keys() {
        match ccm::hostname(&services, name).await {
            Some(h) => hostnames.insert(h),
            None => return Ok(false),
        };
    }
    let aws = &cluster.aws;
    let ports: usize = live.values().map(|p| *p as usize).sum();
    if hostnames.len() != live.len()
        || ccm::counts(aws).await != (live.len(), ports)
        || ccm::owned_security_groups(aws).await != live.len()
    {
        return Ok(false);
    }
    let pods = ccm::pod_targets(&cluster.client).await;
    let tgs = aws.elbv2.describe_target_groups().send().await?;
    for tg in tgs.target_groups() {
        if ccm::targets_of(aws, tg.target_group_arn().unwrap_or_default()).await != pods {
            return Ok(false);
        }
    }
    Ok(pods.len() == 3)
}

/// What the API server and moto hold, for a failure message.
async fn state(cluster: &Cluster) -> String {
    let services: Api<Service> = Api::namespaced(cluster.client.clone(), "default");
    let mut out = String::new();
    for svc in services.list(&ListParams::default()).await.unwrap().items {
        let name = svc.metadata.name.clone().unwrap_or_default();
        let ports = svc.spec.and_then(|s| s.ports).map(|p| p.len()).unwrap_or(0);
        let deleting = svc.metadata.deletion_timestamp.is_some();
        let host = ccm::hostname(&services, &name).await;
        out += &format!("Service {name}: {ports} ports, deleting {deleting}, hostname {host:?}\n");
    }
    let aws = &cluster.aws;
    for lb in aws
        .elbv2
        .describe_load_balancers()
        .send()
        .await
        .unwrap()
        .load_balancers()
    {
        out += &format!("NLB {:?}\n", lb.load_balancer_name());
    }
    for tg in aws
        .elbv2
        .describe_target_groups()
        .send()
        .await
        .unwrap()
        .target_groups()
    {
        let targets = ccm::targets_of(aws, tg.target_group_arn().unwrap()).await;
        out += &format!("target group {:?}: {targets:?}\n", tg.target_group_name());
    }
    out += &format!(
        "owned security groups: {}; Pods: {:?}",
        ccm::owned_security_groups(aws).await,
        ccm::pod_targets(&cluster.client).await
    );
    out
}
