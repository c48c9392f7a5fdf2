//! `cnlb-ccm --provider=onprem` when its parts fail, through the whole
//! stack: a plugin that crashes gives Warning Events on the Service and is
//! retried while HAProxy keeps forwarding to the Pods; once the plugin is
//! back, a change made meanwhile (a scale) is applied. An HAProxy restart
//! loses no backend: all of them are back and serving.
//!
//! Needs the workspace binaries: `cargo build --workspace --bins`.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Result, ensure};
use cnlb_localstack_tests::eventually;
use cnlb_localstack_tests::onprem::{self, APP, Load, Stack, StackConfig};

const WAIT: Duration = Duration::from_secs(120);
const DRAIN: u32 = 5;

async fn failure_events(stack: &Stack) -> Result<usize> {
    Ok(onprem::service_events(&stack.client, APP)
        .await?
        .iter()
        .filter(|(reason, _)| reason == "SyncLoadBalancerFailed")
        .count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_crash_is_retried_and_haproxy_restart_loses_nothing() -> Result<()> {
    let mut stack = Stack::start(StackConfig::new("onprem-ccm")).await?;
    let client = stack.client.clone();
    onprem::deploy_app(&client, 3, DRAIN).await?;
    onprem::create_service(&client, APP, DRAIN).await?;
    let lb = onprem::wait_lb_address(&client, APP, WAIT).await?;
    let backend = stack.backend_name(APP).await?;
    stack.wait_servers_follow(&backend, Some(3), WAIT).await?;
    let failures_before = failure_events(&stack).await?;

    // 1. The plugin crashes. The Service changes meanwhile (a scale):
    // the controller reports the failure and retries; HAProxy keeps
    // forwarding to the Pods it has.
    stack.lb.kill_plugin();
    let load = Load::start(lb, 20);
    onprem::scale(&client, 4).await?;
    eventually("a SyncLoadBalancerFailed Event", WAIT, || async {
        Ok(failure_events(&stack).await? > failures_before)
    })
    .await?;
    let events = onprem::service_events(&client, APP).await?;
    println!("events while the plugin is down: {events:?}");
    // Keep it down a little longer: retries go on, nothing changes.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let servers = stack.lb.servers(&backend).await?.unwrap_or_default();
    ensure!(
        servers.len() == 3,
        "servers while the plugin is down: {servers:?}"
    );
    let down = load.stop().await;
    println!("while the plugin was down: {down:?}");
    ensure!(
        down.failed == 0 && down.ok > 0,
        "requests while the plugin was down: {down:?}"
    );
    ensure!(down.per_pod.len() == 3, "{:?}", down.per_pod);
    stack.check_running()?;

    // 2. The plugin is back: the retry applies the scale.
    stack.lb.start_plugin().await?;
    stack.wait_servers_follow(&backend, Some(4), WAIT).await?;

    // 3. HAProxy restarts: every backend is back (from the configuration
    // the plugin wrote through) and serves.
    let before = stack.lb.servers(&backend).await?.unwrap_or_default();
    stack.lb.stop_haproxy();
    stack.lb.start_haproxy().await?;
    let after = stack.lb.servers(&backend).await?.unwrap_or_default();
    ensure!(
        before == after,
        "before the restart {before:?}, after {after:?}"
    );
    stack.wait_servers_follow(&backend, Some(4), WAIT).await?;
    let seen = std::sync::Mutex::new(BTreeSet::new());
    eventually("all 4 Pods answer after the restart", WAIT, || async {
        let pod = onprem::get(lb).await?;
        let mut seen = seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        seen.insert(pod);
        Ok(seen.len() == 4)
    })
    .await?;
    // And a change after the restart is applied too.
    onprem::scale(&client, 2).await?;
    stack.wait_servers_follow(&backend, Some(2), WAIT).await?;
    stack.check_running()?;
    Ok(())
}
