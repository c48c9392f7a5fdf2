//! Changing a Service changes its NLB in place: a new Service port moves
//! the listener to a new target group (the old one is deleted) and the Pod
//! IPs follow; a changed health-check annotation modifies the target group;
//! a bad annotation on a working Service is reported and tears nothing down;
//! a Service that stops being a LoadBalancer loses its NLB and the finalizer.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::ccm;
use cnlb_localstack_tests::eventually;
use cnlb_provider_aws::Clients;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

async fn listener_ports(aws: &Clients) -> BTreeSet<i32> {
    let lbs = aws.elbv2.describe_load_balancers().send().await.unwrap();
    let Some(lb) = lbs.load_balancers().first() else {
        return BTreeSet::new();
    };
    let listeners = aws
        .elbv2
        .describe_listeners()
        .load_balancer_arn(lb.load_balancer_arn().unwrap())
        .send()
        .await
        .unwrap();
    listeners
        .listeners()
        .iter()
        .filter_map(|l| l.port())
        .collect()
}

#[test]
fn port_and_annotation_changes_update_the_nlb_in_place() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cluster = ccm::cluster("aws-changes", 1).await;
        let (env, aws, net) = (&cluster.env, &cluster.aws, &cluster.net);
        let _ccm = ccm::spawn(env, &net.vpc, "cnlb-ccm");
        let client = cluster.client.clone();
        ccm::create_web(&client, 2).await;
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        services.create(&PostParams::default(), &ccm::service("web", json!({}))).await.unwrap();
        eventually("the NLB serves port 80 with the pods as targets", WAIT, || async {
            let pods = ccm::pod_targets(&client).await;
            Ok(pods.len() == 2
                && listener_ports(aws).await == BTreeSet::from([80])
                && ccm::all_targets(aws).await == pods)
        })
        .await
        .unwrap();
        let lb_before = aws.elbv2.describe_load_balancers().send().await.unwrap().load_balancers()[0]
            .load_balancer_arn()
            .map(str::to_string);
        let tg_before = aws.elbv2.describe_target_groups().send().await.unwrap().target_groups()[0]
            .target_group_arn()
            .map(str::to_string);

        // Port 80 -> 8443: same NLB, listener on the new port, a new target
        // group holding the same Pods, the old target group gone.
        let patch = json!({"spec": {"ports": [{"name": "http", "port": 8443, "targetPort": 8080, "protocol": "TCP"}]}});
        services.patch("web", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
        eventually("the listener moves to 8443 and the targets follow", WAIT, || async {
            let tgs = aws.elbv2.describe_target_groups().send().await?;
            let one_new_tg = tgs.target_groups().len() == 1
                && tgs.target_groups()[0].target_group_arn().map(str::to_string) != tg_before;
            Ok(one_new_tg
                && listener_ports(aws).await == BTreeSet::from([8443])
                && ccm::all_targets(aws).await == ccm::pod_targets(&client).await)
        })
        .await
        .unwrap();
        let lb_after = aws.elbv2.describe_load_balancers().send().await.unwrap().load_balancers()[0]
            .load_balancer_arn()
            .map(str::to_string);
        assert_eq!(lb_before, lb_after, "the NLB (and its address) is kept");

        // A health-check annotation changes the target group in place.
        let patch = json!({"metadata": {"annotations": {
            "service.beta.kubernetes.io/aws-load-balancer-healthcheck-interval": "30",
            "service.beta.kubernetes.io/aws-load-balancer-healthcheck-healthy-threshold": "5",
        }}});
        services.patch("web", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
        eventually("the target group's health check follows the annotations", WAIT, || async {
            let tgs = aws.elbv2.describe_target_groups().send().await?;
            let tg = &tgs.target_groups()[0];
            Ok(tg.health_check_interval_seconds() == Some(30) && tg.healthy_threshold_count() == Some(5))
        })
        .await
        .unwrap();
        assert_eq!(ccm::counts(aws).await, (1, 1));

        // A bad value on a working Service: reported, and nothing torn down.
        let condition = |status: &'static str| {
            let services = services.clone();
            async move {
                let svc = services.get("web").await?;
                let conditions = svc.status.and_then(|s| s.conditions).unwrap_or_default();
                Ok(conditions
                    .iter()
                    .any(|c| c.type_ == "cnlb.dev/LoadBalancerReady" && c.status == status))
            }
        };
        let scheme = "service.beta.kubernetes.io/aws-load-balancer-scheme";
        let patch = json!({"metadata": {"annotations": {scheme: "public"}}});
        services.patch("web", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
        eventually("the bad value is reported", WAIT, || condition("False")).await.unwrap();
        assert_eq!(ccm::counts(aws).await, (1, 1));
        assert_eq!(ccm::all_targets(aws).await, ccm::pod_targets(&client).await);
        let patch = json!({"metadata": {"annotations": {scheme: null}}});
        services.patch("web", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
        eventually("fixed, the Service is ready again", WAIT, || condition("True")).await.unwrap();
        assert_eq!(ccm::counts(aws).await, (1, 1));

        // No longer a LoadBalancer: the NLB goes, and so does the finalizer.
        let patch = json!({"spec": {"type": "ClusterIP", "loadBalancerClass": null}});
        services.patch("web", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
        eventually("the NLB is deleted and the finalizer removed", WAIT, || async {
            let svc = services.get("web").await?;
            let finalizers = svc.metadata.finalizers.unwrap_or_default();
            Ok(ccm::counts(aws).await == (0, 0) && finalizers.is_empty())
        })
        .await
        .unwrap();
    });
}
