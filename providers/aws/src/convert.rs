//! The SDK's types to and from the plan's plain data: what AWS answers
//! becomes the `Actual*` structs the plan compares, and the plan's
//! settings become request parts.

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_ec2::types::{IpPermission, IpRange, Ipv6Range, SecurityGroup};
use aws_sdk_elasticloadbalancingv2::types::{
    Action, ActionTypeEnum, Listener as ElbListener, LoadBalancer, Matcher, ProtocolEnum, Tag,
    TargetDescription, TargetGroup,
};
use cnlb_provider_core::Target;

use crate::plan::IngressRule;
use crate::plan::listeners::ActualListener;
use crate::plan::load_balancer::ActualLoadBalancer;
use crate::plan::target_group::{ActualHealthCheck, ActualTargetGroup, TargetGroupSettings};

pub(crate) type Tags = BTreeMap<String, String>;

/// The plan's view of a load balancer.
pub(crate) fn actual_load_balancer(lb: &LoadBalancer) -> ActualLoadBalancer {
    ActualLoadBalancer {
        arn: lb.load_balancer_arn().unwrap_or_default().to_string(),
        scheme: lb.scheme().map(|s| s.as_str().to_string()),
        security_groups: lb.security_groups().to_vec(),
        dns_name: lb.dns_name().map(str::to_string),
    }
}

/// The plan's view of a target group.
pub(crate) fn actual_target_group(tg: &TargetGroup) -> ActualTargetGroup {
    ActualTargetGroup {
        arn: tg.target_group_arn().unwrap_or_default().to_string(),
        name: tg.target_group_name().unwrap_or_default().to_string(),
        health_check: ActualHealthCheck {
            protocol: tg.health_check_protocol().map(|p| p.as_str().to_string()),
            port: tg.health_check_port().map(str::to_string),
            path: tg.health_check_path().map(str::to_string),
            interval_seconds: tg.health_check_interval_seconds(),
            timeout_seconds: tg.health_check_timeout_seconds(),
            healthy_threshold: tg.healthy_threshold_count(),
            unhealthy_threshold: tg.unhealthy_threshold_count(),
            success_codes: tg.matcher().and_then(|m| m.http_code()).map(str::to_string),
        },
    }
}

/// The plan's view of a listener: what its first forward action targets.
pub(crate) fn actual_listener(listener: &ElbListener) -> ActualListener {
    ActualListener {
        arn: listener.listener_arn().unwrap_or_default().to_string(),
        port: listener.port(),
        protocol: listener.protocol().map(|p| p.as_str().to_string()),
        forwards_to: listener
            .default_actions()
            .iter()
            .find(|a| a.r#type() == Some(&ActionTypeEnum::Forward))
            .and_then(|a| a.target_group_arn())
            .map(str::to_string),
    }
}

pub(crate) fn forward(target_group: &str) -> Action {
    Action::builder()
        .r#type(ActionTypeEnum::Forward)
        .target_group_arn(target_group)
        .build()
}

/// A target group's health check in the SDK's types, for
/// CreateTargetGroup and ModifyTargetGroup alike.
pub(crate) struct HealthCheckCall {
    pub(crate) protocol: ProtocolEnum,
    pub(crate) port: String,
    pub(crate) path: Option<String>,
    pub(crate) interval: i32,
    pub(crate) timeout: i32,
    pub(crate) healthy_threshold: i32,
    pub(crate) unhealthy_threshold: i32,
    pub(crate) matcher: Option<Matcher>,
}

impl HealthCheckCall {
    pub(crate) fn of(tg: &TargetGroupSettings) -> HealthCheckCall {
        let hc = &tg.health_check;
        HealthCheckCall {
            protocol: ProtocolEnum::from(hc.protocol),
            port: hc.port.clone(),
            path: hc.path.clone(),
            interval: hc.interval_seconds,
            timeout: hc.timeout_seconds,
            healthy_threshold: hc.healthy_threshold,
            unhealthy_threshold: hc.unhealthy_threshold,
            matcher: hc
                .success_codes
                .as_ref()
                .map(|codes| Matcher::builder().http_code(codes).build()),
        }
    }
}

pub(crate) fn target(t: &Target) -> TargetDescription {
    TargetDescription::builder()
        .id(t.ip.to_string())
        .port(i32::from(t.port))
        .build()
}

/// The ingress rules a security group has, in [`ingress_rules`]' shape.
pub(crate) fn rules_of(sg: &SecurityGroup) -> BTreeSet<IngressRule> {
    let mut rules = BTreeSet::new();
    for p in sg.ip_permissions() {
        let (Some(proto), Some(port)) = (
            p.ip_protocol(),
            p.from_port().and_then(|f| u16::try_from(f).ok()),
        ) else {
            continue;
        };
        let cidrs = p
            .ip_ranges()
            .iter()
            .filter_map(|r| r.cidr_ip())
            .chain(p.ipv6_ranges().iter().filter_map(|r| r.cidr_ipv6()));
        for cidr in cidrs {
            rules.insert((proto.to_string(), port, cidr.to_string()));
        }
    }
    rules
}

pub(crate) fn permission((proto, port, cidr): &IngressRule) -> IpPermission {
    let b = IpPermission::builder()
        .ip_protocol(proto)
        .from_port(i32::from(*port))
        .to_port(i32::from(*port));
    if cidr.contains(':') {
        b.ipv6_ranges(Ipv6Range::builder().cidr_ipv6(cidr).build())
            .build()
    } else {
        b.ip_ranges(IpRange::builder().cidr_ip(cidr).build())
            .build()
    }
}

/// Key/value pairs (tags, attributes) of an SDK answer as a map.
pub(crate) fn to_map<'a>(pairs: impl Iterator<Item = (Option<&'a str>, Option<&'a str>)>) -> Tags {
    pairs
        .map(|(k, v)| {
            (
                k.unwrap_or_default().to_string(),
                v.unwrap_or_default().to_string(),
            )
        })
        .collect()
}

