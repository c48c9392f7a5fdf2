//! The Service controller: for each Service cnlb handles, a finalizer before
//! any cloud call, the load balancer ensured from the typed annotations
//! (only when its spec changed), `status.loadBalancer` and a condition
//! written back, the targets brought to the EndpointSlices as deltas, and an
//! Event for every outcome. EndpointSlice changes map to their Service, and
//! the controller queue coalesces bursts into one reconcile.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cnlb_ccm::annotations::{AnnotationError, opted_in, parse_service};
use cnlb_ccm::targets::{awaiting_gate, desired_targets, pending_gates};
use cnlb_provider_core::{
    LoadBalancerKey, LoadBalancerProvider, LoadBalancerSpec, LoadBalancerStatus, ProviderError,
    ResourceIds, RetryPolicy, TargetHealthState, TargetSet, diff_targets, registered_targets,
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ControllerConfig};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

/// Held while cnlb owns cloud resources for the Service.
pub const FINALIZER: &str = "cnlb.dev/load-balancer-cleanup";
/// Cloud resource IDs, persisted so the next run finds them without a search.
pub const IDS_ANNOTATION: &str = "cnlb.dev/resource-ids";
/// Hash of the last spec the cloud was brought to: equal means no cloud call.
pub const APPLIED_ANNOTATION: &str = "cnlb.dev/applied-spec";
/// Service condition reporting the load balancer's state.
pub const CONDITION: &str = "cnlb.dev/LoadBalancerReady";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const MANAGER: &str = "cnlb-ccm";

pub struct Settings {
    pub cluster: String,
    pub class: String,
    pub manage_unclassed: bool,
    pub manage_lbc_annotated: bool,
    pub concurrency: u16,
}

struct Context {
    client: Client,
    provider: Arc<dyn LoadBalancerProvider>,
    recorder: Recorder,
    settings: Settings,
    /// Registered targets per Service UID and listener, as last synced; filled
    /// from the cloud's view the first time a Service is seen after a start.
    registered: Mutex<HashMap<String, BTreeMap<String, TargetSet>>>,
    /// Health polls in a row per Service UID while a readiness gate is pending.
    gate_polls: Mutex<HashMap<String, u32>>,
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

/// Runs until the stream ends (never, in practice).
pub async fn run(client: Client, provider: Arc<dyn LoadBalancerProvider>, settings: Settings) {
    let services: Api<Service> = Api::all(client.clone());
    let slices: Api<EndpointSlice> = Api::all(client.clone());
    let config = ControllerConfig::default()
        .concurrency(settings.concurrency)
        // Coalesce a burst of EndpointSlice updates into one reconcile.
        .debounce(Duration::from_millis(200));
    let ctx = Arc::new(Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: None,
            },
        ),
        client,
        provider,
        settings,
        registered: Mutex::default(),
        gate_polls: Mutex::default(),
    });
    Controller::new(services, watcher::Config::default())
        .with_config(config)
        .watches(
            slices,
            watcher::Config::default().labels(SERVICE_NAME_LABEL),
            |slice| {
                let ns = slice.namespace();
                slice.labels().get(SERVICE_NAME_LABEL).map(|name| {
                    ObjectRef::<Service>::new(name).within(ns.as_deref().unwrap_or_default())
                })
            },
        )
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                warn!("reconcile: {e}");
            }
        })
        .await;
}

