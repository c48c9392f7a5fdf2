//! Listeners from `spec.ports`.

use cnlb_provider_core::{Listener, Protocol};
use k8s_openapi::api::core::v1::ServicePort;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::AnnotationError;

/// Where a Service port sends traffic on the Pods.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TargetPort {
    Number(u16),
    /// A container port name: each Pod may resolve it to a different number;
    /// the EndpointSlice controller does it, and each target carries its own
    /// port.
    Named(String),
}

/// One `spec.ports` entry that parsed, with its index for error keys.
struct Port {
    index: usize,
    listener: Listener,
    target: TargetPort,
}

/// One listener per Service port; a TCP and a UDP port with the same number
/// become one `TCP_UDP` listener, since NLB cannot have a TCP and a UDP
/// listener on one port. Problems go to `errors`, keyed by field path.
pub(super) fn listeners(ports: &[ServicePort], errors: &mut Vec<AnnotationError>) -> Vec<Listener> {
    if ports.is_empty() {
        errors.push(AnnotationError::new(
            "spec.ports",
            "",
            "must list at least one port",
        ));
        return Vec::new();
    }
    let parsed: Vec<Port> = ports
        .iter()
        .enumerate()
        .filter_map(|(i, p)| parse(i, p, errors))
        .collect();
    let mut merged: Vec<Port> = Vec::new();
    for port in parsed {
        let partner = merged.iter_mut().find(|m| {
            m.listener.port == port.listener.port
                && matches!(
                    (m.listener.protocol, port.listener.protocol),
                    (Protocol::Tcp, Protocol::Udp) | (Protocol::Udp, Protocol::Tcp)
                )
        });
        let Some(partner) = partner else {
            merged.push(port);
            continue;
        };
        // One TCP_UDP target group registers each Pod at one port, so both
        // must send to the same, known number.
        match (&partner.target, &port.target) {
            (TargetPort::Number(a), TargetPort::Number(b)) if a == b => {}
            _ => {
                errors.push(AnnotationError::new(
                    format!("spec.ports[{}].targetPort", port.index),
                    target_port_text(&port.target),
                    format!(
                        "TCP and UDP on port {} share one TCP_UDP listener, so their targetPorts \
                         must be the same number (spec.ports[{}] has {})",
                        port.listener.port,
                        partner.index,
                        target_port_text(&partner.target)
                    ),
                ));
                continue;
            }
        }
        // EndpointSlices list both ports under their own names with the same
        // number; the TCP port's name is the one the listener keeps.
        if port.listener.protocol == Protocol::Tcp {
            partner.listener.name = port.listener.name;
        }
        partner.listener.protocol = Protocol::TcpUdp;
    }
    merged.into_iter().map(|p| p.listener).collect()
}

fn target_port_text(target: &TargetPort) -> String {
    match target {
        TargetPort::Number(n) => n.to_string(),
        TargetPort::Named(name) => name.clone(),
    }
}

/// Field path of `spec.ports[index].<field>`.
fn field(index: usize, name: &str) -> String {
    format!("spec.ports[{index}].{name}")
}

fn parse(index: usize, sp: &ServicePort, errors: &mut Vec<AnnotationError>) -> Option<Port> {
    // The API server defaults the protocol to TCP.
    let raw_protocol = sp.protocol.as_deref().unwrap_or("TCP");
    let protocol = match raw_protocol {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => {
            errors.push(AnnotationError::new(
                field(index, "protocol"),
                raw_protocol,
                "NLB does not support SCTP; use TCP or UDP",
            ));
            None
        }
        _ => {
            errors.push(AnnotationError::new(
                field(index, "protocol"),
                raw_protocol,
                "must be one of TCP, UDP",
            ));
            None
        }
    };
    let port = u16::try_from(sp.port).ok().filter(|&p| p != 0);
    if port.is_none() {
        errors.push(AnnotationError::new(
            field(index, "port"),
            sp.port.to_string(),
            "must be an integer from 1 to 65535",
        ));
    }
    let target = match &sp.target_port {
        // The API server defaults targetPort to port.
        None => port.map(TargetPort::Number),
        Some(IntOrString::Int(n)) => {
            let number = u16::try_from(*n).ok().filter(|&p| p != 0);
            if number.is_none() {
                errors.push(AnnotationError::new(
                    field(index, "targetPort"),
                    n.to_string(),
                    "must be an integer from 1 to 65535 or a port name",
                ));
            }
            number.map(TargetPort::Number)
        }
        Some(IntOrString::String(name)) if name.is_empty() => {
            errors.push(AnnotationError::new(
                field(index, "targetPort"),
                "",
                "must be an integer from 1 to 65535 or a port name",
            ));
            None
        }
        Some(IntOrString::String(name)) => Some(TargetPort::Named(name.clone())),
    };
    // Each `None` above has pushed its error.
    let (protocol, port, target) = (protocol?, port?, target?);
    let target_port = match &target {
        TargetPort::Number(n) => *n,
        // `Listener::target_port` must be a number and is only the target
        // group's default port: every registered target carries the port its
        // Pod resolved the name to. The Service port is a valid stand-in, and
        // `name` (the Service port name) is how the targets controller finds
        // the resolved numbers in the EndpointSlices.
        TargetPort::Named(_) => port,
    };
    Some(Port {
        index,
        listener: Listener {
            name: sp.name.clone().unwrap_or_default(),
            protocol,
            port,
            target_port,
        },
        target,
    })
}
