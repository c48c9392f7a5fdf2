//! Many Services at once, and the controller killed with SIGKILL in the
//! middle of reconciling them: after a restart every Service has exactly one
//! NLB, one target group and one security group (no duplicate, nothing leaked). Services deleted
//! while the controller is down are cleaned up when it comes back.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::ccm;
use cnlb_localstack_tests::eventually;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::{DeleteParams, ListParams};

const SERVICES: usize = 10;
const WAIT: Duration = Duration::from_secs(90);

#[test]
fn sigkill_mid_reconcile_leaves_no_duplicate_and_no_leak() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cluster = ccm::cluster("aws-crash", 2).await;
        let (env, aws, net) = (&cluster.env, &cluster.aws, &cluster.net);
        let client = cluster.client.clone();
        ccm::create_web(&client, 3).await;
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        let names = ccm::create_services(&services, SERVICES).await;

        // Kill the controller as soon as the first cloud resource exists:
        // the other Services are half done or not started.
        let first = ccm::spawn(env, &net.vpc, "cnlb-ccm-1");
        eventually("the first target group exists", WAIT, || async {
            let (_, tgs) = ccm::counts(aws).await;
            Ok(tgs > 0)
        })
        .await
        .unwrap();
        first.kill();
        let (lbs, tgs) = ccm::counts(aws).await;
        assert!(
            lbs < SERVICES || tgs < SERVICES,
            "killed too late to be mid-reconcile"
        );

        let second = ccm::spawn(env, &net.vpc, "cnlb-ccm-2");
        eventually(
            "every Service has its NLB and the pods as targets",
            WAIT,
            || async {
                let mut ready = 0;
                for name in &names {
                    if ccm::hostname(&services, name).await.is_some() {
                        ready += 1;
                    }
                }
                let pods = ccm::pod_targets(&client).await;
                let tgs = aws.elbv2.describe_target_groups().send().await?;
                let mut all_full = pods.len() == 3;
                for tg in tgs.target_groups() {
                    all_full &= ccm::targets_of(aws, tg.target_group_arn().unwrap_or_default())
                        .await
                        == pods;
                }
                Ok(ready == SERVICES && all_full)
            },
        )
        .await
        .unwrap();
        assert_eq!(ccm::owned_security_groups(aws).await, SERVICES);
        assert_eq!(
            ccm::counts(aws).await,
            (SERVICES, SERVICES),
            "one NLB and one target group each"
        );
        let lbs = aws.elbv2.describe_load_balancers().send().await.unwrap();
        let dns: BTreeSet<&str> = lbs
            .load_balancers()
            .iter()
            .filter_map(|l| l.dns_name())
            .collect();
        assert_eq!(dns.len(), SERVICES);

        // Delete every Service while the controller is down: the finalizer
        // keeps them until it is back and has deleted their cloud resources.
        second.kill();
        services
            .delete_collection(&DeleteParams::default(), &ListParams::default())
            .await
            .unwrap();
        assert!(
            ccm::our_services(&services).await.unwrap() >= SERVICES,
            "the finalizer holds the Services while the controller is down"
        );
        let _third = ccm::spawn(env, &net.vpc, "cnlb-ccm-3");
        eventually(
            "every NLB, target group and Service is gone",
            WAIT,
            || async {
                let ours = ccm::our_services(&services).await?;
                Ok(ccm::counts(aws).await == (0, 0)
                    && ccm::owned_security_groups(aws).await == 0
                    && ours == 0)
            },
        )
        .await
        .unwrap();
    });
}
