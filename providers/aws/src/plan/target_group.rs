//! Target groups: one per listener, TargetType=ip. What cannot change in
//! place (protocol, port, target port) is in the name, so a change of it
//! is a replacement: the new group is found by its name or created, and the
//! old one, under a persisted ARN no listener forwards to any more, is
//! deleted ([`stale`]). The health check changes in place.

use std::collections::BTreeSet;
use std::time::Duration;

use cnlb_provider_core::{
    HealthCheckPort, HealthCheckProtocol, Listener, LoadBalancerSpec, ResourceIds, Result,
};

use super::{elb_protocol, listener_of_id_key, target_group_name};

/// A target group as cnlb wants it: what CreateTargetGroup sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetGroupSettings {
    pub name: String,
    /// ELBv2 protocol (`TCP`, `UDP`, `TCP_UDP`).
    pub protocol: &'static str,
    /// The listener's target port.
    pub port: u16,
    pub health_check: HealthCheckSettings,
}

/// The health check of a target group, as CreateTargetGroup and
/// ModifyTargetGroup send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckSettings {
    /// `TCP`, `HTTP` or `HTTPS`.
    pub protocol: &'static str,
    /// `traffic-port` or a port number.
    pub port: String,
    /// HTTP(S) only: the request path (`/` when the Service names none).
    pub path: Option<String>,
    pub interval_seconds: i32,
    pub timeout_seconds: i32,
    pub healthy_threshold: i32,
    pub unhealthy_threshold: i32,
    /// HTTP(S) only: the matcher's HTTP codes.
    pub success_codes: Option<String>,
}

impl HealthCheckSettings {
    /// Path and matcher mean something (and are compared) for HTTP(S) only.
    pub fn is_http(&self) -> bool {
        self.protocol != "TCP"
    }
}

/// A target group as DescribeTargetGroups shows it; what AWS leaves out is
/// `None` (and then differs from any desired value).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActualTargetGroup {
    pub arn: String,
    pub name: String,
    pub health_check: ActualHealthCheck,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActualHealthCheck {
    pub protocol: Option<String>,
    pub port: Option<String>,
    pub path: Option<String>,
    pub interval_seconds: Option<i32>,
    pub timeout_seconds: Option<i32>,
    pub healthy_threshold: Option<i32>,
    pub unhealthy_threshold: Option<i32>,
    pub success_codes: Option<String>,
}

/// What to do about a listener's target group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetGroupAction {
    /// None has its name: CreateTargetGroup, tags included.
    Create,
    /// It exists: its missing tags are added, and if `drifted` (the
    /// health-check fields that differ) is not empty, one
    /// ModifyTargetGroup sets the whole health check.
    Update {
        arn: String,
        drifted: Vec<&'static str>,
    },
}

/// The target group of `listener`.
pub fn desired(spec: &LoadBalancerSpec, listener: &Listener) -> Result<TargetGroupSettings> {
    Ok(TargetGroupSettings {
        name: target_group_name(&spec.key, listener)?,
        protocol: elb_protocol(listener.protocol)?,
        port: listener.target_port,
        health_check: health_check(spec),
    })
}

fn health_check(spec: &LoadBalancerSpec) -> HealthCheckSettings {
    let hc = &spec.health_check;
    let protocol = match hc.protocol {
        HealthCheckProtocol::Tcp => "TCP",
        HealthCheckProtocol::Http => "HTTP",
        HealthCheckProtocol::Https => "HTTPS",
    };
    let http = hc.protocol != HealthCheckProtocol::Tcp;
    HealthCheckSettings {
        protocol,
        port: match hc.port {
            HealthCheckPort::TrafficPort => "traffic-port".to_string(),
            HealthCheckPort::Port(p) => p.to_string(),
        },
        path: http.then(|| hc.path.clone().unwrap_or_else(|| "/".to_string())),
        interval_seconds: secs(hc.interval),
        timeout_seconds: secs(hc.timeout),
        // Validated to be small and positive.
        healthy_threshold: hc.healthy_threshold as i32,
        unhealthy_threshold: hc.unhealthy_threshold as i32,
        success_codes: http.then(|| hc.success_codes.clone()),
    }
}

fn secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX)
}

/// Whether `actual`, found under a persisted ARN, is still the target group
/// named `name`. If not, protocol or port changed, which a target group
/// cannot do in place: it is being replaced, so the one to use is looked
/// up by name (or created).
pub fn is_named(actual: &ActualTargetGroup, name: &str) -> bool {
    actual.name == name
}

/// What to do with the target group found for `desired` (by persisted ARN
/// if [`is_named`], else by name).
pub fn plan(
    desired: &TargetGroupSettings,
    actual: Option<&ActualTargetGroup>,
) -> TargetGroupAction {
    match actual {
        None => TargetGroupAction::Create,
        Some(actual) => TargetGroupAction::Update {
            arn: actual.arn.clone(),
            drifted: health_check_drift(&desired.health_check, &actual.health_check),
        },
    }
}