async fn reconcile(svc: Arc<Service>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = svc.namespace().unwrap_or_default();
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let s = &ctx.settings;
    if !opted_in(&svc, &s.class, s.manage_unclassed, s.manage_lbc_annotated) {
        // No longer ours (type or class changed, maybe being deleted too):
        // clean up what we built, then let go.
        if svc.finalizers().iter().any(|f| f == FINALIZER) {
            cleanup(&svc, &ctx).await?;
            remove_finalizer(&api, &svc).await?;
        }
        return Ok(Action::await_change());
    }
    finalizer(&api, FINALIZER, svc, |event| async {
        match event {
            FinalizerEvent::Apply(svc) => apply(&svc, &ctx).await,
            FinalizerEvent::Cleanup(svc) => {
                cleanup(&svc, &ctx).await.map(|()| Action::await_change())
            }
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    })
}

async fn apply(svc: &Service, ctx: &Context) -> Result<Action, Error> {
    let spec = match parse_service(svc, &ctx.settings.cluster) {
        Ok(spec) => spec,
        Err(errors) => {
            report_invalid(svc, ctx, &errors).await;
            // A user error: nothing is torn down, nothing retried until the Service changes.
            return Ok(Action::await_change());
        }
    };
    let known = resource_ids(svc);
    let hash = spec_hash(&spec);
    let applied = svc.annotations().get(APPLIED_ANNOTATION) == Some(&hash);
    let has_ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .is_some_and(|i| !i.is_empty());
    // After a bad annotation is fixed back to the applied spec, the condition
    // still says False: write it again (one ensure, idempotent).
    let ready = svc
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == CONDITION && c.status == "True")
        });
    let ids = if applied && has_ingress && ready && !known.is_empty() {
        known
    } else {
        event(
            ctx,
            svc,
            EventType::Normal,
            "EnsuringLoadBalancer",
            "Ensuring load balancer",
        )
        .await;
        let status = match ctx.provider.ensure_load_balancer(&spec, &known).await {
            Ok(status) => status,
            Err(err) => {
                if err.is_user_error() {
                    // What this cloud cannot build: say so where the user
                    // looks; the Event comes from error_policy.
                    write_condition(ctx, svc, "False", "Unsupported", &err.to_string()).await;
                }
                return Err(err.into());
            }
        };
        // Ensure may have replaced target groups (port or protocol change):
        // re-read what is registered instead of trusting the cache.
        if let Ok(mut m) = ctx.registered.lock() {
            m.remove(&spec.key.uid);
        }
        persist(ctx, svc, &status, &hash).await?;
        event(
            ctx,
            svc,
            EventType::Normal,
            "EnsuredLoadBalancer",
            "Ensured load balancer",
        )
        .await;
        status.ids
    };
    sync_targets(ctx, svc, &spec, &ids).await
}

/// Brings every listener's targets to the Service's EndpointSlices, sending
/// only the delta against what is registered; then drives the readiness gate
/// of Pods waiting for their target to be healthy.
async fn sync_targets(
    ctx: &Context,
    svc: &Service,
    spec: &LoadBalancerSpec,
    ids: &ResourceIds,
) -> Result<Action, Error> {
    let uid = spec.key.uid.clone();
    let slices: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &spec.key.namespace);
    let lp = ListParams::default().labels(&format!("{SERVICE_NAME_LABEL}={}", spec.key.name));
    let pods = service_pods(ctx, svc).await?;
    let awaiting = awaiting_gate(&pods);
    let desired = desired_targets(&spec.listeners, &slices.list(&lp).await?.items, &awaiting);

    let cached = ctx
        .registered
        .lock()
        .ok()
        .and_then(|m| m.get(&uid).cloned());
    let mut registered = match cached {
        Some(r) => r,
        None => {
            let health = ctx.provider.target_health(&spec.key, ids).await?;
            spec.listeners
                .iter()
                .map(|l| (l.name.clone(), registered_targets(&health, &l.name)))
                .collect()
        }
    };
    let mut changes = 0;
    for listener in &spec.listeners {
        let current = registered.entry(listener.name.clone()).or_default();
        let want = desired.get(&listener.name).cloned().unwrap_or_default();
        let delta = diff_targets(current, &want);
        if delta.is_empty() {
            continue;
        }
        changes += delta.len();
        ctx.provider
            .sync_targets(&spec.key, listener, &delta, ids)
            .await?;
        delta.apply_to(current);
    }
    if let Ok(mut m) = ctx.registered.lock() {
        m.insert(uid.clone(), registered);
    }
    if changes > 0 {
        info!(service = %spec.key.service(), changes, "targets synced");
    }
    if awaiting.is_empty() {
        if let Ok(mut polls) = ctx.gate_polls.lock() {
            polls.remove(&uid);
        }
        return Ok(Action::await_change());
    }
    open_gates(ctx, spec, ids, &pods, &awaiting, &desired).await?;
    // Poll health only while a gate is pending: 1 s, 2 s, 4 s, ... 10 s,
    // from 1 s again whenever targets changed (a new Pod waits for its first
    // health report; during a rollout this is each step).
    let polls = ctx.gate_polls.lock().ok().map(|mut p| {
        let n = p.entry(uid).or_insert(0);
        if changes > 0 {
            *n = 0;
        }
        *n += 1;
        *n
    });
    let secs = 1u64 << polls.unwrap_or(1).saturating_sub(1).min(4);
    Ok(Action::requeue(Duration::from_secs(secs.min(10))))
}

