//! The readiness gate `cnlb.dev/load-balancer-ready`: a Pod that declares it
//! is registered while not yet Ready, becomes Ready only once its target is
//! healthy, and so a rolling update (maxUnavailable 0) never has fewer
//! registered targets than replicas: no target is dropped before its
//! replacement is registered.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use cnlb_localstack_tests::eventually;
use common::ccm;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

const GATE: &str = "cnlb.dev/load-balancer-ready";
const WAIT: Duration = Duration::from_secs(90);

#[test]
fn gated_pods_become_ready_after_registration_and_rollouts_keep_capacity() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cluster = ccm::cluster("aws-gate", 2).await;
        let (env, aws, net) = (&cluster.env, &cluster.aws, &cluster.net);
        let _ccm = ccm::spawn(env, &net.vpc, "cnlb-ccm");
        let client = cluster.client.clone();

        ccm::create_gated_web(&client, 3, GATE).await;
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        services
            .create(&PostParams::default(), &ccm::service("web", json!({})))
            .await
            .unwrap();

        eventually("every Pod passes the gate and is Ready", WAIT, || async {
            let ps = ccm::web_pods(&client).await;
            Ok(ps.len() == 3
                && ps
                    .iter()
                    .all(|p| ccm::pod_condition(p, GATE) && ccm::pod_condition(p, "Ready")))
        })
        .await
        .unwrap();
        // A gate is only opened for a registered target.
        assert_eq!(ccm::all_targets(aws).await, ccm::pod_targets(&client).await);

        // Rolling update: sample the registered targets until the rollout is done.
        // By name: a new Pod may get an IP an old one just released.
        let old: BTreeSet<String> = ccm::web_pods(&client)
            .await
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        let patch = json!({"spec": {"template": {"metadata": {"annotations": {"rollout": "2"}}}}});
        deployments
            .patch("web", &PatchParams::default(), &Patch::Merge(patch))
            .await
            .unwrap();
        let start = Instant::now();
        let mut fewest = usize::MAX;
        loop {
            let registered = ccm::all_targets(aws).await;
            fewest = fewest.min(registered.len());
            let ps = ccm::web_pods(&client).await;
            if start.elapsed() > WAIT {
                let state: Vec<String> = ps
                    .iter()
                    .map(|p| {
                        let conds: Vec<String> = p
                            .status
                            .as_ref()
                            .and_then(|s| s.conditions.clone())
                            .unwrap_or_default()
                            .iter()
                            .map(|c| format!("{}={}", c.type_, c.status))
                            .collect();
                        format!(
                            "{} ip={:?} deleting={} {:?}",
                            p.metadata.name.clone().unwrap_or_default(),
                            p.status.as_ref().and_then(|s| s.pod_ip.clone()),
                            p.metadata.deletion_timestamp.is_some(),
                            conds
                        )
                    })
                    .collect();
                panic!(
                    "rollout did not finish: registered {registered:?}\npods:\n{}",
                    state.join("\n")
                );
            }
            let live: BTreeSet<String> = ccm::pod_targets(&client).await;
            let names: BTreeSet<String> =
                ps.iter().filter_map(|p| p.metadata.name.clone()).collect();
            let done = ps.len() == 3
                && names.is_disjoint(&old)
                && ps.iter().all(|p| ccm::pod_condition(p, "Ready"))
                && registered == live;
            if done {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            fewest >= 3,
            "registered targets fell to {fewest} during the rollout"
        );
    });
}
