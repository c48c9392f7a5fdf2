//! What this process wrote on each Service, kept only until the store shows
//! it. The store lags behind our own writes: a reconcile from a stale copy
//! must neither ensure again nor drop a condition. Once the Service watch
//! delivers the version our last write made, the object says all of it, and
//! the entry goes (at 10,000 Services, keeping every entry took 25 MB).
//!
//! A reconcile reads the freshest copy in the store and, while it runs, its
//! Service's entry stays: a copy taken before the store caught up still has
//! the entry beside it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cnlb_provider_core::{LoadBalancerSpec, ResourceIds};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};

use super::lock;

/// cnlb's own annotations and status, as last written.
#[derive(Clone, Default)]
pub(crate) struct Written {
    pub spec: Option<LoadBalancerSpec>,
    pub ids: Option<ResourceIds>,
    pub ingress: Option<serde_json::Value>,
    pub conditions: Option<Vec<Condition>>,
    /// The digest of what is registered ([`super::REGISTERED_ANNOTATION`]).
    pub registered: Option<String>,
    /// The resource version our last write made.
    version: String,
    /// The store shows `version`.
    caught_up: bool,
    /// A reconcile of the Service runs.
    reconciling: bool,
}

/// [`Written`] by Service UID, while the store has not caught up.
#[derive(Default)]
pub(crate) struct Writes(Mutex<HashMap<String, Written>>);

impl Writes {
    /// At the start of a reconcile: the freshest copy of `svc` in the store,
    /// and its entry kept until [`Writes::end`].
    pub fn begin(&self, store: &Store<Service>, svc: Arc<Service>) -> Arc<Service> {
        let mut writes = lock(&self.0);
        if let Some(w) = writes.get_mut(&svc.uid().unwrap_or_default()) {
            w.reconciling = true;
        }
        // Under the lock: with no entry, the store shows every write.
        store.get(&ObjectRef::from_obj(svc.as_ref())).unwrap_or(svc)
    }

    /// At the end of a reconcile: the entry goes if the store caught up.
    pub fn end(&self, svc: &Service) {
        let uid = svc.uid().unwrap_or_default();
        let mut writes = lock(&self.0);
        if let Some(w) = writes.get_mut(&uid) {
            w.reconciling = false;
            if w.caught_up {
                writes.remove(&uid);
            }
        }
    }

    /// What we wrote on `svc` that its store copy may not show yet.
    pub fn get(&self, svc: &Service) -> Written {
        let uid = svc.uid().unwrap_or_default();
        lock(&self.0).get(&uid).cloned().unwrap_or_default()
    }

    /// Records a write on `svc` that made `updated` (the server's answer).
    pub fn wrote(
        &self,
        store: &Store<Service>,
        svc: &Service,
        updated: &Service,
        update: impl FnOnce(&mut Written),
    ) {
        let uid = svc.uid().unwrap_or_default();
        let version = updated.resource_version().unwrap_or_default();
        let mut writes = lock(&self.0);
        let entry = writes.entry(uid).or_default();
        update(entry);
        // Under the lock: the watch updates the store before it calls
        // `seen`, so either this sees the version or `seen` sees the entry.
        let stored = store.get(&ObjectRef::from_obj(svc));
        entry.caught_up = stored.is_some_and(|s| s.resource_version().as_ref() == Some(&version));
        entry.version = version;
    }

    /// Called by the Service watch once `svc` is in the store.
    pub fn seen(&self, svc: &Service) {
        let uid = svc.uid().unwrap_or_default();
        let mut writes = lock(&self.0);
        let Some(w) = writes.get_mut(&uid) else {
            return;
        };
        if svc.resource_version().as_ref() == Some(&w.version) {
            w.caught_up = true;
            if !w.reconciling {
                writes.remove(&uid);
            }
        }
    }

    pub fn forget(&self, svc: &Service) {
        lock(&self.0).remove(&svc.uid().unwrap_or_default());
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.0).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::reflector::store::Writer;
    use kube::runtime::watcher::Event;

    fn service(version: &str) -> Service {
        let mut svc = Service::default();
        svc.metadata.name = Some("web".into());
        svc.metadata.namespace = Some("default".into());
        svc.metadata.uid = Some("uid-1".into());
        svc.metadata.resource_version = Some(version.into());
        svc
    }

    /// A Service store and its writes, as the watch keeps them.
    struct World {
        writer: Writer<Service>,
        store: Store<Service>,
        writes: Writes,
    }

    impl World {
        /// The store holding the Service at `version`.
        fn at(version: &str) -> World {
            let writer = Writer::<Service>::default();
            let store = writer.as_reader();
            let mut world = World {
                writer,
                store,
                writes: Writes::default(),
            };
            world.store_at(version);
            world
        }

        /// The watch delivers `version`.
        fn store_at(&mut self, version: &str) {
            self.writer
                .apply_watcher_event(&Event::Apply(service(version)));
            self.writes.seen(&service(version));
        }

        /// A write from a copy at `from` that made `version`.
        fn wrote(&self, from: &Service, version: &str, update: impl FnOnce(&mut Written)) {
            self.writes
                .wrote(&self.store, from, &service(version), update);
        }
    }

    #[test]
    fn an_entry_lasts_until_the_store_shows_the_last_write() {
        let mut world = World::at("1");
        world.wrote(&service("1"), "2", |w| w.registered = Some("d1".into()));
        world.wrote(&service("1"), "3", |w| {
            w.ingress = Some(serde_json::json!([]))
        });
        let w = world.writes.get(&service("1"));
        assert_eq!(w.registered.as_deref(), Some("d1"));
        assert!(w.ingress.is_some());

        // An older version of ours, or someone else's, keeps the entry.
        world.store_at("2");
        assert_eq!(world.writes.len(), 1);
        world.store_at("3");
        assert_eq!(world.writes.len(), 0);
        assert!(world.writes.get(&service("1")).registered.is_none());
    }

    #[test]
    fn a_write_the_store_already_shows_goes_when_no_reconcile_runs() {
        let world = World::at("5");
        let svc = world.writes.begin(&world.store, Arc::new(service("4")));
        world.wrote(&svc, "5", |w| w.registered = Some("d".into()));
        assert_eq!(world.writes.len(), 1);
        world.writes.end(&svc);
        assert_eq!(world.writes.len(), 0);
    }

    #[test]
    fn a_running_reconcile_keeps_its_entry_and_starts_from_the_freshest_copy() {
        let mut world = World::at("1");
        world.wrote(&service("1"), "2", |w| w.registered = Some("d".into()));

        // A reconcile handed an old copy starts from the store's newest.
        let svc = world.writes.begin(&world.store, Arc::new(service("0")));
        assert_eq!(svc.resource_version().as_deref(), Some("1"));
        // The store catches up meanwhile: the entry stays for this reconcile.
        world.store_at("2");
        assert_eq!(world.writes.get(&svc).registered.as_deref(), Some("d"));
        world.writes.end(&svc);
        assert_eq!(world.writes.len(), 0);

        // The next one starts from a copy that shows the write.
        let svc = world.writes.begin(&world.store, Arc::new(service("1")));
        assert_eq!(svc.resource_version().as_deref(), Some("2"));
        world.writes.end(&svc);
    }
}
