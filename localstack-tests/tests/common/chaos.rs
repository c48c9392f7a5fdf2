//! The fault trials of tests/aws/faults.rs and tests/gcp/faults.rs: a
//! round trip of Services through a faulty cloud, and crash trials over
//! churn (Services created, changed and deleted at random). Each cloud
//! says how to start its controller and when the cloud matches.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, Instant};

use cnlb_localstack_tests::eventually;
use cnlb_localstack_tests::fault_proxy::{self, FaultProxy};
use cnlb_localstack_tests::process::Proc;
use cnlb_provider_aws::{Group, RateLimit};

use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

/// One round of churn over Services `chaos-0..pool` (class cnlb.dev/nlb,
/// in front of app=web): each is created, deleted, has its second port
/// toggled, or is left alone, at random. `live` maps the Services that
/// exist to their port count.
async fn churn(services: &Api<Service>, rng: &mut fastrand::Rng, live: &mut Live, pool: usize) {
    for i in 0..pool {
        let name = format!("chaos-{i}");
        match (live.get(&name).copied(), rng.u8(0..3)) {
            (None, 0 | 1) => {
                services
                    .create(
                        &PostParams::default(),
                        &super::ccm::service(&name, json!({})),
                    )
                    .await
                    .unwrap();
                live.insert(name, 1);
            }
            (Some(_), 0) => {
                services
                    .delete(&name, &DeleteParams::default())
                    .await
                    .unwrap();
                live.remove(&name);
            }
            (Some(ports), 1) => {
                let ports = 3 - ports;
                let patch = json!({"spec": {"ports": service_ports(ports)}});
                services
                    .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                    .await
                    .unwrap();
                live.insert(name, ports);
            }
            _ => {}
        }
    }
}

/// Port 80, and 81 when `count` is 2, both to the Pods' 8080.
fn service_ports(count: u16) -> serde_json::Value {
    let mut ports =
        vec![json!({"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"})];
    if count == 2 {
        ports.push(json!({"name": "alt", "port": 81, "targetPort": 8080, "protocol": "TCP"}));
    }
    json!(ports)
}

/// The API server holds exactly the Services of `live` (besides
/// `kubernetes`): deleted ones are gone, their finalizer done.
pub async fn just_these(services: &Api<Service>, live: &Live) -> kube::Result<bool> {
    let names: BTreeSet<String> = services
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|s| s.metadata.name)
        .filter(|n| n != "kubernetes")
        .collect();
    Ok(names.iter().eq(live.keys()))
}

/// The client-side buckets `ccm::spawn_at` and `gcp::spawn_at` configure
/// (read is the default).
const BUCKETS: [(Group, RateLimit); 3] = [
    (Group::Read, RateLimit::new(20, 40)),
    (Group::Write, RateLimit::new(20, 40)),
    (Group::Targets, RateLimit::new(20, 40)),
];

/// What the cloud should hold for these Services (name -> ports).
pub type Live = BTreeMap<String, u16>;

/// Creates `n` Services, starts a controller with `spawn`, waits until
/// `converged` holds, deletes them and waits until nothing is left; the
/// calls (through `proxy`) must stay within the configured buckets, each
/// operation sorted by `group_of`. Returns the figures.
pub async fn round_trip<S, C, Fut>(
    services: &Api<Service>,
    proxy: &FaultProxy,
    n: usize,
    what: &str,
    spawn: S,
    group_of: fn(&str) -> Group,
    converged: C,
) -> String
where
    S: FnOnce(&str) -> Proc,
    C: Fn(Live) -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let first = proxy.calls().len();
    let started = Instant::now();
    let names = super::ccm::create_services(services, n).await;
    let live: Live = names.iter().map(|n| (n.clone(), 1)).collect();
    let controller = spawn(&format!("cnlb-ccm-{}", what.replace([' ', '%'], "")));
    let wait = Duration::from_secs(120 + 6 * n as u64);
    eventually(&format!("{what}: every Service converged"), wait, || {
        converged(live.clone())
    })
    .await
    .unwrap();
    let created_in = started.elapsed();
    let create_calls = proxy.calls().len() - first;

    let deleting = Instant::now();
    services
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
        .unwrap();
    eventually(&format!("{what}: nothing left"), wait, || {
        converged(Live::new())
    })
    .await
    .unwrap();
    let deleted_in = deleting.elapsed();
    controller.kill();

    let calls = &proxy.calls()[first..];
    for (group, limit) in BUCKETS {
        let busiest = fault_proxy::busiest(calls, Duration::from_secs(1), |c| {
            group_of(&c.operation) == group
        });
        // +1: a call's arrival at the proxy lags its token by a little.
        assert!(
            busiest <= (limit.burst + limit.per_second + 1) as usize,
            "{what}: {busiest} {group:?} calls in one second, above the bucket {limit:?}"
        );
    }
    format!(
        "converged in {:.1} s with {create_calls} calls, deleted in {:.1} s with {} calls",
        created_in.as_secs_f64(),
        deleted_in.as_secs_f64(),
        calls.len() - create_calls,
    )
}

/// Crash trials: `trials` rounds of [`churn`] over `pool` Services, each
/// ended by a SIGKILL of the controller at a random moment (0 to 2.5 s,
/// from `seed`) and a restart with `spawn`, after which `converged` must
/// hold within 30 s (else the test fails with what `describe` says), and
/// at the end nothing may be left. Returns the figures.
pub async fn kill_trials<S, C, Fut, D, DFut>(
    services: &Api<Service>,
    (trials, pool, seed): (usize, usize, u64),
    spawn: S,
    converged: C,
    describe: D,
) -> String
where
    S: Fn(&str) -> Proc,
    C: Fn(Live) -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
    D: Fn() -> DFut,
    DFut: Future<Output = String>,
{
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut live = Live::new();
    let mut controller = spawn("cnlb-ccm-0");
    let mut recoveries = Vec::new();
    for trial in 1..=trials {
        churn(services, &mut rng, &mut live, pool).await;
        tokio::time::sleep(Duration::from_millis(rng.u64(0..2500))).await;
        controller.kill();
        let restarted = Instant::now();
        controller = spawn(&format!("cnlb-ccm-{trial}"));
        let within = eventually(
            &format!("trial {trial}: every Service converged within 30 s of the restart"),
            Duration::from_secs(30),
            || converged(live.clone()),
        )
        .await;
        if let Err(e) = within {
            panic!("{e:#}\nwanted {live:?}\n{}", describe().await);
        }
        recoveries.push(restarted.elapsed());
    }
    services
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
        .unwrap();
    eventually("nothing left", Duration::from_secs(60), || {
        converged(Live::new())
    })
    .await
    .unwrap();
    drop(controller);
    recoveries.sort();
    format!(
        "{trials} kills, invariants held after each; converged after restart p50 {:.1} s, max {:.1} s",
        recoveries[recoveries.len() / 2].as_secs_f64(),
        recoveries
            .last()
            .map(Duration::as_secs_f64)
            .unwrap_or_default(),
    )
}
