//! Where the endpoints of cnlb's NEGs are, as far as this process knows:
//! the zone and instance of each endpoint it attached or listed (a detach
//! must name the instance, and after a restart the controller's targets
//! carry only IP and port), and which zonal NEGs it knows whole (created
//! by it, or listed since), so that a health read skips the zones where
//! such a NEG is known to be empty.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

/// An endpoint's zone and instance, names shared with the targets.
pub type Placement = (Arc<str>, Arc<str>);

/// One NEG name's endpoints over its zones.
#[derive(Debug, Default)]
struct Neg {
    endpoints: HashMap<SocketAddr, Placement>,
    /// Zones whose NEG of this name holds exactly the endpoints above in
    /// that zone.
    whole: BTreeSet<String>,
}

#[derive(Debug, Default)]
pub struct Placements {
    negs: HashMap<String, Neg>,
}

impl Placements {
    pub fn get(&self, neg: &str, addr: SocketAddr) -> Option<&Placement> {
        self.negs.get(neg)?.endpoints.get(&addr)
    }

    /// `addr` was attached to `neg` in the placement's zone.
    pub fn attached(&mut self, neg: &str, addr: SocketAddr, placement: Placement) {
        self.negs
            .entry(neg.to_string())
            .or_default()
            .endpoints
            .insert(addr, placement);
    }

    /// `addr` was detached from `neg` (in whichever zone).
    pub fn detached(&mut self, neg: &str, addr: SocketAddr) {
        if let Some(n) = self.negs.get_mut(neg) {
            n.endpoints.remove(&addr);
        }
    }

    /// `neg` in `zone` was just created by this process: it is empty.
    pub fn created(&mut self, neg: &str, zone: &str) {
        let n = self.negs.entry(neg.to_string()).or_default();
        n.endpoints.retain(|_, p| &*p.0 != zone);
        n.whole.insert(zone.to_string());
    }

    /// `neg` in `zone` was listed whole: these are its endpoints (those
    /// without an instance are counted as present but not placed).
    pub fn listed(
        &mut self,
        neg: &str,
        zone: &str,
        endpoints: impl IntoIterator<Item = (SocketAddr, Option<Arc<str>>)>,
    ) {
        let n = self.negs.entry(neg.to_string()).or_default();
        n.endpoints.retain(|_, p| &*p.0 != zone);
        let zone: Arc<str> = Arc::from(zone);
        let mut whole = true;
        for (addr, instance) in endpoints {
            match instance {
                Some(instance) => {
                    n.endpoints.insert(addr, (zone.clone(), instance));
                }
                None => whole = false,
            }
        }
        if whole {
            n.whole.insert(zone.to_string());
        } else {
            n.whole.remove(&*zone);
        }
    }

    /// `neg` in `zone` is gone, or no longer cnlb's to follow.
    pub fn forget(&mut self, neg: &str, zone: &str) {
        if let Some(n) = self.negs.get_mut(neg) {
            n.endpoints.retain(|_, p| &*p.0 != zone);
            n.whole.remove(zone);
            if n.whole.is_empty() && n.endpoints.is_empty() {
                self.negs.remove(neg);
            }
        }
    }

    /// Every zone of `neg`.
    pub fn forget_all(&mut self, neg: &str) {
        self.negs.remove(neg);
    }

    /// `neg` in `zone` is known to have no endpoint: reading it can only
    /// say so.
    pub fn known_empty(&self, neg: &str, zone: &str) -> bool {
        self.negs
            .get(neg)
            .is_some_and(|n| n.whole.contains(zone) && !n.endpoints.values().any(|p| &*p.0 == zone))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn at(zone: &str, instance: &str) -> Placement {
        (Arc::from(zone), Arc::from(instance))
    }

    #[test]
    fn only_a_neg_known_whole_and_empty_can_be_skipped() {
        type Step = fn(&mut Placements);
        let a: Arc<str> = Arc::from("zone-a");
        let cases: [(&str, Step, bool); 8] = [
            ("never seen", |_| {}, false),
            ("created here", |p| p.created("neg", "zone-a"), true),
            (
                "created, then an endpoint attached",
                |p| {
                    p.created("neg", "zone-a");
                    p.attached("neg", addr("10.4.0.1:80"), at("zone-a", "node-1"));
                },
                false,
            ),
            (
                "created, attached, detached",
                |p| {
                    p.created("neg", "zone-a");
                    p.attached("neg", addr("10.4.0.1:80"), at("zone-a", "node-1"));
                    p.detached("neg", addr("10.4.0.1:80"));
                },
                true,
            ),
            (
                "an endpoint attached in another zone",
                |p| {
                    p.created("neg", "zone-a");
                    p.attached("neg", addr("10.4.0.1:80"), at("zone-b", "node-2"));
                },
                true,
            ),
            ("listed empty", |p| p.listed("neg", "zone-a", []), true),
            (
                "listed with an endpoint without an instance",
                |p| p.listed("neg", "zone-a", [(addr("10.4.0.1:80"), None)]),
                false,
            ),
            (
                "created, then deleted",
                |p| {
                    p.created("neg", "zone-a");
                    p.forget("neg", "zone-a");
                },
                false,
            ),
        ];
        for (why, step, empty) in cases {
            let mut p = Placements::default();
            step(&mut p);
            assert_eq!(p.known_empty("neg", &a), empty, "{why}");
            assert!(!p.known_empty("other", &a), "{why}: another name");
        }
    }

    #[test]
    fn a_listing_replaces_what_was_known_of_its_zone() {
        let mut p = Placements::default();
        p.attached("neg", addr("10.4.0.1:80"), at("zone-a", "node-1"));
        p.attached("neg", addr("10.4.0.2:80"), at("zone-b", "node-2"));
        p.listed(
            "neg",
            "zone-a",
            [(addr("10.4.0.3:80"), Some(Arc::from("node-3")))],
        );
        assert_eq!(p.get("neg", addr("10.4.0.1:80")), None);
        assert_eq!(
            p.get("neg", addr("10.4.0.2:80")),
            Some(&at("zone-b", "node-2"))
        );
        assert_eq!(
            p.get("neg", addr("10.4.0.3:80")),
            Some(&at("zone-a", "node-3"))
        );
        p.forget_all("neg");
        assert_eq!(p.get("neg", addr("10.4.0.2:80")), None);
    }
}
