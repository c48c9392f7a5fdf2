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
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tracing::{info, warn};

use super::slices::SliceCache;
use super::written::Writes;
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
    pub(super) writes: Arc<Writes>,
}

#[derive(Clone)]
pub(super) struct Stores {
    pub(super) services: Store<Service>,
    pub(super) slices: SliceCache,
    pub(super) pods: Store<Pod>,
}

/// Reconcile requests, sent only while this replica leads (a new leader
/// reconciles every Service anyway) and only for Services in the store
/// (the controller skips others), each Service counted once in the
/// queue-depth gauge until its reconcile starts. A Service's own event
/// brings a request once it is in the store: at once, or, for a Service
/// seen in a relist, when the relist has replaced the store's contents.
pub(super) struct Triggers {
    leading: AtomicBool,
    services: Store<Service>,
    queued: Mutex<HashSet<ObjectRef<Service>>>,
    /// Services seen in a relist not yet in the store.
    relisted: Mutex<Vec<ObjectRef<Service>>>,
    sender: UnboundedSender<ObjectRef<Service>>,
    metrics: ControllerMetrics,
}

impl Triggers {
    pub(super) fn lead(&self) {
        self.leading.store(true, Ordering::SeqCst);
    }

    pub(super) fn send(&self, r: ObjectRef<Service>) {
        if !self.leading.load(Ordering::SeqCst) || self.services.get(&r).is_none() {
            return;
        }
        let mut queued = lock(&self.queued);
        queued.insert(r.clone());
        self.metrics.set_queue_depth(queued.len());
        let _ = self.sender.unbounded_send(r);
    }

    /// A request from the Service's own watch event.
    fn send_own(&self, r: ObjectRef<Service>) {
        if self.services.get(&r).is_none() {
            lock(&self.relisted).push(r);
        } else {
            self.send(r);
        }
    }

    /// The Service watch's relist is in the store.
    fn relist_done(&self) {
        let relisted = std::mem::take(&mut *lock(&self.relisted));
        for r in relisted {
            self.send(r);
        }
    }

    pub(super) fn started(&self, svc: &Service) {
        let mut queued = lock(&self.queued);
        queued.remove(&ObjectRef::from_obj(svc));
        self.metrics.set_queue_depth(queued.len());
    }

    /// A parked health poll, sent again: not a change, so not counted in
    /// the queue depth.
    pub(super) fn send_poll(&self, r: ObjectRef<Service>) {
        if self.leading.load(Ordering::SeqCst) {
            let _ = self.sender.unbounded_send(r);
        }
    }
}

