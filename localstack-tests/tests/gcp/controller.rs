//! `cnlb-ccm --provider=gcp` end to end, against the real control plane,
//! real Pods (network namespaces with alias-range IPs from
//! `vpc-ipam-agent --backend gcp`) and the GCE emulator: a LoadBalancer
//! Service becomes a regional proxy Network Load Balancer whose zonal NEGs
//! (created up front in every zone) hold exactly the Pod IPs through
//! scaling; GKE's `cloud.google.com/neg` names the NEGs and
//! `cloud.google.com/neg-status` reports them; bad annotations are reported
//! and build nothing; a port change replaces that port's parts; 403
//! `rateLimitExceeded` is retried; deleting the Service leaves nothing.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::{ccm, gcp};
use cnlb_localstack_tests::eventually;
use k8s_openapi::api::core::v1::{Event, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(90);

async fn endpoints_follow_pods(cluster: &gcp::GcpCluster, n: usize) {
    eventually(
        &format!("the NEG endpoints are the {n} pod IPs"),
        WAIT,
        || async {
            let pods = ccm::pod_targets(&cluster.client).await;
            Ok(pods.len() == n && gcp::all_endpoints(&cluster.gce).await == pods)
        },
    )
    .await
    .unwrap();
}

async fn event_names(client: &Client, service: &str, reason: &str, needle: &str) {
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    eventually(
        &format!("a {reason} event on Service {service} naming {needle}"),
        WAIT,
        || async {
            let list = events
                .list(&ListParams::default().fields(&format!("involvedObject.name={service}")))
                .await?;
            Ok(list.items.iter().any(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.message.as_deref().is_some_and(|m| m.contains(needle))
            }))
        },
    )
    .await
    .unwrap();
}

