//! The EndpointSlice cache: each slice kept as the few fields cnlb reads
//! ([`SliceTargets`], node and zone names shared), indexed by its Service.
//! At 250,000 endpoints this took cnlb-ccm's peak from 372 to 238 MiB
//! (cnlb-bench-memory), and a Service's slices are found without a scan of
//! every slice. Fed by the EndpointSlice watch's events, it answers which
//! Services each event changed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;

use super::SERVICE_NAME_LABEL;
use crate::targets::SliceTargets;

/// (namespace, name)
type Key = (String, String);

/// A slice as the cache keeps it: its key, its Service (from its label) and
/// its targets.
type Entry = (Key, Option<String>, SliceTargets);

#[derive(Clone, Default)]
pub(super) struct SliceCache {
    inner: Arc<RwLock<Inner>>,
}

#[derive(Default)]
struct Inner {
    /// Per Service (namespace, name): its slices by name.
    by_service: HashMap<Key, BTreeMap<String, Arc<SliceTargets>>>,
    /// Per slice (namespace, name): the Service it belongs to.
    service_of: HashMap<Key, String>,
    /// Node and zone names, shared by every endpoint that names them.
    names: HashSet<Arc<str>>,
    /// The slices of a relist in progress, kept as they are cached (a list
    /// of the objects themselves would weigh as much as they do).
    relist: Option<Vec<Entry>>,
    /// Filled once: the first list is done.
    listed: bool,
}

impl SliceCache {
    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies a watch event; returns the Services whose endpoints it
    /// changed.
    pub(super) fn handle(&self, event: watcher::Event<EndpointSlice>) -> Vec<ObjectRef<Service>> {
        let mut inner = self.write();
        match event {
            watcher::Event::Apply(slice) => {
                let entry = inner.entry(&slice);
                inner.apply(entry)
            }
            watcher::Event::Delete(slice) => inner.delete(&key(&slice)),
            watcher::Event::Init => {
                inner.relist = Some(Vec::new());
                Vec::new()
            }
            watcher::Event::InitApply(slice) => {
                let entry = inner.entry(&slice);
                inner.relist.get_or_insert_default().push(entry);
                Vec::new()
            }
            watcher::Event::InitDone => inner.relisted(),
        }
    }

    /// True once the first list is in.
    pub(super) fn listed(&self) -> bool {
        self.read().listed
    }

    pub(super) fn len(&self) -> usize {
        self.read().service_of.len()
    }

