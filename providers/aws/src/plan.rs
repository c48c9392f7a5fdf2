//! Pure decisions of the AWS provider: resource names, the keys of persisted
//! IDs, tag and attribute diffs. No SDK calls here.

use std::collections::{BTreeMap, BTreeSet};

use cnlb_provider_core::{
    IpAddressType, Listener, LoadBalancerKey, LoadBalancerSpec, Protocol, ProviderError, Result,
};

/// One ingress rule of the frontend security group: (protocol, port, CIDR).
pub type IngressRule = (String, u16, String);

/// The NLB's frontend security group rules: each listener's port and
/// protocol(s), from `loadBalancerSourceRanges`, or from anywhere when the
/// Service names none (as aws-load-balancer-controller does).
pub fn ingress_rules(spec: &LoadBalancerSpec) -> BTreeSet<IngressRule> {
    let mut anywhere = vec!["0.0.0.0/0".to_string()];
    if spec.ip_address_type == IpAddressType::DualStack {
        anywhere.push("::/0".to_string());
    }
    let cidrs = if spec.source_ranges.is_empty() {
        &anywhere
    } else {
        &spec.source_ranges
    };
    let mut rules = BTreeSet::new();
    for l in &spec.listeners {
        let protocols: &[&str] = match l.protocol {
            Protocol::Tcp | Protocol::Tls => &["tcp"],
            Protocol::Udp => &["udp"],
            Protocol::TcpUdp => &["tcp", "udp"],
        };
        for p in protocols {
            for cidr in cidrs {
                rules.insert((p.to_string(), l.port, cidr.clone()));
            }
        }
    }
    rules
}

/// Key of the load balancer ARN in the persisted [`ResourceIds`](cnlb_provider_core::ResourceIds).
pub const LOAD_BALANCER_ID: &str = "load-balancer";
/// Key of the frontend security group ID.
pub const SECURITY_GROUP_ID: &str = "security-group";
/// Prefix of target group ARN keys: `target-group/<listener name>`.
pub const TARGET_GROUP_ID_PREFIX: &str = "target-group/";

/// RegisterTargets / DeregisterTargets batch size, as aws-load-balancer-controller.
pub const TARGET_BATCH: usize = 200;
/// DescribeTags takes at most 20 ARNs.
pub const DESCRIBE_TAGS_BATCH: usize = 20;

pub fn target_group_id_key(listener: &Listener) -> String {
    format!("{TARGET_GROUP_ID_PREFIX}{}", listener.name)
}

/// The listener name of a target group ID key.
pub fn listener_of_id_key(key: &str) -> Option<&str> {
    key.strip_prefix(TARGET_GROUP_ID_PREFIX)
}

/// ELBv2 protocol of a listener and its target group. TLS needs a
/// certificate, which the model does not carry yet.
pub fn elb_protocol(protocol: Protocol) -> Result<&'static str> {
    match protocol {
        Protocol::Tcp => Ok("TCP"),
        Protocol::Udp => Ok("UDP"),
        Protocol::TcpUdp => Ok("TCP_UDP"),
        Protocol::Tls => Err(ProviderError::invalid(
            "listeners.protocol",
            "TLS listeners need a certificate, which cnlb does not support yet",
        )),
    }
}

/// Target group name: everything a target group cannot change in place
/// (protocol, port) is in its name, so a change creates a new one instead of
/// colliding with the old, which is deleted once no listener uses it.
pub fn target_group_name(key: &LoadBalancerKey, listener: &Listener) -> Result<String> {
    let proto = elb_protocol(listener.protocol)?;
    Ok(key.resource_name(&format!(
        "tg-{}-{}-{}",
        listener.port, proto, listener.target_port
    )))
}