#[test]
fn load_balancer_service_becomes_a_proxy_nlb_with_zonal_negs_of_pod_ips() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cluster = gcp::cluster("gcp-controller", 3).await;
        let (env, gce, client) = (&cluster.env, &cluster.gce, &cluster.client);
        let (_ccm, metrics) = gcp::spawn(env, "cnlb-ccm", &[]);
        let pp = PostParams::default();
        ccm::create_web(client, 3).await;
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        let neg = json!({"cloud.google.com/neg": r#"{"exposed_ports":{"80":{"name":"web-http"}}}"#,
                         "networking.gke.io/load-balancer-type": "External"});
        services
            .create(&pp, &ccm::service("web", neg))
            .await
            .unwrap();

        // Status carries the forwarding rules' address; everything exists once.
        eventually("status.loadBalancer.ingress has an IP", WAIT, || async {
            Ok(gcp::ingress_ip(&services, "web").await.is_some())
        })
        .await
        .unwrap();
        let ip = gcp::ingress_ip(&services, "web").await.unwrap();
        let r = gce.resources().await.unwrap();
        assert_eq!(r.addresses.len(), 1);
        assert_eq!(r.addresses[0].address.as_deref(), Some(ip.as_str()));
        assert_eq!(r.forwarding_rules.len(), 1);
        assert_eq!(r.forwarding_rules[0].ip_address.as_deref(), Some(ip.as_str()));
        assert_eq!(
            serde_json::to_value(&r.backend_services[0]).unwrap()["loadBalancingScheme"],
            "EXTERNAL_MANAGED"
        );
        // A NEG in every zone up front, named as the annotation asks.
        let zones: BTreeSet<String> = gce.zones().iter().cloned().collect();
        let neg_zones: BTreeSet<String> = r
            .network_endpoint_groups
            .iter()
            .map(|n| {
                assert_eq!(n.network_endpoint_group.name.as_deref(), Some("web-http"));
                let zone = n.network_endpoint_group.zone.clone().unwrap_or_default();
                zone.rsplit('/').next().unwrap().to_string()
            })
            .collect();
        assert_eq!(neg_zones, zones);
        assert_eq!(r.backend_services[0].backends.len(), zones.len());
        let firewall = serde_json::to_value(&r.firewalls[0]).unwrap();
        assert!(firewall["sourceRanges"].to_string().contains("35.191.0.0/16"));
        // GKE's neg-status annotation.
        let svc = services.get("web").await.unwrap();
        let status: serde_json::Value = serde_json::from_str(
            &svc.metadata.annotations.unwrap()["cloud.google.com/neg-status"],
        )
        .unwrap();
        assert_eq!(status["network_endpoint_groups"]["80"], "web-http");
        assert_eq!(status["zones"].as_array().unwrap().len(), zones.len());

        endpoints_follow_pods(&cluster, 3).await;
        ccm::scale(client, 5).await;
        endpoints_follow_pods(&cluster, 5).await;
        ccm::scale(client, 2).await;
        endpoints_follow_pods(&cluster, 2).await;

        // GCE refuses attach calls for a while: the controller backs off and
        // gets there.
        gce.fail_next(Some("networkEndpointGroups.attachNetworkEndpoints"), 3)
            .await
            .unwrap();
        ccm::scale(client, 4).await;
        endpoints_follow_pods(&cluster, 4).await;
        let throttles = common::metric(
            metrics,
            "cnlb_cloud_api_throttles_total",
            &[r#"provider="gcp""#, "attachNetworkEndpoints"],
        )
        .await;
        assert!(throttles >= 3.0, "{throttles} throttled attach calls");

        // Health is polled until GCE's probes decide on every endpoint; from
        // then on, at rest, no call at all.
        eventually("TargetsHealthy says 4/4", WAIT, || async {
            Ok(ccm::condition(client, "web", "cnlb.dev/TargetsHealthy")
                .await
                .is_some_and(|(s, _, m)| s == "True" && m.starts_with("4/4")))
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        gce.reset_calls().await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let calls = gce.calls().await.unwrap();
        assert_eq!(calls.total, 0, "calls at rest: {:?}", calls.methods);

        // Bad annotations: Events and a condition naming the key; nothing built.
        let bad = ccm::service(
            "bad",
            json!({"cloud.google.com/neg": r#"{"exposed_ports":{"81":{}}}"#}),
        );
        services.create(&pp, &bad).await.unwrap();
        event_names(client, "bad", "InvalidAnnotation", "cloud.google.com/neg").await;
        // What GCP cannot build is the provider's error, on the Service too.
        let mut udp = ccm::service("udp", json!({}));
        udp.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].protocol = Some("UDP".into());
        services.create(&pp, &udp).await.unwrap();
        event_names(client, "udp", "SyncLoadBalancerFailed", "UDP").await;
        assert_eq!(gcp::counts(gce).await[2], 1, "one backend service, web's");

        // A new Service port: that port's parts replace the old ones.
        let patch = json!({"metadata": {"annotations": {"cloud.google.com/neg": null}},
                           "spec": {"ports": [{"name": "http", "port": 8000, "targetPort": 8080, "protocol": "TCP"}]}});
        services
            .patch("web", &PatchParams::default(), &Patch::Merge(patch))
            .await
            .unwrap();
        eventually("the NEGs of port 8000 hold the Pods", WAIT, || async {
            let negs = gcp::neg_endpoints(gce).await;
            let pods = ccm::pod_targets(client).await;
            let r = gce.resources().await?;
            Ok(!negs.contains_key("web-http")
                && negs.values().flatten().cloned().collect::<BTreeSet<_>>() == pods
                && r.forwarding_rules.len() == 1
                && r.forwarding_rules[0].port_range.as_deref() == Some("8000"))
        })
        .await
        .unwrap();

        // Deleting the Services deletes everything; the Services go.
        for name in ["web", "bad", "udp"] {
            services
                .delete(name, &DeleteParams::default())
                .await
                .unwrap();
        }
        eventually("nothing is left in GCE", WAIT, || async {
            let left = gce.resources().await?.load_balancing_links();
            Ok(left.is_empty() && services.get_opt("web").await?.is_none())
        })
        .await
        .unwrap();
    });
}
