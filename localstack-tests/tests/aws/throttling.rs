//! cnlb-ccm in an AWS account that throttles: the fault proxy enforces
//! the account's documented EC2 and ELBv2 buckets (at half their size, so
//! a few Services reach them), and a neighbour in the same account keeps
//! describing load balancers. cnlb-ccm runs with its default rates: every
//! Service converges and is deleted, the throttles slow it down (its rate
//! halves and climbs back) and none reaches a Service as a Warning Event.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use crate::common::ccm;
use crate::common::chaos::Live;
use cnlb_localstack_tests::aws::AwsEndpoints;
use cnlb_localstack_tests::eventually;
use cnlb_localstack_tests::fault_proxy::{AccountLimits, Cloud, FaultProxy, Outcome};
use cnlb_localstack_tests::process::Proc;
use k8s_openapi::api::core::v1::{Event, Service};
use kube::Api;
use kube::api::{DeleteParams, ListParams};

#[test]
fn a_throttling_account_slows_cnlb_without_failing_a_service() {
    super::faults::runtime().block_on(async {
        let n = 6;
        let cluster = ccm::cluster("aws-throttled", 2).await;
        ccm::create_web(&cluster.client, 3).await;
        ccm::wait_web_ready(&cluster.client, 3, Duration::from_secs(120)).await;
        let proxy = FaultProxy::start(Cloud::Aws, &cluster.env.aws().unwrap().ec2, 40).unwrap();
        proxy.set_account_limits(Some(AccountLimits { scale: 0.5 }));
        let endpoints = AwsEndpoints::single(proxy.url());

        let neighbour = crate::common::clients_for(&endpoints).await;
        let noise = tokio::spawn(async move {
            loop {
                let _ = neighbour.elbv2.describe_load_balancers().send().await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });

        let mut cmd = ccm::command(&cluster.env, &cluster.net.vpc);
        cmd.args(["--leader-elect=false", "--metrics-bind-address=0"])
            .envs(endpoints.env_vars());
        let controller = Proc::spawn("cnlb-ccm-throttled", cmd, &cluster.env.dir).unwrap();

        let services: Api<Service> = Api::namespaced(cluster.client.clone(), "default");
        let started = Instant::now();
        let live: Live = ccm::create_services(&services, n)
            .await
            .into_iter()
            .map(|name| (name, 1))
            .collect();
        let wait = Duration::from_secs(180);
        eventually("every Service converged", wait, || {
            super::faults::converged(&cluster, live.clone())
        })
        .await
        .unwrap();
        let created_in = started.elapsed();
        let deleting = Instant::now();
        services
            .delete_collection(&DeleteParams::default(), &ListParams::default())
            .await
            .unwrap();
        eventually("nothing left", wait, || {
            super::faults::converged(&cluster, Live::new())
        })
        .await
        .unwrap();
        let deleted_in = deleting.elapsed();
        noise.abort();

        let events: Api<Event> = Api::namespaced(cluster.client.clone(), "default");
        let warnings: Vec<String> = events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| {
                e.type_.as_deref() == Some("Warning")
                    && e.involved_object.kind.as_deref() == Some("Service")
            })
            .map(|e| format!("{:?}: {:?}", e.reason, e.message))
            .collect();
        assert_eq!(warnings, Vec::<String>::new(), "Warning Events on Services");
        let calls = proxy.calls();
        let limited = calls
            .iter()
            .filter(|c| c.outcome == Outcome::Limited)
            .count();
        assert!(
            limited > 0,
            "the account never throttled: {}",
            proxy.summary()
        );
        controller.kill();
        println!(
            "aws throttled account: {n} Services converged in {:.1} s, deleted in {:.1} s; \
             {} of {} calls ({:.1} %) over the account's limits; proxy: {}",
            created_in.as_secs_f64(),
            deleted_in.as_secs_f64(),
            limited,
            calls.len(),
            100.0 * limited as f64 / calls.len() as f64,
            proxy.summary()
        );
    });
}
