//! EndpointSlices to the desired targets of each listener: pure, so that the
//! rules (which endpoints get traffic, which port a named target port
//! resolves to) are unit tested without an API server.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use cnlb_provider_core::{Listener, Protocol, Target, TargetSet, TargetState};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The Pod readiness gate cnlb drives: Pods that declare it in
/// `spec.readinessGates` become Ready only once their target is healthy in
/// the load balancer, so a rollout waits for the new Pods to take traffic.
pub const READINESS_GATE: &str = "cnlb.dev/load-balancer-ready";
/// GKE's NEG readiness gate (ingress-gce); cnlb drives it the same way, so
/// Pods written for GKE need no change.
pub const NEG_READINESS_GATE: &str = "cloud.google.com/load-balancer-neg-ready";
/// Every gate cnlb drives.
pub const READINESS_GATES: [&str; 2] = [READINESS_GATE, NEG_READINESS_GATE];

/// The gates of [`READINESS_GATES`] the Pod declares whose condition is
/// not True yet.
pub fn pending_gates(pod: &Pod) -> Vec<&'static str> {
    let declared = pod.spec.as_ref().and_then(|s| s.readiness_gates.as_ref());
    READINESS_GATES
        .into_iter()
        .filter(|gate| declared.is_some_and(|gs| gs.iter().any(|g| g.condition_type == *gate)))
        .filter(|gate| condition(pod, gate) != Some(true))
        .collect()
}

/// True for a Pod held back only by cnlb's gates: it declares one, its
/// containers are ready, a gate's condition is not True yet, and it is not
/// terminating. Such a Pod must be registered (it is not Ready, so its
/// endpoint says not ready) or its gate could never turn True.
pub fn awaits_gate(pod: &Pod) -> bool {
    serves_behind_gate(pod) && !pending_gates(pod).is_empty()
}

/// True for a Pod that declares one of cnlb's gates, whose containers are
/// ready and that is not terminating: it takes traffic whether its gate is
/// still pending ([`awaits_gate`]) or has just opened. Its endpoint says
/// ready only after the kubelet has seen the gate and the EndpointSlice
/// controller the Pod, a moment later; deregistering it meanwhile would
/// flap the target.
pub fn serves_behind_gate(pod: &Pod) -> bool {
    let declared = pod.spec.as_ref().and_then(|s| s.readiness_gates.as_ref());
    pod.metadata.deletion_timestamp.is_none()
        && condition(pod, "ContainersReady") == Some(true)
        && declared.is_some_and(|gs| {
            gs.iter()
                .any(|g| READINESS_GATES.contains(&g.condition_type.as_str()))
        })
}

/// The status of the Pod's condition `kind`, if present.
fn condition(pod: &Pod, kind: &str) -> Option<bool> {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == kind))
        .map(|c| c.status == "True")
}

/// IPs of the Pods that [`awaits_gate`].
pub fn awaiting_gate<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> BTreeSet<IpAddr> {
    ips_where(pods, awaits_gate)
}

/// IPs of the Pods that [`serves_behind_gate`].
pub fn serving_behind_gate<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> BTreeSet<IpAddr> {
    ips_where(pods, serves_behind_gate)
}

fn ips_where<'a>(pods: impl IntoIterator<Item = &'a Pod>, f: fn(&Pod) -> bool) -> BTreeSet<IpAddr> {
    pods.into_iter()
        .filter(|p| f(p))
        .filter_map(|p| p.status.as_ref()?.pod_ip.as_ref()?.parse().ok())
        .collect()
}

/// What cnlb reads of an EndpointSlice: its ports and, per address, the
/// endpoint's state, node, zone and Pod. An FQDN slice holds no Pod IP and
/// gives no endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceTargets {
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePort {
    pub name: Box<str>,
    pub number: u16,
    pub protocol: Box<str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub ip: IpAddr,
    pub state: TargetState,
    pub node: Option<Arc<str>>,
    pub zone: Option<Arc<str>>,
    /// The Pod behind it (a `targetRef` of kind Pod in the slice's namespace).
    pub pod: Option<Box<str>>,
}

