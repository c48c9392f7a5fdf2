//! The middle tier: the Service controller's reconcile logic against a real
//! API server and the in-memory provider of `providers/core` (no cloud
//! emulator, no Nodes). The test writes EndpointSlices and Pod statuses
//! itself, so it controls their order exactly: an endpoint that appears
//! before its Pod's containers are ready, a bad annotation during a scale,
//! a Service deleted under gated Pods. Each of these was a defect; the
//! integration tests on real Nodes check the same outcomes with a real
//! kubelet's timing.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use cnlb_ccm::conditions::{LOAD_BALANCER_READY, TARGETS_HEALTHY};
use cnlb_ccm::service::{ControllerMetrics, Settings};
use cnlb_localstack_tests::{Env, eventually};
use cnlb_provider_core::TargetHealthState;
use cnlb_provider_core::fake::Fake;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

const CLASS: &str = "cnlb.dev/nlb";
const GATE: &str = "cnlb.dev/load-balancer-ready";
const WAIT: Duration = Duration::from_secs(30);

struct Harness {
    client: Client,
    fake: Arc<Fake>,
    controller: tokio::task::JoinHandle<()>,
    _env: Env,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.controller.abort();
    }
}

async fn start(name: &str) -> Harness {
    // The controller's warnings, in the test's output when it fails
    // (TEST_LOG="info,cnlb_ccm=debug,kube_runtime=debug" for more).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("TEST_LOG").unwrap_or("warn,kube_client=off".into()))
        .with_test_writer()
        .try_init();
    let env = Env::builder(name).kube().start().await.unwrap();
    let client = env.kube().unwrap().admin_client().unwrap();
    let fake = Arc::new(Fake::default());
    let metrics =
        ControllerMetrics::register(&mut prometheus_client::registry::Registry::default());
    let settings = Settings {
        cluster: "test".into(),
        class: CLASS.into(),
        manage_unclassed: false,
        manage_lbc_annotated: false,
        concurrency: 4,
    };
    let (caches, watching) = cnlb_ccm::service::watch(client.clone(), metrics.clone());
    let run = cnlb_ccm::service::run(
        client.clone(),
        fake.clone(),
        settings,
        caches,
        metrics,
        Arc::default(),
    );
    let controller = tokio::spawn(async move {
        futures::join!(watching, run);
    });
    Harness {
        client,
        fake,
        controller,
        _env: env,
    }
}

/// A LoadBalancer Service of class cnlb.dev/nlb without a selector (so the
/// test writes its EndpointSlice), port 80 -> 8080 named http.
async fn create_service(client: &Client, name: &str, annotations: Value) -> Service {
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "type": "LoadBalancer", "loadBalancerClass": CLASS,
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
        },
    }))
    .unwrap();
    Api::<Service>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &svc)
        .await
        .unwrap()
}

/// A Pod named `name` with the readiness gate, given `ip` and the
/// condition ContainersReady = `ready`, as a kubelet would report it.
async fn create_gated_pod(client: &Client, name: &str, ip: &str, ready: bool) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "readinessGates": [{"conditionType": GATE}],
            "containers": [{"name": "web", "image": "none"}],
        },
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    set_containers_ready(client, name, ip, ready).await;
}

async fn set_containers_ready(client: &Client, name: &str, ip: &str, ready: bool) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let status = if ready { "True" } else { "False" };
    let patch = json!({"status": {
        "podIP": ip, "podIPs": [{"ip": ip}], "phase": "Running",
        "conditions": [{"type": "ContainersReady", "status": status}],
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .unwrap();
}

/// Writes the Service's one EndpointSlice: `(ip, pod name, ready)` each.
async fn set_endpoints(client: &Client, service: &str, endpoints: &[(&str, &str, bool)]) {
    let eps: Vec<Value> = endpoints
        .iter()
        .map(|(ip, pod, ready)| {
            json!({
                "addresses": [ip],
                "conditions": {"ready": ready, "serving": ready, "terminating": false},
                "targetRef": {"kind": "Pod", "namespace": "default", "name": pod},
            })
        })
        .collect();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {
            "name": format!("{service}-test"),
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "cnlb-test",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps,
    }))
    .unwrap();
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    api.patch(
        &format!("{service}-test"),
        &PatchParams::apply("cnlb-test").force(),
        &Patch::Apply(slice),
    )
    .await
    .unwrap();
}

async fn uid(client: &Client, name: &str) -> String {
    Api::<Service>::namespaced(client.clone(), "default")
        .get(name)
        .await
        .unwrap()
        .uid()
        .unwrap()
}

/// `ip:port` registered in the fake's load balancer of Service `name`.
async fn targets(h: &Harness, name: &str) -> BTreeSet<String> {
    let uid = uid(&h.client, name).await;
    h.fake
        .load_balancer(&uid)
        .map(|lb| {
            lb.targets
                .values()
                .flatten()
                .map(|t| format!("{}:{}", t.ip, t.port))
                .collect()
        })
        .unwrap_or_default()
}

