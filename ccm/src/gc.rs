//! Garbage collection: load balancers whose ownership names a Service of
//! this cluster that no longer exists (force-deleted with its finalizer
//! removed, or deleted while another controller held it) are deleted. The
//! finalizer makes this rare; this makes it certain. Runs at start and then
//! every [`PERIOD`], only on the leader. At start and shortly after load
//! balancers were deleted, the provider also prunes what load balancers
//! share (AWS: backend security-group rules no NLB needs any more).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use cnlb_provider_core::LoadBalancerProvider;
use k8s_openapi::api::core::v1::Service;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use tokio::sync::Notify;
use tracing::{info, warn};

pub const PERIOD: Duration = Duration::from_secs(600);
/// After a deletion, wait this long for more: a burst of deletions costs
/// one prune.
const SETTLE: Duration = Duration::from_secs(5);

/// Runs until aborted; `deletions` is told after each load balancer
/// deletion.
pub async fn run(
    client: Client,
    provider: Arc<dyn LoadBalancerProvider>,
    cluster: String,
    deletions: Arc<Notify>,
) {
    let mut ticks = tokio::time::interval(PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut prune = true;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = deletions.notified() => {
                prune = true;
                tokio::time::sleep(SETTLE).await;
            }
        }
        match collect(&client, provider.as_ref(), &cluster).await {
            Ok(0) => {}
            Ok(deleted) => {
                prune = true;
                info!(
                    deleted,
                    "garbage collection deleted orphaned load balancers"
                );
            }
            Err(e) => warn!("garbage collection: {e}"),
        }
        if prune {
            match provider.prune_shared(&cluster).await {
                Ok(()) => prune = false,
                Err(e) => warn!("pruning what load balancers share (next collection retries): {e}"),
            }
        }
    }
}

/// Deletes every owned load balancer whose Service UID is not live; returns
/// how many. The cloud is listed before the Services, so a load balancer
/// found belongs to a Service that, if it still exists, is in the list.
pub async fn collect(
    client: &Client,
    provider: &dyn LoadBalancerProvider,
    cluster: &str,
) -> anyhow::Result<usize> {
    let owned = provider.list_owned(cluster).await?;
    if owned.is_empty() {
        return Ok(0);
    }
    let services: Api<Service> = Api::all(client.clone());
    let live: BTreeSet<String> = services
        .list_metadata(&ListParams::default())
        .await?
        .items
        .iter()
        .filter_map(|s| s.uid())
        .collect();
    let mut deleted = 0;
    for lb in owned.iter().filter(|lb| !live.contains(&lb.key.uid)) {
        info!(service = %lb.key.service(), uid = %lb.key.uid, "deleting the load balancer of a Service that no longer exists");
        match provider.delete_load_balancer(&lb.key, &lb.ids).await {
            Ok(()) => deleted += 1,
            Err(e) => warn!(service = %lb.key.service(), "garbage collection: {e}"),
        }
    }
    Ok(deleted)
}
