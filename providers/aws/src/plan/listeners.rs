//! The NLB's listeners: one per spec listener, on its port, forwarding to
//! its target group. A listener changes protocol and default action in
//! place; one on a port the spec no longer has is deleted.

use std::collections::{BTreeMap, BTreeSet};

use cnlb_provider_core::{LoadBalancerSpec, ResourceIds, Result};

use super::{elb_protocol, listener_of_id_key};

/// A listener as DescribeListeners shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActualListener {
    pub arn: String,
    pub port: Option<i32>,
    /// ELBv2 protocol (`TCP`, `UDP`, ...).
    pub protocol: Option<String>,
    /// The target group of its first forward default action.
    pub forwards_to: Option<String>,
}

/// One listener call, in the order they are to be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerAction {
    /// CreateListener, tags included.
    Create {
        port: u16,
        protocol: &'static str,
        target_group: String,
    },
    /// ModifyListener: protocol and forward action.
    Modify {
        arn: String,
        protocol: &'static str,
        target_group: String,
    },
    /// DeleteListener (already gone is fine).
    Delete { arn: String },
}

/// The calls that bring `existing` to `spec`'s listeners, each forwarding
/// to the target group of its port in `target_groups` (a listener without
/// one is left alone): creates and modifies in the spec's order, then the
/// deletes of listeners on ports the spec does not have.
pub fn plan(
    spec: &LoadBalancerSpec,
    target_groups: &BTreeMap<u16, String>,
    existing: &[ActualListener],
) -> Result<Vec<ListenerAction>> {
    let mut actions = Vec::new();
    for l in &spec.listeners {
        let Some(tg) = target_groups.get(&l.port) else {
            continue;
        };
        let protocol = elb_protocol(l.protocol)?;
        match existing.iter().find(|x| x.port == Some(i32::from(l.port))) {
            Some(x)
                if x.protocol.as_deref() == Some(protocol)
                    && x.forwards_to.as_deref() == Some(tg.as_str()) => {}
            Some(x) => actions.push(ListenerAction::Modify {
                arn: x.arn.clone(),
                protocol,
                target_group: tg.clone(),
            }),
            None => actions.push(ListenerAction::Create {
                port: l.port,
                protocol,
                target_group: tg.clone(),
            }),
        }
    }
    let wanted: BTreeSet<i32> = spec.listeners.iter().map(|l| i32::from(l.port)).collect();
    actions.extend(
        existing
            .iter()
            .filter(|x| x.port.is_some_and(|p| !wanted.contains(&p)))
            .map(|x| ListenerAction::Delete { arn: x.arn.clone() }),
    );
    Ok(actions)
}

