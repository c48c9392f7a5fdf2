//! The node controllers of a cloud controller manager, as
//! k8s.io/cloud-provider's cloud-node and cloud-node-lifecycle run them,
//! but batched: every cloud call covers many Nodes (see
//! `cnlb_provider_core::node`).
//!
//! - **Initialization**: a Node registered with the `uninitialized` taint
//!   (kubelet `--cloud-provider=external`) gets its provider ID, addresses
//!   and topology labels from its instance, then loses the taint. Nodes
//!   that register together are looked up together; a failure leaves the
//!   taint, says why in a Warning Event on the Node, and is retried with
//!   backoff.
//! - **Addresses**: every `--node-status-update-frequency`, one lookup for
//!   all initialized Nodes; changed addresses are written.
//! - **Lifecycle**: every `--node-monitor-period`, the NotReady Nodes (and
//!   those tainted shut down) are looked up: a Node whose instance is gone
//!   is deleted, one whose instance is stopped tainted `shutdown`, and the
//!   taint goes when it runs again. Ready Nodes cost no call.

pub mod plan;
mod reported;

pub use reported::{PluginNodes, ReportedAddresses};

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use cnlb_provider_core::{Instance, InstanceState, NodeAddress, NodeProvider, NodeRef};
use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender, unbounded};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::events::{Events, Kind};
use plan::{Lifecycle, UNINITIALIZED_TAINT};

/// At most this many Nodes per cloud lookup: EC2 takes 200 instance IDs
/// per filter.
pub const BATCH: usize = 200;
/// Nodes written at once after a lookup.
const WRITERS: usize = 16;
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(60);

pub struct Settings {
    /// cloud-node: initialization and address sync.
    pub initialize: bool,
    /// cloud-node-lifecycle.
    pub lifecycle: bool,
    /// `--node-monitor-period`.
    pub monitor_period: Duration,
    /// `--node-status-update-frequency`.
    pub status_update_frequency: Duration,
}

struct Context {
    client: Client,
    provider: Arc<dyn NodeProvider>,
    nodes: Store<Node>,
    events: Events,
}

/// Runs the enabled node controllers until their watch ends (never, in
/// practice).
pub async fn run(client: Client, provider: Arc<dyn NodeProvider>, settings: Settings) {
    let (nodes, writer) = reflector::store();
    let ctx = Arc::new(Context {
        events: Events::new(client.clone(), crate::service::MANAGER),
        client: client.clone(),
        provider,
        nodes: nodes.clone(),
    });
    let (requests, wanted) = unbounded::<String>();
    let watch = watcher(Api::<Node>::all(client), watcher::Config::default())
        .default_backoff()
        .modify(|n| n.metadata.managed_fields = None)
        .reflect(writer)
        .applied_objects();
    let forward = forward_uninitialized(watch, requests);
    let controllers = async {
        // One waiter: the store's readiness wakes only the last.
        if nodes.wait_until_ready().await.is_err() {
            return;
        }
        info!(
            nodes = nodes.len(),
            provider = ctx.provider.name(),
            "Node cache filled"
        );
        let initialize = async {
            if settings.initialize {
                tokio::join!(
                    initialize(&ctx, wanted),
                    every(settings.status_update_frequency, || sync_addresses(&ctx)),
                );
            }
        };
        let lifecycle = async {
            if settings.lifecycle {
                every(settings.monitor_period, || check_lifecycle(&ctx)).await;
            }
        };
        tokio::join!(initialize, lifecycle);
    };
    // One task: dropping it (when leadership is lost) stops everything.
    tokio::join!(forward, controllers);
}

/// Drives the Node watch (and its store), sending the names of Nodes that
/// wait to be initialized.
async fn forward_uninitialized<S>(watch: S, requests: UnboundedSender<String>)
where
    S: futures::Stream<Item = Result<Node, watcher::Error>>,
{
    let mut watch = std::pin::pin!(watch);
    loop {
        match watch.try_next().await {
            Ok(Some(node)) => {
                if plan::has_taint(&node, UNINITIALIZED_TAINT) {
                    let _ = requests.unbounded_send(node.name_any());
                }
            }
            Ok(None) => return,
            Err(e) => warn!("watching Nodes: {e}"),
        }
    }
}

