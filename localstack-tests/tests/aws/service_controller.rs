//! The Service controller on real Nodes with moto: each test is one defect
//! a user saw before, now fixed (the middle tier, `env/service_controller.rs`,
//! checks the same rules with an in-memory cloud).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crate::common::ccm;
use cnlb_localstack_tests::eventually;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

const GATE: &str = "cnlb.dev/load-balancer-ready";
const WAIT: Duration = Duration::from_secs(90);
const LBC: &str = "service.beta.kubernetes.io/aws-load-balancer-";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn create(client: &Client, svc: Service) {
    Api::<Service>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &svc)
        .await
        .unwrap();
}

/// A bad annotation on a working Service: the NLB stays, and its targets
/// keep following the Pods through a scale up and a scale down.
#[test]
fn targets_keep_following_the_pods_while_an_annotation_is_invalid() {
    runtime().block_on(async {
        let cluster = ccm::cluster("aws-invalid-scale", 2).await;
        let (env, aws, net) = (&cluster.env, &cluster.aws, &cluster.net);
        let _ccm = ccm::spawn(env, &net.vpc, "cnlb-ccm");
        let client = cluster.client.clone();
        ccm::create_web(&client, 2).await;
        create(&client, ccm::service("web", json!({}))).await;
        let follows = |n: usize| {
            let client = client.clone();
            async move {
                eventually(
                    &format!("the NLB's targets are the {n} Pods"),
                    WAIT,
                    || async {
                        let pods = ccm::pod_targets(&client).await;
                        Ok(pods.len() == n && ccm::all_targets(aws).await == pods)
                    },
                )
                .await
                .unwrap();
            }
        };
        follows(2).await;

        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        let bad = json!({"metadata": {"annotations": {format!("{LBC}scheme"): "sideways"}}});
        services
            .patch("web", &PatchParams::default(), &Patch::Merge(bad))
            .await
            .unwrap();
        eventually("the condition names the bad key", WAIT, || async {
            Ok(ccm::condition(&client, "web", "cnlb.dev/LoadBalancerReady")
                .await
                .is_some_and(|(s, _, m)| s == "False" && m.contains("scheme")))
        })
        .await
        .unwrap();
        ccm::scale(&client, 4).await;
        follows(4).await;
        ccm::scale(&client, 1).await;
        follows(1).await;
        assert_eq!(ccm::counts(aws).await, (1, 1), "one NLB, one target group");
    });
}

/// Gated Pods whose containers never become ready (their probe checks a
/// closed port) wait for a gate only cnlb can open; when it stops managing
/// their Service (deleted, or no longer a LoadBalancer) it opens them.
#[test]
fn gates_are_released_when_the_service_is_deleted_or_its_type_changes() {
    runtime().block_on(async {
        let cluster = ccm::cluster("aws-release", 2).await;
        let (env, net) = (&cluster.env, &cluster.net);
        let _ccm = ccm::spawn(env, &net.vpc, "cnlb-ccm");
        let client = cluster.client.clone();
        for app in ["deleted", "moved"] {
            let mut web = ccm::web(1, Some(GATE));
            web["metadata"]["name"] = json!(app);
            web["spec"]["selector"]["matchLabels"]["app"] = json!(app);
            web["spec"]["template"]["metadata"]["labels"]["app"] = json!(app);
            web["spec"]["template"]["spec"]["containers"][0]["readinessProbe"] =
                json!({"tcpSocket": {"port": 9999}, "periodSeconds": 1});
            ccm::create_deployment(&client, web).await;
            let mut svc = ccm::service(app, json!({}));
            svc.spec.as_mut().unwrap().selector =
                Some([("app".to_string(), app.to_string())].into());
            create(&client, svc).await;
        }
        let gate = |app: &'static str| {
            let client = client.clone();
            async move {
                let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client, "default")
                    .list(&ListParams::default().labels(&format!("app={app}")))
                    .await
                    .unwrap()
                    .items;
                pods.len() == 1 && pods.iter().all(|p| ccm::pod_condition(p, GATE))
            }
        };
        eventually("both load balancers exist", WAIT, || async {
            Ok(
                ccm::hostname(&Api::namespaced(client.clone(), "default"), "deleted")
                    .await
                    .is_some()
                    && ccm::hostname(&Api::namespaced(client.clone(), "default"), "moved")
                        .await
                        .is_some(),
            )
        })
        .await
        .unwrap();
        // Each Pod is an endpoint (not ready) of its Service: gated by it.
        let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
            Api::namespaced(client.clone(), "default");
        eventually("both Pods are endpoints", WAIT, || async {
            let list = slices.list(&ListParams::default()).await?.items;
            let endpoints = list
                .iter()
                .flat_map(|s| s.endpoints.iter().flatten())
                .filter(|ep| ep.target_ref.is_some())
                .count();
            Ok(endpoints == 2)
        })
        .await
        .unwrap();
        assert!(!gate("deleted").await && !gate("moved").await);

        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        services
            .delete("deleted", &DeleteParams::default())
            .await
            .unwrap();
        let cluster_ip = json!({"spec": {"type": "ClusterIP", "loadBalancerClass": null}});
        services
            .patch("moved", &PatchParams::default(), &Patch::Merge(cluster_ip))
            .await
            .unwrap();
        for app in ["deleted", "moved"] {
            eventually(
                &format!("the gate of {app}'s Pod is released"),
                WAIT,
                || async { Ok(gate(app).await) },
            )
            .await
            .unwrap();
        }
    });
}