/// Sets the readiness gate of each waiting Pod whose targets are healthy on
/// every listener it is registered for. A Pod with no registered target yet
/// keeps waiting: it is never marked ready before it can take traffic.
async fn open_gates(
    ctx: &Context,
    spec: &LoadBalancerSpec,
    ids: &ResourceIds,
    pods: &[Pod],
    awaiting: &BTreeSet<IpAddr>,
    desired: &BTreeMap<String, TargetSet>,
) -> Result<(), Error> {
    let health = ctx.provider.target_health(&spec.key, ids).await?;
    let healthy: BTreeSet<(String, IpAddr, u16)> = health
        .iter()
        .filter(|h| h.state == TargetHealthState::Healthy)
        .map(|h| (h.listener.clone(), h.ip, h.port))
        .collect();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &spec.key.namespace);
    for pod in pods {
        let Some(ip) = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_ref())
            .and_then(|i| i.parse().ok())
        else {
            continue;
        };
        if !awaiting.contains(&ip) {
            continue;
        }
        let targets: Vec<(String, u16)> = desired
            .iter()
            .flat_map(|(l, set)| {
                set.iter()
                    .filter(|t| t.ip == ip)
                    .map(move |t| (l.clone(), t.port))
            })
            .collect();
        let ready = !targets.is_empty()
            && targets
                .iter()
                .all(|(l, port)| healthy.contains(&(l.clone(), ip, *port)));
        if !ready {
            continue;
        }
        let gates = pending_gates(pod);
        let conditions: Vec<serde_json::Value> = gates
            .iter()
            .map(|gate| {
                json!({
                    "type": gate, "status": "True", "reason": "TargetHealthy",
                    "message": "the load balancer reports this Pod's target healthy",
                    "lastTransitionTime": Time(Timestamp::now()),
                })
            })
            .collect();
        let patch = json!({"status": {"conditions": conditions}});
        // Strategic merge: conditions merge by type, the kubelet's stay.
        api.patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Strategic(patch),
        )
        .await?;
        info!(pod = %pod.name_any(), ?gates, "readiness gates set");
    }
    Ok(())
}

/// The Pods the Service selects (none for a Service without a selector).
async fn service_pods(ctx: &Context, svc: &Service) -> Result<Vec<Pod>, Error> {
    let Some(selector) = svc
        .spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .filter(|s| !s.is_empty())
    else {
        return Ok(Vec::new());
    };
    let labels: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &svc.namespace().unwrap_or_default());
    Ok(api
        .list(&ListParams::default().labels(&labels.join(",")))
        .await?
        .items)
}

async fn cleanup(svc: &Service, ctx: &Context) -> Result<(), Error> {
    let key = LoadBalancerKey::new(
        &ctx.settings.cluster,
        svc.namespace().unwrap_or_default(),
        svc.name_any(),
        svc.uid().unwrap_or_default(),
    );
    event(
        ctx,
        svc,
        EventType::Normal,
        "DeletingLoadBalancer",
        "Deleting load balancer",
    )
    .await;
    ctx.provider
        .delete_load_balancer(&key, &resource_ids(svc))
        .await?;
    if let Ok(mut m) = ctx.registered.lock() {
        m.remove(&key.uid);
    }
    event(
        ctx,
        svc,
        EventType::Normal,
        "DeletedLoadBalancer",
        "Deleted load balancer",
    )
    .await;
    Ok(())
}

/// Forgets a Service that is no longer ours: its status first, while the
/// object surely exists, then the finalizer (which may let a pending
/// deletion finish).
async fn remove_finalizer(api: &Api<Service>, svc: &Service) -> Result<(), Error> {
    let name = svc.name_any();
    let status = json!({"status": {"loadBalancer": {}}});
    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
        .await?;
    let finalizers: Vec<&String> = svc
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .collect();
    let patch = json!({
        "metadata": {
            "finalizers": finalizers,
            "annotations": {IDS_ANNOTATION: null, APPLIED_ANNOTATION: null},
        },
    });
    api.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
        .await?;
    Ok(())
}

