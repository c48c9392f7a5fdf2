//! The Service controller. For each Service cnlb handles: a finalizer
//! before any cloud call, the load balancer ensured when its spec changed
//! ([`apply`]), the targets brought to the EndpointSlices as deltas
//! ([`sync`]), readiness gates opened on health and released when cnlb lets
//! go ([`gates`]), the status written by server-side apply ([`status`]),
//! and an Event for every change ([`events`]).
//!
//! Services, EndpointSlices and Pods come from [`watches`]' stores, filled
//! before this replica leads. A reconcile starts as soon as a change
//! arrives; changes during a running reconcile of the same Service are
//! merged into the next one.

mod apply;
mod gates;
mod lane;
mod metrics;
mod slices;
mod status;
mod sync;
mod watches;
mod written;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use cnlb_provider_core::{LoadBalancerProvider, ProviderError, RetryPolicy};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::runtime::controller::{Action, Config as ControllerConfig};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

pub use metrics::ControllerMetrics;
pub use watches::{Caches, watch};

use crate::annotations::opted_in;
use crate::events::{Events, Kind};
use lane::PollLane;
use sync::Registered;
use watches::{Stores, Triggers};
use written::{Writes, Written};

/// Held while cnlb owns cloud resources for the Service.
pub const FINALIZER: &str = "cnlb.dev/load-balancer-cleanup";
/// Cloud resource IDs, persisted so the next run finds them without a search.
pub const IDS_ANNOTATION: &str = "cnlb.dev/resource-ids";
/// The spec the cloud was last brought to (JSON): the same spec means no
/// cloud call, and while the Service's own spec is invalid its targets
/// follow this one's listeners.
pub const APPLIED_ANNOTATION: &str = "cnlb.dev/applied-spec";
/// A digest of the resource IDs and the targets last registered: a new
/// leader whose caches give the same digest knows what is registered
/// without asking the cloud.
pub const REGISTERED_ANNOTATION: &str = "cnlb.dev/registered-targets";
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
    stores: Stores,
    events: Events,
    metrics: ControllerMetrics,
    /// Registered targets per Service UID and listener, as last synced;
    /// filled from the cloud's view the first time a Service is seen after
    /// a start, or after an ensure.
    registered: Mutex<HashMap<String, Registered>>,
    /// Health polls in a row per Service UID, while one is worth it.
    health_polls: Mutex<HashMap<String, u32>>,
    lane: Mutex<PollLane<ObjectRef<Service>>>,
    triggers: Arc<Triggers>,
    /// Told after each load balancer deletion (garbage collection then
    /// prunes what load balancers share).
    deletions: Arc<Notify>,
    /// What this process wrote on each Service that the store may not show yet.
    writes: Arc<Writes>,
    /// The Services not yet reconciled since this replica took the lead.
    verifying: Mutex<Option<Verifying>>,
}

struct Verifying {
    total: usize,
    pending: HashSet<ObjectRef<Service>>,
    since: Instant,
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
        self.writes.get(svc)
    }

    /// Records what a write on `svc` that made `updated` said.
    fn wrote(&self, svc: &Service, updated: &Service, update: impl FnOnce(&mut Written)) {
        self.writes
            .wrote(&self.stores.services, svc, updated, update);
    }

    fn forget_written(&self, svc: &Service) {
        self.writes.forget(svc);
    }

    fn health_pending(&self, uid: &str) -> bool {
        lock(&self.health_polls).contains_key(uid)
    }

    /// A place in the lane of settling polls, held until dropped; `None`:
    /// the lane is full and the poll parked (the lane sends it again).
    fn enter_lane(&self, svc: &Service) -> Option<LanePlace<'_>> {
        let entered = lock(&self.lane).enter(&ObjectRef::from_obj(svc));
        entered.then_some(LanePlace(self))
    }

    /// `svc`'s reconcile ended: the parked polls there is room for now
    /// are sent again.
    fn lane_done(&self, svc: &Service) {
        let polls = {
            let mut lane = lock(&self.lane);
            lane.done(&ObjectRef::from_obj(svc));
            lane.release(|r| self.stores.services.get(r).is_none())
        };
        for r in polls {
            self.triggers.send_poll(r);
        }
    }

    /// The first health poll after targets changed: once the cloud can
    /// have decided on the new ones (`verdict`), or after a second while a
    /// gate waits (it is opened at the first verdict, whenever it comes).
    fn first_poll(&self, uid: &str, verdict: Duration, gates_wait: bool) -> Action {
        lock(&self.health_polls).insert(uid.to_string(), 1);
        let first = sync::poll_delay(1);
        let delay = if gates_wait {
            first
        } else {
            first.max(verdict)
        };
        Action::requeue(delay)
    }

    /// The next health poll: while a gate waits (it needs a verdict), or,
    /// for at most [`SETTLE_POLLS`] since targets last changed, while the
    /// cloud has not decided on every target. No poll (and nothing
    /// remembered) otherwise.
    fn next_poll(&self, uid: &str, gates_wait: bool, unsettled: bool) -> Action {
        let mut polls = lock(&self.health_polls);
        let n = polls.entry(uid.to_string()).or_insert(0);
        if !(gates_wait || (unsettled && *n < SETTLE_POLLS)) {
            polls.remove(uid);
            return Action::await_change();
        }
        *n += 1;
        Action::requeue(sync::poll_delay(*n))
    }

    /// Says once when every Service there was on taking the lead has been
    /// reconciled (or is gone).
    fn verified(&self, svc: &Service) {
        let mut verifying = lock(&self.verifying);
        let Some(v) = verifying.as_mut() else {
            return;
        };
        v.pending.remove(&ObjectRef::from_obj(svc));
        // The last few may have been deleted meanwhile (no reconcile comes).
        if v.pending.len() < 64 {
            v.pending.retain(|r| self.stores.services.get(r).is_some());
        }
        if v.pending.is_empty() {
            info!(services = v.total, took = ?v.since.elapsed(), "every Service verified since taking the lead");
            *verifying = None;
        }
    }
}

