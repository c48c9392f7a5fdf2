//! The one place the controllers send Events from. An Event goes out when
//! something changes, never again for a reconcile that finds the same
//! thing: each (object, reason, subject) remembers the last note it sent.
//! Each distinct subject (an annotation key, say) is its own Event, so
//! none is merged into another's count.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client, Resource, ResourceExt};
use tracing::warn;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Normal,
    Warning,
}

static SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// (object UID, reason, subject) -> last note sent.
type Sent = HashMap<(String, &'static str, String), String>;

pub struct Events {
    client: Client,
    controller: String,
    instance: String,
    sent: Mutex<Sent>,
}

impl Events {
    pub fn new(client: Client, controller: &str) -> Self {
        let instance = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| controller.to_string());
        Self {
            client,
            controller: controller.to_string(),
            instance,
            sent: Mutex::default(),
        }
    }

    fn sent(&self) -> MutexGuard<'_, Sent> {
        self.sent.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `note` under `reason` about `subject` of `obj` unless it is
    /// what was sent last for them. A failure to send is logged: a
    /// condition on the object says the same.
    pub async fn send<K>(
        &self,
        obj: &K,
        kind: Kind,
        reason: &'static str,
        subject: &str,
        note: &str,
    ) where
        K: Resource<DynamicType = ()>,
    {
        let note: String = note.chars().take(1000).collect();
        let key = (obj.uid().unwrap_or_default(), reason, subject.to_string());
        if self.sent().get(&key) == Some(&note) {
            return;
        }
        let event = self.event(obj, kind, reason, subject, &note);
        // Events of cluster-scoped objects (Nodes) go to `default`, as the
        // kubelet's do.
        let ns = obj.namespace().unwrap_or_else(|| "default".into());
        let api: Api<Event> = Api::namespaced(self.client.clone(), &ns);
        match api.create(&PostParams::default(), &event).await {
            Ok(_) => {
                self.sent().insert(key, note);
            }
            Err(e) => warn!("sending Event {reason}: {e}"),
        }
    }

    /// Forgets what was sent under `reason` for `obj`, so that the same
    /// note is sent again should it come back (a fixed error that recurs).
    pub fn forget<K: ResourceExt>(&self, obj: &K, reason: &'static str) {
        let uid = obj.uid().unwrap_or_default();
        self.sent()
            .retain(|(u, r, _), _| !(u == &uid && *r == reason));
    }

    /// Forgets everything about an object that is gone.
    pub fn forget_all<K: ResourceExt>(&self, obj: &K) {
        let uid = obj.uid().unwrap_or_default();
        self.sent().retain(|(u, _, _), _| u != &uid);
    }

    fn event<K>(&self, obj: &K, kind: Kind, reason: &str, subject: &str, note: &str) -> Event
    where
        K: Resource<DynamicType = ()>,
    {
        let now = Timestamp::now();
        let regarding: ObjectReference = obj.object_ref(&());
        Event {
            metadata: ObjectMeta {
                namespace: Some(obj.namespace().unwrap_or_else(|| "default".into())),
                // Unique: the time, and a count for Events of one instant.
                name: Some(format!(
                    "{}.{:x}{:x}",
                    obj.name_any(),
                    now.as_nanosecond(),
                    SEQUENCE.fetch_add(1, Ordering::Relaxed)
                )),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            // What was done, for the subject it was done to.
            action: Some(if subject.is_empty() {
                reason.to_string()
            } else {
                format!("{reason} {subject}").chars().take(128).collect()
            }),
            reason: Some(reason.to_string()),
            note: Some(note.to_string()),
            regarding: Some(regarding),
            type_: Some(
                match kind {
                    Kind::Normal => "Normal",
                    Kind::Warning => "Warning",
                }
                .to_string(),
            ),
            ..Event::default()
        }
    }
}
