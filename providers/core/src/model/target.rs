//! Pod IP targets, target sets and the pure register/deregister diff.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// EndpointSlice endpoint conditions, with their Kubernetes meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TargetState {
    /// The Pod is ready and not terminating.
    pub ready: bool,
    /// The Pod is ready, whether or not it is terminating.
    pub serving: bool,
    /// The Pod is shutting down.
    pub terminating: bool,
}

impl TargetState {
    /// A ready, serving, non-terminating endpoint.
    pub const READY: Self = Self {
        ready: true,
        serving: true,
        terminating: false,
    };

    /// Builds the state from EndpointSlice conditions, where a missing
    /// condition means: ready unknown = ready, serving unknown = same as
    /// ready, terminating unknown = not terminating.
    pub fn from_conditions(
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
    ) -> Self {
        let ready = ready.unwrap_or(true);
        Self {
            ready,
            serving: serving.unwrap_or(ready),
            terminating: terminating.unwrap_or(false),
        }
    }

    /// True if the endpoint should be registered: ready or serving, and not
    /// terminating (terminating endpoints are drained even while serving).
    pub fn wants_traffic(self) -> bool {
        !self.terminating && (self.ready || self.serving)
    }
}

/// Same as [`TargetState::READY`], the EndpointSlice meaning of "no conditions".
impl Default for TargetState {
    fn default() -> Self {
        Self::READY
    }
}

/// One Pod IP and port behind a listener.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Target {
    pub ip: IpAddr,
    pub port: u16,
    /// Node name (GCE_VM_IP_PORT endpoints need the instance). Node and
    /// zone names are shared: a controller holds every target of a
    /// cluster, and they name a few nodes.
    #[serde(default, with = "shared_name")]
    pub node: Option<Arc<str>>,
    /// Zone (zonal NEGs, AWS availability zone).
    #[serde(default, with = "shared_name")]
    pub zone: Option<Arc<str>>,
    pub state: TargetState,
}

/// An `Option<Arc<str>>` as an optional string (serde's own needs its
/// `rc` feature, which would rebuild every crate that uses serde).
mod shared_name {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(name: &Option<Arc<str>>, s: S) -> Result<S::Ok, S::Error> {
        match name {
            Some(name) => s.serialize_some(&**name),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Arc<str>>, D::Error> {
        Ok(Option::<String>::deserialize(d)?.map(Arc::from))
    }
}

impl Target {
    /// A ready target with no node or zone.
    pub fn new(ip: IpAddr, port: u16) -> Self {
        Self {
            ip,
            port,
            node: None,
            zone: None,
            state: TargetState::READY,
        }
    }

    /// The identity of the target in a [`TargetSet`].
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }
}

/// Targets of one listener, one per (ip, port). Iterates in sorted order.
/// Serialised as a list of targets. A sorted vector: a controller keeps
/// every registered target of the cluster, and a map's nodes and keys
/// would take about twice the memory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<Target>", into = "Vec<Target>")]
pub struct TargetSet {
    /// Sorted by address, without duplicates.
    targets: Vec<Target>,
}

impl TargetSet {
    pub fn new() -> Self {
        Self::default()
    }

    fn find(&self, addr: &SocketAddr) -> Result<usize, usize> {
        self.targets.binary_search_by_key(addr, Target::addr)
    }

    /// Inserts `target`, replacing (and returning) any target with the same
    /// (ip, port).
    pub fn insert(&mut self, target: Target) -> Option<Target> {
        match self.find(&target.addr()) {
            Ok(i) => Some(std::mem::replace(&mut self.targets[i], target)),
            Err(i) => {
                self.targets.insert(i, target);
                None
            }
        }
    }

    pub fn remove(&mut self, addr: &SocketAddr) -> Option<Target> {
        self.find(addr).ok().map(|i| self.targets.remove(i))
    }

    pub fn get(&self, addr: &SocketAddr) -> Option<&Target> {
        self.find(addr).ok().map(|i| &self.targets[i])
    }

    pub fn contains(&self, addr: &SocketAddr) -> bool {
        self.find(addr).is_ok()
    }

