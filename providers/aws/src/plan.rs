//! Pure decisions of the AWS provider: what each resource should be and
//! what to do about what exists (create, modify in place, replace,
//! delete), as data. No SDK types and no calls here: `provider.rs`
//! describes the resources, turns them into the plain `Actual*` structs of
//! these modules, asks the plan and makes the calls it answers.
//!
//! This module: resource names, the keys of persisted IDs, what AWS cannot
//! build ([`validate`]), attribute and tag diffs ([`changed`]) and the
//! backend security group's rules. Per resource: [`target_group`],
//! [`security_group`], [`load_balancer`], [`listeners`].

use std::collections::{BTreeMap, BTreeSet};

use cnlb_provider_core::{
    Listener, LoadBalancerKey, LoadBalancerSpec, Protocol, ProviderError, Result,
};

pub mod listeners;
pub mod load_balancer;
pub mod security_group;
pub mod target_group;

#[cfg(test)]
mod fixtures;

pub use security_group::{IngressRule, ingress_rules};

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

/// What an NLB cannot be asked for, as user errors naming the field.
pub fn validate(spec: &LoadBalancerSpec) -> Result<()> {
    spec.validate()?;
    for l in &spec.listeners {
        elb_protocol(l.protocol)?;
    }
    if let Some(listener) = spec.target_group_names.keys().next() {
        return Err(ProviderError::invalid(
            format!("target_group_names[{listener}]"),
            "target group names derive from the Service on AWS; they cannot be chosen",
        ));
    }
    Ok(())
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
    use super::fixtures::{key, listener};
    use super::*;

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

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn attributes_and_tags_to_set() {
        let owner = ("cnlb.dev/cluster", "c");
        let cases = [
            (
                "attributes in sync, others AWS has are kept",
                map(&[("a", "1")]),
                map(&[("a", "1"), ("aws-default", "x")]),
                vec![],
            ),
            (
                "attribute changed",
                map(&[("a", "1"), ("b", "2")]),
                map(&[("a", "1"), ("b", "3")]),
                vec![("b", "2")],
            ),
            (
                "attribute AWS does not show",
                map(&[("a", "1")]),
                map(&[]),
                vec![("a", "1")],
            ),
            (
                "an attribute the user dropped keeps its value",
                map(&[]),
                map(&[("a", "1")]),
                vec![],
            ),
            (
                "tags missing (adopted after a crash, or a user tag added)",
                map(&[owner, ("team", "web")]),
                map(&[owner]),
                vec![("team", "web")],
            ),
            (
                "a tag with another value",
                map(&[("team", "web")]),
                map(&[("team", "api")]),
                vec![("team", "web")],
            ),
        ];
        for (name, desired, actual, want) in cases {
            let want: Vec<(String, String)> = want
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            assert_eq!(changed(&desired, &actual), want, "{name}");
        }
    }

    #[test]
    fn what_an_nlb_cannot_be_asked_for() {
        let valid = || {
            let mut spec = LoadBalancerSpec::new(key());
            spec.listeners = vec![listener(80, Protocol::Tcp)];
            spec
        };
        type Edit = fn(&mut LoadBalancerSpec);
        let cases: [(&str, Edit, Option<&str>); 4] = [
            ("valid", |_| {}, None),
            (
                "not valid anywhere",
                |s| s.key.uid.clear(),
                Some("invalid key.uid"),
            ),
            (
                "tls",
                |s| s.listeners[0].protocol = Protocol::Tls,
                Some("invalid listeners.protocol"),
            ),
            (
                "target group names",
                |s| {
                    s.target_group_names.insert("http".into(), "mine".into());
                },
                Some("invalid target_group_names[http]"),
            ),
        ];
        for (name, edit, want) in cases {
            let mut spec = valid();
            edit(&mut spec);
            match (validate(&spec), want) {
                (Ok(()), None) => {}
                (Err(e), Some(want)) => {
                    assert!(e.is_user_error(), "{name}");
                    assert!(e.to_string().starts_with(want), "{name}: {e}");
                }
                (got, _) => panic!("{name}: {got:?}"),
            }
        }
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