/// The health-check fields of `actual` that differ from `desired`.
pub fn health_check_drift(
    desired: &HealthCheckSettings,
    actual: &ActualHealthCheck,
) -> Vec<&'static str> {
    let mut drifted = Vec::new();
    let mut check = |field, differs: bool| {
        if differs {
            drifted.push(field);
        }
    };
    check(
        "protocol",
        actual.protocol.as_deref() != Some(desired.protocol),
    );
    check(
        "port",
        actual.port.as_deref() != Some(desired.port.as_str()),
    );
    check(
        "interval",
        actual.interval_seconds != Some(desired.interval_seconds),
    );
    check(
        "timeout",
        actual.timeout_seconds != Some(desired.timeout_seconds),
    );
    check(
        "healthy_threshold",
        actual.healthy_threshold != Some(desired.healthy_threshold),
    );
    check(
        "unhealthy_threshold",
        actual.unhealthy_threshold != Some(desired.unhealthy_threshold),
    );
    // A TCP check keeps whatever path and matcher AWS reports.
    if desired.is_http() {
        check("path", actual.path != desired.path);
        check(
            "success_codes",
            actual.success_codes != desired.success_codes,
        );
    }
    drifted
}

/// Target groups under persisted IDs that the load balancer no longer
/// uses (`current` holds the IDs of this ensure): their listener went, or
/// changed protocol or port. Deleted after the listeners moved.
pub fn stale(known: &ResourceIds, current: &ResourceIds) -> BTreeSet<String> {
    let current: BTreeSet<&String> = current.values().collect();
    known
        .iter()
        .filter(|(k, arn)| listener_of_id_key(k).is_some() && !current.contains(arn))
        .map(|(_, arn)| arn.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use cnlb_provider_core::{HealthCheck, LoadBalancerKey, Protocol};

    use super::*;
    use crate::plan::{LOAD_BALANCER_ID, SECURITY_GROUP_ID, target_group_id_key};

    fn spec(health_check: HealthCheck) -> LoadBalancerSpec {
        let mut spec = LoadBalancerSpec::new(LoadBalancerKey::new("c", "default", "web", "uid-1"));
        spec.health_check = health_check;
        spec
    }

    fn listener(port: u16, protocol: Protocol, target_port: u16) -> Listener {
        Listener {
            name: "http".into(),
            protocol,
            port,
            target_port,
        }
    }

    fn http_check() -> HealthCheck {
        HealthCheck {
            protocol: HealthCheckProtocol::Http,
            port: HealthCheckPort::Port(10254),
            path: Some("/healthz".into()),
            success_codes: "200".into(),
            ..HealthCheck::default()
        }
    }

    /// The target group AWS shows once `desired` was created.
    fn actual_of(desired: &TargetGroupSettings) -> ActualTargetGroup {
        let hc = &desired.health_check;
        ActualTargetGroup {
            arn: format!("arn:{}", desired.name),
            name: desired.name.clone(),
            health_check: ActualHealthCheck {
                protocol: Some(hc.protocol.into()),
                port: Some(hc.port.clone()),
                path: hc.path.clone(),
                interval_seconds: Some(hc.interval_seconds),
                timeout_seconds: Some(hc.timeout_seconds),
                healthy_threshold: Some(hc.healthy_threshold),
                unhealthy_threshold: Some(hc.unhealthy_threshold),
                success_codes: hc.success_codes.clone(),
            },
        }
    }

    #[test]
    fn desired_settings_follow_the_spec() {
        let tcp = desired(
            &spec(HealthCheck::default()),
            &listener(80, Protocol::TcpUdp, 8080),
        )
        .unwrap();
        assert_eq!((tcp.protocol, tcp.port), ("TCP_UDP", 8080));
        assert_eq!(
            tcp.health_check,
            HealthCheckSettings {
                protocol: "TCP",
                port: "traffic-port".into(),
                path: None,
                interval_seconds: 10,
                timeout_seconds: 10,
                healthy_threshold: 3,
                unhealthy_threshold: 3,
                success_codes: None,
            }
        );
        let http = desired(&spec(http_check()), &listener(80, Protocol::Tcp, 8080)).unwrap();
        let hc = &http.health_check;
        assert_eq!(
            (hc.protocol, hc.port.as_str(), hc.path.as_deref()),
            ("HTTP", "10254", Some("/healthz"))
        );
        assert_eq!(hc.success_codes.as_deref(), Some("200"));
        let no_path = HealthCheck {
            protocol: HealthCheckProtocol::Https,
            path: None,
            ..HealthCheck::default()
        };
        let https = desired(&spec(no_path), &listener(80, Protocol::Tcp, 8080)).unwrap();
        assert_eq!(https.health_check.path.as_deref(), Some("/"));
        assert_eq!(https.health_check.success_codes.as_deref(), Some("200-399"));
        assert!(
            desired(&spec(http_check()), &listener(443, Protocol::Tls, 8443))
                .unwrap_err()
                .is_user_error()
        );
    }

    #[test]
    fn health_check_drift_is_modified_in_place() {
        let tcp = desired(
            &spec(HealthCheck::default()),
            &listener(80, Protocol::Tcp, 8080),
        )
        .unwrap();
        let http = desired(&spec(http_check()), &listener(80, Protocol::Tcp, 8080)).unwrap();
        type Edit = fn(&mut ActualHealthCheck);
        let cases: [(&str, &TargetGroupSettings, Edit, Vec<&str>); 13] = [
            ("tcp in sync", &tcp, |_| {}, vec![]),
            ("http in sync", &http, |_| {}, vec![]),
            (
                "protocol",
                &tcp,
                |a| a.protocol = Some("HTTP".into()),
                vec!["protocol"],
            ),
            (
                "port",
                &tcp,
                |a| a.port = Some("10254".into()),
                vec!["port"],
            ),
            (
                "interval",
                &tcp,
                |a| a.interval_seconds = Some(30),
                vec!["interval"],
            ),
            (
                "timeout",
                &tcp,
                |a| a.timeout_seconds = Some(5),
                vec!["timeout"],
            ),
            (
                "thresholds",
                &tcp,
                |a| {
                    a.healthy_threshold = Some(5);
                    a.unhealthy_threshold = Some(2);
                },
                vec!["healthy_threshold", "unhealthy_threshold"],
            ),
            (
                "what AWS leaves out differs",
                &tcp,
                |a| a.interval_seconds = None,
                vec!["interval"],
            ),
            (
                "http path",
                &http,
                |a| a.path = Some("/".into()),
                vec!["path"],
            ),
            (
                "http success codes",
                &http,
                |a| a.success_codes = Some("200-399".into()),
                vec!["success_codes"],
            ),
            (
                "http matcher missing",
                &http,
                |a| a.success_codes = None,
                vec!["success_codes"],
            ),
            (
                "tcp ignores path and matcher",
                &tcp,
                |a| {
                    a.path = Some("/old".into());
                    a.success_codes = Some("200".into());
                },
                vec![],
            ),
            (
                "tcp to http",
                &http,
                |a| {
                    // As the default TCP check left it.
                    a.protocol = Some("TCP".into());
                    a.port = Some("traffic-port".into());
                    a.path = None;
                    a.success_codes = None;
                },
                vec!["protocol", "port", "path", "success_codes"],
            ),
        ];
        for (name, desired, edit, want) in cases {
            let mut actual = actual_of(desired);
            edit(&mut actual.health_check);
            assert_eq!(
                plan(desired, Some(&actual)),
                TargetGroupAction::Update {
                    arn: actual.arn.clone(),
                    drifted: want,
                },
                "{name}"
            );
        }
        assert_eq!(plan(&tcp, None), TargetGroupAction::Create);
    }

    #[test]
    fn protocol_and_port_changes_replace_the_target_group() {
        let s = spec(HealthCheck::default());
        let old = desired(&s, &listener(80, Protocol::Tcp, 8080)).unwrap();
        let cases = [
            ("same settings", listener(80, Protocol::Tcp, 8080), true),
            ("listener port", listener(81, Protocol::Tcp, 8080), false),
            ("protocol", listener(80, Protocol::Udp, 8080), false),
            ("target port", listener(80, Protocol::Tcp, 9090), false),
        ];
        for (name, l, reused) in cases {
            let new = desired(&s, &l).unwrap();
            assert_eq!(is_named(&actual_of(&old), &new.name), reused, "{name}");
        }
        // A health check change never changes the name.
        let other_check = desired(&spec(http_check()), &listener(80, Protocol::Tcp, 8080)).unwrap();
        assert!(is_named(&actual_of(&old), &other_check.name));
    }

    #[test]
    fn stale_target_groups_are_those_no_listener_uses() {
        let http = listener(80, Protocol::Tcp, 8080);
        let dns = Listener {
            name: "dns".into(),
            ..listener(53, Protocol::Udp, 53)
        };
        let ids = |pairs: &[(&str, &str)]| -> ResourceIds {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let (tg_http, tg_dns) = (target_group_id_key(&http), target_group_id_key(&dns));
        let cases = [
            ("nothing known", ids(&[]), ids(&[(&tg_http, "a")]), vec![]),
            (
                "in sync",
                ids(&[(&tg_http, "a"), (LOAD_BALANCER_ID, "lb")]),
                ids(&[(&tg_http, "a"), (LOAD_BALANCER_ID, "lb")]),
                vec![],
            ),
            (
                "replaced (port change)",
                ids(&[(&tg_http, "a")]),
                ids(&[(&tg_http, "b")]),
                vec!["a"],
            ),
            (
                "listener removed",
                ids(&[(&tg_http, "a"), (&tg_dns, "d")]),
                ids(&[(&tg_http, "a")]),
                vec!["d"],
            ),
            (
                "other IDs are not target groups",
                ids(&[(SECURITY_GROUP_ID, "sg-old"), (LOAD_BALANCER_ID, "lb-old")]),
                ids(&[]),
                vec![],
            ),
        ];
        for (name, known, current, want) in cases {
            let want: BTreeSet<String> = want.into_iter().map(str::to_string).collect();
            assert_eq!(stale(&known, &current), want, "{name}");
        }
    }
}