async fn every<F, Fut>(period: Duration, mut tick: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        tick().await;
    }
}

/// Looks up `nodes` in batches of [`BATCH`]: each Node with its instance
/// (`None`: there is none), or the batch's error.
async fn look_up(
    ctx: &Context,
    nodes: &[Arc<Node>],
) -> Vec<(Arc<Node>, Result<Option<Instance>, String>)> {
    let mut out = Vec::with_capacity(nodes.len());
    for chunk in nodes.chunks(BATCH) {
        let refs: Vec<NodeRef> = chunk.iter().map(|n| plan::node_ref(n)).collect();
        match ctx.provider.instances(&refs).await {
            Ok(found) if found.len() == chunk.len() => {
                out.extend(chunk.iter().cloned().zip(found.into_iter().map(Ok)));
            }
            Ok(found) => {
                let e = format!(
                    "the {} provider answered {} of {} Nodes",
                    ctx.provider.name(),
                    found.len(),
                    chunk.len()
                );
                out.extend(chunk.iter().map(|n| (n.clone(), Err(e.clone()))));
            }
            Err(e) => out.extend(chunk.iter().map(|n| (n.clone(), Err(e.to_string())))),
        }
    }
    out
}

/// When a Node that failed may be tried again.
struct Retry {
    due: Instant,
    backoff: Duration,
}

/// Initializes the Nodes named on `wanted` (and those due for a retry),
/// as many per lookup as arrived together.
async fn initialize(ctx: &Context, mut wanted: UnboundedReceiver<String>) {
    let mut retries: HashMap<String, Retry> = HashMap::new();
    loop {
        let mut names = BTreeSet::new();
        let next_retry = retries.values().map(|r| r.due).min();
        tokio::select! {
            name = wanted.next() => match name {
                Some(name) => { names.insert(name); }
                None => return,
            },
            () = sleep_until(next_retry) => {}
        }
        // Whatever else arrived meanwhile goes into the same lookup.
        while let Ok(name) = wanted.try_recv() {
            names.insert(name);
        }
        // Nodes initialized meanwhile (or gone) need no retry.
        retries.retain(|n, _| {
            ctx.nodes
                .get(&ObjectRef::new(n))
                .is_some_and(|node| plan::has_taint(&node, UNINITIALIZED_TAINT))
        });
        let now = Instant::now();
        // A Node waiting out its backoff is not tried early because its
        // kubelet updated it.
        names.retain(|n| retries.get(n).is_none_or(|r| r.due <= now));
        names.extend(
            retries
                .iter()
                .filter(|(_, r)| r.due <= now)
                .map(|(n, _)| n.clone()),
        );
        let nodes: Vec<Arc<Node>> = names
            .iter()
            .filter_map(|n| ctx.nodes.get(&ObjectRef::new(n)))
            .filter(|n| plan::has_taint(n, UNINITIALIZED_TAINT))
            .collect();
        // The Nodes are written a few at a time: the API server, not the
        // cloud, is what many Nodes wait for here.
        let outcomes: Vec<(Arc<Node>, Result<(), String>)> = futures::stream::iter(
            look_up(ctx, &nodes).await,
        )
        .map(|(node, found)| async move {
            let result = match found {
                Ok(Some(instance)) => initialize_node(ctx, &node, &instance)
                    .await
                    .map_err(|e| format!("writing the Node: {e}")),
                Ok(None) => Err(format!(
                    "no instance of {} found for Node {}: by provider ID, name or address {:?}",
                    ctx.provider.name(),
                    node.name_any(),
                    plan::node_ref(&node).internal_ips
                )),
                Err(e) => Err(e),
            };
            (node, result)
        })
        .buffer_unordered(WRITERS)
        .collect()
        .await;
        for (node, result) in outcomes {
            let name = node.name_any();
            match result {
                Ok(()) => {
                    retries.remove(&name);
                    ctx.events.forget(node.as_ref(), "FailedToInitialize");
                    info!(node = %name, "initialized");
                }
                Err(e) => {
                    warn!(node = %name, "initializing: {e}");
                    ctx.events
                        .send(node.as_ref(), Kind::Warning, "FailedToInitialize", "", &e)
                        .await;
                    let backoff = retries
                        .get(&name)
                        .map_or(FIRST_RETRY, |r| (r.backoff * 2).min(MAX_RETRY));
                    retries.insert(
                        name,
                        Retry {
                            due: Instant::now() + backoff,
                            backoff,
                        },
                    );
                }
            }
        }
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

fn addresses_json(addresses: &[NodeAddress]) -> serde_json::Value {
    addresses
        .iter()
        .map(|a| json!({"type": a.kind.as_str(), "address": a.address}))
        .collect()
}

/// Addresses and labels first, so that nothing schedules on a Node that
/// lacks them; the taint last, in a patch conditional on the Node not
/// having changed meanwhile.
async fn initialize_node(ctx: &Context, node: &Node, instance: &Instance) -> kube::Result<()> {
    let init = plan::initialization(node, instance);
    let api: Api<Node> = Api::all(ctx.client.clone());
    let name = node.name_any();
    let addresses = if init.addresses.is_empty() {
        None
    } else {
        Some(init.addresses.as_slice())
    };
    let mut version = node.resource_version();
    if let Some(addresses) = addresses {
        let patched = api
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"addresses": addresses_json(addresses)}})),
            )
            .await?;
        version = patched.resource_version();
    }
    let mut spec = json!({"taints": init.taints});
    if let Some(id) = &init.provider_id {
        spec["providerID"] = json!(id);
    }
    let patch = json!({
        "metadata": {"labels": init.labels, "resourceVersion": version},
        "spec": spec,
    });
    api.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
        .await?;
    Ok(())
}