/// Entries of `desired` that `actual` lacks or holds with another value: the
/// attributes or tags to set. Entries the user no longer names keep their
/// last value, as with aws-load-balancer-controller.
pub fn changed(
    desired: &BTreeMap<String, String>,
    actual: &BTreeMap<String, String>,
) -> Vec<(String, String)> {
    desired
        .iter()
        .filter(|(k, v)| actual.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// An ingress rule of a target's security group from the cluster's backend
/// security group: (protocol, port).
pub type BackendRule = (String, u16);

/// The IP protocols (`tcp`, `udp`) of an ELBv2 target group protocol.
pub fn ip_protocols(elb_protocol: &str) -> &'static [&'static str] {
    match elb_protocol {
        "UDP" => &["udp"],
        "TCP_UDP" => &["tcp", "udp"],
        _ => &["tcp"],
    }
}

/// What the targets of one target group need from the backend group: its
/// protocol(s) on each target port, and TCP on a fixed health-check port
/// (`"traffic-port"` is covered by the target ports).
pub fn backend_rules(
    elb_protocol: &str,
    target_ports: impl IntoIterator<Item = u16>,
    health_check_port: &str,
) -> BTreeSet<BackendRule> {
    let mut rules = BTreeSet::new();
    for port in target_ports {
        for p in ip_protocols(elb_protocol) {
            rules.insert((p.to_string(), port));
        }
    }
    if let Ok(port) = health_check_port.parse::<u16>() {
        rules.insert(("tcp".to_string(), port));
    }
    rules
}

/// The rules of `have` (per security group) that nothing `needed` asks for:
/// a rule goes once no load balancer of the cluster needs its port.
pub fn unneeded_rules(
    have: &BTreeMap<String, BTreeSet<BackendRule>>,
    needed: &BTreeSet<BackendRule>,
) -> BTreeMap<String, BTreeSet<BackendRule>> {
    have.iter()
        .map(|(sg, rules)| (sg.clone(), rules - needed))
        .filter(|(_, rules)| !rules.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> LoadBalancerKey {
        LoadBalancerKey::new("c", "default", "web", "uid-1")
    }

    fn listener(port: u16, protocol: Protocol) -> Listener {
        Listener {
            name: "http".into(),
            protocol,
            port,
            target_port: 8080,
        }
    }

    #[test]
    fn target_group_names_change_with_what_cannot_change_in_place() {
        let tcp = target_group_name(&key(), &listener(80, Protocol::Tcp)).unwrap();
        let udp = target_group_name(&key(), &listener(80, Protocol::Udp)).unwrap();
        let other_port = target_group_name(&key(), &listener(81, Protocol::Tcp)).unwrap();
        assert_ne!(tcp, udp);
        assert_ne!(tcp, other_port);
        assert!(
            tcp.len() <= 32 && tcp.starts_with("k8s-default-web-"),
            "{tcp}"
        );
        assert_eq!(
            tcp,
            target_group_name(&key(), &listener(80, Protocol::Tcp)).unwrap()
        );
    }

    #[test]
    fn ingress_rules_follow_listeners_and_source_ranges() {
        let mut spec = LoadBalancerSpec::new(key());
        spec.listeners = vec![listener(80, Protocol::Tcp), listener(53, Protocol::TcpUdp)];
        let rules = ingress_rules(&spec);
        assert_eq!(rules.len(), 3);
        assert!(rules.contains(&("udp".into(), 53, "0.0.0.0/0".into())));
        spec.source_ranges = vec!["10.1.0.0/16".into(), "192.168.0.0/24".into()];
        let rules = ingress_rules(&spec);
        assert_eq!(rules.len(), 6);
        assert!(rules.iter().all(|(_, _, c)| c != "0.0.0.0/0"));
    }

    #[test]
    fn tls_is_refused_as_user_error() {
        assert!(elb_protocol(Protocol::Tls).unwrap_err().is_user_error());
    }

    #[test]
    fn only_differing_attributes_are_set() {
        let desired =
            BTreeMap::from([("a".to_string(), "1".to_string()), ("b".into(), "2".into())]);
        let actual = BTreeMap::from([("a".to_string(), "1".to_string()), ("b".into(), "3".into())]);
        assert_eq!(changed(&desired, &actual), vec![("b".into(), "2".into())]);
        assert!(changed(&desired, &desired).is_empty());
    }

    #[test]
    fn id_keys_round_trip() {
        let l = listener(80, Protocol::Tcp);
        assert_eq!(listener_of_id_key(&target_group_id_key(&l)), Some("http"));
        assert_eq!(listener_of_id_key(LOAD_BALANCER_ID), None);
    }

    #[test]
    fn backend_rules_cover_target_ports_and_a_fixed_health_check_port() {
        let rules = backend_rules("TCP", [8080, 8080, 9000], "traffic-port");
        let want: BTreeSet<BackendRule> = [("tcp".into(), 8080), ("tcp".into(), 9000)].into();
        assert_eq!(rules, want);
        let rules = backend_rules("TCP_UDP", [53], "10254");
        let want: BTreeSet<BackendRule> = [
            ("tcp".into(), 53),
            ("udp".into(), 53),
            ("tcp".into(), 10254),
        ]
        .into();
        assert_eq!(rules, want);
        assert_eq!(backend_rules("UDP", [53], "traffic-port").len(), 1);
    }

    #[test]
    fn a_rule_goes_once_no_load_balancer_needs_its_port() {
        let rule = |p: &str, port: u16| (p.to_string(), port);
        let have = BTreeMap::from([
            (
                "sg-a".to_string(),
                BTreeSet::from([rule("tcp", 8080), rule("tcp", 9000)]),
            ),
            ("sg-b".to_string(), BTreeSet::from([rule("tcp", 8080)])),
        ]);
        let needed = BTreeSet::from([rule("tcp", 8080), rule("udp", 9000)]);
        let gone = unneeded_rules(&have, &needed);
        assert_eq!(
            gone,
            BTreeMap::from([("sg-a".to_string(), BTreeSet::from([rule("tcp", 9000)]))])
        );
        assert!(unneeded_rules(&have, &[rule("tcp", 8080), rule("tcp", 9000)].into()).is_empty());
    }
}