    /// The slices of Service `namespace/name`.
    pub(super) fn of_service(&self, namespace: &str, name: &str) -> Vec<Arc<SliceTargets>> {
        self.read()
            .by_service
            .get(&(namespace.to_string(), name.to_string()))
            .map(|slices| slices.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The Services whose endpoints name Pod `namespace/pod`.
    pub(super) fn services_naming(&self, namespace: &str, pod: &str) -> Vec<ObjectRef<Service>> {
        self.read()
            .by_service
            .iter()
            .filter(|((ns, _), slices)| {
                ns == namespace
                    && slices
                        .values()
                        .any(|s| s.endpoints.iter().any(|e| e.pod.as_deref() == Some(pod)))
            })
            .map(|((ns, svc), _)| ObjectRef::new(svc).within(ns))
            .collect()
    }
}

impl Inner {
    fn entry(&mut self, slice: &EndpointSlice) -> Entry {
        let service = slice.labels().get(SERVICE_NAME_LABEL).cloned();
        let targets = SliceTargets::new(slice, |name| self.intern(name));
        (key(slice), service, targets)
    }

    fn apply(&mut self, (key, service, targets): Entry) -> Vec<ObjectRef<Service>> {
        let Some(service) = service else {
            return self.delete(&key);
        };
        let mut changed = Vec::new();
        // A slice moved to another Service leaves the first one.
        if self.service_of.get(&key).is_some_and(|s| *s != service) {
            changed = self.delete(&key);
        }
        let slices = self
            .by_service
            .entry((key.0.clone(), service.clone()))
            .or_default();
        if slices.get(&key.1).is_some_and(|s| **s == targets) {
            return changed;
        }
        slices.insert(key.1.clone(), Arc::new(targets));
        changed.push(ObjectRef::new(&service).within(&key.0));
        self.service_of.insert(key, service);
        changed
    }

    fn delete(&mut self, key: &Key) -> Vec<ObjectRef<Service>> {
        let Some(service) = self.service_of.remove(key) else {
            return Vec::new();
        };
        let svc_key = (key.0.clone(), service);
        if let Some(slices) = self.by_service.get_mut(&svc_key) {
            slices.remove(&key.1);
            if slices.is_empty() {
                self.by_service.remove(&svc_key);
            }
        }
        vec![ObjectRef::new(&svc_key.1).within(&key.0)]
    }

    /// A relist replaces everything: what it no longer has was deleted
    /// while no watch ran (no event says so), what it has anew was
    /// changed.
    fn relisted(&mut self) -> Vec<ObjectRef<Service>> {
        let listed = self.relist.take().unwrap_or_default();
        let kept: HashSet<Key> = listed.iter().map(|(k, _, _)| k.clone()).collect();
        let gone: Vec<Key> = self
            .service_of
            .keys()
            .filter(|k| !kept.contains(*k))
            .cloned()
            .collect();
        let mut changed: Vec<ObjectRef<Service>> =
            gone.iter().flat_map(|k| self.delete(k)).collect();
        for entry in listed {
            changed.extend(self.apply(entry));
        }
        // Names no endpoint holds any more (gone Nodes) go.
        self.names.retain(|name| Arc::strong_count(name) > 1);
        self.listed = true;
        changed
    }

    fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some(shared) = self.names.get(name) {
            return shared.clone();
        }
        let shared: Arc<str> = name.into();
        self.names.insert(shared.clone());
        shared
    }
}

fn key(slice: &EndpointSlice) -> Key {
    (slice.namespace().unwrap_or_default(), slice.name_any())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(name: &str, service: &str, ips: &[&str]) -> EndpointSlice {
        let endpoints: Vec<_> = ips
            .iter()
            .map(|ip| {
                json!({"addresses": [ip], "nodeName": "n1", "zone": "a",
                             "targetRef": {"kind": "Pod", "name": format!("pod-{ip}")}})
            })
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns",
                         "labels": {SERVICE_NAME_LABEL: service}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    fn names(refs: Vec<ObjectRef<Service>>) -> Vec<String> {
        let mut names: Vec<String> = refs.into_iter().map(|r| r.name).collect();
        names.sort();
        names
    }

    #[test]
    fn events_change_the_services_they_concern() {
        let cache = SliceCache::default();
        let apply = |s| cache.handle(watcher::Event::Apply(s));
        assert_eq!(names(apply(slice("web-1", "web", &["10.0.0.1"]))), ["web"]);
        assert_eq!(
            names(apply(slice("web-1", "web", &["10.0.0.1"]))),
            Vec::<String>::new(),
            "the same endpoints again change nothing"
        );
        assert_eq!(names(apply(slice("web-2", "web", &["10.0.0.2"]))), ["web"]);
        assert_eq!(cache.of_service("ns", "web").len(), 2);
        assert_eq!(
            names(apply(slice("web-2", "api", &["10.0.0.2"]))),
            ["api", "web"],
            "a slice relabelled to another Service leaves the first"
        );
        assert_eq!(cache.of_service("ns", "web").len(), 1);
        assert_eq!(names(cache.services_naming("ns", "pod-10.0.0.2")), ["api"]);
        assert!(cache.services_naming("other", "pod-10.0.0.2").is_empty());
        let deleted = cache.handle(watcher::Event::Delete(slice("web-1", "web", &[])));
        assert_eq!(names(deleted), ["web"]);
        assert!(cache.of_service("ns", "web").is_empty());
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn a_relist_finds_what_changed_and_what_went_while_no_watch_ran() {
        let cache = SliceCache::default();
        cache.handle(watcher::Event::Init);
        for s in [
            slice("web-1", "web", &["10.0.0.1"]),
            slice("api-1", "api", &["10.0.1.1"]),
            slice("db-1", "db", &["10.0.2.1"]),
        ] {
            assert!(cache.handle(watcher::Event::InitApply(s)).is_empty());
        }
        assert!(!cache.listed(), "not before the list is done");
        assert_eq!(
            names(cache.handle(watcher::Event::InitDone)),
            ["api", "db", "web"]
        );
        assert!(cache.listed());

        cache.handle(watcher::Event::Init);
        cache.handle(watcher::Event::InitApply(slice(
            "web-1",
            "web",
            &["10.0.0.1"],
        )));
        cache.handle(watcher::Event::InitApply(slice(
            "api-1",
            "api",
            &["10.0.1.9"],
        )));
        assert_eq!(
            names(cache.handle(watcher::Event::InitDone)),
            ["api", "db"],
            "db's slice went, api's changed, web's did not"
        );
        assert!(cache.of_service("ns", "db").is_empty());
    }

    #[test]
    fn node_and_zone_names_are_shared() {
        let cache = SliceCache::default();
        cache.handle(watcher::Event::Apply(slice(
            "web-1",
            "web",
            &["10.0.0.1", "10.0.0.2"],
        )));
        let slices = cache.of_service("ns", "web");
        let (a, b) = (&slices[0].endpoints[0], &slices[0].endpoints[1]);
        assert!(Arc::ptr_eq(
            a.node.as_ref().unwrap(),
            b.node.as_ref().unwrap()
        ));
    }
}