/// A settling poll's place in the lane.
struct LanePlace<'a>(&'a Context);

impl Drop for LanePlace<'_> {
    fn drop(&mut self) {
        lock(&self.0.lane).leave();
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
    /// The copy reconciled is behind the API server: a finalizer change
    /// the watch has not delivered yet made the patch's test fail.
    #[error("the cached Service is behind the API server: {0}")]
    Stale(String),
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
            Error::Stale(_) => "stale",
            Error::Invalid(_) => "invalid",
        }
    }
}

/// Runs on the leader until the watches end (never, in practice): waits
/// for the caches (empty caches would deregister every target), then
/// reconciles every Service once (a new leader verifies what the last one
/// left) and each one a change concerns.
pub async fn run(
    client: Client,
    provider: Arc<dyn LoadBalancerProvider>,
    settings: Settings,
    caches: Caches,
    metrics: ControllerMetrics,
    deletions: Arc<Notify>,
) {
    let Caches {
        stores,
        mut filled,
        triggers,
        requests,
        writes,
    } = caches;
    if filled.wait_for(|f| *f).await.is_err() {
        return;
    }
    triggers.lead();
    let all: HashSet<ObjectRef<Service>> = stores
        .services
        .state()
        .iter()
        .map(|svc| ObjectRef::from_obj(svc.as_ref()))
        .collect();
    info!(services = all.len(), "leading: verifying every Service");
    let config = ControllerConfig::default().concurrency(settings.concurrency);
    // A quarter of the slots for settling polls (see `lane`).
    let lane = PollLane::new(usize::from(settings.concurrency) / 4);
    let ctx = Arc::new(Context {
        events: Events::new(client.clone(), MANAGER),
        client,
        provider,
        settings,
        stores: stores.clone(),
        metrics,
        registered: Mutex::default(),
        health_polls: Mutex::default(),
        lane: Mutex::new(lane),
        triggers: triggers.clone(),
        deletions,
        writes,
        verifying: Mutex::new(Some(Verifying {
            total: all.len(),
            pending: all.clone(),
            since: Instant::now(),
        })),
    });
    for r in all {
        triggers.send(r);
    }
    // Every request comes from `triggers`: the Service watch already runs.
    let no_stream = futures::stream::pending::<Result<Service, watcher::Error>>();
    Controller::for_stream(no_stream, stores.services)
        .with_config(config)
        .reconcile_on(requests)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                warn!("reconcile: {e}");
            }
        })
        .await;
}

async fn reconcile(svc: Arc<Service>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.triggers.started(&svc);
    let started = Instant::now();
    let svc = ctx.writes.begin(&ctx.stores.services, svc);
    let result = reconcile_service(svc.clone(), &ctx).await;
    ctx.writes.end(&svc);
    ctx.lane_done(&svc);
    if result.is_ok() {
        ctx.verified(&svc);
    }
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
        kube::runtime::finalizer::Error::AddFinalizer(kube::Error::Api(s))
        | kube::runtime::finalizer::Error::RemoveFinalizer(kube::Error::Api(s))
            if s.code == 422 =>
        {
            Error::Stale(s.message.clone())
        }
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
    if matches!(err, Error::Stale(_)) {
        // Nothing is wrong: the next attempt starts from the newer copy.
        debug!(service, "{err}");
        return Action::requeue(std::time::Duration::from_secs(1));
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
