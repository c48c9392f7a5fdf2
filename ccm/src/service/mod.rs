//! The Service controller. For each Service cnlb handles: a finalizer
//! before any cloud call, the load balancer ensured when its spec changed
//! ([`apply`]), the targets brought to the EndpointSlices as deltas
//! ([`sync`]), readiness gates opened on health and released when cnlb lets
//! go ([`gates`]), the status written by server-side apply ([`status`]),
//! and an Event for every change ([`events`]).
//!
//! Services, EndpointSlices and Pods come from reflector stores (one watch
//! each, no LIST per reconcile). An EndpointSlice change reaches its
//! Service; a Pod change reaches the Services whose endpoints name it, so
//! a Pod whose containers become ready while its gate waits is registered
//! without its EndpointSlice changing. A reconcile starts as soon as a
//! change arrives; changes during a running reconcile of the same Service
//! are merged into the next one.

mod apply;
mod gates;
mod metrics;
mod status;
mod sync;

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use cnlb_provider_core::{LoadBalancerProvider, ProviderError, RetryPolicy};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::controller::{Action, Config as ControllerConfig};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, predicates, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

pub use metrics::ControllerMetrics;

use crate::annotations::opted_in;
use crate::events::{Events, Kind};
use crate::targets::READINESS_GATES;
use sync::Registered;

/// Held while cnlb owns cloud resources for the Service.
pub const FINALIZER: &str = "cnlb.dev/load-balancer-cleanup";
/// Cloud resource IDs, persisted so the next run finds them without a search.
pub const IDS_ANNOTATION: &str = "cnlb.dev/resource-ids";
/// The spec the cloud was last brought to (JSON): the same spec means no
/// cloud call, and while the Service's own spec is invalid its targets
/// follow this one's listeners.
pub const APPLIED_ANNOTATION: &str = "cnlb.dev/applied-spec";
/// cnlb's field manager (status) and Event reporter.
pub const MANAGER: &str = "cnlb-ccm";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Health polls after a change while the cloud has not decided on every
/// target (about a minute with the backoff), so that TargetsHealthy ends
/// up true to the cloud; none at rest.
const SETTLE_POLLS: u32 = 8;

pub struct Settings {
    pub cluster: String,
    pub class: String,
    pub manage_unclassed: bool,
    pub manage_lbc_annotated: bool,
    pub concurrency: u16,
}

pub(crate) struct Context {
    client: Client,
    provider: Arc<dyn LoadBalancerProvider>,
    settings: Settings,
    slices: Store<EndpointSlice>,
    pods: Store<Pod>,
    events: Events,
    metrics: ControllerMetrics,
    /// Registered targets per Service UID and listener, as last synced;
    /// filled from the cloud's view the first time a Service is seen after
    /// a start, or after an ensure.
    registered: Mutex<HashMap<String, Registered>>,
    /// Health polls in a row per Service UID, while one is worth it.
    health_polls: Mutex<HashMap<String, u32>>,
    /// Services a change triggered whose reconcile has not started.
    queued: Mutex<HashSet<ObjectRef<Service>>>,
    /// Told after each load balancer deletion (garbage collection then
    /// prunes what load balancers share).
    deletions: Arc<Notify>,
    /// What this process last wrote on each Service (by UID). The store
    /// lags behind our own writes: a reconcile from a stale copy must
    /// neither ensure again nor drop a condition.
    written: Mutex<HashMap<String, Written>>,
}