/// One lookup for every initialized Node; writes the addresses that changed.
async fn sync_addresses(ctx: &Context) {
    let nodes: Vec<Arc<Node>> = ctx
        .nodes
        .state()
        .into_iter()
        .filter(|n| !plan::has_taint(n, UNINITIALIZED_TAINT))
        .collect();
    if nodes.is_empty() {
        return;
    }
    let api: Api<Node> = Api::all(ctx.client.clone());
    for (node, found) in look_up(ctx, &nodes).await {
        let Ok(Some(instance)) = found else { continue };
        let Some(addresses) = plan::changed_addresses(&node, &instance) else {
            continue;
        };
        let patch = json!({"status": {"addresses": addresses_json(&addresses)}});
        if let Err(e) = api
            .patch_status(
                &node.name_any(),
                &PatchParams::default(),
                &Patch::Merge(patch),
            )
            .await
        {
            warn!(node = %node.name_any(), "updating addresses: {e}");
        }
    }
}

/// Looks up the NotReady Nodes (and those tainted shut down) and acts on
/// what the cloud says of their instances.
async fn check_lifecycle(ctx: &Context) {
    let nodes: Vec<Arc<Node>> = ctx
        .nodes
        .state()
        .into_iter()
        .filter(|n| plan::needs_lifecycle_check(n))
        .collect();
    if nodes.is_empty() {
        return;
    }
    let api: Api<Node> = Api::all(ctx.client.clone());
    for (node, found) in look_up(ctx, &nodes).await {
        let found = match found {
            Ok(found) => found,
            Err(e) => {
                warn!(node = %node.name_any(), "checking its instance: {e}");
                continue;
            }
        };
        let name = node.name_any();
        let result = match plan::lifecycle(&node, found.as_ref()) {
            Lifecycle::Keep => Ok(()),
            Lifecycle::Delete => {
                info!(node = %name, "its instance is gone: deleting the Node");
                ctx.events
                    .send(
                        node.as_ref(),
                        Kind::Normal,
                        "DeletingNode",
                        "",
                        &format!("Deleting Node {name}: its instance no longer exists"),
                    )
                    .await;
                api.delete(&name, &DeleteParams::default())
                    .await
                    .map(|_| ())
            }
            Lifecycle::Taint(taints) | Lifecycle::Untaint(taints) => {
                let stopped = found.is_some_and(|i| i.state == InstanceState::Shutdown);
                info!(node = %name, stopped, "instance state changed: updating the shutdown taint");
                let patch = json!({
                    "metadata": {"resourceVersion": node.resource_version()},
                    "spec": {"taints": taints},
                });
                api.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                    .await
                    .map(|_| ())
            }
        };
        if let Err(e) = result {
            warn!(node = %name, "lifecycle: {e}");
        }
    }
}
