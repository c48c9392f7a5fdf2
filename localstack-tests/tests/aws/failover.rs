//! Two `cnlb-ccm` replicas against moto: the leader converges the
//! Services while a standby fills its caches; the leader is SIGKILLed and
//! the standby takes over.
//! - Pods added while no replica leads: the new leader asks the cloud what
//!   is registered and registers the new Pod everywhere.
//! - Nothing changed: the new leader verifies every Service without a
//!   single target call (it knows from the Services' record of what was
//!   registered that its caches agree with the cloud).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::ccm::{self, Cluster};
use cnlb_localstack_tests::aws::AwsEndpoints;
use cnlb_localstack_tests::eventually;
use cnlb_localstack_tests::fault_proxy::{Cloud, FaultProxy};
use cnlb_localstack_tests::process::Proc;
use k8s_openapi::api::core::v1::Service;
use kube::Api;

const SERVICES: usize = 4;
const WAIT: Duration = Duration::from_secs(120);
/// What reads or changes a target group's targets.
const TARGET_CALLS: [&str; 3] = [
    "DescribeTargetHealth",
    "RegisterTargets",
    "DeregisterTargets",
];

fn replica(cluster: &Cluster, endpoints: &AwsEndpoints, name: &str) -> Proc {
    let mut cmd = ccm::command(&cluster.env, &cluster.net.vpc);
    cmd.args(["--leader-elect=true", "--metrics-bind-address=0"])
        .envs(endpoints.env_vars());
    Proc::spawn(name, cmd, &cluster.env.dir).unwrap()
}

fn logged(replica: &Proc, message: &str) -> bool {
    std::fs::read_to_string(replica.log()).is_ok_and(|log| log.contains(message))
}

async fn wait_logged(replica: &Proc, message: &str) {
    eventually(
        &format!("{} logs {message:?}", replica.name()),
        WAIT,
        || async { Ok(logged(replica, message)) },
    )
    .await
    .unwrap();
}

/// Every Service has its NLB, and every target group holds exactly the Pods.
async fn converged(cluster: &Cluster, names: &[String]) -> anyhow::Result<bool> {
    let services: Api<Service> = Api::namespaced(cluster.client.clone(), "default");
    for name in names {
        if ccm::hostname(&services, name).await.is_none() {
            return Ok(false);
        }
    }
    let pods = ccm::pod_targets(&cluster.client).await;
    let aws = &cluster.aws;
    let tgs = aws.elbv2.describe_target_groups().send().await?;
    let mut arns = BTreeSet::new();
    for tg in tgs.target_groups() {
        let arn = tg.target_group_arn().unwrap_or_default();
        if ccm::targets_of(aws, arn).await != pods {
            return Ok(false);
        }
        arns.insert(arn.to_string());
    }
    Ok(arns.len() == names.len())
}

#[test]
fn a_standby_with_warm_caches_takes_over_without_reading_every_target_group() {
    super::faults::runtime().block_on(async {
        let cluster = ccm::cluster("aws-failover", 2).await;
        ccm::create_web(&cluster.client, 3).await;
        ccm::wait_web_ready(&cluster.client, 3, WAIT).await;
        let proxy = FaultProxy::start(Cloud::Aws, &cluster.env.aws().unwrap().ec2, 41).unwrap();
        let endpoints = AwsEndpoints::single(proxy.url());
        let services: Api<Service> = Api::namespaced(cluster.client.clone(), "default");
        let names = ccm::create_services(&services, SERVICES).await;

        let first = replica(&cluster, &endpoints, "cnlb-ccm-first");
        wait_logged(&first, "became leader").await;
        eventually("every Service converged", WAIT, || {
            converged(&cluster, &names)
        })
        .await
        .unwrap();
        let second = replica(&cluster, &endpoints, "cnlb-ccm-second");
        wait_logged(&second, "caches filled").await;
        assert!(!logged(&second, "became leader"), "a standby, not a leader");

        // A Pod added while nobody leads.
        first.kill();
        ccm::scale(&cluster.client, 4).await;
        ccm::wait_web_ready(&cluster.client, 4, WAIT).await;
        wait_logged(&second, "every Service verified").await;
        eventually("the new Pod is a target everywhere", WAIT, || {
            converged(&cluster, &names)
        })
        .await
        .unwrap();
        assert_eq!(ccm::pod_targets(&cluster.client).await.len(), 4);

        // Nothing changes while nobody leads.
        let third = replica(&cluster, &endpoints, "cnlb-ccm-third");
        wait_logged(&third, "caches filled").await;
        let mark = proxy.calls().len();
        second.kill();
        wait_logged(&third, "every Service verified").await;
        let target_calls: Vec<String> = proxy.calls()[mark..]
            .iter()
            .map(|c| c.operation.clone())
            .filter(|op| TARGET_CALLS.contains(&op.as_str()))
            .collect();
        assert_eq!(
            target_calls,
            Vec::<String>::new(),
            "the new leader trusts what the last one recorded"
        );
        assert!(converged(&cluster, &names).await.unwrap());
    });
}