/// cnlb's own annotations and status, as last written.
#[derive(Clone, Default)]
pub(crate) struct Written {
    pub spec: Option<cnlb_provider_core::LoadBalancerSpec>,
    pub ids: Option<cnlb_provider_core::ResourceIds>,
    pub ingress: Option<serde_json::Value>,
    pub conditions: Option<Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each guarded map stays consistent whatever a panicking holder did.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Context {
    fn registered(&self, uid: &str) -> Option<Registered> {
        lock(&self.registered).get(uid).cloned()
    }

    fn remember_registered(&self, uid: &str, registered: Registered) {
        lock(&self.registered).insert(uid.to_string(), registered);
    }

    fn forget_registered(&self, uid: &str) {
        lock(&self.registered).remove(uid);
        lock(&self.health_polls).remove(uid);
    }

    fn written(&self, svc: &Service) -> Written {
        let uid = svc.uid().unwrap_or_default();
        lock(&self.written).get(&uid).cloned().unwrap_or_default()
    }

    fn wrote(&self, svc: &Service, update: impl FnOnce(&mut Written)) {
        update(
            lock(&self.written)
                .entry(svc.uid().unwrap_or_default())
                .or_default(),
        );
    }

    fn forget_written(&self, svc: &Service) {
        lock(&self.written).remove(&svc.uid().unwrap_or_default());
    }

    fn health_pending(&self, uid: &str) -> bool {
        lock(&self.health_polls).contains_key(uid)
    }

    /// The next health poll: while a gate waits (it needs a verdict), or,
    /// for at most [`SETTLE_POLLS`] since targets last changed, while the
    /// cloud has not decided on every target; the backoff restarts when
    /// targets `changed`. No poll (and nothing remembered) otherwise.
    fn next_poll(&self, uid: &str, changed: bool, gates_wait: bool, unsettled: bool) -> Action {
        let mut polls = lock(&self.health_polls);
        let n = polls.entry(uid.to_string()).or_insert(0);
        if changed {
            *n = 0;
        }
        let again = gates_wait || (unsettled && *n < SETTLE_POLLS);
        if !again {
            polls.remove(uid);
            return Action::await_change();
        }
        *n += 1;
        Action::requeue(sync::poll_delay(*n))
    }

    fn queue(&self, r: ObjectRef<Service>) -> ObjectRef<Service> {
        let mut queued = lock(&self.queued);
        queued.insert(r.clone());
        self.metrics.set_queue_depth(queued.len());
        r
    }

    fn dequeue(&self, svc: &Service) {
        let mut queued = lock(&self.queued);
        queued.remove(&ObjectRef::from_obj(svc));
        self.metrics.set_queue_depth(queued.len());
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// The label of `cnlb_reconcile_errors`.
    fn kind(&self) -> &'static str {
        match self {
            Error::Provider(p) => match p.retry_policy() {
                RetryPolicy::AwaitChange => "cloud_refused",
                RetryPolicy::After(_) => "cloud_retry_after",
                RetryPolicy::Backoff => "cloud",
            },
            Error::Kube(_) => "kubernetes",
            Error::Finalizer(_) => "finalizer",
            Error::Invalid(_) => "invalid",
        }
    }
}

/// What of a Service a reconcile depends on: a change elsewhere (our own
/// status write, say) triggers nothing.
fn service_fingerprint(svc: &Service) -> Option<u64> {
    let mut h = DefaultHasher::new();
    serde_json::to_string(&svc.spec).ok()?.hash(&mut h);
    svc.annotations().hash(&mut h);
    svc.finalizers().hash(&mut h);
    svc.metadata.deletion_timestamp.is_some().hash(&mut h);
    Some(h.finish())
}

/// What of a Pod the gates need; the rest is dropped from the store.
fn keep_gate_fields(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    pod.metadata.annotations = None;
    pod.metadata.labels = None;
    pod.metadata.owner_references = None;
    if let Some(spec) = pod.spec.take() {
        pod.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            readiness_gates: spec.readiness_gates,
            ..Default::default()
        });
    }
    if let Some(status) = pod.status.take() {
        pod.status = Some(k8s_openapi::api::core::v1::PodStatus {
            pod_ip: status.pod_ip,
            conditions: status.conditions,
            ..Default::default()
        });
    }
}

fn declares_a_gate(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.readiness_gates.as_ref())
        .is_some_and(|gs| {
            gs.iter()
                .any(|g| READINESS_GATES.contains(&g.condition_type.as_str()))
        })
}

/// The Service an EndpointSlice belongs to.
fn service_of_slice(slice: &EndpointSlice) -> Option<ObjectRef<Service>> {
    let name = slice.labels().get(SERVICE_NAME_LABEL)?;
    Some(ObjectRef::new(name).within(&slice.namespace().unwrap_or_default()))
}

