//! Many Services at once, and `cnlb-ccm --provider=gcp` killed with SIGKILL
//! in the middle of building them: after a restart every Service has
//! exactly one of each part (a NEG per zone, health check, backend service,
//! proxy, forwarding rule, address, firewall rule), and every NEG holds the
//! Pods, once. Services deleted while the controller is down are cleaned up
//! when it comes back; a load balancer whose Service vanished without its
//! finalizer (NEG leaks, ingress-gce#1755) is garbage collected at start.
//! Health still undecided at a kill is read again by the next controller.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crate::common::{ccm, gcp};
use cnlb_localstack_tests::eventually;
use k8s_openapi::api::core::v1::Service;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

const SERVICES: usize = 6;
const WAIT: Duration = Duration::from_secs(120);

#[test]
fn sigkill_mid_build_leaves_no_duplicate_and_no_leak() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cluster = gcp::cluster("gcp-crash", 3).await;
        let (env, gce, client) = (&cluster.env, &cluster.gce, &cluster.client);
        let zones = gce.zones().len();
        ccm::create_web(client, 3).await;
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        let names = ccm::create_services(&services, SERVICES).await;

        // Kill the controller as soon as the first backend service exists:
        // the other Services are half built or not started.
        let (first, _) = gcp::spawn(env, "cnlb-ccm-1", &[]);
        eventually("the first backend service exists", WAIT, || async {
            Ok(gcp::counts(gce).await[2] > 0)
        })
        .await
        .unwrap();
        first.kill();
        let built = gcp::counts(gce).await;
        assert!(
            built[4] < SERVICES,
            "killed too late to be mid-build: {built:?}"
        );

        let (second, _) = gcp::spawn(env, "cnlb-ccm-2", &[]);
        eventually(
            "every Service has its load balancer and every NEG the pods",
            WAIT,
            || async {
                let mut ready = 0;
                for name in &names {
                    if gcp::ingress_ip(&services, name).await.is_some() {
                        ready += 1;
                    }
                }
                let pods = ccm::pod_targets(client).await;
                let negs = gcp::neg_endpoints(gce).await;
                Ok(ready == SERVICES
                    && pods.len() == 3
                    && negs.len() == SERVICES
                    && negs.values().all(|eps| *eps == pods))
            },
        )
        .await
        .unwrap();
        gce.settle(WAIT).await.unwrap();
        assert_eq!(
            gcp::counts(gce).await,
            [
                SERVICES * zones,
                SERVICES,
                SERVICES,
                SERVICES,
                SERVICES,
                SERVICES,
                SERVICES
            ],
            "one of each part per Service, a NEG per zone"
        );
        // Each Pod is in exactly one NEG per Service: in its own zone's.
        let r = gce.resources().await.unwrap();
        let attached: usize = r
            .network_endpoint_groups
            .iter()
            .map(|n| n.endpoints.len())
            .sum();
        assert_eq!(attached, SERVICES * 3);

        // One Service vanishes without its finalizer while the controller is
        // down: its load balancer is an orphan the next start collects.
        second.kill();
        services
            .patch(
                "svc-0",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": null}})),
            )
            .await
            .unwrap();
        services
            .delete("svc-0", &DeleteParams::default())
            .await
            .unwrap();
        // The others are deleted normally: the finalizer holds them.
        services
            .delete_collection(&DeleteParams::default(), &ListParams::default())
            .await
            .unwrap();
        assert!(
            ccm::our_services(&services).await.unwrap() >= SERVICES - 1,
            "the finalizer holds the Services while the controller is down"
        );
        let _third = gcp::spawn(env, "cnlb-ccm-3", &[]);
        eventually(
            "nothing is left in GCE and the Services are gone",
            WAIT,
            || async {
                let ours = ccm::our_services(&services).await?;
                Ok(gce.resources().await?.load_balancing_links().is_empty() && ours == 0)
            },
        )
        .await
        .unwrap();
    });
}

/// `cnlb-ccm` is SIGKILLed once it has attached the endpoints and recorded
/// them, before GCE's probes decide on them (the first health read waits
/// for the check's first verdict, 20 s): the next one cannot tell whether
/// its predecessor's health polls had ended, so it reads health again and
/// reports every endpoint healthy, although nothing else changed.
#[test]
fn health_undecided_at_a_kill_is_reported_by_the_next_controller() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cluster = gcp::cluster("gcp-health-kill", 2).await;
        let (env, gce, client) = (&cluster.env, &cluster.gce, &cluster.client);
        ccm::create_web(client, 2).await;
        ccm::wait_web_ready(client, 2, WAIT).await;
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        let (first, _) = gcp::spawn(env, "cnlb-ccm-1", &[]);
        services
            .create(&PostParams::default(), &ccm::service("web", json!({})))
            .await
            .unwrap();
        eventually("both endpoints attached and recorded", WAIT, || async {
            let recorded = services
                .get("web")
                .await?
                .annotations()
                .contains_key("cnlb.dev/registered-targets");
            Ok(recorded && gcp::all_endpoints(gce).await.len() == 2)
        })
        .await
        .unwrap();
        first.kill();
        let healthy = || async {
            ccm::condition(client, "web", "cnlb.dev/TargetsHealthy")
                .await
                .is_some_and(|(s, _, m)| s == "True" && m.starts_with("2/2"))
        };
        assert!(!healthy().await, "killed too late: health already reported");

        let _second = gcp::spawn(env, "cnlb-ccm-2", &[]);
        eventually("TargetsHealthy says 2/2", WAIT, || async {
            Ok(healthy().await)
        })
        .await
        .unwrap();
    });
}
