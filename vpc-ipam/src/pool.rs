//! The node's address pool in memory, and the pure decisions made on it:
//! which address to hand out, and how much to ask from or give back to the
//! cloud. The agent keeps it in step with the store and the backend.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use crate::backend::Assigned;
use crate::protocol::AttachmentKey;
use crate::store::{Allocation, Snapshot};

/// Free-address watermarks; see the agent's `--*-target` flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Targets {
    pub min: usize,
    pub warm: usize,
    pub max: usize,
}

/// The watermark flags as given; `None` takes the default of
/// [`TargetFlags::resolve`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TargetFlags {
    pub min: Option<usize>,
    pub warm: Option<usize>,
    pub max: Option<usize>,
}

/// The warm and max targets of a backend that names no refill unit (GCP
/// alias ranges, a fixed pool).
const FALLBACK_WARM: usize = 4;
const FALLBACK_MAX: usize = 16;

impl TargetFlags {
    /// The targets, defaults filled from `unit`: the addresses one more
    /// cloud resource gives the node (an ENI's secondary addresses, a /28
    /// prefix). As aws-vpc-cni keeps one ENI (WARM_ENI_TARGET=1) or one
    /// prefix warm, the warm target is one unit, so that a burst of Pods
    /// takes a whole ENI's worth before any ADD waits for the cloud; the
    /// pool gives addresses back only beyond one more unit, and refills at
    /// once only when empty. A default never contradicts a given flag.
    pub fn resolve(self, unit: Option<usize>) -> Targets {
        let warm = self.warm.unwrap_or_else(|| {
            unit.unwrap_or(FALLBACK_WARM)
                .max(self.min.unwrap_or(0))
                .min(self.max.unwrap_or(usize::MAX))
        });
        let max = match unit {
            Some(unit) => warm.saturating_add(unit),
            None => warm.max(FALLBACK_MAX),
        };
        Targets {
            min: self.min.unwrap_or(warm.min(1)),
            warm,
            max: self.max.unwrap_or(max),
        }
    }
}

/// What the pool wants from the cloud now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Nothing,
    /// `urgent`: below the minimum or ADDs are waiting, so no batching delay.
    Acquire {
        count: usize,
        urgent: bool,
    },
    Release(Vec<IpAddr>),
}