/// The Services whose endpoints name `pod`.
fn services_of(slices: &Store<EndpointSlice>, pod: &Pod) -> Vec<ObjectRef<Service>> {
    let (ns, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
    slices
        .state_filter(|s| {
            s.namespace().as_deref() == Some(ns.as_str())
                && s.endpoints.iter().flatten().any(|ep| {
                    ep.target_ref
                        .as_ref()
                        .is_some_and(|t| t.name.as_deref() == Some(name.as_str()))
                })
        })
        .iter()
        .filter_map(|s| s.labels().get(SERVICE_NAME_LABEL).cloned())
        .collect::<HashSet<_>>()
        .into_iter()
        .map(|svc| ObjectRef::new(&svc).within(&ns))
        .collect()
}

/// Runs until the watches end (never, in practice).
pub async fn run(
    client: Client,
    provider: Arc<dyn LoadBalancerProvider>,
    settings: Settings,
    metrics: ControllerMetrics,
    deletions: Arc<Notify>,
) {
    let (services, services_writer) = reflector::store();
    let (slices, slices_writer) = reflector::store();
    let (pods, pods_writer) = reflector::store();
    let config = ControllerConfig::default().concurrency(settings.concurrency);
    let ctx = Arc::new(Context {
        events: Events::new(client.clone(), MANAGER),
        client: client.clone(),
        provider,
        settings,
        slices: slices.clone(),
        pods: pods.clone(),
        metrics,
        registered: Mutex::default(),
        health_polls: Mutex::default(),
        queued: Mutex::default(),
        deletions,
        written: Mutex::default(),
    });
    info!("watching Services, EndpointSlices and Pods");

    // EndpointSlice and Pod changes become reconcile requests of the
    // Services they concern.
    let (triggers, requests) = futures::channel::mpsc::unbounded();
    // A relist (after a watch expired: 410 Gone) has no event for the
    // EndpointSlices deleted while we were not watching; the slices it no
    // longer finds name the Services to queue.
    let (c, relist_triggers) = (ctx.clone(), triggers.clone());
    let mut before_relist = Vec::new();
    let slice_watch = watcher(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default().labels(SERVICE_NAME_LABEL),
    )
    .default_backoff()
    .modify(|s| s.metadata.managed_fields = None)
    .reflect(slices_writer)
    .inspect_ok(move |event| match event {
        watcher::Event::Init => before_relist = c.slices.state(),
        watcher::Event::InitDone => {
            for slice in before_relist.drain(..) {
                let gone = c.slices.get(&ObjectRef::from_obj(&*slice)).is_none();
                if let Some(r) = service_of_slice(&slice).filter(|_| gone) {
                    let _ = relist_triggers.unbounded_send(c.queue(r));
                }
            }
        }
        _ => {}
    })
    .touched_objects()
    .predicate_filter(predicates::resource_version, Default::default());
    let c = ctx.clone();
    let slice_triggers = forward(
        slice_watch,
        triggers.clone(),
        move |slice: &EndpointSlice| {
            service_of_slice(slice)
                .map(|r| c.queue(r))
                .into_iter()
                .collect()
        },
    );
    let pod_watch = watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(keep_gate_fields)
        .reflect(pods_writer)
        .touched_objects();
    let c = ctx.clone();
    let pod_triggers = forward(pod_watch, triggers, move |pod: &Pod| {
        if !declares_a_gate(pod) {
            return Vec::new();
        }
        services_of(&c.slices, pod)
            .into_iter()
            .map(|r| c.queue(r))
            .collect()
    });

    let c = ctx.clone();
    let controller = async move {
        // Decisions need every EndpointSlice and Pod: empty caches (right
        // after a start) would deregister every target. (One waiter per
        // store: its readiness wakes only the last.)
        if slices.wait_until_ready().await.is_err() || pods.wait_until_ready().await.is_err() {
            return;
        }
        info!(
            endpoint_slices = slices.len(),
            pods = pods.len(),
            "EndpointSlice and Pod caches filled"
        );
        let service_stream = watcher(Api::<Service>::all(client), watcher::Config::default())
            .default_backoff()
            .modify(|s| s.metadata.managed_fields = None)
            .reflect(services_writer)
            .applied_objects()
            .predicate_filter(service_fingerprint, Default::default())
            .map_ok(move |svc| {
                c.queue(ObjectRef::from_obj(&svc));
                svc
            });
        Controller::for_stream(service_stream, services)
            .with_config(config)
            .reconcile_on(requests)
            .run(reconcile, error_policy, ctx)
            .for_each(|result| async move {
                if let Err(e) = result {
                    warn!("reconcile: {e}");
                }
            })
            .await;
    };
    // One task: dropping it (when leadership is lost) stops all three.
    futures::join!(slice_triggers, pod_triggers, controller);
}

/// Drives a watch (and the store it fills), sending the Services each
/// object concerns.
async fn forward<K, S>(
    stream: S,
    triggers: futures::channel::mpsc::UnboundedSender<ObjectRef<Service>>,
    concerns: impl Fn(&K) -> Vec<ObjectRef<Service>>,
) where
    S: futures::Stream<Item = Result<K, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        match item {
            Ok(obj) => {
                for r in concerns(&obj) {
                    let _ = triggers.unbounded_send(r);
                }
            }
            Err(e) => warn!("watch: {e}"),
        }
    }
}

