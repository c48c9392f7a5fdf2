//! The lane of settling health polls: a few reconcile slots at most poll
//! the cloud only to see targets settle, so that the others stay free for
//! changes. Such a poll waits for the read rate while it holds its slot;
//! at 1,000 Services the polls that follow a change would otherwise fill
//! every slot while changes wait behind them. A poll that finds the lane
//! full is parked, and sent again, in order, when a place frees: each
//! parked poll costs one more reconcile, not one per tick.

use std::collections::{HashSet, VecDeque};
use std::hash::Hash;

pub(super) struct PollLane<K> {
    width: usize,
    /// Polls in their slot now.
    running: usize,
    /// Sent again, their reconcile not yet ended: each holds a place.
    released: HashSet<K>,
    parked: VecDeque<K>,
    is_parked: HashSet<K>,
}

impl<K: Clone + Eq + Hash> PollLane<K> {
    pub(super) fn new(width: usize) -> Self {
        Self {
            width: width.max(1),
            running: 0,
            released: HashSet::new(),
            parked: VecDeque::new(),
            is_parked: HashSet::new(),
        }
    }

    /// Whether `k`'s poll may run now (then [`leave`](Self::leave) after
    /// it); if not, it is parked.
    pub(super) fn enter(&mut self, k: &K) -> bool {
        self.released.remove(k);
        if self.running < self.width {
            self.running += 1;
            return true;
        }
        if self.is_parked.insert(k.clone()) {
            self.parked.push_back(k.clone());
        }
        false
    }

    pub(super) fn leave(&mut self) {
        self.running = self.running.saturating_sub(1);
    }

    /// `k`'s reconcile ended, a poll or not: a place released for it is
    /// free again.
    pub(super) fn done(&mut self, k: &K) {
        self.released.remove(k);
    }

    /// The parked polls to send again now, as many as there are places.
    /// Those `gone` says will never reconcile (a deleted Service) are
    /// dropped, and hold no place.
    pub(super) fn release(&mut self, gone: impl Fn(&K) -> bool) -> Vec<K> {
        self.released.retain(|k| !gone(k));
        let mut out = Vec::new();
        while self.running + self.released.len() < self.width {
            let Some(k) = self.parked.pop_front() else {
                break;
            };
            self.is_parked.remove(&k);
            if gone(&k) {
                continue;
            }
            self.released.insert(k.clone());
            out.push(k);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_beyond_the_width_wait_in_order_for_a_place() {
        let mut lane = PollLane::new(2);
        let none = |_: &&str| false;
        assert!(lane.enter(&"a"));
        assert!(lane.enter(&"b"));
        for k in ["c", "d", "c", "e"] {
            assert!(!lane.enter(&k), "{k}: the lane is full");
        }
        assert_eq!(lane.release(none), Vec::<&str>::new(), "no place yet");
        lane.leave();
        assert_eq!(lane.release(none), ["c"], "parked once, sent once");
        lane.leave();
        assert_eq!(lane.release(none), ["d"]);
        assert!(lane.enter(&"c"), "its place was kept");
        lane.done(&"c");
        assert_eq!(lane.release(none), Vec::<&str>::new(), "c and d hold both");
        // d's reconcile ended without a poll (its endpoints had changed).
        lane.done(&"d");
        assert_eq!(lane.release(none), ["e"]);
    }

    #[test]
    fn a_poll_that_will_never_run_holds_no_place() {
        let mut lane = PollLane::new(1);
        assert!(lane.enter(&"a"));
        assert!(!lane.enter(&"b"));
        assert!(!lane.enter(&"c"));
        assert!(!lane.enter(&"d"));
        lane.leave();
        let gone = |k: &&str| *k == "b";
        assert_eq!(lane.release(gone), ["c"], "b was deleted meanwhile");
        // c was deleted after being sent: its place frees.
        let gone = |k: &&str| *k == "c";
        assert_eq!(lane.release(gone), ["d"]);
    }
}