pub(crate) fn elb_tag(k: &str, v: &str) -> Tag {
    Tag::builder().key(k).value(v).build()
}

pub(crate) fn elb_tags(tags: &Tags) -> Vec<Tag> {
    tags.iter().map(|(k, v)| elb_tag(k, v)).collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use aws_sdk_elasticloadbalancingv2::types::LoadBalancerSchemeEnum;
    use cnlb_provider_core::{
        HealthCheck, HealthCheckPort, HealthCheckProtocol, Listener, LoadBalancerKey,
        LoadBalancerSpec, Protocol, Scheme,
    };

    use super::*;
    use crate::plan::listeners;
    use crate::plan::load_balancer::{self, LoadBalancerAction};
    use crate::plan::target_group::{self, TargetGroupAction};

    fn spec(health_check: HealthCheck) -> LoadBalancerSpec {
        let mut spec = LoadBalancerSpec::new(LoadBalancerKey::new("c", "default", "web", "uid-1"));
        spec.health_check = health_check;
        spec.listeners = vec![Listener {
            name: "http".into(),
            protocol: Protocol::TcpUdp,
            port: 80,
            target_port: 8080,
        }];
        spec
    }

    /// What AWS answers for a target group made as cnlb makes it.
    fn created(desired: &TargetGroupSettings) -> TargetGroup {
        let hc = HealthCheckCall::of(desired);
        TargetGroup::builder()
            .target_group_arn("arn:tg")
            .target_group_name(&desired.name)
            .protocol(ProtocolEnum::from(desired.protocol))
            .port(i32::from(desired.port))
            .health_check_protocol(hc.protocol)
            .health_check_port(hc.port)
            .set_health_check_path(hc.path)
            .health_check_interval_seconds(hc.interval)
            .health_check_timeout_seconds(hc.timeout)
            .healthy_threshold_count(hc.healthy_threshold)
            .unhealthy_threshold_count(hc.unhealthy_threshold)
            .set_matcher(hc.matcher)
            .build()
    }

    #[test]
    fn what_cnlb_creates_reads_back_in_sync() {
        let checks = [
            ("tcp", HealthCheck::default()),
            (
                "http",
                HealthCheck {
                    protocol: HealthCheckProtocol::Http,
                    port: HealthCheckPort::Port(10254),
                    path: Some("/healthz".into()),
                    ..HealthCheck::default()
                },
            ),
            (
                "https",
                HealthCheck {
                    protocol: HealthCheckProtocol::Https,
                    ..HealthCheck::default()
                },
            ),
        ];
        for (name, check) in checks {
            let spec = spec(check);
            let desired = target_group::desired(&spec, &spec.listeners[0]).unwrap();
            let actual = actual_target_group(&created(&desired));
            assert!(target_group::is_named(&actual, &desired.name), "{name}");
            assert_eq!(
                target_group::plan(&desired, Some(&actual)),
                TargetGroupAction::Update {
                    arn: "arn:tg".into(),
                    drifted: vec![]
                },
                "{name}"
            );
        }

        let spec = spec(HealthCheck::default());
        let tgs = BTreeMap::from([(80, "arn:tg".to_string())]);
        let listener = ElbListener::builder()
            .listener_arn("arn:l")
            .port(80)
            .protocol(ProtocolEnum::TcpUdp)
            .default_actions(forward("arn:tg"))
            .build();
        let existing = [actual_listener(&listener)];
        assert_eq!(existing[0].forwards_to.as_deref(), Some("arn:tg"));
        assert_eq!(listeners::plan(&spec, &tgs, &existing).unwrap(), vec![]);

        for scheme in [Scheme::Internal, Scheme::InternetFacing] {
            let lb = LoadBalancer::builder()
                .load_balancer_arn("arn:lb")
                .scheme(LoadBalancerSchemeEnum::from(load_balancer::scheme(scheme)))
                .security_groups("sg-1")
                .dns_name("lb.example")
                .build();
            let spec = LoadBalancerSpec {
                scheme,
                ..spec.clone()
            };
            let actual = actual_load_balancer(&lb);
            assert_eq!(
                load_balancer::plan(&spec, &["sg-1".to_string()], Some(actual.clone())).unwrap(),
                LoadBalancerAction::Update {
                    lb: actual,
                    security_groups: None
                }
            );
        }
    }
}