    pub fn len(&self) -> usize {
        self.targets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// Targets in (ip, port) order.
    pub fn iter(&self) -> impl Iterator<Item = &Target> {
        self.targets.iter()
    }

    /// Only the targets that want traffic: what is registered after the
    /// delta from [`diff_targets`] has been applied.
    pub fn wanted(&self) -> TargetSet {
        self.iter()
            .filter(|t| t.state.wants_traffic())
            .cloned()
            .collect()
    }
}

impl From<Vec<Target>> for TargetSet {
    fn from(targets: Vec<Target>) -> Self {
        targets.into_iter().collect()
    }
}

impl From<TargetSet> for Vec<Target> {
    fn from(set: TargetSet) -> Self {
        set.targets
    }
}

impl FromIterator<Target> for TargetSet {
    fn from_iter<I: IntoIterator<Item = Target>>(iter: I) -> Self {
        let mut set = Self::new();
        set.extend(iter);
        set
    }
}

impl Extend<Target> for TargetSet {
    /// Like inserting each in turn (a later target replaces an earlier one
    /// with the same address), sorted once.
    fn extend<I: IntoIterator<Item = Target>>(&mut self, iter: I) {
        let before = self.targets.len();
        self.targets.extend(iter);
        if self.targets.len() == before {
            return;
        }
        // Stable: of equal addresses, the one added last ends up last, and
        // takes the place of the one kept.
        self.targets.sort_by_key(Target::addr);
        self.targets.dedup_by(|later, kept| {
            let same = later.addr() == kept.addr();
            if same {
                std::mem::swap(later, kept);
            }
            same
        });
        // A controller keeps these for every Service: no spare room.
        self.targets.shrink_to_fit();
    }
}

impl IntoIterator for TargetSet {
    type Item = Target;
    type IntoIter = std::vec::IntoIter<Target>;

    fn into_iter(self) -> Self::IntoIter {
        self.targets.into_iter()
    }
}

impl<'a> IntoIterator for &'a TargetSet {
    type Item = &'a Target;
    type IntoIter = std::slice::Iter<'a, Target>;

    fn into_iter(self) -> Self::IntoIter {
        self.targets.iter()
    }
}

/// Changes to apply to one listener's registered targets. Both lists are
/// sorted by (ip, port). Providers apply deregistrations first, so that
/// draining starts as early as possible and capacity (targets per group,
/// endpoints per NEG) is freed before new targets are added.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetDelta {
    pub register: Vec<Target>,
    pub deregister: Vec<Target>,
}

impl TargetDelta {
    /// True when there is nothing to do (and so no cloud call to make).
    pub fn is_empty(&self) -> bool {
        self.register.is_empty() && self.deregister.is_empty()
    }

    /// Number of targets touched.
    pub fn len(&self) -> usize {
        self.register.len() + self.deregister.len()
    }

