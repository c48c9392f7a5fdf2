//! The control plane is real: controllers turn a Deployment into Pods,
//! kube-scheduler binds them to the real Nodes, whose kubelets run them and
//! report them Ready, the EndpointSlice controller publishes their IPs;
//! RBAC refuses a ServiceAccount outside its role.

#![allow(clippy::unwrap_used)] // helpers of tests: a failed call fails the test

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use cnlb_localstack_tests::{Env, NodeConfig, eventually, sample_app};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

async fn pod_ips(client: &Client) -> BTreeSet<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let list = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap();
    list.items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
        .collect()
}

async fn scale(client: &Client, replicas: i32) {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let patch = json!({"spec": {"replicas": replicas}});
    deployments
        .patch("web", &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
}

/// Waits until the ready endpoints are exactly the IPs of `n` live pods, on our nodes.
async fn endpoints_follow_pods(client: &Client, nodes: &[NodeConfig], n: usize) {
    eventually(
        &format!("{n} ready endpoints carrying the pod IPs"),
        WAIT,
        || async {
            let ips = pod_ips(client).await;
            let eps = common::ccm::ready_endpoints(client).await;
            let ep_ips: BTreeSet<String> = eps.iter().map(|(ip, _, _)| ip.clone()).collect();
            let placed = eps
                .iter()
                .all(|(_, node, zone)| nodes.iter().any(|c| &c.name == node && &c.zone == zone));
            Ok(ips.len() == n && ep_ips == ips && placed)
        },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn deployment_and_service_give_endpoint_slices_with_pod_ips() {
    let nodes = vec![NodeConfig::numbered(1), NodeConfig::numbered(2)];
    let env = Env::builder("endpointslices")
        .nodes(nodes.clone())
        .start()
        .await
        .unwrap();
    let client = env.kube().unwrap().admin_client().unwrap();

    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [sample_app::container("web", &[8080])]},
            },
        },
    }))
    .unwrap();
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }))
    .unwrap();
    let pp = PostParams::default();
    Api::<Deployment>::namespaced(client.clone(), "default")
        .create(&pp, &deployment)
        .await
        .unwrap();
    Api::<Service>::namespaced(client.clone(), "default")
        .create(&pp, &service)
        .await
        .unwrap();

    endpoints_follow_pods(&client, &nodes, 3).await;
    let ips = pod_ips(&client).await;
    let prefix = env.pod_cidr().unwrap().replace(".0.0/16", ".");
    assert!(
        ips.iter().all(|ip| ip.starts_with(&prefix)),
        "pod IPs from the environment's Pod CIDR {prefix}*: {ips:?}"
    );
    // Real containers answer on their IPs.
    for ip in &ips {
        let addr = std::net::SocketAddr::new(ip.parse().unwrap(), 8080);
        let body = cnlb_localstack_tests::onprem::get_body(addr).await.unwrap();
        assert!(body.ends_with(&format!(" {ip}")), "{ip} answered {body:?}");
    }

    scale(&client, 5).await;
    endpoints_follow_pods(&client, &nodes, 5).await;

    // Scale-down deletes pods gracefully; their kubelets finish each deletion.
    scale(&client, 2).await;
    endpoints_follow_pods(&client, &nodes, 2).await;
}

#[tokio::test]
async fn service_account_is_refused_outside_its_cluster_role() {
    let env = Env::builder("rbac").kube().start().await.unwrap();
    let cp = env.kube().unwrap();
    let admin = cp.admin_client().unwrap();
    let pp = PostParams::default();

    let role: ClusterRole = serde_json::from_value(json!({
        "metadata": {"name": "pod-reader"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
    }))
    .unwrap();
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "narrow-pod-reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "pod-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "narrow", "namespace": "default"}],
    }))
    .unwrap();
    Api::<ClusterRole>::all(admin.clone())
        .create(&pp, &role)
        .await
        .unwrap();
    Api::<ClusterRoleBinding>::all(admin.clone())
        .create(&pp, &binding)
        .await
        .unwrap();

    let narrow = cp.service_account_client("default", "narrow").unwrap();
    let pods: Api<Pod> = Api::all(narrow.clone());
    // The authorizer sees new bindings through an informer: allow it a moment.
    eventually(
        "the bound role lets the account list pods",
        WAIT,
        || async { Ok(pods.list(&ListParams::default()).await.is_ok()) },
    )
    .await
    .unwrap();

    let forbidden = |r: Result<_, kube::Error>| match r {
        Err(kube::Error::Api(e)) => e.is_forbidden(),
        _ => false,
    };
    let secrets: Api<Secret> = Api::namespaced(narrow.clone(), "kube-system");
    assert!(
        forbidden(secrets.list(&ListParams::default()).await.map(|_| ())),
        "secrets readable"
    );
    let cms: Api<ConfigMap> = Api::namespaced(narrow.clone(), "default");
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "x"}})).unwrap();
    assert!(
        forbidden(cms.create(&pp, &cm).await.map(|_| ())),
        "configmap creatable"
    );
    let other = cp
        .service_account_client("default", "someone-else")
        .unwrap();
    let pods_other: Api<Pod> = Api::all(other);
    assert!(
        forbidden(pods_other.list(&ListParams::default()).await.map(|_| ())),
        "an unbound account may list pods"
    );
}