/// The target groups a deleted load balancer leaves: those under persisted
/// IDs and those its listeners forward to, even if their IDs were never
/// persisted (a crash before the controller wrote them).
pub fn target_groups_to_delete(
    known: &ResourceIds,
    listeners: &[ActualListener],
) -> BTreeSet<String> {
    known
        .iter()
        .filter(|(k, _)| listener_of_id_key(k).is_some())
        .map(|(_, arn)| arn.clone())
        .chain(listeners.iter().filter_map(|l| l.forwards_to.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use cnlb_provider_core::{Listener, LoadBalancerKey, Protocol};

    use super::*;
    use crate::plan::{LOAD_BALANCER_ID, SECURITY_GROUP_ID, target_group_id_key};

    fn spec(listeners: &[(u16, Protocol)]) -> LoadBalancerSpec {
        let mut spec = LoadBalancerSpec::new(LoadBalancerKey::new("c", "default", "web", "uid-1"));
        spec.listeners = listeners
            .iter()
            .map(|(port, protocol)| Listener {
                name: format!("p{port}"),
                protocol: *protocol,
                port: *port,
                target_port: 8080,
            })
            .collect();
        spec
    }

    fn existing(arn: &str, port: i32, protocol: &str, tg: &str) -> ActualListener {
        ActualListener {
            arn: arn.into(),
            port: Some(port),
            protocol: Some(protocol.into()),
            forwards_to: Some(tg.into()),
        }
    }

    fn create(port: u16, protocol: &'static str, tg: &str) -> ListenerAction {
        ListenerAction::Create {
            port,
            protocol,
            target_group: tg.into(),
        }
    }

    fn modify(arn: &str, protocol: &'static str, tg: &str) -> ListenerAction {
        ListenerAction::Modify {
            arn: arn.into(),
            protocol,
            target_group: tg.into(),
        }
    }

    fn delete(arn: &str) -> ListenerAction {
        ListenerAction::Delete { arn: arn.into() }
    }

    #[test]
    fn listeners_are_created_modified_and_deleted() {
        use Protocol::{Tcp, TcpUdp, Udp};
        let tgs = BTreeMap::from([
            (80, "tg-80".to_string()),
            (53, "tg-53".to_string()),
            (443, "tg-443".to_string()),
        ]);
        let cases = [
            (
                "none yet",
                spec(&[(80, Tcp)]),
                vec![],
                vec![create(80, "TCP", "tg-80")],
            ),
            (
                "in sync",
                spec(&[(80, Tcp), (53, TcpUdp)]),
                vec![
                    existing("l-80", 80, "TCP", "tg-80"),
                    existing("l-53", 53, "TCP_UDP", "tg-53"),
                ],
                vec![],
            ),
            (
                "another target group (port change replaced it)",
                spec(&[(80, Tcp)]),
                vec![existing("l-80", 80, "TCP", "tg-old")],
                vec![modify("l-80", "TCP", "tg-80")],
            ),
            (
                "another protocol",
                spec(&[(53, Udp)]),
                vec![existing("l-53", 53, "TCP", "tg-53")],
                vec![modify("l-53", "UDP", "tg-53")],
            ),
            (
                "no forward action",
                spec(&[(80, Tcp)]),
                vec![ActualListener {
                    forwards_to: None,
                    ..existing("l-80", 80, "TCP", "")
                }],
                vec![modify("l-80", "TCP", "tg-80")],
            ),
            (
                "extra listener deleted after the others",
                spec(&[(80, Tcp), (443, Tcp)]),
                vec![
                    existing("l-8080", 8080, "TCP", "tg-x"),
                    existing("l-80", 80, "TCP", "tg-80"),
                ],
                vec![create(443, "TCP", "tg-443"), delete("l-8080")],
            ),
            (
                "everything at once, in the spec's order",
                spec(&[(443, Tcp), (80, Tcp), (53, Udp)]),
                vec![
                    existing("l-53", 53, "TCP", "tg-53"),
                    existing("l-22", 22, "TCP", "tg-22"),
                    existing("l-25", 25, "TCP", "tg-25"),
                ],
                vec![
                    create(443, "TCP", "tg-443"),
                    create(80, "TCP", "tg-80"),
                    modify("l-53", "UDP", "tg-53"),
                    delete("l-22"),
                    delete("l-25"),
                ],
            ),
            (
                "no listener left",
                spec(&[]),
                vec![existing("l-80", 80, "TCP", "tg-80")],
                vec![delete("l-80")],
            ),
            (
                "a listener without a port is left alone",
                spec(&[]),
                vec![ActualListener {
                    port: None,
                    ..existing("l-x", 0, "TCP", "tg-x")
                }],
                vec![],
            ),
            (
                "a spec listener without a target group is left alone",
                spec(&[(8443, Tcp)]),
                vec![existing("l-8443", 8443, "UDP", "tg-x")],
                vec![],
            ),
        ];
        for (name, spec, existing, want) in cases {
            assert_eq!(plan(&spec, &tgs, &existing).unwrap(), want, "{name}");
        }
    }

    #[test]
    fn tls_listeners_are_a_user_error() {
        let tgs = BTreeMap::from([(443, "tg-443".to_string())]);
        let err = plan(&spec(&[(443, Protocol::Tls)]), &tgs, &[]).unwrap_err();
        assert!(err.is_user_error());
    }

    #[test]
    fn deleting_a_load_balancer_deletes_every_target_group_it_used() {
        let l = Listener {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 80,
            target_port: 8080,
        };
        let known = ResourceIds::from([
            (target_group_id_key(&l), "tg-known".to_string()),
            (LOAD_BALANCER_ID.to_string(), "lb".to_string()),
            (SECURITY_GROUP_ID.to_string(), "sg".to_string()),
        ]);
        let cases = [
            ("persisted only", known.clone(), vec![], vec!["tg-known"]),
            (
                "forwarded to but never persisted",
                ResourceIds::new(),
                vec![existing("l-80", 80, "TCP", "tg-lost")],
                vec!["tg-lost"],
            ),
            (
                "both, once each",
                known,
                vec![
                    existing("l-80", 80, "TCP", "tg-known"),
                    existing("l-81", 81, "TCP", "tg-lost"),
                    ActualListener {
                        forwards_to: None,
                        ..existing("l-82", 82, "TCP", "")
                    },
                ],
                vec!["tg-known", "tg-lost"],
            ),
        ];
        for (name, known, listeners, want) in cases {
            let want: BTreeSet<String> = want.into_iter().map(str::to_string).collect();
            assert_eq!(target_groups_to_delete(&known, &listeners), want, "{name}");
        }
    }
}
