//! A Service cannot make `cnlb-ccm --provider=gcp` touch Compute resources
//! it does not own. GKE's `cloud.google.com/neg` names the NEGs cnlb
//! creates, fills and deletes, and cnlb's own `cnlb.dev/resource-ids`
//! (which anyone who may edit the Service can write) names NEGs too; the
//! other resources' names are deterministic, so someone else may hold one.
//! A resource whose description is not cnlb's for the Service (made here
//! directly in the emulator) makes the Service report a Conflict (Event and
//! condition) and is the same afterwards, also after the Service is
//! deleted.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::{ccm, gcp};
use cnlb_localstack_tests::Env;
use cnlb_localstack_tests::gce::GceEmulator;
use cnlb_provider_core::LoadBalancerSpec;
use cnlb_provider_gcp::GcpConfig;
use cnlb_provider_gcp::plan::{self, Names};
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use serde_json::{Value, json};

/// How cnlb says a resource is not a Service's.
const NOT_OURS: &str = "not this Service's";

async fn start(name: &str) -> (Env, GceEmulator, kube::Client, GcpConfig) {
    let env = Env::builder(name).kube().gce().start().await.unwrap();
    let gce = env.gce().unwrap();
    let client = env.kube().unwrap().admin_client().unwrap();
    let cfg = GcpConfig {
        project: gce.project().to_string(),
        region: gce.region().to_string(),
        network: gce.network().to_string(),
        subnetwork: gce.subnetwork().to_string(),
        zones: gce.zones().to_vec(),
        proxy_source_ranges: Vec::new(),
    };
    (env, gce, client, cfg)
}

/// Inserts `body` into collection `path` (`zones/<zone>/networkEndpointGroups`,
/// `global/firewalls`, ...) with a description that is not cnlb's, as
/// another team's tooling would.
async fn insert_foreign(gce: &GceEmulator, path: &str, mut body: Value) {
    body["description"] = json!("team payments");
    post(gce, path, &body).await;
}

/// `POST` of `body` to `path` under the project, waiting for its operation.
async fn post(gce: &GceEmulator, path: &str, body: &Value) {
    let url = format!(
        "{}/compute/v1/projects/{}/{path}",
        gce.endpoint(),
        gce.project()
    );
    reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
    gce.settle(Duration::from_secs(10)).await.unwrap();
}

/// What the emulator holds under `names` (any kind, NEGs with their
/// endpoints), for before/after comparisons.
async fn describe(gce: &GceEmulator, names: &[&str]) -> BTreeMap<String, String> {
    let r = gce.resources().await.unwrap();
    let mut out = BTreeMap::new();
    let mut add = |name: &Option<String>, what: String| {
        if let Some(name) = name.as_deref().filter(|n| names.contains(n)) {
            out.insert(format!("{name} {}", out.len()), what);
        }
    };
    for neg in &r.network_endpoint_groups {
        let n = &neg.network_endpoint_group;
        add(&n.name, format!("{:?} {:?}", n, neg.endpoints));
    }
    for hc in &r.health_checks {
        add(&hc.name, format!("{hc:?}"));
    }
    for fw in &r.firewalls {
        add(&fw.name, format!("{fw:?}"));
    }
    for a in &r.addresses {
        add(&a.name, format!("{a:?}"));
    }
    out
}