impl SliceTargets {
    /// `share` gives the one copy of a node or zone name that every
    /// endpoint naming it keeps.
    pub fn new(slice: &EndpointSlice, mut share: impl FnMut(&str) -> Arc<str>) -> Self {
        let mut out = SliceTargets {
            ports: Vec::new(),
            endpoints: Vec::new(),
        };
        if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
            return out;
        }
        out.ports = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some(SlicePort {
                    name: p.name.as_deref().unwrap_or_default().into(),
                    number: u16::try_from(p.port?).ok()?,
                    protocol: p.protocol.as_deref().unwrap_or("TCP").into(),
                })
            })
            .collect();
        let namespace = slice.metadata.namespace.as_deref();
        for ep in slice.endpoints.iter().flatten() {
            let c = ep.conditions.as_ref();
            let state = TargetState::from_conditions(
                c.and_then(|c| c.ready),
                c.and_then(|c| c.serving),
                c.and_then(|c| c.terminating),
            );
            let node = ep.node_name.as_deref().map(&mut share);
            let zone = ep.zone.as_deref().map(&mut share);
            let pod = ep
                .target_ref
                .as_ref()
                .filter(|t| t.kind.as_deref() == Some("Pod"))
                .filter(|t| t.namespace.is_none() || t.namespace.as_deref() == namespace)
                .and_then(|t| t.name.as_deref())
                .map(Box::from);
            for ip in ep.addresses.iter().filter_map(|a| a.parse().ok()) {
                out.endpoints.push(SliceEndpoint {
                    ip,
                    state,
                    node: node.clone(),
                    zone: zone.clone(),
                    pod: pod.clone(),
                });
            }
        }
        out.endpoints.shrink_to_fit();
        out
    }
}

/// Desired targets per listener name, from every EndpointSlice of the
/// Service. A listener's targets are the endpoints of the slice port with
/// the listener's name (the Service port name), at that port's number, so
/// named target ports resolve per Pod. Terminating endpoints are included
/// with their state: the diff deregisters them at once. Endpoints of Pods
/// in `behind_gate` count as ready (see [`serves_behind_gate`]).
pub fn desired_targets<'a>(
    listeners: &[Listener],
    slices: impl IntoIterator<Item = &'a SliceTargets>,
    behind_gate: &BTreeSet<IpAddr>,
) -> BTreeMap<String, TargetSet> {
    let mut out: BTreeMap<String, TargetSet> = listeners
        .iter()
        .map(|l| (l.name.clone(), TargetSet::new()))
        .collect();
    for slice in slices {
        for listener in listeners {
            let Some(port) = slice.ports.iter().find(|p| {
                *p.name == listener.name && protocol_matches(listener.protocol, &p.protocol)
            }) else {
                continue;
            };
            let Some(set) = out.get_mut(&listener.name) else {
                continue;
            };
            for ep in &slice.endpoints {
                let state = if behind_gate.contains(&ep.ip) && !ep.state.terminating {
                    TargetState::READY
                } else {
                    ep.state
                };
                set.insert(Target {
                    ip: ep.ip,
                    port: port.number,
                    node: ep.node.clone(),
                    zone: ep.zone.clone(),
                    state,
                });
            }
        }
    }
    out
}

