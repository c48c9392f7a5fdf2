//! EndpointSlices to the desired targets of each listener: pure, so that the
//! rules (which endpoints get traffic, which port a named target port
//! resolves to) are unit tested without an API server.

use std::collections::BTreeMap;

use cnlb_provider_core::{Listener, Protocol, Target, TargetSet, TargetState};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// Desired targets per listener name, from every EndpointSlice of the
/// Service. A listener's targets are the endpoints of the slice port with
/// the listener's name (the Service port name), at that port's number, so
/// named target ports resolve per Pod. Terminating endpoints are included
/// with their state: the diff deregisters them at once.
pub fn desired_targets(
    listeners: &[Listener],
    slices: &[EndpointSlice],
) -> BTreeMap<String, TargetSet> {
    let mut out: BTreeMap<String, TargetSet> = listeners
        .iter()
        .map(|l| (l.name.clone(), TargetSet::new()))
        .collect();
    for slice in slices {
        // IP targets of an IPv4 NLB; FQDN slices are not Pod IPs.
        if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
            continue;
        }
        let ports = slice.ports.as_deref().unwrap_or_default();
        for listener in listeners {
            let Some(port) = ports.iter().find(|p| {
                p.name.as_deref().unwrap_or_default() == listener.name
                    && protocol_matches(listener.protocol, p.protocol.as_deref())
            }) else {
                continue;
            };
            let Some(number) = port.port.and_then(|p| u16::try_from(p).ok()) else {
                continue;
            };
            let Some(set) = out.get_mut(&listener.name) else {
                continue;
            };
            for ep in slice.endpoints.as_deref().unwrap_or_default() {
                let c = ep.conditions.as_ref();
                let state = TargetState::from_conditions(
                    c.and_then(|c| c.ready),
                    c.and_then(|c| c.serving),
                    c.and_then(|c| c.terminating),
                );
                for addr in &ep.addresses {
                    let Ok(ip) = addr.parse() else { continue };
                    set.insert(Target {
                        ip,
                        port: number,
                        node: ep.node_name.clone(),
                        zone: ep.zone.clone(),
                        state,
                    });
                }
            }
        }
    }
    out
}

/// A TCP_UDP listener is fed by the TCP port of the same name (both carry
/// the same endpoints).
fn protocol_matches(listener: Protocol, slice_port: Option<&str>) -> bool {
    let slice_port = slice_port.unwrap_or("TCP");
    match listener {
        Protocol::Tcp | Protocol::Tls | Protocol::TcpUdp => slice_port == "TCP",
        Protocol::Udp => slice_port == "UDP",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(v: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(v).unwrap()
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
        let out = desired_targets(&[listener("http", Protocol::Tcp)], &[s]);
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
        let out = desired_targets(&[listener("http", Protocol::Tcp)], &[a, b]);
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
        let out = desired_targets(&[listener("dns", Protocol::Udp)], &[s.clone(), fqdn]);
        assert_eq!(out["dns"].len(), 1);
        let out = desired_targets(&[listener("dns", Protocol::Tcp)], &[s]);
        assert!(out["dns"].is_empty(), "a TCP listener takes no UDP port");
    }

    #[test]
    fn listeners_without_endpoints_are_present_and_empty() {
        let out = desired_targets(&[listener("http", Protocol::Tcp)], &[]);
        assert!(out["http"].is_empty());
    }
}
