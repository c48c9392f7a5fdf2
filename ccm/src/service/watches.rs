//! The Service controller's caches: Services, EndpointSlices and Pods in
//! reflector stores (one watch each, no LIST per reconcile). They are
//! watched from the start, on a standby replica too, so that a new leader
//! decides from warm caches instead of listing everything first. While this
//! replica leads, a change becomes a reconcile request of the Services it
//! concerns: a Service's own change (what a reconcile depends on), an
//! EndpointSlice's change its Service, and a Pod's change the Services whose
//! endpoints name it (a Pod whose containers become ready while its gate
//! waits is registered without its EndpointSlice changing).

use std::collections::HashSet;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender, unbounded};
use futures::{Future, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Pod, Service, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Api, Client, ResourceExt};
use tracing::{info, warn};

use super::{ControllerMetrics, FINALIZER, REGISTERED_ANNOTATION, SERVICE_NAME_LABEL, lock};
use crate::targets::READINESS_GATES;

/// kubectl's copy of the whole object, in an annotation.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// The stores and the reconcile requests their changes make.
pub struct Caches {
    pub(super) stores: Stores,
    /// True once every store holds its first full list.
    pub(super) filled: tokio::sync::watch::Receiver<bool>,
    pub(super) triggers: Arc<Triggers>,
    pub(super) requests: UnboundedReceiver<ObjectRef<Service>>,
}

#[derive(Clone)]
pub(super) struct Stores {
    pub(super) services: Store<Service>,
    pub(super) slices: Store<EndpointSlice>,
    pub(super) pods: Store<Pod>,
}

impl Stores {
    /// True once every store holds its first full list. Only one waiter
    /// per store: its readiness wakes only the last.
    async fn ready(&self) -> bool {
        self.services.wait_until_ready().await.is_ok()
            && self.slices.wait_until_ready().await.is_ok()
            && self.pods.wait_until_ready().await.is_ok()
    }
}

/// Reconcile requests, sent only while this replica leads (a new leader
/// reconciles every Service anyway), each Service counted once in the
/// queue-depth gauge until its reconcile starts.
pub(super) struct Triggers {
    leading: AtomicBool,
    queued: Mutex<HashSet<ObjectRef<Service>>>,
    sender: UnboundedSender<ObjectRef<Service>>,
    metrics: ControllerMetrics,
}

impl Triggers {
    pub(super) fn lead(&self) {
        self.leading.store(true, Ordering::SeqCst);
    }

    pub(super) fn send(&self, r: ObjectRef<Service>) {
        if !self.leading.load(Ordering::SeqCst) {
            return;
        }
        let mut queued = lock(&self.queued);
        queued.insert(r.clone());
        self.metrics.set_queue_depth(queued.len());
        let _ = self.sender.unbounded_send(r);
    }

    pub(super) fn started(&self, svc: &Service) {
        let mut queued = lock(&self.queued);
        queued.remove(&ObjectRef::from_obj(svc));
        self.metrics.set_queue_depth(queued.len());
    }
}