async fn reconcile(svc: Arc<Service>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.dequeue(&svc);
    let started = Instant::now();
    let result = reconcile_service(svc.clone(), &ctx).await;
    debug!(took = ?started.elapsed(), ?result, "reconciled");
    ctx.metrics
        .reconciled(started.elapsed(), result.as_ref().err().map(Error::kind));
    if result.is_ok() {
        ctx.events.forget(svc.as_ref(), "SyncLoadBalancerFailed");
    }
    result
}

async fn reconcile_service(svc: Arc<Service>, ctx: &Context) -> Result<Action, Error> {
    let ns = svc.namespace().unwrap_or_default();
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let s = &ctx.settings;
    if !opted_in(&svc, &s.class, s.manage_unclassed, s.manage_lbc_annotated) {
        // No longer ours (type or class changed, maybe being deleted too):
        // clean up what we built, then let go.
        if svc.finalizers().iter().any(|f| f == FINALIZER) {
            apply::cleanup(&svc, ctx).await?;
            apply::release(&svc, ctx).await?;
        }
        return Ok(Action::await_change());
    }
    finalizer(&api, FINALIZER, svc, |event| async {
        match event {
            FinalizerEvent::Apply(svc) => apply::apply(&svc, ctx).await,
            FinalizerEvent::Cleanup(svc) => apply::cleanup(&svc, ctx)
                .await
                .map(|()| Action::await_change()),
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    })
}

fn error_policy(svc: Arc<Service>, err: &Error, ctx: Arc<Context>) -> Action {
    let service = format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any());
    if matches!(err, Error::Provider(ProviderError::Throttled { .. })) {
        // The cloud is busy, not the Service wrong: the call wrapper has
        // slowed down already; try again later without telling the user.
        debug!(service, "{err}");
        return Action::requeue(std::time::Duration::from_secs(10));
    }
    warn!(service, "{err}");
    let action = match err {
        Error::Provider(p) => match p.retry_policy() {
            RetryPolicy::AwaitChange => Action::await_change(),
            RetryPolicy::After(d) => Action::requeue(d),
            RetryPolicy::Backoff => Action::requeue(std::time::Duration::from_secs(10)),
        },
        _ => Action::requeue(std::time::Duration::from_secs(5)),
    };
    // error_policy is synchronous: the Event goes out in the background
    // (once per distinct error: a retry that fails the same way says nothing new).
    let note = err.to_string();
    tokio::spawn(async move {
        ctx.events
            .send(
                svc.as_ref(),
                Kind::Warning,
                "SyncLoadBalancerFailed",
                "",
                &note,
            )
            .await;
    });
    action
}