/// A TCP_UDP listener is fed by the TCP port of the same name (both carry
/// the same endpoints).
fn protocol_matches(listener: Protocol, slice_port: &str) -> bool {
    match listener {
        Protocol::Tcp | Protocol::Tls | Protocol::TcpUdp => slice_port == "TCP",
        Protocol::Udp => slice_port == "UDP",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(v: serde_json::Value) -> SliceTargets {
        SliceTargets::new(&serde_json::from_value(v).unwrap(), |n| Arc::from(n))
    }

    fn listener(name: &str, protocol: Protocol) -> Listener {
        Listener {
            name: name.into(),
            protocol,
            port: 80,
            target_port: 8080,
        }
    }

    #[test]
    fn endpoints_of_the_named_port_with_their_state() {
        let s = slice(json!({
            "metadata": {"name": "web-abc"},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "metrics", "port": 9090}],
            "endpoints": [
                {"addresses": ["100.64.1.2"], "conditions": {"ready": true}, "nodeName": "n1", "zone": "a"},
                {"addresses": ["100.64.1.3"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["100.64.1.4"], "conditions": {"ready": false, "serving": false}},
            ],
        }));
        let out = desired_targets(&[listener("http", Protocol::Tcp)], &[s], &BTreeSet::new());
        let set = &out["http"];
        assert_eq!(set.len(), 3);
        let wanted: Vec<String> = set.wanted().iter().map(|t| t.addr().to_string()).collect();
        assert_eq!(wanted, vec!["100.64.1.2:8080"]);
        let first = set.iter().next().unwrap();
        assert_eq!(first.node.as_deref(), Some("n1"));
        assert_eq!(first.zone.as_deref(), Some("a"));
    }

    #[test]
    fn named_target_ports_resolve_per_slice() {
        let a = slice(json!({
            "metadata": {"name": "a"}, "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["10.0.0.1"]}],
        }));
        let b = slice(json!({
            "metadata": {"name": "b"}, "addressType": "IPv4",
            "ports": [{"name": "http", "port": 9000}],
            "endpoints": [{"addresses": ["10.0.0.2"]}],
        }));
        let out = desired_targets(
            &[listener("http", Protocol::Tcp)],
            &[a, b],
            &BTreeSet::new(),
        );
        let addrs: Vec<String> = out["http"].iter().map(|t| t.addr().to_string()).collect();
        assert_eq!(addrs, vec!["10.0.0.1:8080", "10.0.0.2:9000"]);
    }

    #[test]
    fn protocols_and_address_types_are_respected() {
        let s = slice(json!({
            "metadata": {"name": "dns"}, "addressType": "IPv4",
            "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}],
            "endpoints": [{"addresses": ["10.0.0.1"]}],
        }));
        let fqdn = slice(json!({
            "metadata": {"name": "f"}, "addressType": "FQDN",
            "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}],
            "endpoints": [{"addresses": ["example.com"]}],
        }));
        let out = desired_targets(
            &[listener("dns", Protocol::Udp)],
            &[s.clone(), fqdn],
            &BTreeSet::new(),
        );
        assert_eq!(out["dns"].len(), 1);
        let out = desired_targets(&[listener("dns", Protocol::Tcp)], &[s], &BTreeSet::new());
        assert!(out["dns"].is_empty(), "a TCP listener takes no UDP port");
    }

    fn pod(gate: bool, containers_ready: bool, gate_true: bool) -> Pod {
        let mut conditions = vec![
            json!({"type": "ContainersReady", "status": if containers_ready { "True" } else { "False" }}),
        ];
        if gate_true {
            conditions.push(json!({"type": READINESS_GATE, "status": "True"}));
        }
        let gates = if gate {
            json!([{"conditionType": READINESS_GATE}])
        } else {
            json!([])
        };
        serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [], "readinessGates": gates},
            "status": {"podIP": "10.0.0.1", "conditions": conditions},
        }))
        .unwrap()
    }

    #[test]
    fn only_pods_held_back_by_our_gate_await_it() {
        assert!(awaits_gate(&pod(true, true, false)));
        assert!(!awaits_gate(&pod(true, true, true)), "gate already True");
        assert!(
            serves_behind_gate(&pod(true, true, true)),
            "gate just opened: still serving until its endpoint says ready"
        );
        assert!(!serves_behind_gate(&pod(true, false, true)));
        assert!(!serves_behind_gate(&pod(false, true, false)));
        assert!(
            !awaits_gate(&pod(true, false, false)),
            "containers not ready"
        );
        assert!(!awaits_gate(&pod(false, true, false)), "no gate declared");
        assert_eq!(awaiting_gate(&[pod(true, true, false)]).len(), 1);
    }

    #[test]
    fn gkes_neg_gate_is_driven_too() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [], "readinessGates": [{"conditionType": NEG_READINESS_GATE}]},
            "status": {"podIP": "10.0.0.1", "conditions": [{"type": "ContainersReady", "status": "True"}]},
        }))
        .unwrap();
        assert!(awaits_gate(&pod));
        assert_eq!(pending_gates(&pod), vec![NEG_READINESS_GATE]);
    }

    #[test]
    fn a_pod_awaiting_the_gate_is_registered_though_not_ready() {
        let s = slice(json!({
            "metadata": {"name": "web-abc"}, "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": false, "serving": false}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "serving": false}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": false, "serving": true, "terminating": true}},
            ],
        }));
        let awaiting = BTreeSet::from(["10.0.0.1".parse().unwrap(), "10.0.0.3".parse().unwrap()]);
        let out = desired_targets(&[listener("http", Protocol::Tcp)], &[s], &awaiting);
        let wanted: Vec<String> = out["http"]
            .wanted()
            .iter()
            .map(|t| t.addr().to_string())
            .collect();
        assert_eq!(
            wanted,
            vec!["10.0.0.1:8080"],
            "terminating endpoints are never revived"
        );
    }

    #[test]
    fn listeners_without_endpoints_are_present_and_empty() {
        let out = desired_targets(&[listener("http", Protocol::Tcp)], &[], &BTreeSet::new());
        assert!(out["http"].is_empty());
    }
}
