//! The demo's flows through the whole on-prem stack (`cnlb-ccm
//! --provider=onprem`, the `cnlb-onprem-haproxy` plugin, HAProxy, Pods in
//! their own network namespaces), asserted: HAProxy's servers follow
//! scaling up and down (= the Ready Pod IPs:8080), a rolling update under
//! at least 50 requests/s (each on a fresh TCP connection) fails no
//! request, and deleting the Service removes its frontend.
//!
//! Needs the workspace binaries: `cargo build --workspace --bins`.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use cnlb_localstack_tests::eventually;
use cnlb_localstack_tests::onprem::{self, APP, Load, Stack, StackConfig};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(120);
/// preStop sleep and deregistration delay: short, the test waits for it.
const DRAIN: u32 = 5;
const RATE: u32 = 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_rolling_update_under_load_and_delete() -> Result<()> {
    let stack = Stack::start(StackConfig::new("onprem-demo")).await?;
    let client = stack.client.clone();
    onprem::deploy_app(&client, 3, DRAIN).await?;
    onprem::create_service(&client, APP, DRAIN).await?;
    let lb = onprem::wait_lb_address(&client, APP, WAIT).await?;
    let backend = stack.backend_name(APP).await?;
    stack.wait_servers_follow(&backend, Some(3), WAIT).await?;

    // Real answers from every Pod, through the load balancer.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..9 {
        seen.insert(onprem::get(lb).await?);
    }
    ensure!(seen.len() == 3, "answers from {seen:?}");

    let load = Load::start(lb, RATE);
    // Backends follow scaling, up and down.
    onprem::scale(&client, 5).await?;
    stack.wait_servers_follow(&backend, Some(5), WAIT).await?;
    onprem::scale(&client, 2).await?;
    stack.wait_servers_follow(&backend, Some(2), WAIT).await?;
    onprem::scale(&client, 4).await?;
    stack.wait_servers_follow(&backend, Some(4), WAIT).await?;

    // A rolling update replaces all 4 Pods.
    let before = load.snapshot();
    let old: std::collections::BTreeSet<String> = onprem::pods(&client)
        .await?
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    onprem::rolling_update(&client, "2").await?;
    eventually("every Pod is replaced", WAIT, || async {
        let pods = onprem::pods(&client).await?;
        Ok(pods
            .iter()
            .all(|p| p.metadata.name.as_ref().is_some_and(|n| !old.contains(n))))
    })
    .await?;
    stack.wait_servers_follow(&backend, Some(4), WAIT).await?;
    let total = load.stop().await;
    let rollout = total.since(&before);
    println!(
        "rolling update: {} requests, {} failed, {:.1}/s; whole run: {} requests, {} failed, {:.1}/s; per pod: {:?}",
        rollout.total(),
        rollout.failed,
        rollout.rate(),
        total.total(),
        total.failed,
        total.rate(),
        total.per_pod
    );
    ensure!(
        total.failed == 0,
        "{} requests failed: {:?}",
        total.failed,
        total.errors
    );
    ensure!(
        rollout.rate() >= 50.0 && total.rate() >= 50.0,
        "too slow to count: {:.1}/s during the rollout, {:.1}/s overall",
        rollout.rate(),
        total.rate()
    );
    ensure!(rollout.elapsed >= Duration::from_secs(5), "{rollout:?}");
    // Old and new Pods answered: 4 + 4 names at least during the rollout.
    ensure!(rollout.per_pod.len() >= 8, "{:?}", rollout.per_pod);

    // Deleting the Service removes its frontend and backend.
    onprem::delete_service(&client, APP).await?;
    eventually("the Service is gone", WAIT, || {
        onprem::service_gone(&client, APP)
    })
    .await?;
    ensure!(
        stack.lb.servers(&backend).await?.is_none(),
        "backend still there"
    );
    let config = std::fs::read_to_string(stack.lb.config_file())?;
    ensure!(!config.contains(&backend), "{config}");
    eventually("the address stops answering", WAIT, || async {
        Ok(TcpStream::connect(lb).await.is_err())
    })
    .await
    .context("after the Service's deletion")?;
    stack.check_running()?;
    Ok(())
}