async fn wait_targets(h: &Harness, name: &str, want: &[&str]) {
    let want: BTreeSet<String> = want.iter().map(|ip| format!("{ip}:8080")).collect();
    eventually(&format!("targets of {name} are {want:?}"), WAIT, || async {
        Ok(targets(h, name).await == want)
    })
    .await
    .unwrap();
}

async fn gate_open(client: &Client, pod: &str) -> bool {
    let pod = Api::<Pod>::namespaced(client.clone(), "default")
        .get(pod)
        .await
        .unwrap();
    pod.status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == GATE && c.status == "True")
}

async fn condition(
    client: &Client,
    service: &str,
    type_: &str,
) -> Option<(String, String, String)> {
    let svc = Api::<Service>::namespaced(client.clone(), "default")
        .get(service)
        .await
        .unwrap();
    svc.status?
        .conditions?
        .into_iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status, c.reason, c.message))
}

/// Warning Events about Service `name`: (reason, note).
async fn warnings(client: &Client, name: &str) -> Vec<(String, String)> {
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter(|e| e.type_.as_deref() == Some("Warning"))
        .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect()
}

/// Defect 1: a Pod's endpoint appears while its containers are not ready
/// (as with any readiness probe); later they become ready, and nothing in
/// the EndpointSlice changes. The Pod change alone gets the target
/// registered and the gate opened.
#[tokio::test]
async fn a_pod_whose_containers_become_ready_later_is_registered_and_its_gate_opens() {
    let h = start("svc-gate-later").await;
    create_service(&h.client, "web", json!({})).await;
    create_gated_pod(&h.client, "web-1", "10.1.0.1", false).await;
    set_endpoints(&h.client, "web", &[("10.1.0.1", "web-1", false)]).await;
    eventually("the load balancer exists", WAIT, || async {
        Ok(h.fake.count() == 1)
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        targets(&h, "web").await.is_empty(),
        "not ready: not registered"
    );
    assert!(!gate_open(&h.client, "web-1").await);

    set_containers_ready(&h.client, "web-1", "10.1.0.1", true).await;
    wait_targets(&h, "web", &["10.1.0.1"]).await;
    eventually("the gate opens", WAIT, || async {
        Ok(gate_open(&h.client, "web-1").await)
    })
    .await
    .unwrap();
}

/// Defect 2: a bad annotation on a working Service keeps its load balancer,
/// and its targets keep following the endpoints, up and down.
#[tokio::test]
async fn targets_follow_the_endpoints_while_an_annotation_is_invalid() {
    let h = start("svc-invalid-scale").await;
    create_service(&h.client, "web", json!({})).await;
    set_endpoints(
        &h.client,
        "web",
        &[("10.1.0.1", "a", true), ("10.1.0.2", "b", true)],
    )
    .await;
    wait_targets(&h, "web", &["10.1.0.1", "10.1.0.2"]).await;
    let ensures = h.fake.calls()["ensure_load_balancer"];

    let services: Api<Service> = Api::namespaced(h.client.clone(), "default");
    let bad = json!({"metadata": {"annotations": {
        "service.beta.kubernetes.io/aws-load-balancer-scheme": "sideways",
    }}});
    services
        .patch("web", &PatchParams::default(), &Patch::Merge(bad))
        .await
        .unwrap();
    eventually("the condition names the bad key", WAIT, || async {
        Ok(condition(&h.client, "web", LOAD_BALANCER_READY)
            .await
            .is_some_and(|(s, r, m)| {
                s == "False" && r == "InvalidAnnotation" && m.contains("scheme")
            }))
    })
    .await
    .unwrap();
    // Scale up, then down.
    set_endpoints(
        &h.client,
        "web",
        &[
            ("10.1.0.1", "a", true),
            ("10.1.0.2", "b", true),
            ("10.1.0.3", "c", true),
        ],
    )
    .await;
    wait_targets(&h, "web", &["10.1.0.1", "10.1.0.2", "10.1.0.3"]).await;
    set_endpoints(&h.client, "web", &[("10.1.0.3", "c", true)]).await;
    wait_targets(&h, "web", &["10.1.0.3"]).await;
    assert_eq!(h.fake.count(), 1, "the load balancer is kept");
    assert_eq!(
        h.fake.calls()["ensure_load_balancer"],
        ensures,
        "its shape waits for a valid spec"
    );
}

/// Defect 3: Pods that declare the gate become Ready when cnlb stops
/// managing their Service: deleted, or no longer a LoadBalancer of its
/// class (`loadBalancerClass` is immutable: it changes with the type).
#[tokio::test]
async fn gates_are_released_when_the_service_is_deleted_or_changes_class() {
    let h = start("svc-release").await;
    // Never healthy: only a release can open the gates.
    h.fake.set_health(TargetHealthState::Unhealthy);
    for (svc, pod, ip) in [("deleted", "p-1", "10.1.0.1"), ("moved", "p-2", "10.1.0.2")] {
        create_service(&h.client, svc, json!({})).await;
        create_gated_pod(&h.client, pod, ip, true).await;
        set_endpoints(&h.client, svc, &[(ip, pod, false)]).await;
        wait_targets(&h, svc, &[ip]).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!gate_open(&h.client, "p-1").await && !gate_open(&h.client, "p-2").await);

    let services: Api<Service> = Api::namespaced(h.client.clone(), "default");
    services
        .delete("deleted", &DeleteParams::default())
        .await
        .unwrap();
    let other = json!({"spec": {"loadBalancerClass": null, "type": "ClusterIP"}});
    services
        .patch("moved", &PatchParams::default(), &Patch::Merge(other))
        .await
        .unwrap();
    for pod in ["p-1", "p-2"] {
        eventually(&format!("{pod}'s gate is released"), WAIT, || async {
            Ok(gate_open(&h.client, pod).await)
        })
        .await
        .unwrap();
    }
    eventually("both load balancers are gone", WAIT, || async {
        Ok(h.fake.count() == 0)
    })
    .await
    .unwrap();
}

/// Defect 4: two bad keys give two Warning Events, each naming its key; a
/// change that leaves them bad (an endpoint) sends no Event again.
#[tokio::test]
async fn every_bad_key_gets_its_own_event_once() {
    let h = start("svc-events").await;
    create_service(
        &h.client,
        "web",
        json!({
            "service.beta.kubernetes.io/aws-load-balancer-scheme": "sideways",
            "service.beta.kubernetes.io/aws-load-balancer-healthcheck-interval": "often",
        }),
    )
    .await;
    eventually("two InvalidAnnotation Events", WAIT, || async {
        let w = warnings(&h.client, "web").await;
        Ok(w.iter().filter(|(r, _)| r == "InvalidAnnotation").count() == 2)
    })
    .await
    .unwrap();
    let w = warnings(&h.client, "web").await;
    assert!(
        w.iter()
            .any(|(_, n)| n.contains("aws-load-balancer-scheme")),
        "{w:?}"
    );
    assert!(
        w.iter().any(|(_, n)| n.contains("healthcheck-interval")),
        "{w:?}"
    );

    set_endpoints(&h.client, "web", &[("10.1.0.1", "a", true)]).await;
    set_endpoints(&h.client, "web", &[("10.1.0.2", "b", true)]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        warnings(&h.client, "web").await.len(),
        2,
        "no Event repeated"
    );
}

/// Defect 5: the status is server-side applied under cnlb's field manager:
/// another writer's condition stays, lastTransitionTime moves only when a
/// status changes, and TargetsHealthy says whether traffic can flow.
#[tokio::test]
async fn status_keeps_other_conditions_and_tells_whether_traffic_flows() {
    let h = start("svc-status").await;
    h.fake.set_health(TargetHealthState::Initial);
    create_service(&h.client, "web", json!({})).await;
    let services: Api<Service> = Api::namespaced(h.client.clone(), "default");
    let theirs = json!({
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
    set_endpoints(
        &h.client,
        "web",
        &[("10.1.0.1", "a", true), ("10.1.0.2", "b", true)],
    )
    .await;
    eventually("targets are registered, not healthy yet", WAIT, || async {
        Ok(condition(&h.client, "web", TARGETS_HEALTHY)
            .await
            .is_some_and(|(s, _, m)| s == "False" && m == "0/2 healthy on 80/TCP"))
    })
    .await
    .unwrap();
    let ready_at = |svc: Service| {
        svc.status
            .unwrap()
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == LOAD_BALANCER_READY)
            .unwrap()
            .last_transition_time
    };
    let first = ready_at(services.get("web").await.unwrap());

    h.fake.set_health(TargetHealthState::Healthy);
    eventually("TargetsHealthy turns True", WAIT, || async {
        Ok(condition(&h.client, "web", TARGETS_HEALTHY)
            .await
            .is_some_and(|(s, r, m)| {
                s == "True" && r == "AllHealthy" && m == "2/2 healthy on 80/TCP"
            }))
    })
    .await
    .unwrap();
    let svc = services.get("web").await.unwrap();
    assert_eq!(
        ready_at(svc.clone()),
        first,
        "LoadBalancerReady did not change"
    );
    let conditions = svc.status.unwrap().conditions.unwrap();
    assert!(
        conditions.iter().any(|c| c.type_ == "example.com/Audited"),
        "another writer's condition is kept: {conditions:?}"
    );
    assert!(
        svc.metadata
            .managed_fields
            .unwrap_or_default()
            .iter()
            .any(|m| m.manager.as_deref() == Some("cnlb-ccm")
                && m.operation.as_deref() == Some("Apply")),
        "written by server-side apply"
    );
}
