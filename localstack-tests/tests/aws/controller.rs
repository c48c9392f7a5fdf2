//! `cnlb-ccm --provider=aws` end to end, against the real control plane and
//! moto: a LoadBalancer Service becomes an NLB whose targets are the Pod IPs
//! and follow scaling; a bad annotation is reported on the Service and
//! builds nothing; deleting the Service deletes the NLB, and then garbage
//! collection the cluster's backend security group.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crate::common::ccm;
use cnlb_localstack_tests::eventually;
use cnlb_provider_aws::Clients;
use k8s_openapi::api::core::v1::{Event, Service};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

async fn targets_follow_pods(client: &Client, aws: &Clients, n: usize) {
    eventually(
        &format!("the NLB targets are the {n} pod IPs"),
        WAIT,
        || async {
            let pods = ccm::pod_targets(client).await;
            Ok(pods.len() == n && ccm::all_targets(aws).await == pods)
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
        let cluster = ccm::cluster("aws-controller", 2).await;
        let (env, aws, net) = (&cluster.env, &cluster.aws, &cluster.net);
        let _ccm = ccm::spawn(env, &net.vpc, "cnlb-ccm");

        let client = cluster.client.clone();
        let pp = PostParams::default();
        ccm::create_web(&client, 3).await;
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        services
            .create(&pp, &ccm::service("web", json!({})))
            .await
            .unwrap();

        // Status carries the NLB's DNS name; the finalizer guards the cloud resources.
        eventually(
            "status.loadBalancer.ingress has the NLB hostname",
            WAIT,
            || async { Ok(ccm::hostname(&services, "web").await.is_some()) },
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
        // Its frontend group and the cluster's backend group.
        assert_eq!(lbs.load_balancers()[0].security_groups().len(), 2);
        assert_eq!(ccm::cluster_security_groups(aws).await, 2);
        let host = ccm::hostname(&services, "web").await;
        assert_eq!(host.as_deref(), lbs.load_balancers()[0].dns_name());

        targets_follow_pods(&client, aws, 3).await;
        ccm::scale(&client, 5).await;
        targets_follow_pods(&client, aws, 5).await;
        ccm::scale(&client, 2).await;
        targets_follow_pods(&client, aws, 2).await;

        // A bad annotation: a Warning Event and a condition naming the key; nothing built.
        let bad = ccm::service(
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
        eventually(
            "condition LoadBalancerReady=False names the key",
            WAIT,
            || async {
                let bad = services.get("bad").await?;
                let conditions = bad.status.and_then(|s| s.conditions).unwrap_or_default();
                Ok(conditions.iter().any(|c| {
                    c.type_ == "cnlb.dev/LoadBalancerReady"
                        && c.status == "False"
                        && c.reason == "InvalidAnnotation"
                        && c.message.contains("aws-load-balancer-scheme")
                }))
            },
        )
        .await
        .unwrap();
        assert_eq!(ccm::counts(aws).await, (1, 1));

        // Deleting the Service deletes the NLB and its target group, then the Service goes.
        services
            .delete("web", &DeleteParams::default())
            .await
            .unwrap();
        eventually("the NLB and the Service are gone", WAIT, || async {
            Ok(ccm::counts(aws).await == (0, 0) && services.get_opt("web").await?.is_none())
        })
        .await
        .unwrap();
        // With no NLB left, garbage collection deletes the backend group.
        eventually("no security group of the cluster is left", WAIT, || async {
            Ok(ccm::cluster_security_groups(aws).await == 0)
        })
        .await
        .unwrap();
    });
}
