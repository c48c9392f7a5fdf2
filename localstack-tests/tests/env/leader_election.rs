//! Two `cnlb-ccm` replicas: one holds the Lease and acts; when it is killed
//! with SIGKILL the other takes over within the lease duration and acts; a
//! replica stopped with SIGTERM hands the lease over at once.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::Duration;

use cnlb_localstack_tests::process::Proc;
use cnlb_localstack_tests::{Env, eventually};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Service};
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

fn replica(env: &Env, name: &str) -> Proc {
    let mut cmd = common::ccm::command(env, "vpc-0123");
    cmd.args(["--leader-elect=true", "--metrics-bind-address=0"])
        // No AWS endpoint: the Services below are rejected before any cloud call.
        .env("AWS_EC2_METADATA_DISABLED", "true");
    Proc::spawn(name, cmd, &env.dir).unwrap()
}

async fn holder(client: &Client) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-system");
    leases
        .get_opt("cnlb-ccm")
        .await
        .ok()??
        .spec?
        .holder_identity
        .filter(|h| !h.is_empty())
}

/// A LoadBalancer Service with a bad annotation; only an acting leader
/// reports it (an InvalidAnnotation Event), and no cloud call is needed.
async fn acted_on(client: &Client, name: &str) -> bool {
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": name,
                     "annotations": {"service.beta.kubernetes.io/aws-load-balancer-scheme": "public"}},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": "cnlb.dev/nlb",
                 "ports": [{"name": "http", "port": 80}]},
    }))
    .unwrap();
    services.create(&PostParams::default(), &svc).await.unwrap();
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    eventually(
        &format!("the leader reports Service {name}"),
        Duration::from_secs(30),
        || async {
            let list = events
                .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
                .await?;
            Ok(list
                .items
                .iter()
                .any(|e| e.reason.as_deref() == Some("InvalidAnnotation")))
        },
    )
    .await
    .is_ok()
}

#[tokio::test]
async fn one_replica_leads_and_another_takes_over() {
    let env = Env::builder("leader").kube().start().await.unwrap();
    let client = env.kube().unwrap().admin_client().unwrap();
    let a = replica(&env, "ccm-a");
    let b = replica(&env, "ccm-b");
    let id = |p: &Proc| format!("_{}", p.pid());

    eventually(
        "a replica holds the lease",
        Duration::from_secs(30),
        || async { Ok(holder(&client).await.is_some()) },
    )
    .await
    .unwrap();
    let first = holder(&client).await.unwrap();
    let (leader, follower) = if first.ends_with(&id(&a)) {
        (a, b)
    } else {
        (b, a)
    };
    assert!(first.ends_with(&id(&leader)), "{first}");
    assert!(acted_on(&client, "before").await);
    let follower_log = std::fs::read_to_string(follower.log()).unwrap();
    assert!(
        !follower_log.contains("became leader"),
        "two leaders:\n{follower_log}"
    );

    // The leader dies without a word: the follower waits out the lease, then leads.
    leader.kill();
    eventually(
        "the follower takes the lease over",
        Duration::from_secs(40),
        || async {
            Ok(holder(&client)
                .await
                .is_some_and(|h| h.ends_with(&id(&follower))))
        },
    )
    .await
    .unwrap();
    assert!(acted_on(&client, "after").await);

    // A graceful stop hands the lease over at once.
    follower.terminate();
    eventually("the lease is released", Duration::from_secs(15), || async {
        Ok(holder(&client).await.is_none())
    })
    .await
    .unwrap();
}
