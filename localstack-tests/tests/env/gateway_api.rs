//! The Gateway API CRDs of the pinned module install on the real API
//! server, and cnlb's types (generated from them, `gateway-api/`) write
//! and read each kind cnlb serves: the API server fills in the CRDs'
//! defaults, applies their validation rules and keeps status.

#![allow(clippy::unwrap_used)] // helpers of tests: a failed call fails the test

use cnlb_gateway_api::gatewayclasses::{GatewayClassStatus, GatewayClassStatusSupportedFeatures};
use cnlb_gateway_api::gateways::GatewayListenersAllowedRoutesNamespacesFrom;
use cnlb_gateway_api::{Gateway, GatewayClass, ReferenceGrant, TcpRoute, TlsRoute, UdpRoute};
use cnlb_localstack_tests::{Env, gateway_api};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

fn from<T: DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).unwrap()
}

#[tokio::test]
async fn the_pinned_crds_install_and_each_kind_round_trips() {
    let env = Env::builder("gateway-api").kube().start().await.unwrap();
    let client = env.kube().unwrap().admin_client().unwrap();
    gateway_api::install_crds(&client).await.unwrap();
    let pp = PostParams::default();

    let classes: Api<GatewayClass> = Api::all(client.clone());
    let class: GatewayClass = from(json!({
        "metadata": {"name": "cnlb-onprem"},
        "spec": {"controllerName": "cnlb.dev/onprem"},
    }));
    classes.create(&pp, &class).await.unwrap();
    // Status is a subresource, written as a controller writes it.
    let status = GatewayClassStatus {
        conditions: Some(vec![Condition {
            type_: "Accepted".into(),
            status: "True".into(),
            reason: "Accepted".into(),
            message: String::new(),
            observed_generation: Some(1),
            // The API server keeps whole seconds.
            last_transition_time: Time(
                Timestamp::from_second(Timestamp::now().as_second()).unwrap(),
            ),
        }]),
        supported_features: Some(vec![GatewayClassStatusSupportedFeatures {
            name: "Gateway".into(),
        }]),
    };
    classes
        .patch_status(
            "cnlb-onprem",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await
        .unwrap();
    let got = classes.get("cnlb-onprem").await.unwrap();
    assert_eq!(got.spec.controller_name, "cnlb.dev/onprem");
    assert_eq!(got.status, Some(status));

    let gateways: Api<Gateway> = Api::namespaced(client.clone(), "default");
    let listeners = json!([
        {"name": "tcp", "port": 80, "protocol": "TCP"},
        {"name": "dns", "port": 53, "protocol": "UDP"},
        {"name": "tls", "port": 443, "protocol": "TLS", "hostname": "a.example.com",
         "tls": {"mode": "Passthrough"}},
    ]);
    let gateway: Gateway = from(json!({
        "metadata": {"name": "edge"},
        "spec": {"gatewayClassName": "cnlb-onprem", "listeners": listeners},
    }));
    let created = gateways.create(&pp, &gateway).await.unwrap();
    // The CRD's defaults: routes from the Gateway's namespace only.
    let from_ns = created.spec.listeners[0]
        .allowed_routes
        .as_ref()
        .and_then(|a| a.namespaces.as_ref())
        .and_then(|n| n.from.clone());
    assert_eq!(
        from_ns,
        Some(GatewayListenersAllowedRoutesNamespacesFrom::Same)
    );
    // The CRD's validation: listener names are unique.
    let twice: Gateway = from(json!({
        "metadata": {"name": "twice"},
        "spec": {"gatewayClassName": "cnlb-onprem", "listeners": [
            {"name": "tcp", "port": 80, "protocol": "TCP"},
            {"name": "tcp", "port": 81, "protocol": "TCP"},
        ]},
    }));
    let err = gateways.create(&pp, &twice).await.unwrap_err().to_string();
    assert!(err.contains("name must be unique"), "{err}");

    let parent = json!([{"name": "edge", "sectionName": "tcp"}]);
    let backend = json!([{"name": "web", "port": 8080, "weight": 1}]);
    let tcp: TcpRoute = from(json!({
        "metadata": {"name": "web"},
        "spec": {"parentRefs": parent, "rules": [{"backendRefs": backend}]},
    }));
    let tcp = Api::<TcpRoute>::namespaced(client.clone(), "default")
        .create(&pp, &tcp)
        .await
        .unwrap();
    let backend_ref = &tcp.spec.rules[0].backend_refs[0];
    assert_eq!(
        (backend_ref.name.as_str(), backend_ref.port),
        ("web", Some(8080))
    );
    // A Service backend needs its port.
    let portless: TcpRoute = from(json!({
        "metadata": {"name": "portless"},
        "spec": {"parentRefs": parent, "rules": [{"backendRefs": [{"name": "web"}]}]},
    }));
    let err = Api::<TcpRoute>::namespaced(client.clone(), "default")
        .create(&pp, &portless)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("port"), "{err}");

    let udp: UdpRoute = from(json!({
        "metadata": {"name": "dns"},
        "spec": {"parentRefs": [{"name": "edge", "sectionName": "dns"}],
                 "rules": [{"backendRefs": [{"name": "dns", "port": 53}]}]},
    }));
    Api::<UdpRoute>::namespaced(client.clone(), "default")
        .create(&pp, &udp)
        .await
        .unwrap();
    let tls: TlsRoute = from(json!({
        "metadata": {"name": "a"},
        "spec": {"parentRefs": [{"name": "edge", "sectionName": "tls"}],
                 "hostnames": ["a.example.com"],
                 "rules": [{"backendRefs": [{"name": "a", "port": 8443}]}]},
    }));
    let tls = Api::<TlsRoute>::namespaced(client.clone(), "default")
        .create(&pp, &tls)
        .await
        .unwrap();
    assert_eq!(tls.spec.hostnames, vec!["a.example.com".to_string()]);
    let grant: ReferenceGrant = from(json!({
        "metadata": {"name": "from-edge", "namespace": "kube-system"},
        "spec": {
            "from": [{"group": "gateway.networking.k8s.io", "kind": "TCPRoute", "namespace": "default"}],
            "to": [{"group": "", "kind": "Service"}],
        },
    }));
    let grant = Api::<ReferenceGrant>::namespaced(client.clone(), "kube-system")
        .create(&pp, &grant)
        .await
        .unwrap();
    assert_eq!(grant.spec.to[0].kind, "Service");
}
