//! The NLB's frontend security group: who may reach the listener ports.
//! Its rules are brought to [`ingress_rules`] by authorizing and revoking
//! only the differences, so connections under unchanged rules never blink.

use std::collections::BTreeSet;

use cnlb_provider_core::{IpAddressType, LoadBalancerKey, LoadBalancerSpec, Protocol};

/// One ingress rule of the frontend security group: (protocol, port, CIDR).
pub type IngressRule = (String, u16, String);

/// The frontend security group's name.
pub fn security_group_name(key: &LoadBalancerKey) -> String {
    key.resource_name("sg")
}

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

/// What AuthorizeSecurityGroupIngress and RevokeSecurityGroupIngress send
/// (no call when empty).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngressChanges {
    pub authorize: Vec<IngressRule>,
    pub revoke: Vec<IngressRule>,
}

/// The rules `desired` has and `actual` lacks, and the other way round.
pub fn ingress_changes(
    desired: &BTreeSet<IngressRule>,
    actual: &BTreeSet<IngressRule>,
) -> IngressChanges {
    IngressChanges {
        authorize: desired.difference(actual).cloned().collect(),
        revoke: actual.difference(desired).cloned().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::fixtures::{key, listener};

    fn rule(p: &str, port: u16, cidr: &str) -> IngressRule {
        (p.to_string(), port, cidr.to_string())
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
    fn dualstack_without_source_ranges_admits_ipv6_too() {
        let mut spec = LoadBalancerSpec::new(key());
        spec.listeners = vec![listener(80, Protocol::Tls)];
        spec.ip_address_type = IpAddressType::DualStack;
        let want = BTreeSet::from([rule("tcp", 80, "0.0.0.0/0"), rule("tcp", 80, "::/0")]);
        assert_eq!(ingress_rules(&spec), want);
    }

    #[test]
    fn only_the_differences_are_authorized_and_revoked() {
        let web = rule("tcp", 80, "10.0.0.0/8");
        let office = rule("tcp", 80, "192.168.0.0/24");
        let dns = rule("udp", 53, "10.0.0.0/8");
        let anywhere = rule("tcp", 80, "0.0.0.0/0");
        let cases = [
            (
                "new group",
                vec![web.clone(), dns.clone()],
                vec![],
                vec![web.clone(), dns.clone()],
                vec![],
            ),
            (
                "in sync",
                vec![web.clone(), dns.clone()],
                vec![dns.clone(), web.clone()],
                vec![],
                vec![],
            ),
            (
                "a source range added",
                vec![web.clone(), office.clone()],
                vec![web.clone()],
                vec![office.clone()],
                vec![],
            ),
            (
                "source ranges set: anywhere goes",
                vec![web.clone()],
                vec![anywhere.clone()],
                vec![web.clone()],
                vec![anywhere.clone()],
            ),
            (
                "a listener removed",
                vec![web.clone()],
                vec![web.clone(), dns.clone()],
                vec![],
                vec![dns.clone()],
            ),
            (
                "no listener left",
                vec![],
                vec![web.clone()],
                vec![],
                vec![web],
            ),
        ];
        for (name, desired, actual, authorize, revoke) in cases {
            let desired: BTreeSet<IngressRule> = desired.into_iter().collect();
            let actual: BTreeSet<IngressRule> = actual.into_iter().collect();
            assert_eq!(
                ingress_changes(&desired, &actual),
                IngressChanges { authorize, revoke },
                "{name}"
            );
        }
    }

    #[test]
    fn the_group_name_is_the_services_own() {
        let name = security_group_name(&key());
        assert!(name.starts_with("k8s-default-web-"), "{name}");
        assert_ne!(name, key().short_name());
        let other = LoadBalancerKey::new("c", "default", "web", "uid-2");
        assert_ne!(name, security_group_name(&other));
    }
}
