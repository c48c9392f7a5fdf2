//! GKE's NEG readiness gate `cloud.google.com/load-balancer-neg-ready`,
//! driven by NEG endpoint health: a Pod that declares it is attached while
//! not yet Ready and becomes Ready only once the emulator's health check
//! (probing the Pod's real server) reports it HEALTHY, never before a health
//! check covers it (unlike ingress-gce#1718). So a rolling update
//! (maxUnavailable 0) never has fewer healthy endpoints than replicas.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use crate::common::{ccm, gcp};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

const GATE: &str = "cloud.google.com/load-balancer-neg-ready";
const WAIT: Duration = Duration::from_secs(120);

fn pod_target(pod: &Pod) -> Option<String> {
    Some(format!("{}:8080", pod.status.as_ref()?.pod_ip.as_ref()?))
}

#[test]
fn neg_gate_opens_on_health_and_rollouts_keep_healthy_capacity() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cluster = gcp::cluster("gcp-gate", 3).await;
        let (env, gce, client) = (&cluster.env, &cluster.gce, &cluster.client);
        let (_ccm, _) = gcp::spawn(env, "cnlb-ccm", &[]);

        ccm::create_gated_web(client, 3, GATE).await;

        // Without a load balancer nothing checks the Pods: they wait.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(ccm::web_pods(client).await.iter().all(|p| !ccm::pod_condition(p, GATE)));

        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        let hc = json!({"service.beta.kubernetes.io/aws-load-balancer-healthcheck-interval": "5",
                        "service.beta.kubernetes.io/aws-load-balancer-healthcheck-timeout": "2",
                        "service.beta.kubernetes.io/aws-load-balancer-healthcheck-healthy-threshold": "2"});
        services
            .create(&PostParams::default(), &ccm::service("web", hc))
            .await
            .unwrap();

        // Each Pod passes the gate only once its endpoint is HEALTHY.
        let start = Instant::now();
        loop {
            let ps = ccm::web_pods(client).await;
            let healthy = gcp::healthy_endpoints(gce).await;
            for p in ps.iter().filter(|p| ccm::pod_condition(p, GATE)) {
                let target = pod_target(p).unwrap();
                assert!(
                    healthy.contains(&target),
                    "{target} passed the gate but is not HEALTHY in its NEG: {healthy:?}"
                );
            }
            if ps.len() == 3 && ps.iter().all(|p| ccm::pod_condition(p, GATE) && ccm::pod_condition(p, "Ready")) {
                break;
            }
            assert!(start.elapsed() < WAIT, "the Pods did not pass the gate");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            gcp::all_endpoints(gce).await,
            ccm::pod_targets(client).await
        );

        // Rolling update: sample the healthy endpoints until it is done.
        let fewest = ccm::roll_out_web(client, WAIT, || async {
            let attached = gcp::all_endpoints(gce).await;
            let healthy = gcp::healthy_endpoints(gce).await;
            (attached.intersection(&healthy).count(), attached)
        })
        .await;
        assert!(
            fewest >= 3,
            "healthy attached endpoints fell to {fewest} during the rollout"
        );
    });
}
