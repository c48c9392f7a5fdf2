//! Garbage collection: load balancers whose ownership names a Service of
//! this cluster that no longer exists (force-deleted with its finalizer
//! removed, or deleted while another controller held it) are deleted. The
//! finalizer makes this rare; this makes it certain. Runs at start and then
//! every [`PERIOD`], only on the leader.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use cnlb_provider_core::LoadBalancerProvider;
use k8s_openapi::api::core::v1::Service;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use tracing::{info, warn};

pub const PERIOD: Duration = Duration::from_secs(600);

/// Runs until aborted.
pub async fn run(client: Client, provider: Arc<dyn LoadBalancerProvider>, cluster: String) {
    let mut ticks = tokio::time::interval(PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match collect(&client, provider.as_ref(), &cluster).await {
            Ok(0) => {}
            Ok(deleted) => info!(
                deleted,
                "garbage collection deleted orphaned load balancers"
            ),
            Err(e) => warn!("garbage collection: {e}"),
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