/// Two bad keys give two Warning Events, each naming its key, once: the
/// Pods' endpoints changing later sends none again.
#[test]
fn each_bad_annotation_gets_its_own_warning_once() {
    runtime().block_on(async {
        let cluster = ccm::cluster("aws-events", 1).await;
        let (env, net) = (&cluster.env, &cluster.net);
        let _ccm = ccm::spawn(env, &net.vpc, "cnlb-ccm");
        let client = cluster.client.clone();
        ccm::create_web(&client, 1).await;
        create(
            &client,
            ccm::service(
                "web",
                json!({
                    format!("{LBC}scheme"): "sideways",
                    format!("{LBC}healthcheck-interval"): "often",
                }),
            ),
        )
        .await;
        let events: Api<Event> = Api::namespaced(client.clone(), "default");
        let warnings = || async {
            events
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .into_iter()
                .filter(|e| e.type_.as_deref() == Some("Warning"))
                // Only the Service's: the kubelet warns about its Pods.
                .filter(|e| e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("Service"))
                .filter_map(|e| e.note)
                .collect::<Vec<String>>()
        };
        eventually("two Warning Events", WAIT, || async {
            Ok(warnings().await.len() == 2)
        })
        .await
        .unwrap();
        let notes = warnings().await;
        assert!(
            notes.iter().any(|n| n.contains(&format!("{LBC}scheme"))),
            "{notes:?}"
        );
        assert!(
            notes
                .iter()
                .any(|n| n.contains(&format!("{LBC}healthcheck-interval"))),
            "{notes:?}"
        );
        ccm::scale(&client, 3).await;
        eventually("3 Pods serve", WAIT, || async {
            Ok(ccm::ready_endpoints(&client).await.len() == 3)
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(warnings().await.len(), 2, "no Warning repeated");
    });
}

/// The status is server-side applied: another writer's condition stays,
/// and TargetsHealthy says the targets are registered and healthy.
#[test]
fn status_is_applied_beside_other_writers_and_says_traffic_flows() {
    runtime().block_on(async {
        let cluster = ccm::cluster("aws-status", 1).await;
        let (env, net) = (&cluster.env, &cluster.net);
        let _ccm = ccm::spawn(env, &net.vpc, "cnlb-ccm");
        let client = cluster.client.clone();
        ccm::create_web(&client, 2).await;
        create(&client, ccm::service("web", json!({}))).await;
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        let theirs: Value = json!({
            "apiVersion": "v1", "kind": "Service",
            "status": {"conditions": [{
                "type": "example.com/Audited", "status": "True", "reason": "Checked",
                "message": "by someone else", "lastTransitionTime": "2025-01-01T00:00:00Z",
            }]},
        });
        services
            .patch_status(
                "web",
                &PatchParams::apply("someone-else"),
                &Patch::Apply(theirs),
            )
            .await
            .unwrap();
        eventually("TargetsHealthy says 2/2", WAIT, || async {
            Ok(ccm::condition(&client, "web", "cnlb.dev/TargetsHealthy")
                .await
                .is_some_and(|(s, _, m)| s == "True" && m == "2/2 healthy on 80/TCP"))
        })
        .await
        .unwrap();
        assert!(
            ccm::condition(&client, "web", "example.com/Audited")
                .await
                .is_some(),
            "another writer's condition is kept"
        );
        assert!(
            ccm::condition(&client, "web", "cnlb.dev/LoadBalancerReady")
                .await
                .is_some_and(|(s, _, _)| s == "True")
        );
    });
}
