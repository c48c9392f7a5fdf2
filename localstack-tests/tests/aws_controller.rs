//! `cnlb-ccm --provider=aws` end to end, against the real control plane and
//! moto: a LoadBalancer Service becomes an NLB whose targets are the Pod IPs
//! and follow scaling; a bad annotation is reported on the Service and
//! builds nothing; deleting the Service deletes the NLB.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use cnlb_localstack_tests::paths::workspace_bin;
use cnlb_localstack_tests::process::Proc;
use cnlb_localstack_tests::{Env, NodeConfig, eventually};
use cnlb_provider_aws::Clients;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event, Pod, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

fn service(name: &str, annotations: serde_json::Value) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": "cnlb.dev/nlb",
            "selector": {"app": "web"},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
        },
    }))
    .unwrap()
}

async fn pod_targets(client: &Client) -> BTreeSet<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let list = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap();
    list.items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
        .map(|ip| format!("{ip}:8080"))
        .collect()
}

async fn nlb_targets(aws: &Clients) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let tgs = aws.elbv2.describe_target_groups().send().await.unwrap();
    for tg in tgs.target_groups() {
        let health = aws
            .elbv2
            .describe_target_health()
            .target_group_arn(tg.target_group_arn().unwrap())
            .send()
            .await
            .unwrap();
        for d in health.target_health_descriptions() {
            let t = d.target().unwrap();
            out.insert(format!("{}:{}", t.id().unwrap(), t.port().unwrap()));
        }
    }
    out
}

async fn scale(client: &Client, replicas: i32) {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let patch = json!({"spec": {"replicas": replicas}});
    deployments
        .patch("web", &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
}

async fn targets_follow_pods(client: &Client, aws: &Clients, n: usize) {
    eventually(
        &format!("the NLB targets are the {n} pod IPs"),
        WAIT,
        || async {
            let pods = pod_targets(client).await;
            Ok(pods.len() == n && nlb_targets(aws).await == pods)
        },
    )
    .await
    .unwrap();
}

#[test]
fn load_balancer_service_becomes_an_nlb_targeting_pod_ips() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let nodes = vec![NodeConfig::numbered(1), NodeConfig::numbered(2)];
        let env = Env::builder("aws-controller")
            .nodes(nodes)
            .moto()
            .start()
            .await
            .unwrap();
        let endpoints = env.aws().unwrap();
        common::use_endpoints(&endpoints);
        let aws = Clients::from_env().await;
        let net = common::ec2_network(&aws).await;

        let cp = env.kube().unwrap();
        let mut cmd = Command::new(workspace_bin("cnlb-ccm").unwrap());
        cmd.arg(format!("--kubeconfig={}", cp.kubeconfig.display()))
            .args([
                "--cluster-name=test",
                "--provider=aws",
                "--leader-elect=false",
            ])
            .args([
                "--metrics-bind-address=0",
                &format!("--aws-vpc-id={}", net.vpc),
            ])
            .envs(endpoints.env_vars());
        let _ccm = Proc::spawn("cnlb-ccm", cmd, &env.dir).unwrap();

        let client = cp.admin_client().unwrap();
        let pp = PostParams::default();
        let deployment: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "web", "image": "example.invalid/web:1",
                                             "ports": [{"name": "http", "containerPort": 8080}]}]},
                },
            },
        }))
        .unwrap();
        Api::<Deployment>::namespaced(client.clone(), "default")
            .create(&pp, &deployment)
            .await
            .unwrap();
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        services
            .create(&pp, &service("web", json!({})))
            .await
            .unwrap();

        // Status carries the NLB's DNS name; the finalizer guards the cloud resources.
        eventually(
            "status.loadBalancer.ingress has the NLB hostname",
            WAIT,
            || async {
                let svc = services.get("web").await?;
                let host = svc
                    .status
                    .and_then(|s| s.load_balancer?.ingress?.into_iter().next()?.hostname);
                Ok(host.is_some())
            },
        )
        .await
        .unwrap();
        let svc = services.get("web").await.unwrap();
        assert!(
            svc.metadata
                .finalizers
                .unwrap()
                .contains(&"cnlb.dev/load-balancer-cleanup".into())
        );
        let lbs = aws.elbv2.describe_load_balancers().send().await.unwrap();
        assert_eq!(lbs.load_balancers().len(), 1);
        let host = svc.status.unwrap().load_balancer.unwrap().ingress.unwrap()[0]
            .hostname
            .clone();
        assert_eq!(host.as_deref(), lbs.load_balancers()[0].dns_name());

        targets_follow_pods(&client, &aws, 3).await;
        scale(&client, 5).await;
        targets_follow_pods(&client, &aws, 5).await;
        scale(&client, 2).await;
        targets_follow_pods(&client, &aws, 2).await;

        // A bad annotation: a Warning Event and a condition naming the key; nothing built.
        let bad = service(
            "bad",
            json!({"service.beta.kubernetes.io/aws-load-balancer-scheme": "public"}),
        );
        services.create(&pp, &bad).await.unwrap();
        let events: Api<Event> = Api::namespaced(client.clone(), "default");
        eventually(
            "an InvalidAnnotation event on Service bad",
            WAIT,
            || async {
                let list = events
                    .list(&ListParams::default().fields("involvedObject.name=bad"))
                    .await?;
                Ok(list.items.iter().any(|e| {
                    e.reason.as_deref() == Some("InvalidAnnotation")
                        && e.message
                            .as_deref()
                            .is_some_and(|m| m.contains("aws-load-balancer-scheme"))
                }))
            },
        )
        .await
        .unwrap();
        let bad = services.get("bad").await.unwrap();
        let conditions = bad.status.unwrap().conditions.unwrap_or_default();
        let c = conditions
            .iter()
            .find(|c| c.type_ == "cnlb.dev/LoadBalancerReady")
            .unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "InvalidAnnotation")
        );
        assert!(
            c.message.contains("aws-load-balancer-scheme"),
            "{}",
            c.message
        );
        assert_eq!(
            aws.elbv2
                .describe_load_balancers()
                .send()
                .await
                .unwrap()
                .load_balancers()
                .len(),
            1
        );

        // Deleting the Service deletes the NLB and its target group, then the Service goes.
        services
            .delete("web", &DeleteParams::default())
            .await
            .unwrap();
        eventually("the NLB and the Service are gone", WAIT, || async {
            let lbs = aws.elbv2.describe_load_balancers().send().await?;
            let tgs = aws.elbv2.describe_target_groups().send().await?;
            let gone = services.get_opt("web").await?.is_none();
            Ok(lbs.load_balancers().is_empty() && tgs.target_groups().is_empty() && gone)
        })
        .await
        .unwrap();
    });
}