/// Until when (ms) the pool task holds `plan` back so that a burst of ADDs
/// becomes one cloud call: a refill that is not urgent waits `delay` from
/// when it was first planned (`window_end`: the end this set before, if
/// any). An urgent one (ADDs wait, the pool is below its minimum) never
/// waits, not even inside a window a calmer plan opened: an ADD that
/// found the pool empty must not sit out the batching delay. `None`: now.
pub fn batch_wait(plan: &Plan, now: u64, window_end: Option<u64>, delay: u64) -> Option<u64> {
    match plan {
        Plan::Acquire { urgent: false, .. } => {
            let end = window_end.unwrap_or(now.saturating_add(delay));
            (now < end).then_some(end)
        }
        Plan::Acquire { urgent: true, .. } | Plan::Release(_) | Plan::Nothing => None,
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub assigned: usize,
    pub allocated: usize,
    pub cooling: usize,
    pub free: usize,
    /// Being given back to the cloud right now.
    pub releasing: usize,
}

#[derive(Debug, Default)]
pub struct Pool {
    assigned: BTreeMap<IpAddr, Assigned>,
    allocations: BTreeMap<AttachmentKey, Allocation>,
    by_ip: HashMap<IpAddr, AttachmentKey>,
    /// Last release of an address: it is not handed out before this time
    /// (Unix ms); after it, addresses released longest ago go first.
    cooldowns: HashMap<IpAddr, u64>,
    /// Being given back to the cloud: not free any more.
    releasing: BTreeSet<IpAddr>,
}

impl Pool {
    pub fn new(assigned: Vec<Assigned>, snapshot: &Snapshot) -> Pool {
        let mut pool = Pool {
            cooldowns: snapshot.cooldowns.iter().map(|(ip, t)| (*ip, *t)).collect(),
            ..Pool::default()
        };
        pool.replace_assigned(assigned);
        for (key, allocation) in &snapshot.allocations {
            pool.allocate(key.clone(), allocation.clone());
        }
        pool
    }

    pub fn lookup(&self, key: &AttachmentKey) -> Option<&Allocation> {
        self.allocations.get(key)
    }

    pub fn allocations(&self) -> impl Iterator<Item = (&AttachmentKey, &Allocation)> {
        self.allocations.iter()
    }

    /// What holds `ip` in the cloud (its ENI), while the node has it.
    pub fn holder(&self, ip: &IpAddr) -> Option<&str> {
        self.assigned.get(ip).map(|a| a.holder.as_str())
    }

    pub fn is_assigned(&self, ip: &IpAddr) -> bool {
        self.assigned.contains_key(ip)
    }

    fn is_free(&self, ip: &IpAddr, now: u64) -> bool {
        !self.by_ip.contains_key(ip)
            && !self.releasing.contains(ip)
            && self.cooldowns.get(ip).is_none_or(|until| *until <= now)
    }

    /// Free addresses in the order they are handed out: never released
    /// first, then those released longest ago, each by address.
    fn free_in_order(&self, now: u64) -> Vec<&Assigned> {
        let mut free: Vec<&Assigned> = self
            .assigned
            .values()
            .filter(|a| self.is_free(&a.ip, now))
            .collect();
        free.sort_by_key(|a| (self.cooldowns.get(&a.ip).copied(), a.ip));
        free
    }

    /// The address to hand out next.
    pub fn pick(&self, now: u64) -> Option<&Assigned> {
        self.free_in_order(now).into_iter().next()
    }

    pub fn allocate(&mut self, key: AttachmentKey, allocation: Allocation) {
        self.cooldowns.remove(&allocation.ip);
        self.by_ip.insert(allocation.ip, key.clone());
        self.allocations.insert(key, allocation);
    }

    /// Drops the allocation of `key`; `cooldown_until` starts the cooldown
    /// of its address.
    pub fn free(&mut self, key: &AttachmentKey, cooldown_until: Option<u64>) -> Option<Allocation> {
        let allocation = self.allocations.remove(key)?;
        self.by_ip.remove(&allocation.ip);
        if let Some(until) = cooldown_until {
            self.cooldowns.insert(allocation.ip, until);
        }
        Some(allocation)
    }

    pub fn counts(&self, now: u64) -> Counts {
        let allocated = self.allocations.len();
        let free = self
            .assigned
            .keys()
            .filter(|ip| self.is_free(ip, now))
            .count();
        let cooling = self
            .assigned
            .keys()
            .filter(|ip| {
                !self.by_ip.contains_key(ip)
                    && self.cooldowns.get(ip).is_some_and(|until| *until > now)
            })
            .count();
        let releasing = self
            .releasing
            .iter()
            .filter(|ip| self.assigned.contains_key(ip))
            .count();
        Counts {
            assigned: self.assigned.len(),
            allocated,
            cooling,
            free,
            releasing,
        }
    }

    /// When the next cooling address becomes free.
    pub fn next_cooldown_end(&self, now: u64) -> Option<u64> {
        self.cooldowns
            .iter()
            .filter(|(ip, until)| **until > now && self.assigned.contains_key(ip))
            .map(|(_, until)| *until)
            .min()
    }

    /// What to ask of the cloud, given `waiting` ADDs blocked on an empty
    /// pool. Cooling addresses count as neither free nor releasable: giving
    /// one back could let another node's Pod take it while a load balancer
    /// still sends it traffic.
    pub fn plan(&self, now: u64, targets: Targets, waiting: usize) -> Plan {
        let free = self.free_in_order(now);
        let want = targets.warm + waiting;
        if free.len() < want {
            let deficit = want - free.len();
            // At least a warm target's worth per call (within the maximum):
            // under a stream of ADDs, one-address top-ups each cost a cloud
            // call and fall behind the write rate limit.
            let room = targets.max.saturating_sub(free.len());
            return Plan::Acquire {
                count: deficit.max(targets.warm.min(room)),
                urgent: waiting > 0 || free.len() < targets.min,
            };
        }
        if free.len() > targets.max && waiting == 0 {
            let surplus = free.len() - targets.warm;
            // Give back those that would be handed out last.
            let ips = free.iter().rev().take(surplus).map(|a| a.ip).collect();
            return Plan::Release(ips);
        }
        Plan::Nothing
    }

    pub fn add_assigned(&mut self, added: Vec<Assigned>) {
        for a in added {
            self.assigned.insert(a.ip, a);
        }
    }

    /// Takes the cloud's view as the truth (on start, after a release).
    pub fn replace_assigned(&mut self, assigned: Vec<Assigned>) {
        self.assigned = assigned.into_iter().map(|a| (a.ip, a)).collect();
        self.releasing.clear();
        // A cooldown only matters for an address the node still holds.
        let held = &self.assigned;
        self.cooldowns.retain(|ip, _| held.contains_key(ip));
    }

    pub fn start_release(&mut self, ips: &[IpAddr]) {
        self.releasing.extend(ips.iter().copied());
    }

    /// Allocations whose address the cloud no longer assigns to the node.
    pub fn orphans(&self) -> Vec<(AttachmentKey, Allocation)> {
        self.allocations
            .iter()
            .filter(|(_, a)| !self.assigned.contains_key(&a.ip))
            .map(|(k, a)| (k.clone(), a.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::PodRef;

    fn assigned(last: u8) -> Assigned {
        Assigned {
            ip: format!("10.0.0.{last}").parse().unwrap(),
            subnet: "10.0.0.0/24".parse().unwrap(),
            holder: "eni-1".into(),
        }
    }

    fn pool(lasts: impl IntoIterator<Item = u8>) -> Pool {
        Pool::new(
            lasts.into_iter().map(assigned).collect(),
            &Snapshot::default(),
        )
    }

    fn key(id: &str) -> AttachmentKey {
        AttachmentKey {
            container_id: id.into(),
            ifname: "eth0".into(),
        }
    }

    fn allocation(a: &Assigned) -> Allocation {
        Allocation {
            ip: a.ip,
            subnet: a.subnet,
            pod: PodRef::default(),
            allocated_at: 0,
        }
    }

    const TARGETS: Targets = Targets {
        min: 1,
        warm: 2,
        max: 4,
    };

    #[test]
    fn hands_out_never_used_addresses_before_released_ones() {
        let mut p = pool([5, 6]);
        let first = p.pick(0).unwrap().clone();
        assert_eq!(first.ip.to_string(), "10.0.0.5");
        p.allocate(key("a"), allocation(&first));
        p.free(&key("a"), Some(0));
        // .5 is out of cooldown, but .6 was never used.
        assert_eq!(p.pick(10).unwrap().ip.to_string(), "10.0.0.6");
    }

    #[test]
    fn cooling_addresses_are_neither_free_nor_released() {
        let mut p = pool([5, 6, 7, 8, 9, 10]);
        let a = p.pick(0).unwrap().clone();
        p.allocate(key("a"), allocation(&a));
        p.free(&key("a"), Some(1_000));
        let counts = p.counts(500);
        assert_eq!((counts.free, counts.cooling), (5, 1));
        assert_eq!(p.next_cooldown_end(500), Some(1_000));
        let Plan::Release(ips) = p.plan(500, TARGETS, 0) else {
            panic!("expected a release")
        };
        assert_eq!(ips.len(), 3);
        assert!(!ips.contains(&a.ip));
        assert_eq!(p.counts(1_000).free, 6);
    }

    #[test]
    fn plans_to_keep_the_warm_target_free() {
        assert_eq!(
            pool([]).plan(0, TARGETS, 0),
            Plan::Acquire {
                count: 2,
                urgent: true
            }
        );
        // A top-up asks for a warm target's worth at once.
        assert_eq!(
            pool([5]).plan(0, TARGETS, 0),
            Plan::Acquire {
                count: 2,
                urgent: false
            }
        );
        assert_eq!(pool([5, 6, 7]).plan(0, TARGETS, 0), Plan::Nothing);
        // Waiting ADDs are demand on top of the warm target.
        assert_eq!(
            pool([5, 6]).plan(0, TARGETS, 3),
            Plan::Acquire {
                count: 3,
                urgent: true
            }
        );
    }

    #[test]
    fn targets_default_to_one_refill_unit() {
        let flags = |min, warm, max| TargetFlags { min, warm, max };
        let targets = |min, warm, max| Targets { min, warm, max };
        for (given, unit, want) in [
            // One ENI of an m5.large (10 addresses, its primary not for
            // Pods), of an m5.4xlarge (30), a /28 prefix.
            (flags(None, None, None), Some(9), targets(1, 9, 18)),
            (flags(None, None, None), Some(29), targets(1, 29, 58)),
            (flags(None, None, None), Some(16), targets(1, 16, 32)),
            (flags(None, None, None), None, targets(1, 4, 16)),
            (flags(None, Some(20), None), None, targets(1, 20, 20)),
            // Given flags win; defaults stay ordered around them.
            (flags(None, Some(8), None), Some(29), targets(1, 8, 37)),
            (flags(None, None, Some(10)), Some(29), targets(1, 10, 10)),
            (flags(Some(40), None, None), Some(29), targets(40, 40, 69)),
            (flags(None, Some(0), None), Some(29), targets(0, 0, 29)),
            (flags(Some(0), Some(0), Some(0)), Some(29), targets(0, 0, 0)),
            (flags(Some(2), Some(5), Some(9)), Some(29), targets(2, 5, 9)),
        ] {
            assert_eq!(given.resolve(unit), want, "{given:?}, unit {unit:?}");
        }
    }

    #[test]
    fn only_refills_that_are_not_urgent_wait_for_a_batch() {
        let calm = Plan::Acquire {
            count: 4,
            urgent: false,
        };
        let urgent = Plan::Acquire {
            count: 5,
            urgent: true,
        };
        let release = Plan::Release(vec!["10.0.0.5".parse().unwrap()]);
        for (plan, now, window_end, delay, want) in [
            // The first calm plan opens a window of the delay...
            (&calm, 1_000, None, 100, Some(1_100)),
            // ...planned again inside it, it keeps its end...
            (&calm, 1_060, Some(1_100), 100, Some(1_100)),
            // ...and goes once it is over, or at once without a delay.
            (&calm, 1_100, Some(1_100), 100, None),
            (&calm, 1_000, None, 0, None),
            // ADDs found the pool empty inside the window: at once.
            (&urgent, 1_060, Some(1_100), 100, None),
            (&urgent, 1_000, None, 100, None),
            (&release, 1_000, None, 100, None),
            (&Plan::Nothing, 1_000, Some(1_100), 100, None),
        ] {
            assert_eq!(
                batch_wait(plan, now, window_end, delay),
                want,
                "{plan:?} at {now}, window end {window_end:?}, delay {delay}"
            );
        }
    }

    #[test]
    fn releasing_addresses_are_not_handed_out() {
        let mut p = pool([5, 6]);
        p.start_release(&["10.0.0.5".parse().unwrap()]);
        assert_eq!(p.pick(0).unwrap().ip.to_string(), "10.0.0.6");
        assert_eq!((p.counts(0).free, p.counts(0).releasing), (1, 1));
        p.replace_assigned(vec![assigned(6)]);
        assert_eq!(p.counts(0).assigned, 1);
        assert_eq!(p.counts(0).releasing, 0);
    }

    #[test]
    fn allocations_the_cloud_lost_are_orphans() {
        let snapshot = Snapshot {
            allocations: [(key("a"), allocation(&assigned(9)))].into(),
            ..Snapshot::default()
        };
        let p = Pool::new(vec![assigned(5)], &snapshot);
        assert_eq!(p.orphans().len(), 1);
        // An orphan's address is still never handed out twice.
        assert_eq!(p.pick(0).unwrap().ip.to_string(), "10.0.0.5");
    }
}
