//! Conversions between the core model and the plugin protocol's messages.
//!
//! Pure and lossless for everything the model can express. Decoding a
//! message can fail (an IP that does not parse, a port above 65535, an
//! unknown enum value): that is an [`ProviderError::InvalidSpec`] naming the
//! field, which the server returns as `INVALID_ARGUMENT` and the client turns
//! into a plugin error (see [`crate::client`]).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use cnlb_provider_core::{
    HealthCheck, HealthCheckPort, HealthCheckProtocol, Instance, InstanceMetadata, InstanceState,
    IpAddressType, IpMode, Listener, LoadBalancerIngress, LoadBalancerKey, LoadBalancerSpec,
    LoadBalancerStatus, NodeAddress, NodeAddressKind, NodeRef, OwnedLoadBalancer, Protocol,
    ProviderError, ResourceIds, Result, Scheme, Target, TargetHealth, TargetHealthState,
    TargetState,
};

use crate::proto;

pub fn ids_to_proto(ids: &ResourceIds) -> HashMap<String, String> {
    ids.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

pub fn ids_from_proto(ids: HashMap<String, String>) -> ResourceIds {
    ids.into_iter().collect()
}

fn map_to_proto(map: &BTreeMap<String, String>) -> HashMap<String, String> {
    ids_to_proto(map)
}

pub fn key_to_proto(key: &LoadBalancerKey) -> proto::LoadBalancerKey {
    proto::LoadBalancerKey {
        cluster: key.cluster.clone(),
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        uid: key.uid.clone(),
    }
}

/// A missing key is an invalid request.
pub fn key_from_proto(key: Option<proto::LoadBalancerKey>) -> Result<LoadBalancerKey> {
    let key = key.ok_or_else(|| ProviderError::invalid("key", "missing"))?;
    Ok(LoadBalancerKey::new(
        key.cluster,
        key.namespace,
        key.name,
        key.uid,
    ))
}

fn protocol_to_proto(protocol: Protocol) -> proto::Protocol {
    match protocol {
        Protocol::Tcp => proto::Protocol::Tcp,
        Protocol::Udp => proto::Protocol::Udp,
        Protocol::TcpUdp => proto::Protocol::TcpUdp,
        Protocol::Tls => proto::Protocol::Tls,
    }
}

fn protocol_from_proto(field: &str, value: i32) -> Result<Protocol> {
    match proto::Protocol::try_from(value) {
        Ok(proto::Protocol::Tcp) => Ok(Protocol::Tcp),
        Ok(proto::Protocol::Udp) => Ok(Protocol::Udp),
        Ok(proto::Protocol::TcpUdp) => Ok(Protocol::TcpUdp),
        Ok(proto::Protocol::Tls) => Ok(Protocol::Tls),
        Ok(proto::Protocol::Unspecified) | Err(_) => Err(ProviderError::invalid(
            field,
            format!("unknown protocol {value}"),
        )),
    }
}

fn port(field: &str, value: u32) -> Result<u16> {
    u16::try_from(value).map_err(|_| ProviderError::invalid(field, format!("port {value} > 65535")))
}

fn ip(field: &str, value: &str) -> Result<IpAddr> {
    value
        .parse()
        .map_err(|_| ProviderError::invalid(field, format!("{value:?} is not an IP address")))
}

pub fn listener_to_proto(l: &Listener) -> proto::Listener {
    proto::Listener {
        name: l.name.clone(),
        protocol: protocol_to_proto(l.protocol).into(),
        port: l.port.into(),
        target_port: l.target_port.into(),
    }
}

pub fn listener_from_proto(field: &str, l: Option<proto::Listener>) -> Result<Listener> {
    let l = l.ok_or_else(|| ProviderError::invalid(field, "missing"))?;
    Ok(Listener {
        protocol: protocol_from_proto(&format!("{field}.protocol"), l.protocol)?,
        port: port(&format!("{field}.port"), l.port)?,
        target_port: port(&format!("{field}.target_port"), l.target_port)?,
        name: l.name,
    })
}

fn health_check_to_proto(hc: &HealthCheck) -> proto::HealthCheck {
    let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    proto::HealthCheck {
        protocol: match hc.protocol {
            HealthCheckProtocol::Tcp => proto::HealthCheckProtocol::Tcp,
            HealthCheckProtocol::Http => proto::HealthCheckProtocol::Http,
            HealthCheckProtocol::Https => proto::HealthCheckProtocol::Https,
        }
        .into(),
        port: match hc.port {
            HealthCheckPort::TrafficPort => 0,
            HealthCheckPort::Port(p) => p.into(),
        },
        path: hc.path.clone(),
        interval_ms: millis(hc.interval),
        timeout_ms: millis(hc.timeout),
        healthy_threshold: hc.healthy_threshold,
        unhealthy_threshold: hc.unhealthy_threshold,
        success_codes: hc.success_codes.clone(),
    }
}

/// A missing health check is the model's default one.
fn health_check_from_proto(hc: Option<proto::HealthCheck>) -> Result<HealthCheck> {
    let Some(hc) = hc else {
        return Ok(HealthCheck::default());
    };
    let protocol = match proto::HealthCheckProtocol::try_from(hc.protocol) {
        Ok(proto::HealthCheckProtocol::Tcp) => HealthCheckProtocol::Tcp,
        Ok(proto::HealthCheckProtocol::Http) => HealthCheckProtocol::Http,
        Ok(proto::HealthCheckProtocol::Https) => HealthCheckProtocol::Https,
        Err(_) => {
            return Err(ProviderError::invalid(
                "health_check.protocol",
                format!("unknown protocol {}", hc.protocol),
            ));
        }
    };
    Ok(HealthCheck {
        protocol,
        port: match hc.port {
            0 => HealthCheckPort::TrafficPort,
            p => HealthCheckPort::Port(port("health_check.port", p)?),
        },
        path: hc.path,
        interval: Duration::from_millis(hc.interval_ms),
        timeout: Duration::from_millis(hc.timeout_ms),
        healthy_threshold: hc.healthy_threshold,
        unhealthy_threshold: hc.unhealthy_threshold,
        success_codes: hc.success_codes,
    })
}

pub fn spec_to_proto(spec: &LoadBalancerSpec) -> proto::LoadBalancerSpec {
    proto::LoadBalancerSpec {
        key: Some(key_to_proto(&spec.key)),
        scheme: match spec.scheme {
            Scheme::Internal => proto::Scheme::Internal,
            Scheme::InternetFacing => proto::Scheme::InternetFacing,
        }
        .into(),
        ip_address_type: match spec.ip_address_type {
            IpAddressType::Ipv4 => proto::IpAddressType::Ipv4,
            IpAddressType::DualStack => proto::IpAddressType::DualStack,
        }
        .into(),
        listeners: spec.listeners.iter().map(listener_to_proto).collect(),
        health_check: Some(health_check_to_proto(&spec.health_check)),
        source_ranges: spec.source_ranges.clone(),
        attributes: map_to_proto(&spec.attributes),
        target_group_attributes: map_to_proto(&spec.target_group_attributes),
        tags: map_to_proto(&spec.tags),
        subnets: spec
            .subnets
            .as_ref()
            .map(|ids| proto::Subnets { ids: ids.clone() }),
    }
}

pub fn spec_from_proto(spec: Option<proto::LoadBalancerSpec>) -> Result<LoadBalancerSpec> {
    let spec = spec.ok_or_else(|| ProviderError::invalid("spec", "missing"))?;
    let scheme = match proto::Scheme::try_from(spec.scheme) {
        Ok(proto::Scheme::Internal) => Scheme::Internal,
        Ok(proto::Scheme::InternetFacing) => Scheme::InternetFacing,
        Err(_) => return Err(ProviderError::invalid("scheme", "unknown value")),
    };
    let ip_address_type = match proto::IpAddressType::try_from(spec.ip_address_type) {
        Ok(proto::IpAddressType::Ipv4) => IpAddressType::Ipv4,
        Ok(proto::IpAddressType::DualStack) => IpAddressType::DualStack,
        Err(_) => return Err(ProviderError::invalid("ip_address_type", "unknown value")),
    };
    let listeners = spec
        .listeners
        .into_iter()
        .enumerate()
        .map(|(i, l)| listener_from_proto(&format!("listeners[{i}]"), Some(l)))
        .collect::<Result<_>>()?;
    let mut out = LoadBalancerSpec {
        key: key_from_proto(spec.key)?,
        scheme,
        ip_address_type,
        listeners,
        health_check: health_check_from_proto(spec.health_check)?,
        source_ranges: spec.source_ranges,
        attributes: spec.attributes.into_iter().collect(),
        target_group_attributes: spec.target_group_attributes.into_iter().collect(),
        tags: spec.tags.into_iter().collect(),
        subnets: spec.subnets.map(|s| s.ids),
        target_group_names: Default::default(),
        provider_settings: String::new(),
    };
    out.normalize();
    Ok(out)
}

pub fn target_to_proto(t: &Target) -> proto::Backend {
    proto::Backend {
        ip: t.ip.to_string(),
        port: t.port.into(),
        node: t.node.as_deref().map(String::from),
        zone: t.zone.as_deref().map(String::from),
        conditions: Some(proto::BackendConditions {
            ready: t.state.ready,
            serving: t.state.serving,
            terminating: t.state.terminating,
        }),
    }
}

/// Missing conditions mean what they mean in an EndpointSlice: ready.
pub fn target_from_proto(field: &str, b: proto::Backend) -> Result<Target> {
    let state = b.conditions.map_or(TargetState::READY, |c| TargetState {
        ready: c.ready,
        serving: c.serving,
        terminating: c.terminating,
    });
    Ok(Target {
        ip: ip(&format!("{field}.ip"), &b.ip)?,
        port: port(&format!("{field}.port"), b.port)?,
        node: b.node.map(Into::into),
        zone: b.zone.map(Into::into),
        state,
    })
}

pub fn targets_from_proto(field: &str, backends: Vec<proto::Backend>) -> Result<Vec<Target>> {
    backends
        .into_iter()
        .enumerate()
        .map(|(i, b)| target_from_proto(&format!("{field}[{i}]"), b))
        .collect()
}

pub fn health_to_proto(h: &TargetHealth) -> proto::BackendHealth {
    proto::BackendHealth {
        listener: h.listener.clone(),
        ip: h.ip.to_string(),
        port: h.port.into(),
        state: match h.state {
            TargetHealthState::Healthy => proto::HealthState::Healthy,
            TargetHealthState::Unhealthy => proto::HealthState::Unhealthy,
            TargetHealthState::Initial => proto::HealthState::Initial,
            TargetHealthState::Draining => proto::HealthState::Draining,
            TargetHealthState::Unavailable => proto::HealthState::Unavailable,
        }
        .into(),
        reason: h.reason.clone(),
    }
}

/// An unknown state (from a newer plugin) reads as unavailable.
pub fn health_from_proto(h: proto::BackendHealth) -> Result<TargetHealth> {
    let state = match proto::HealthState::try_from(h.state) {
        Ok(proto::HealthState::Healthy) => TargetHealthState::Healthy,
        Ok(proto::HealthState::Unhealthy) => TargetHealthState::Unhealthy,
        Ok(proto::HealthState::Initial) => TargetHealthState::Initial,
        Ok(proto::HealthState::Draining) => TargetHealthState::Draining,
        Ok(proto::HealthState::Unavailable) | Err(_) => TargetHealthState::Unavailable,
    };
    Ok(TargetHealth {
        ip: ip("backends.ip", &h.ip)?,
        port: port("backends.port", h.port)?,
        listener: h.listener,
        state,
        reason: h.reason,
    })
}

pub fn status_to_proto(status: &LoadBalancerStatus) -> proto::EnsureLoadBalancerResponse {
    proto::EnsureLoadBalancerResponse {
        ingress: status
            .ingress
            .iter()
            .map(|i| proto::Ingress {
                hostname: i.hostname.clone(),
                ip: i.ip.map(|ip| ip.to_string()),
                ip_mode: match i.ip_mode {
                    None => proto::IpMode::Unspecified,
                    Some(IpMode::Vip) => proto::IpMode::Vip,
                    Some(IpMode::Proxy) => proto::IpMode::Proxy,
                }
                .into(),
            })
            .collect(),
        ids: ids_to_proto(&status.ids),
    }
}

pub fn status_from_proto(resp: proto::EnsureLoadBalancerResponse) -> Result<LoadBalancerStatus> {
    let ingress = resp
        .ingress
        .into_iter()
        .map(|i| {
            Ok(LoadBalancerIngress {
                ip: i.ip.as_deref().map(|v| ip("ingress.ip", v)).transpose()?,
                hostname: i.hostname,
                ip_mode: match proto::IpMode::try_from(i.ip_mode) {
                    Ok(proto::IpMode::Vip) => Some(IpMode::Vip),
                    Ok(proto::IpMode::Proxy) => Some(IpMode::Proxy),
                    Ok(proto::IpMode::Unspecified) | Err(_) => None,
                },
            })
        })
        .collect::<Result<_>>()?;
    Ok(LoadBalancerStatus {
        ingress,
        ids: ids_from_proto(resp.ids),
        annotations: Default::default(),
    })
}

pub fn owned_to_proto(o: &OwnedLoadBalancer) -> proto::OwnedLoadBalancer {
    proto::OwnedLoadBalancer {
        key: Some(key_to_proto(&o.key)),
        ids: ids_to_proto(&o.ids),
    }
}

pub fn owned_from_proto(o: proto::OwnedLoadBalancer) -> Result<OwnedLoadBalancer> {
    Ok(OwnedLoadBalancer {
        key: key_from_proto(o.key)?,
        ids: ids_from_proto(o.ids),
    })
}

pub fn node_to_proto(node: &NodeRef) -> proto::NodeRef {
    proto::NodeRef {
        name: node.name.clone(),
        provider_id: node.provider_id.clone(),
        internal_ips: node.internal_ips.iter().map(IpAddr::to_string).collect(),
    }
}

/// An empty provider ID is no provider ID (as an empty `spec.providerID`).
pub fn nodes_from_proto(nodes: Vec<proto::NodeRef>) -> Result<Vec<NodeRef>> {
    nodes
        .into_iter()
        .enumerate()
        .map(|(i, n)| {
            let internal_ips = n
                .internal_ips
                .iter()
                .enumerate()
                .map(|(j, v)| ip(&format!("nodes[{i}].internal_ips[{j}]"), v))
                .collect::<Result<_>>()?;
            Ok(NodeRef {
                name: n.name,
                provider_id: n.provider_id.filter(|id| !id.is_empty()),
                internal_ips,
            })
        })
        .collect()
}

fn address_kind_to_proto(kind: NodeAddressKind) -> proto::NodeAddressType {
    match kind {
        NodeAddressKind::InternalIP => proto::NodeAddressType::InternalIp,
        NodeAddressKind::ExternalIP => proto::NodeAddressType::ExternalIp,
        NodeAddressKind::Hostname => proto::NodeAddressType::Hostname,
        NodeAddressKind::InternalDNS => proto::NodeAddressType::InternalDns,
        NodeAddressKind::ExternalDNS => proto::NodeAddressType::ExternalDns,
    }
}

/// `None` (a found instance with no result, or nothing set) reads as
/// neither found nor not found: the reply is invalid.
pub fn instance_result_to_proto(instance: Option<&Instance>) -> proto::InstanceResult {
    use proto::instance_result::Result as R;
    proto::InstanceResult {
        result: Some(match instance {
            Some(i) => R::Found(proto::Instance {
                provider_id: i.metadata.provider_id.clone(),
                instance_type: i.metadata.instance_type.clone(),
                addresses: i
                    .metadata
                    .addresses
                    .iter()
                    .map(|a| proto::NodeAddress {
                        r#type: address_kind_to_proto(a.kind).into(),
                        address: a.address.clone(),
                    })
                    .collect(),
                zone: i.metadata.zone.clone(),
                region: i.metadata.region.clone(),
                state: match i.state {
                    InstanceState::Running => proto::InstanceState::Running,
                    InstanceState::Shutdown => proto::InstanceState::Shutdown,
                }
                .into(),
            }),
            None => R::NotFound(proto::InstanceNotFound {}),
        }),
    }
}

/// A result is "not found" only when it says so: a result with nothing
/// set, an instance without provider ID, or a state or address type this
/// side does not know is an error naming the field, never `None` (which
/// deletes the Node).
pub fn instance_result_from_proto(
    field: &str,
    r: proto::InstanceResult,
) -> Result<Option<Instance>> {
    use proto::instance_result::Result as R;
    let i = match r.result {
        Some(R::Found(i)) => i,
        Some(R::NotFound(_)) => return Ok(None),
        None => return Err(ProviderError::invalid(field, "neither found nor not_found")),
    };
    if i.provider_id.is_empty() {
        return Err(ProviderError::invalid(
            format!("{field}.found.provider_id"),
            "empty",
        ));
    }
    let state = match proto::InstanceState::try_from(i.state) {
        Ok(proto::InstanceState::Running) => InstanceState::Running,
        Ok(proto::InstanceState::Shutdown) => InstanceState::Shutdown,
        Ok(proto::InstanceState::Unspecified) | Err(_) => {
            return Err(ProviderError::invalid(
                format!("{field}.found.state"),
                format!("unknown instance state {}", i.state),
            ));
        }
    };
    let addresses = i
        .addresses
        .into_iter()
        .enumerate()
        .map(|(j, a)| {
            let kind = match proto::NodeAddressType::try_from(a.r#type) {
                Ok(proto::NodeAddressType::InternalIp) => NodeAddressKind::InternalIP,
                Ok(proto::NodeAddressType::ExternalIp) => NodeAddressKind::ExternalIP,
                Ok(proto::NodeAddressType::Hostname) => NodeAddressKind::Hostname,
                Ok(proto::NodeAddressType::InternalDns) => NodeAddressKind::InternalDNS,
                Ok(proto::NodeAddressType::ExternalDns) => NodeAddressKind::ExternalDNS,
                Ok(proto::NodeAddressType::Unspecified) | Err(_) => {
                    return Err(ProviderError::invalid(
                        format!("{field}.found.addresses[{j}].type"),
                        format!("unknown address type {}", a.r#type),
                    ));
                }
            };
            Ok(NodeAddress {
                kind,
                address: a.address,
            })
        })
        .collect::<Result<_>>()?;
    Ok(Some(Instance {
        metadata: InstanceMetadata {
            provider_id: i.provider_id,
            instance_type: i.instance_type,
            addresses,
            zone: i.zone,
            region: i.region,
        },
        state,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> LoadBalancerSpec {
        let mut spec = LoadBalancerSpec::new(LoadBalancerKey::new("c1", "default", "web", "uid-1"));
        spec.scheme = Scheme::InternetFacing;
        spec.listeners = vec![
            Listener {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                target_port: 8080,
            },
            Listener {
                name: "dns".into(),
                protocol: Protocol::Udp,
                port: 53,
                target_port: 5353,
            },
        ];
        spec.health_check = HealthCheck {
            protocol: HealthCheckProtocol::Http,
            port: HealthCheckPort::Port(9000),
            path: Some("/healthz".into()),
            interval: Duration::from_millis(1500),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 4,
            success_codes: "200,204".into(),
        };
        spec.source_ranges = vec!["10.0.0.0/8".into()];
        spec.target_group_attributes =
            BTreeMap::from([("proxy_protocol_v2.enabled".into(), "true".into())]);
        spec.tags = BTreeMap::from([("team".into(), "web".into())]);
        spec.subnets = Some(vec!["rack-1".into()]);
        spec.normalized()
    }

    #[test]
    fn spec_round_trips() {
        let spec = spec();
        assert_eq!(spec_from_proto(Some(spec_to_proto(&spec))).unwrap(), spec);
        let mut none = spec.clone();
        none.subnets = None;
        assert_eq!(spec_from_proto(Some(spec_to_proto(&none))).unwrap(), none);
    }

    #[test]
    fn bad_messages_name_the_field() {
        let mut msg = spec_to_proto(&spec());
        msg.listeners[1].port = 70000;
        let err = spec_from_proto(Some(msg)).unwrap_err();
        assert_eq!(
            err,
            ProviderError::invalid("listeners[1].port", "port 70000 > 65535")
        );
        let mut msg = spec_to_proto(&spec());
        msg.listeners[0].protocol = 0;
        assert!(matches!(
            spec_from_proto(Some(msg)),
            Err(ProviderError::InvalidSpec { field, .. }) if field == "listeners[0].protocol"
        ));
        assert!(spec_from_proto(None).unwrap_err().is_user_error());
        let backend = proto::Backend {
            ip: "10.0.0.300".into(),
            port: 80,
            ..Default::default()
        };
        assert!(matches!(
            targets_from_proto("register", vec![backend]),
            Err(ProviderError::InvalidSpec { field, .. }) if field == "register[0].ip"
        ));
    }

    #[test]
    fn targets_health_status_round_trip() {
        let mut t = Target::new("2001:db8::1".parse().unwrap(), 8080);
        t.node = Some("n1".into());
        t.state = TargetState {
            ready: false,
            serving: true,
            terminating: true,
        };
        assert_eq!(target_from_proto("t", target_to_proto(&t)).unwrap(), t);
        // No conditions: ready, as in an EndpointSlice.
        let bare = proto::Backend {
            ip: "10.0.0.1".into(),
            port: 80,
            ..Default::default()
        };
        assert_eq!(
            target_from_proto("t", bare).unwrap().state,
            TargetState::READY
        );

        let h = TargetHealth {
            listener: "http".into(),
            ip: "10.0.0.1".parse().unwrap(),
            port: 80,
            state: TargetHealthState::Draining,
            reason: Some("drain".into()),
        };
        assert_eq!(health_from_proto(health_to_proto(&h)).unwrap(), h);

        let status = LoadBalancerStatus {
            ingress: vec![LoadBalancerIngress {
                hostname: None,
                ip: Some("127.0.0.9".parse().unwrap()),
                ip_mode: Some(IpMode::Proxy),
            }],
            ids: ResourceIds::from([("address".into(), "127.0.0.9".into())]),
            annotations: Default::default(),
        };
        assert_eq!(status_from_proto(status_to_proto(&status)).unwrap(), status);

        let owned = OwnedLoadBalancer {
            key: spec().key,
            ids: status.ids.clone(),
        };
        assert_eq!(owned_from_proto(owned_to_proto(&owned)).unwrap(), owned);
    }

    fn instance(state: InstanceState) -> Instance {
        Instance {
            metadata: InstanceMetadata {
                provider_id: "onprem://n1".into(),
                instance_type: "r640".into(),
                addresses: vec![
                    NodeAddress {
                        kind: NodeAddressKind::InternalIP,
                        address: "10.0.0.1".into(),
                    },
                    NodeAddress {
                        kind: NodeAddressKind::ExternalDNS,
                        address: "n1.example.com".into(),
                    },
                ],
                zone: "rack-1".into(),
                region: "dc-1".into(),
            },
            state,
        }
    }

    #[test]
    fn nodes_and_instances_round_trip() {
        let nodes = vec![
            NodeRef {
                name: "n1".into(),
                provider_id: Some("onprem://n1".into()),
                internal_ips: vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
            },
            NodeRef::named("n2"),
        ];
        let msgs: Vec<_> = nodes.iter().map(node_to_proto).collect();
        assert_eq!(nodes_from_proto(msgs).unwrap(), nodes);
        let mut empty_id = node_to_proto(&NodeRef::named("n3"));
        empty_id.provider_id = Some(String::new());
        assert_eq!(
            nodes_from_proto(vec![empty_id]).unwrap(),
            [NodeRef::named("n3")]
        );
        let mut bad = node_to_proto(&NodeRef::named("n4"));
        bad.internal_ips.push("10.0.0.256".into());
        assert!(matches!(
            nodes_from_proto(vec![node_to_proto(&nodes[1]), bad]),
            Err(ProviderError::InvalidSpec { field, .. }) if field == "nodes[1].internal_ips[0]"
        ));

        for i in [
            Some(instance(InstanceState::Running)),
            Some(instance(InstanceState::Shutdown)),
            None,
        ] {
            let msg = instance_result_to_proto(i.as_ref());
            assert_eq!(instance_result_from_proto("results[0]", msg).unwrap(), i);
        }
    }

    #[test]
    fn doubtful_results_are_errors_not_absent_instances() {
        use proto::instance_result::Result as R;
        let found = |f: fn(&mut proto::Instance)| {
            let mut msg = instance_result_to_proto(Some(&instance(InstanceState::Running)));
            if let Some(R::Found(i)) = &mut msg.result {
                f(i);
            }
            instance_result_from_proto("results[3]", msg)
        };
        type Change = fn(&mut proto::Instance);
        let cases: [(Change, &str); 4] = [
            (|i| i.state = 0, "results[3].found.state"),
            (|i| i.state = 42, "results[3].found.state"),
            (|i| i.provider_id.clear(), "results[3].found.provider_id"),
            (
                |i| i.addresses[1].r#type = 0,
                "results[3].found.addresses[1].type",
            ),
        ];
        for (change, want) in cases {
            assert!(
                matches!(found(change), Err(ProviderError::InvalidSpec { field, .. }) if field == want),
                "{want}"
            );
        }
        assert!(instance_result_from_proto("r", proto::InstanceResult { result: None }).is_err());
    }
}
