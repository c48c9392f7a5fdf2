//! The Service conditions cnlb writes (pure): what `kubectl get svc -o
//! yaml` tells a user about the load balancer and about whether traffic can
//! flow, and when a condition's `lastTransitionTime` moves (only when its
//! status changes).

use std::collections::BTreeMap;

use cnlb_provider_core::{Listener, TargetHealth, TargetHealthState, TargetSet};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The load balancer matches the Service (or why not).
pub const LOAD_BALANCER_READY: &str = "cnlb.dev/LoadBalancerReady";
/// How many targets are registered and healthy, per listener: whether
/// traffic can flow.
pub const TARGETS_HEALTHY: &str = "cnlb.dev/TargetsHealthy";

/// A condition as cnlb decides it, before times are set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Wanted {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason,
            message: message.into(),
        }
    }
}

/// The condition to write for `wanted`, given the object's current
/// conditions: the transition time of the current one when its status is
/// the same, else `now`.
pub fn to_condition(current: &[Condition], wanted: &Wanted, now: Time) -> Condition {
    let status = if wanted.status { "True" } else { "False" };
    let last_transition_time = current
        .iter()
        .find(|c| c.type_ == wanted.type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(now);
    Condition {
        type_: wanted.type_.to_string(),
        status: status.to_string(),
        reason: wanted.reason.to_string(),
        // The API caps messages at 32 KiB.
        message: wanted.message.chars().take(4096).collect(),
        last_transition_time,
        observed_generation: None,
    }
}

/// True when `current` already says what `wanted` says (status, reason,
/// message), so nothing needs writing.
pub fn is_current(current: &[Condition], wanted: &Wanted) -> bool {
    let status = if wanted.status { "True" } else { "False" };
    current.iter().any(|c| {
        c.type_ == wanted.type_
            && c.status == status
            && c.reason == wanted.reason
            && c.message == wanted.message.chars().take(4096).collect::<String>()
    })
}

/// [`TARGETS_HEALTHY`] from the registered targets and their health: True
/// when every listener has a healthy target, with the counts per listener
/// ("3/3 healthy on 80/TCP").
pub fn targets_healthy(
    listeners: &[Listener],
    registered: &BTreeMap<String, TargetSet>,
    health: &[TargetHealth],
) -> Wanted {
    let mut parts = Vec::new();
    let (mut empty, mut none_healthy, mut some_unhealthy) = (false, false, false);
    for l in listeners {
        let targets = registered.get(&l.name).cloned().unwrap_or_default();
        let healthy = targets
            .iter()
            .filter(|t| {
                health.iter().any(|h| {
                    h.listener == l.name
                        && h.ip == t.ip
                        && h.port == t.port
                        && h.state == TargetHealthState::Healthy
                })
            })
            .count();
        parts.push(format!(
            "{healthy}/{} healthy on {}/{}",
            targets.len(),
            l.port,
            l.protocol.as_str()
        ));
        empty |= targets.is_empty();
        none_healthy |= healthy == 0;
        some_unhealthy |= healthy < targets.len();
    }
    let message = parts.join(", ");
    if empty {
        Wanted::new(TARGETS_HEALTHY, false, "NoTargets", message)
    } else if none_healthy {
        Wanted::new(TARGETS_HEALTHY, false, "NoHealthyTargets", message)
    } else if some_unhealthy {
        Wanted::new(TARGETS_HEALTHY, true, "SomeUnhealthy", message)
    } else {
        Wanted::new(TARGETS_HEALTHY, true, "AllHealthy", message)
    }
}

/// Whether `current` already says every target of `registered` is healthy
/// (or that there are none): the cloud has nothing left to decide, so a
/// new leader, which cannot tell whether the last one's health polls had
/// ended, need not read health again.
pub fn targets_health_final(
    current: &[Condition],
    listeners: &[Listener],
    registered: &BTreeMap<String, TargetSet>,
) -> bool {
    let all_healthy: Vec<TargetHealth> = registered
        .iter()
        .flat_map(|(listener, set)| {
            set.iter().map(|t| TargetHealth {
                listener: listener.clone(),
                ip: t.ip,
                port: t.port,
                state: TargetHealthState::Healthy,
                reason: None,
            })
        })
        .collect();
    is_current(
        current,
        &targets_healthy(listeners, registered, &all_healthy),
    )
}

/// True while some registered target has no verdict, healthy or unhealthy,
/// yet: its health is worth asking again. That includes Unavailable, which
/// GCE reports for an endpoint until a health check covers it; the caller
/// bounds how often it asks (a target that is never checked never settles).
pub fn health_unsettled(registered: &BTreeMap<String, TargetSet>, health: &[TargetHealth]) -> bool {
    registered.iter().any(|(listener, set)| {
        set.iter().any(|t| {
            !health.iter().any(|h| {
                &h.listener == listener
                    && h.ip == t.ip
                    && h.port == t.port
                    && matches!(
                        h.state,
                        TargetHealthState::Healthy | TargetHealthState::Unhealthy
                    )
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use cnlb_provider_core::{Protocol, Target};
    use k8s_openapi::jiff::Timestamp;

    use super::*;

    fn listener(name: &str, port: u16, protocol: Protocol) -> Listener {
        Listener {
            name: name.into(),
            protocol,
            port,
            target_port: 8080,
        }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    fn health(listener: &str, last: u8, state: TargetHealthState) -> TargetHealth {
        TargetHealth {
            listener: listener.into(),
            ip: ip(last),
            port: 8080,
            state,
            reason: None,
        }
    }

    fn set(lasts: &[u8]) -> TargetSet {
        lasts.iter().map(|l| Target::new(ip(*l), 8080)).collect()
    }

    #[test]
    fn targets_healthy_counts_per_listener() {
        use TargetHealthState::*;
        let listeners = [
            listener("http", 80, Protocol::Tcp),
            listener("dns", 53, Protocol::Udp),
        ];
        type Case = (
            BTreeMap<String, TargetSet>,
            Vec<TargetHealth>,
            bool,
            &'static str,
            &'static str,
        );
        let cases: Vec<Case> = vec![
            (
                BTreeMap::from([("http".into(), set(&[1, 2, 3])), ("dns".into(), set(&[1]))]),
                vec![
                    health("http", 1, Healthy),
                    health("http", 2, Healthy),
                    health("http", 3, Healthy),
                    health("dns", 1, Healthy),
                ],
                true,
                "AllHealthy",
                "3/3 healthy on 80/TCP, 1/1 healthy on 53/UDP",
            ),
            (
                BTreeMap::from([("http".into(), set(&[1, 2])), ("dns".into(), set(&[1]))]),
                vec![
                    health("http", 1, Healthy),
                    health("http", 2, Initial),
                    health("dns", 1, Healthy),
                ],
                true,
                "SomeUnhealthy",
                "1/2 healthy on 80/TCP, 1/1 healthy on 53/UDP",
            ),
            (
                BTreeMap::from([("http".into(), set(&[1])), ("dns".into(), set(&[1]))]),
                vec![health("http", 1, Unhealthy), health("dns", 1, Healthy)],
                false,
                "NoHealthyTargets",
                "0/1 healthy on 80/TCP, 1/1 healthy on 53/UDP",
            ),
            (
                BTreeMap::from([("http".into(), set(&[1]))]),
                vec![health("http", 1, Healthy)],
                false,
                "NoTargets",
                "1/1 healthy on 80/TCP, 0/0 healthy on 53/UDP",
            ),
        ];
        for (registered, health, status, reason, message) in cases {
            let w = targets_healthy(&listeners, &registered, &health);
            assert_eq!(
                (w.status, w.reason, w.message.as_str()),
                (status, reason, message)
            );
        }
    }

    #[test]
    fn health_is_final_once_it_says_every_registered_target_is_healthy() {
        let listeners = [listener("http", 80, Protocol::Tcp)];
        let registered = |lasts: &[u8]| BTreeMap::from([("http".to_string(), set(lasts))]);
        let said = |status, reason, message: &str| {
            let wanted = Wanted::new(TARGETS_HEALTHY, status, reason, message);
            vec![to_condition(&[], &wanted, Time(Timestamp::now()))]
        };
        let cases = [
            (
                said(true, "AllHealthy", "2/2 healthy on 80/TCP"),
                registered(&[1, 2]),
                true,
            ),
            (
                said(false, "NoTargets", "0/0 healthy on 80/TCP"),
                registered(&[]),
                true,
            ),
            // Written before the last targets were registered.
            (
                said(true, "AllHealthy", "1/1 healthy on 80/TCP"),
                registered(&[1, 2]),
                false,
            ),
            (
                said(true, "SomeUnhealthy", "1/2 healthy on 80/TCP"),
                registered(&[1, 2]),
                false,
            ),
            (
                said(false, "NoHealthyTargets", "0/2 healthy on 80/TCP"),
                registered(&[1, 2]),
                false,
            ),
            (vec![], registered(&[1]), false),
        ];
        for (current, registered, final_) in cases {
            assert_eq!(
                targets_health_final(&current, &listeners, &registered),
                final_,
                "{current:?}"
            );
        }
    }

    #[test]
    fn transition_time_moves_only_when_the_status_changes() {
        let then = Time(Timestamp::from_second(1_000_000).unwrap());
        let now = Time(Timestamp::from_second(2_000_000).unwrap());
        let current = vec![to_condition(
            &[],
            &Wanted::new(LOAD_BALANCER_READY, true, "Ensured", "ok"),
            then.clone(),
        )];
        assert_eq!(current[0].last_transition_time, then);
        let same = Wanted::new(LOAD_BALANCER_READY, true, "Ensured", "another message");
        assert_eq!(
            to_condition(&current, &same, now.clone()).last_transition_time,
            then
        );
        assert!(!is_current(&current, &same));
        assert!(is_current(
            &current,
            &Wanted::new(LOAD_BALANCER_READY, true, "Ensured", "ok")
        ));
        let flipped = Wanted::new(LOAD_BALANCER_READY, false, "InvalidAnnotation", "bad");
        assert_eq!(
            to_condition(&current, &flipped, now.clone()).last_transition_time,
            now
        );
    }

    #[test]
    fn health_is_unsettled_while_a_target_has_no_verdict() {
        use TargetHealthState::*;
        let registered = BTreeMap::from([("http".to_string(), set(&[1, 2]))]);
        assert!(health_unsettled(&registered, &[health("http", 1, Healthy)]));
        assert!(health_unsettled(
            &registered,
            &[health("http", 1, Healthy), health("http", 2, Initial)]
        ));
        assert!(!health_unsettled(
            &registered,
            &[health("http", 1, Healthy), health("http", 2, Unhealthy)]
        ));
        assert!(health_unsettled(
            &registered,
            &[health("http", 1, Unavailable), health("http", 2, Unhealthy)]
        ));
    }
}