#[test]
fn negs_named_by_annotations_that_are_not_cnlbs_are_refused_and_left_alone() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (env, gce, client, cfg) = start("gcp-foreign-negs").await;
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        let zone = gce.zones()[0].clone();

        // The team's NEG in the first zone, with an endpoint on its VM.
        let spec = ccm::cluster_ip_service(&services, "by-neg-annotation").await;
        let neg = plan::neg(&spec, &cfg, &spec.listeners[0], "payments");
        let negs = format!("zones/{zone}/networkEndpointGroups");
        insert_foreign(&gce, &negs, neg).await;
        gce.seed_instance(&zone, "payments-vm", "10.0.9.9".parse().unwrap())
            .await
            .unwrap();
        let attach = json!({"networkEndpoints": [
            {"ipAddress": "10.0.9.9", "port": 8080, "instance": "payments-vm"},
        ]});
        post(
            &gce,
            &format!("{negs}/payments/attachNetworkEndpoints"),
            &attach,
        )
        .await;
        let before = describe(&gce, &["payments"]).await;
        assert_eq!(before.len(), 1, "{before:?}");
        let (_ccm, _) = gcp::spawn(&env, "cnlb-ccm", &[]);

        // GKE's annotation asks for NEG "payments" on port 80: cnlb would
        // attach the Service's Pods to it and delete it with the Service.
        let by_name = json!({"exposed_ports": {"80": {"name": "payments"}}});
        ccm::make_load_balancer(
            &services,
            "by-neg-annotation",
            json!({"cloud.google.com/neg": by_name.to_string()}),
        )
        .await;
        // cnlb's IDs naming it as the NEG of port 80: cnlb would delete it
        // as one it has replaced by the default NEG.
        let ids = json!({"neg/80": "payments", "listener/80": "http", "zones": zone}).to_string();
        ccm::cluster_ip_service(&services, "by-ids").await;
        ccm::make_load_balancer(&services, "by-ids", json!({"cnlb.dev/resource-ids": ids})).await;
        // The same IDs with the spec they were "last applied" with and a
        // bad annotation: cnlb skips the ensure and brings the NEG's
        // endpoints to the Service's (none): the team's VM would go.
        let spec = ccm::cluster_ip_service(&services, "by-ids-sync").await;
        ccm::make_load_balancer(
            &services,
            "by-ids-sync",
            json!({
                "cnlb.dev/resource-ids": ids,
                "cnlb.dev/applied-spec": serde_json::to_string(&spec).unwrap(),
                "networking.gke.io/load-balancer-type": "Bogus",
            }),
        )
        .await;

        for name in ["by-neg-annotation", "by-ids", "by-ids-sync"] {
            ccm::wait_conflict(&client, name, "payments", NOT_OURS).await;
        }
        assert_eq!(describe(&gce, &["payments"]).await, before);

        ccm::delete_services(&services, &["by-neg-annotation", "by-ids", "by-ids-sync"]).await;
        assert_eq!(describe(&gce, &["payments"]).await, before);
    });
}

#[test]
fn a_foreign_resource_with_cnlbs_name_is_a_conflict_and_survives_the_service() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (env, gce, client, cfg) = start("gcp-foreign-names").await;
        let services: Api<Service> = Api::namespaced(client.clone(), "default");

        // Before cnlb sees the Services as LoadBalancers, someone else
        // takes the name cnlb would give each one's address, health check
        // and firewall rule.
        let region = format!("regions/{}", cfg.region);
        let spec = |s: LoadBalancerSpec| (Names::of(&s.key), s);
        let (names, s) = spec(ccm::cluster_ip_service(&services, "address-taken").await);
        let address = names.address.clone();
        insert_foreign(
            &gce,
            &format!("{region}/addresses"),
            plan::address(&s, &cfg, &names),
        )
        .await;
        let (names, s) = spec(ccm::cluster_ip_service(&services, "hc-taken").await);
        let health_check = names.health_check.clone();
        insert_foreign(
            &gce,
            &format!("{region}/healthChecks"),
            plan::health_check(&s, &names),
        )
        .await;
        let (names, s) = spec(ccm::cluster_ip_service(&services, "fw-taken").await);
        let firewall = names.firewall.clone();
        insert_foreign(&gce, "global/firewalls", plan::firewall(&s, &cfg, &names)).await;
        let taken = [address.as_str(), health_check.as_str(), firewall.as_str()];
        let before = describe(&gce, &taken).await;
        assert_eq!(before.len(), 3, "{before:?}");
        let (_ccm, _) = gcp::spawn(&env, "cnlb-ccm", &[]);
        for name in ["address-taken", "hc-taken", "fw-taken"] {
            ccm::make_load_balancer(&services, name, json!({})).await;
        }

        ccm::wait_conflict(&client, "address-taken", &address, NOT_OURS).await;
        ccm::wait_conflict(&client, "hc-taken", &health_check, NOT_OURS).await;
        ccm::wait_conflict(&client, "fw-taken", &firewall, NOT_OURS).await;
        assert_eq!(describe(&gce, &taken).await, before);

        ccm::delete_services(&services, &["address-taken", "hc-taken", "fw-taken"]).await;
        assert_eq!(describe(&gce, &taken).await, before);
    });
}