/// Starts nothing: the returned future drives the three watches (it never
/// ends in practice) and must run from the start, leader or not.
pub fn watch(client: Client, metrics: ControllerMetrics) -> (Caches, impl Future<Output = ()>) {
    let (services, services_writer) = reflector::store();
    let (pods, pods_writer) = reflector::store();
    let (sender, requests) = unbounded();
    let triggers = Arc::new(Triggers {
        leading: AtomicBool::new(false),
        services: services.clone(),
        queued: Mutex::default(),
        relisted: Mutex::default(),
        sender,
        metrics,
    });

    let (t, writes) = (triggers.clone(), Arc::new(Writes::default()));
    let (w, relist) = (writes.clone(), triggers.clone());
    // A relist's objects reach the store together, at its end (InitDone):
    // they come out of `reflect` before they are in the store.
    let service_watch = watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(keep_service_fields)
    .reflect(services_writer)
    .inspect_ok(move |event| {
        if matches!(event, watcher::Event::InitDone) {
            relist.relist_done();
        }
    })
    .applied_objects()
    .inspect_ok(move |svc| w.seen(svc))
    .predicate_filter(service_fingerprint, Default::default());
    let service_triggers = forward(service_watch, move |svc: Service| {
        t.send_own(ObjectRef::from_obj(&svc));
    });

    // The cache says which Services each event changed, a relist (after a
    // watch expired: 410 Gone) included.
    let slices = SliceCache::default();
    let (listed, mut slices_listed) = tokio::sync::watch::channel(false);
    let (t, cache) = (triggers.clone(), slices.clone());
    let slice_events = watcher(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default().labels(SERVICE_NAME_LABEL),
    )
    .default_backoff();
    let slice_triggers = forward(slice_events, move |event| {
        for r in cache.handle(event) {
            t.send(r);
        }
        if cache.listed() {
            listed.send_if_modified(|l| !std::mem::replace(l, true));
        }
    });

    let pod_watch = watcher(Api::<Pod>::all(client), watcher::Config::default())
        .default_backoff()
        .modify(keep_gate_fields)
        .reflect(pods_writer)
        .touched_objects();
    let (t, cache) = (triggers.clone(), slices.clone());
    let pod_triggers = forward(pod_watch, move |pod: Pod| {
        if declares_a_gate(&pod) {
            let namespace = pod.namespace().unwrap_or_default();
            for r in cache.services_naming(&namespace, &pod.name_any()) {
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
        // One waiter per store: its readiness wakes only the last.
        let ready = s.services.wait_until_ready().await.is_ok()
            && s.pods.wait_until_ready().await.is_ok()
            && slices_listed.wait_for(|l| *l).await.is_ok();
        if ready {
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
        writes,
    };
    let watching = async move {
        futures::join!(service_triggers, slice_triggers, pod_triggers, fill);
    };
    (caches, watching)
}

/// Drives a watch (and the store it fills), handing each item to `sent`.
async fn forward<K, S>(stream: S, mut sent: impl FnMut(K))
where
    S: futures::Stream<Item = Result<K, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        match item {
            Ok(item) => sent(item),
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

/// What of a Service a reconcile reads; the rest is dropped from the store
/// (at 10,000 Services every byte per Service is 10 MB). A Service that is
/// not of type LoadBalancer and carries no finalizer of cnlb's needs
/// nothing but its type: its reconcile ends there.
fn keep_service_fields(svc: &mut Service) {
    let meta = &mut svc.metadata;
    meta.managed_fields = None;
    meta.labels = None;
    meta.owner_references = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
    let ours = meta.finalizers.iter().flatten().any(|f| f == FINALIZER);
    let spec = svc.spec.take().unwrap_or_default();
    let load_balancer = spec.type_.as_deref() == Some("LoadBalancer");
    svc.spec = Some(if ours || load_balancer {
        ServiceSpec {
            type_: spec.type_,
            ports: spec.ports,
            load_balancer_class: spec.load_balancer_class,
            load_balancer_source_ranges: spec.load_balancer_source_ranges,
            ..ServiceSpec::default()
        }
    } else {
        svc.status = None;
        svc.metadata.annotations = None;
        ServiceSpec {
            type_: spec.type_,
            ..ServiceSpec::default()
        }
    });
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(type_: &str) -> Service {
        serde_json::from_value(json!({
            "metadata": {
                "name": "web", "namespace": "default", "uid": "u1", "resourceVersion": "7",
                "labels": {"app": "web"},
                "annotations": {LAST_APPLIED: "{}", "service.beta.kubernetes.io/aws-load-balancer-scheme": "internal"},
                "managedFields": [{"manager": "kubectl"}],
            },
            "spec": {
                "type": type_, "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                "selector": {"app": "web"}, "ipFamilies": ["IPv4"], "sessionAffinity": "None",
                "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}],
                "loadBalancerClass": "cnlb.dev/load-balancer",
                "loadBalancerSourceRanges": ["10.0.0.0/8"],
            },
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}},
        }))
        .unwrap()
    }

    #[test]
    fn the_store_keeps_what_a_reconcile_reads() {
        let mut svc = service("LoadBalancer");
        keep_service_fields(&mut svc);
        let kept = serde_json::to_value(&svc).unwrap();
        assert_eq!(
            kept,
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {
                    "name": "web", "namespace": "default", "uid": "u1", "resourceVersion": "7",
                    "annotations": {"service.beta.kubernetes.io/aws-load-balancer-scheme": "internal"},
                },
                "spec": {
                    "type": "LoadBalancer",
                    "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}],
                    "loadBalancerClass": "cnlb.dev/load-balancer",
                    "loadBalancerSourceRanges": ["10.0.0.0/8"],
                },
                "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}},
            })
        );

        // Not a LoadBalancer and not ours: its type alone.
        let mut svc = service("ClusterIP");
        keep_service_fields(&mut svc);
        let kept = serde_json::to_value(&svc).unwrap();
        assert_eq!(kept["spec"], json!({"type": "ClusterIP"}));
        assert_eq!(kept["status"], serde_json::Value::Null);
        assert_eq!(kept["metadata"]["annotations"], serde_json::Value::Null);

        // Ours (finalizer) after a type change: kept whole, to be cleaned up.
        let mut svc = service("ClusterIP");
        svc.metadata.finalizers = Some(vec![FINALIZER.into()]);
        keep_service_fields(&mut svc);
        assert!(svc.spec.and_then(|s| s.ports).is_some());
        assert!(svc.status.is_some());
    }

    fn triggers(services: Store<Service>) -> (Triggers, UnboundedReceiver<ObjectRef<Service>>) {
        let (sender, requests) = unbounded();
        let registry = &mut prometheus_client::registry::Registry::default();
        let triggers = Triggers {
            leading: AtomicBool::new(true),
            services,
            queued: Mutex::default(),
            relisted: Mutex::default(),
            sender,
            metrics: ControllerMetrics::register(registry),
        };
        (triggers, requests)
    }

    fn queued(triggers: &Triggers) -> usize {
        lock(&triggers.queued).len()
    }

    #[test]
    fn only_services_in_the_store_are_queued() {
        let (services, mut writer) = reflector::store::<Service>();
        let (triggers, mut requests) = triggers(services);
        let svc = service("LoadBalancer");
        let r = ObjectRef::from_obj(&svc);
        triggers.send(r.clone());
        assert_eq!(queued(&triggers), 0, "not in the store: never reconciled");
        writer.apply_watcher_event(&watcher::Event::Apply(svc.clone()));
        triggers.send(r.clone());
        assert_eq!(queued(&triggers), 1);
        assert_eq!(requests.try_recv().ok(), Some(r));
        triggers.started(&svc);
        assert_eq!(queued(&triggers), 0);
    }

    #[test]
    fn a_relisted_service_is_queued_once_in_the_store() {
        let (services, mut writer) = reflector::store::<Service>();
        let (triggers, mut requests) = triggers(services);
        let svc = service("LoadBalancer");
        let r = ObjectRef::from_obj(&svc);
        // The watch's own event comes out before the store has the object.
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitApply(svc.clone()));
        triggers.send_own(r.clone());
        assert_eq!(queued(&triggers), 0, "not yet in the store");
        writer.apply_watcher_event(&watcher::Event::InitDone);
        triggers.relist_done();
        assert_eq!(queued(&triggers), 1);
        assert_eq!(requests.try_recv().ok(), Some(r));
    }
}