    /// Applies the delta to a set of registered targets (e.g. the
    /// controller's cache after a successful `sync_targets`).
    pub fn apply_to(&self, registered: &mut TargetSet) {
        for target in &self.deregister {
            registered.remove(&target.addr());
        }
        registered.extend(self.register.iter().cloned());
    }
}

/// Computes what to change so that exactly the desired targets that want
/// traffic are registered.
///
/// - `current`: the targets registered now (as read from the cloud, without
///   ones already draining, or the controller's cache). Their state is
///   ignored: being in the set means registered.
/// - `desired`: the endpoints from the EndpointSlices, with conditions.
///
/// Rules: a desired target that wants traffic (ready or serving, not
/// terminating) and is not registered is registered; a registered target that
/// is gone, terminating (even if still serving) or neither ready nor serving
/// is deregistered; a desired target that does not want traffic and is not
/// registered is left alone. Applying the delta and diffing again gives an
/// empty delta, so a reconcile where nothing changed makes no cloud call.
///
/// Registrations carry the desired target; deregistrations carry the current
/// one, with node and zone filled in from the desired target when missing.
pub fn diff_targets(current: &TargetSet, desired: &TargetSet) -> TargetDelta {
    let register = desired
        .iter()
        .filter(|t| t.state.wants_traffic() && !current.contains(&t.addr()))
        .cloned()
        .collect();
    let deregister = current
        .iter()
        .filter_map(|registered| {
            let wanted = desired.get(&registered.addr());
            if wanted.is_some_and(|w| w.state.wants_traffic()) {
                return None;
            }
            let mut target = registered.clone();
            if let Some(w) = wanted {
                target.node = target.node.or_else(|| w.node.clone());
                target.zone = target.zone.or_else(|| w.zone.clone());
            }
            Some(target)
        })
        .collect();
    TargetDelta {
        register,
        deregister,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(last_octet: u8, port: u16, state: TargetState) -> Target {
        Target {
            ip: IpAddr::from([10, 0, 0, last_octet]),
            port,
            node: Some(format!("node-{}", last_octet % 2).into()),
            zone: Some("zone-a".into()),
            state,
        }
    }

    const TERMINATING_SERVING: TargetState = TargetState {
        ready: false,
        serving: true,
        terminating: true,
    };
    const NOT_READY: TargetState = TargetState {
        ready: false,
        serving: false,
        terminating: false,
    };

    fn addrs(targets: &[Target]) -> Vec<SocketAddr> {
        targets.iter().map(Target::addr).collect()
    }

    #[test]
    fn a_set_holds_one_target_per_address_in_order() {
        let mut set: TargetSet = [
            target(3, 80, TargetState::READY),
            target(1, 80, TargetState::READY),
            target(3, 80, NOT_READY),
            target(1, 70, TargetState::READY),
        ]
        .into_iter()
        .collect();
        // The later of two with the same address wins, as with insert.
        assert_eq!(
            set.iter().map(|t| (t.addr(), t.state)).collect::<Vec<_>>(),
            vec![
                (target(1, 70, NOT_READY).addr(), TargetState::READY),
                (target(1, 80, NOT_READY).addr(), TargetState::READY),
                (target(3, 80, NOT_READY).addr(), NOT_READY),
            ]
        );
        assert_eq!(set.insert(target(2, 80, NOT_READY)), None);
        assert_eq!(
            set.insert(target(2, 80, TargetState::READY)),
            Some(target(2, 80, NOT_READY))
        );
        set.extend([
            target(0, 80, TargetState::READY),
            target(3, 80, TargetState::READY),
        ]);
        assert_eq!(
            addrs(&Vec::from(set.clone())),
            addrs(&[
                target(0, 80, NOT_READY),
                target(1, 70, NOT_READY),
                target(1, 80, NOT_READY),
                target(2, 80, NOT_READY),
                target(3, 80, NOT_READY),
            ])
        );
        assert!(
            set.get(&target(3, 80, NOT_READY).addr())
                .is_some_and(|t| t.state == TargetState::READY)
        );
        assert_eq!(
            set.remove(&target(1, 70, NOT_READY).addr()),
            Some(target(1, 70, TargetState::READY))
        );
        assert!(!set.contains(&target(1, 70, NOT_READY).addr()));
        assert_eq!(set.len(), 4);
    }

    #[test]
    fn state_from_conditions() {
        assert_eq!(
            TargetState::from_conditions(None, None, None),
            TargetState::READY
        );
        assert_eq!(
            TargetState::from_conditions(Some(false), None, Some(true)),
            TargetState {
                ready: false,
                serving: false,
                terminating: true
            }
        );
        assert_eq!(
            TargetState::from_conditions(Some(false), Some(true), Some(true)),
            TERMINATING_SERVING
        );
        assert!(TargetState::READY.wants_traffic());
        assert!(!TERMINATING_SERVING.wants_traffic());
        assert!(!NOT_READY.wants_traffic());
        // Serving but not ready and not terminating (e.g. publishNotReadyAddresses).
        assert!(
            TargetState {
                ready: false,
                serving: true,
                terminating: false
            }
            .wants_traffic()
        );
    }

    #[test]
    fn new_ready_endpoint_is_registered() {
        let current: TargetSet = [target(1, 80, TargetState::READY)].into_iter().collect();
        let desired: TargetSet = [
            target(1, 80, TargetState::READY),
            target(2, 80, TargetState::READY),
        ]
        .into_iter()
        .collect();
        let delta = diff_targets(&current, &desired);
        assert_eq!(delta.register, vec![target(2, 80, TargetState::READY)]);
        assert!(delta.deregister.is_empty());
    }

    #[test]
    fn terminating_endpoint_is_deregistered_even_if_serving() {
        let current: TargetSet = [
            target(1, 80, TargetState::READY),
            target(2, 80, TargetState::READY),
        ]
        .into_iter()
        .collect();
        let desired: TargetSet = [
            target(1, 80, TargetState::READY),
            target(2, 80, TERMINATING_SERVING),
        ]
        .into_iter()
        .collect();
        let delta = diff_targets(&current, &desired);
        assert!(delta.register.is_empty());
        assert_eq!(
            addrs(&delta.deregister),
            addrs(&[target(2, 80, TargetState::READY)])
        );

        // A new endpoint that is already terminating is not registered.
        let delta = diff_targets(&TargetSet::new(), &desired);
        assert_eq!(delta.register, vec![target(1, 80, TargetState::READY)]);
    }

    #[test]
    fn removed_endpoint_is_deregistered() {
        let current: TargetSet = [
            target(1, 80, TargetState::READY),
            target(2, 80, TargetState::READY),
        ]
        .into_iter()
        .collect();
        let desired: TargetSet = [target(2, 80, TargetState::READY)].into_iter().collect();
        let delta = diff_targets(&current, &desired);
        assert!(delta.register.is_empty());
        assert_eq!(delta.deregister, vec![target(1, 80, TargetState::READY)]);

        // A port change is a different target.
        let desired: TargetSet = [
            target(1, 81, TargetState::READY),
            target(2, 80, TargetState::READY),
        ]
        .into_iter()
        .collect();
        let delta = diff_targets(&current, &desired);
        assert_eq!(delta.register, vec![target(1, 81, TargetState::READY)]);
        assert_eq!(delta.deregister, vec![target(1, 80, TargetState::READY)]);
    }

    #[test]
    fn equal_inputs_give_empty_delta() {
        let set: TargetSet = (1..=5)
            .map(|i| target(i, 8080, TargetState::READY))
            .collect();
        let delta = diff_targets(&set, &set.clone());
        assert!(delta.is_empty());
        assert_eq!(delta.len(), 0);
        assert!(diff_targets(&TargetSet::new(), &TargetSet::new()).is_empty());
    }

    #[test]
    fn new_not_ready_not_serving_endpoint_is_not_registered() {
        let desired: TargetSet = [target(1, 80, NOT_READY)].into_iter().collect();
        assert!(diff_targets(&TargetSet::new(), &desired).is_empty());

        // ... and a registered one that becomes not ready is deregistered.
        let current: TargetSet = [target(1, 80, TargetState::READY)].into_iter().collect();
        let delta = diff_targets(&current, &desired);
        assert_eq!(addrs(&delta.deregister), addrs(&[target(1, 80, NOT_READY)]));
    }

    #[test]
    fn deregistration_fills_node_and_zone_from_desired() {
        let current: TargetSet = [Target::new(IpAddr::from([10, 0, 0, 1]), 80)]
            .into_iter()
            .collect();
        let desired: TargetSet = [target(1, 80, TERMINATING_SERVING)].into_iter().collect();
        let delta = diff_targets(&current, &desired);
        assert_eq!(delta.deregister.len(), 1);
        assert_eq!(delta.deregister[0].node.as_deref(), Some("node-1"));
        assert_eq!(delta.deregister[0].zone.as_deref(), Some("zone-a"));
    }

    #[test]
    fn diff_is_sorted_and_reaches_a_fixpoint() {
        // Inserted out of order, mixed families and states.
        let mut current: TargetSet = [
            target(9, 80, TargetState::READY),
            target(3, 80, TargetState::READY),
            target(7, 80, TargetState::READY),
            Target::new("2001:db8::2".parse().unwrap(), 80),
        ]
        .into_iter()
        .collect();
        let desired: TargetSet = [
            target(5, 80, TargetState::READY),
            target(7, 80, TERMINATING_SERVING),
            target(1, 80, TargetState::READY),
            target(4, 80, NOT_READY),
            Target::new("2001:db8::1".parse().unwrap(), 80),
        ]
        .into_iter()
        .collect();
        let delta = diff_targets(&current, &desired);
        let sorted = |v: &[Target]| {
            let mut a = addrs(v);
            a.sort();
            a == addrs(v)
        };
        assert!(sorted(&delta.register) && sorted(&delta.deregister));
        assert_eq!(
            addrs(&delta.register),
            vec![
                "10.0.0.1:80".parse().unwrap(),
                "10.0.0.5:80".parse().unwrap(),
                "[2001:db8::1]:80".parse().unwrap(),
            ]
        );
        assert_eq!(
            addrs(&delta.deregister),
            vec![
                "10.0.0.3:80".parse::<SocketAddr>().unwrap(),
                "10.0.0.7:80".parse().unwrap(),
                "10.0.0.9:80".parse().unwrap(),
                "[2001:db8::2]:80".parse().unwrap(),
            ]
        );
        // Same inputs, same output.
        assert_eq!(diff_targets(&current, &desired), delta);

        delta.apply_to(&mut current);
        assert_eq!(current, desired.wanted());
        assert!(diff_targets(&current, &desired).is_empty());
    }

    #[test]
    fn target_set_serde_round_trip() {
        let set: TargetSet = [
            target(2, 80, TERMINATING_SERVING),
            target(1, 80, TargetState::READY),
        ]
        .into_iter()
        .collect();
        let json = serde_json::to_value(&set).unwrap();
        assert_eq!(json[0]["ip"], "10.0.0.1");
        assert_eq!(json[1]["state"]["terminating"], true);
        let back: TargetSet = serde_json::from_value(json).unwrap();
        assert_eq!(back, set);
    }
}
