//! The readiness gate `cnlb.dev/load-balancer-ready`, with cnlb-ccm
//! installed as users install it (the Helm chart, in the cluster): a Pod
//! that declares it is registered while not yet Ready, becomes Ready only
//! once its target is healthy, and so a rolling update (maxUnavailable 0)
//! never has fewer registered targets than replicas: no target is dropped
//! before its replacement is registered.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crate::common::ccm;
use cnlb_localstack_tests::eventually;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::PostParams;
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
        let cluster =
            ccm::cluster_with("aws-gate", 2, &[cnlb_localstack_tests::images::ccm_image()]).await;
        ccm::install(&cluster).await;
        let aws = &cluster.aws;
        let client = cluster.client.clone();

        ccm::create_gated_web(&client, 3, GATE).await;
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

        // Rolling update: sample the registered targets until it is done.
        let fewest = ccm::roll_out_web(&client, WAIT, || async {
            let registered = ccm::all_targets(aws).await;
            (registered.len(), registered)
        })
        .await;
        assert!(
            fewest >= 3,
            "registered targets fell to {fewest} during the rollout"
        );
    });
}