/// Starts nothing: the returned future drives the three watches (it never
/// ends in practice) and must run from the start, leader or not.
pub fn watch(client: Client, metrics: ControllerMetrics) -> (Caches, impl Future<Output = ()>) {
    let (services, services_writer) = reflector::store();
    let (slices, slices_writer) = reflector::store();
    let (pods, pods_writer) = reflector::store();
    let (sender, requests) = unbounded();
    let triggers = Arc::new(Triggers {
        leading: AtomicBool::new(false),
        queued: Mutex::default(),
        sender,
        metrics,
    });

    let t = triggers.clone();
    let service_watch = watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(keep_service_fields)
    .reflect(services_writer)
    .applied_objects()
    .predicate_filter(service_fingerprint, Default::default());
    let service_triggers = forward(service_watch, move |svc: &Service| {
        t.send(ObjectRef::from_obj(svc));
    });

    // A relist (after a watch expired: 410 Gone) has no event for the
    // EndpointSlices deleted while we were not watching; the slices it no
    // longer finds name the Services to queue.
    let (t, store) = (triggers.clone(), slices.clone());
    let mut before_relist = Vec::new();
    let slice_watch = watcher(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default().labels(SERVICE_NAME_LABEL),
    )
    .default_backoff()
    .modify(keep_target_fields)
    .reflect(slices_writer)
    .inspect_ok(move |event| match event {
        watcher::Event::Init => before_relist = store.state(),
        watcher::Event::InitDone => {
            for slice in before_relist.drain(..) {
                let gone = store.get(&ObjectRef::from_obj(&*slice)).is_none();
                if let Some(r) = service_of_slice(&slice).filter(|_| gone) {
                    t.send(r);
                }
            }
        }
        _ => {}
    })
    .touched_objects()
    .predicate_filter(predicates::resource_version, Default::default());
    let t = triggers.clone();
    let slice_triggers = forward(slice_watch, move |slice: &EndpointSlice| {
        if let Some(r) = service_of_slice(slice) {
            t.send(r);
        }
    });

    let pod_watch = watcher(Api::<Pod>::all(client), watcher::Config::default())
        .default_backoff()
        .modify(keep_gate_fields)
        .reflect(pods_writer)
        .touched_objects();
    let (t, store) = (triggers.clone(), slices.clone());
    let pod_triggers = forward(pod_watch, move |pod: &Pod| {
        if declares_a_gate(pod) {
            for r in services_of(&store, pod) {
                t.send(r);
            }
        }
    });

    let stores = Stores {
        services,
        slices,
        pods,
    };
    let s = stores.clone();
    let (filled_tx, filled) = tokio::sync::watch::channel(false);
    let fill = async move {
        if s.ready().await {
            let _ = filled_tx.send(true);
            info!(
                services = s.services.len(),
                endpoint_slices = s.slices.len(),
                pods = s.pods.len(),
                "Service, EndpointSlice and Pod caches filled"
            );
        }
    };
    let caches = Caches {
        stores,
        filled,
        triggers,
        requests,
    };
    let watching = async move {
        futures::join!(service_triggers, slice_triggers, pod_triggers, fill);
    };
    (caches, watching)
}

/// Drives a watch (and the store it fills), handing each object to `sent`.
async fn forward<K, S>(stream: S, sent: impl Fn(&K))
where
    S: futures::Stream<Item = Result<K, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        match item {
            Ok(obj) => sent(&obj),
            Err(e) => warn!("watch: {e}"),
        }
    }
}

/// What of a Service a reconcile depends on: a change elsewhere (our own
/// status write or record of what is registered, say) triggers nothing.
fn service_fingerprint(svc: &Service) -> Option<u64> {
    let mut h = DefaultHasher::new();
    serde_json::to_string(&svc.spec).ok()?.hash(&mut h);
    for (k, v) in svc.annotations() {
        if k != REGISTERED_ANNOTATION {
            (k, v).hash(&mut h);
        }
    }
    svc.finalizers().hash(&mut h);
    svc.metadata.deletion_timestamp.is_some().hash(&mut h);
    Some(h.finish())
}

/// What of a Service a reconcile reads; the rest is dropped from the store.
/// A Service that is not of type LoadBalancer and carries no finalizer of
/// cnlb's needs nothing but its type: its reconcile ends there.
fn keep_service_fields(svc: &mut Service) {
    let meta = &mut svc.metadata;
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
    let ours = meta.finalizers.iter().flatten().any(|f| f == FINALIZER);
    let spec = svc.spec.get_or_insert_default();
    if !ours && spec.type_.as_deref() != Some("LoadBalancer") {
        *spec = ServiceSpec {
            type_: spec.type_.take(),
            ..ServiceSpec::default()
        };
        svc.status = None;
        svc.metadata.annotations = None;
        svc.metadata.labels = None;
    }
}

/// What of an EndpointSlice the targets and gates read (addresses,
/// conditions, node, zone, the Pod named); the rest is dropped from the
/// store, where 250,000 endpoints weigh.
fn keep_target_fields(slice: &mut EndpointSlice) {
    let meta = &mut slice.metadata;
    meta.managed_fields = None;
    meta.annotations = None;
    meta.owner_references = None;
    meta.generate_name = None;
    meta.generation = None;
    meta.creation_timestamp = None;
    if let Some(labels) = meta.labels.as_mut() {
        labels.retain(|k, _| k == SERVICE_NAME_LABEL);
    }
    for ep in slice.endpoints.iter_mut().flatten() {
        ep.hostname = None;
        ep.hints = None;
        ep.deprecated_topology = None;
        if let Some(pod) = ep.target_ref.as_mut() {
            pod.uid = None;
            pod.resource_version = None;
            pod.api_version = None;
            pod.field_path = None;
        }
    }
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