fn error_policy(svc: Arc<Service>, err: &Error, ctx: Arc<Context>) -> Action {
    warn!(service = %format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any()), "{err}");
    let (note, action) = match err {
        Error::Provider(p) => (
            p.to_string(),
            match p.retry_policy() {
                RetryPolicy::AwaitChange => Action::await_change(),
                RetryPolicy::After(d) => Action::requeue(d),
                RetryPolicy::Backoff => Action::requeue(Duration::from_secs(10)),
            },
        ),
        other => (other.to_string(), Action::requeue(Duration::from_secs(5))),
    };
    // error_policy is synchronous: publish the Event in the background.
    tokio::spawn(async move {
        event(
            &ctx,
            &svc,
            EventType::Warning,
            "SyncLoadBalancerFailed",
            &note,
        )
        .await;
    });
    action
}

async fn report_invalid(svc: &Service, ctx: &Context, errors: &[AnnotationError]) {
    for e in errors {
        event(
            ctx,
            svc,
            EventType::Warning,
            "InvalidAnnotation",
            &e.to_string(),
        )
        .await;
    }
    let message: Vec<String> = errors.iter().map(ToString::to_string).collect();
    write_condition(ctx, svc, "False", "InvalidAnnotation", &message.join("; ")).await;
}

/// Sets the Service's [`CONDITION`]; a failure is logged (the Event says it too).
async fn write_condition(ctx: &Context, svc: &Service, status: &str, reason: &str, message: &str) {
    let condition = condition(status, reason, message);
    let api: Api<Service> =
        Api::namespaced(ctx.client.clone(), &svc.namespace().unwrap_or_default());
    let patch = json!({"status": {"conditions": [condition]}});
    if let Err(e) = api
        .patch_status(
            &svc.name_any(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
    {
        warn!("writing the {CONDITION} condition: {e}");
    }
}

/// IDs first (so a crash after this point still finds the resources by ID),
/// then the status users read.
async fn persist(
    ctx: &Context,
    svc: &Service,
    status: &LoadBalancerStatus,
    hash: &str,
) -> Result<(), Error> {
    let api: Api<Service> =
        Api::namespaced(ctx.client.clone(), &svc.namespace().unwrap_or_default());
    let ids = serde_json::to_string(&status.ids).map_err(|e| Error::Invalid(e.to_string()))?;
    let mut annotations = status.annotations.clone();
    annotations.insert(IDS_ANNOTATION.into(), ids);
    annotations.insert(APPLIED_ANNOTATION.into(), hash.into());
    let meta = json!({"metadata": {"annotations": annotations}});
    api.patch(
        &svc.name_any(),
        &PatchParams::default(),
        &Patch::Merge(meta),
    )
    .await?;
    let ingress: Vec<serde_json::Value> = status
        .ingress
        .iter()
        .map(|i| {
            let mut v = json!({});
            if let Some(h) = &i.hostname {
                v["hostname"] = json!(h);
            }
            if let Some(ip) = &i.ip {
                v["ip"] = json!(ip.to_string());
            }
            if let Some(mode) = i.ip_mode {
                v["ipMode"] = json!(mode.as_str());
            }
            v
        })
        .collect();
    let ready = condition("True", "Ensured", "the load balancer matches the Service");
    let patch = json!({"status": {"loadBalancer": {"ingress": ingress}, "conditions": [ready]}});
    api.patch_status(
        &svc.name_any(),
        &PatchParams::default(),
        &Patch::Merge(patch),
    )
    .await?;
    Ok(())
}

fn condition(status: &str, reason: &str, message: &str) -> serde_json::Value {
    json!({
        "type": CONDITION, "status": status, "reason": reason,
        // Condition messages are capped at 32 KiB by the API.
        "message": message.chars().take(4096).collect::<String>(),
        "lastTransitionTime": Time(Timestamp::now()),
    })
}

fn resource_ids(svc: &Service) -> ResourceIds {
    svc.annotations()
        .get(IDS_ANNOTATION)
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default()
}

/// Stable for a given build; a different hash after an upgrade costs one
/// ensure call, nothing more.
fn spec_hash(spec: &LoadBalancerSpec) -> String {
    let mut h = DefaultHasher::new();
    serde_json::to_string(spec).unwrap_or_default().hash(&mut h);
    format!("{:016x}", h.finish())
}

async fn event(ctx: &Context, svc: &Service, type_: EventType, reason: &str, note: &str) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: reason.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &svc.object_ref(&())).await {
        warn!("publishing event {reason}: {e}");
    }
}
