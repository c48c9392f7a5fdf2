//! The desired shape of one load balancer, independent of any cloud.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::key::{LoadBalancerKey, OWNER_TAG_PREFIX, owner_tags};
use crate::error::{ProviderError, Result};

/// Whether the load balancer is reachable from the internet.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Scheme {
    /// Only reachable from inside the network (the aws-load-balancer-controller default).
    #[default]
    Internal,
    InternetFacing,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Internal => "internal",
            Self::InternetFacing => "internet-facing",
        }
    }
}

/// IP families of the load balancer's front end.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum IpAddressType {
    #[default]
    Ipv4,
    DualStack,
}

impl IpAddressType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ipv4 => "ipv4",
            Self::DualStack => "dualstack",
        }
    }
}

/// Listener protocol (serialised with the ELBv2 spelling).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Protocol {
    Tcp,
    Udp,
    /// TCP and UDP on the same port.
    TcpUdp,
    /// TLS terminated at the load balancer, TCP to the targets.
    Tls,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::TcpUdp => "TCP_UDP",
            Self::Tls => "TLS",
        }
    }

    /// True if the listener accepts TCP connections.
    pub fn uses_tcp(self) -> bool {
        matches!(self, Self::Tcp | Self::TcpUdp | Self::Tls)
    }

    /// True if the listener accepts UDP datagrams.
    pub fn uses_udp(self) -> bool {
        matches!(self, Self::Udp | Self::TcpUdp)
    }
}

/// One front-end port of the load balancer (one Service port).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Listener {
    /// The Service port name; may be empty for a single-port Service.
    pub name: String,
    pub protocol: Protocol,
    /// Front-end port.
    pub port: u16,
    /// Default port of the target group / backend. Each [`Target`](super::Target)
    /// carries its own port (named target ports can resolve differently per
    /// Pod), so this is only a fallback.
    pub target_port: u16,
}

/// Protocol of the health check probe.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum HealthCheckProtocol {
    #[default]
    Tcp,
    Http,
    Https,
}

/// Port the health check probes. Serialised as `"traffic-port"` or a number.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(into = "HealthCheckPortRepr", try_from = "HealthCheckPortRepr")]
pub enum HealthCheckPort {
    /// The port each target receives traffic on.
    #[default]
    TrafficPort,
    Port(u16),
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum HealthCheckPortRepr {
    Port(u16),
    Named(String),
}

const TRAFFIC_PORT: &str = "traffic-port";

impl From<HealthCheckPort> for HealthCheckPortRepr {
    fn from(port: HealthCheckPort) -> Self {
        match port {
            HealthCheckPort::TrafficPort => Self::Named(TRAFFIC_PORT.to_owned()),
            HealthCheckPort::Port(port) => Self::Port(port),
        }
    }
}

impl TryFrom<HealthCheckPortRepr> for HealthCheckPort {
    type Error = String;

    fn try_from(repr: HealthCheckPortRepr) -> std::result::Result<Self, String> {
        match repr {
            HealthCheckPortRepr::Port(port) => Ok(Self::Port(port)),
            HealthCheckPortRepr::Named(name) if name == TRAFFIC_PORT => Ok(Self::TrafficPort),
            HealthCheckPortRepr::Named(name) => Err(format!(
                "health check port must be a number or {TRAFFIC_PORT:?}, got {name:?}"
            )),
        }
    }
}

/// Target health check. `Default` is the aws-load-balancer-controller NLB
/// default: TCP on the traffic port, every 10 s, 10 s timeout, 3 healthy /
/// 3 unhealthy, success codes 200-399 (used only by HTTP(S) checks).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HealthCheck {
    pub protocol: HealthCheckProtocol,
    pub port: HealthCheckPort,
    /// HTTP(S) request path; ignored for TCP checks.
    pub path: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    /// Comma-separated codes or ranges, e.g. `"200-399"` or `"200,204"`.
    pub success_codes: String,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            protocol: HealthCheckProtocol::Tcp,
            port: HealthCheckPort::TrafficPort,
            path: None,
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(10),
            healthy_threshold: 3,
            unhealthy_threshold: 3,
            success_codes: "200-399".to_owned(),
        }
    }
}

/// Everything a provider needs to build one load balancer.
///
/// Maps and the sorted vectors (see [`normalize`](Self::normalize)) make two
/// specs that mean the same thing compare equal, so the controller can skip
/// cloud calls when nothing changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadBalancerSpec {
    pub key: LoadBalancerKey,
    pub scheme: Scheme,
    pub ip_address_type: IpAddressType,
    pub listeners: Vec<Listener>,
    pub health_check: HealthCheck,
    /// Client CIDRs allowed to connect (`loadBalancerSourceRanges`); empty
    /// means everyone.
    pub source_ranges: Vec<String>,
    /// Load balancer attributes (provider-specific keys).
    pub attributes: BTreeMap<String, String>,
    /// Target group / backend attributes (provider-specific keys).
    pub target_group_attributes: BTreeMap<String, String>,
    /// Additional user tags; ownership tags are added by [`resource_tags`](Self::resource_tags).
    pub tags: BTreeMap<String, String>,
    /// Subnets to place the load balancer in; `None` lets the provider discover them.
    pub subnets: Option<Vec<String>>,
    /// User-chosen names of a listener's target group / network endpoint
    /// groups, by listener name (GKE's `cloud.google.com/neg`
    /// `exposed_ports.<port>.name`). Providers that cannot name them reject
    /// a non-empty map. Left out of the serialised form when empty, so that
    /// specs hashed before it existed hash the same.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub target_group_names: BTreeMap<String, String>,
    /// The provider's own settings that shape every load balancer
    /// ([`LoadBalancerProvider::settings`](crate::LoadBalancerProvider::settings)),
    /// set by the controller: persisted with the spec, so a change of them
    /// brings every load balancer to the new settings once. Left out when
    /// empty, so specs persisted before it existed compare the same.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub provider_settings: String,
}

impl LoadBalancerSpec {
    /// A spec with defaults everywhere and no listeners.
    pub fn new(key: LoadBalancerKey) -> Self {
        Self {
            key,
            ..Self::default()
        }
    }

    /// Sorts listeners (by port, protocol, name) and sorts and deduplicates
    /// source ranges and subnets, so that equal specs compare equal.
    pub fn normalize(&mut self) {
        self.listeners
            .sort_by(|a, b| (a.port, a.protocol, &a.name).cmp(&(b.port, b.protocol, &b.name)));
        self.source_ranges.sort();
        self.source_ranges.dedup();
        if let Some(subnets) = &mut self.subnets {
            subnets.sort();
            subnets.dedup();
        }
    }

    /// [`normalize`](Self::normalize) by value.
    pub fn normalized(mut self) -> Self {
        self.normalize();
        self
    }

    /// The listener named `name`, if any.
    pub fn listener(&self, name: &str) -> Option<&Listener> {
        self.listeners.iter().find(|l| l.name == name)
    }

    /// User tags plus ownership tags; ownership tags win, so a user tag can
    /// never make a resource look like someone else's.
    pub fn resource_tags(&self) -> BTreeMap<String, String> {
        let mut tags = self.tags.clone();
        tags.extend(owner_tags(&self.key));
        tags
    }

    /// For providers that build TCP only: the first other listener as a
    /// user error, "UDP is not supported {why}".
    pub fn require_tcp(&self, why: &str) -> Result<()> {
        match self
            .listeners
            .iter()
            .enumerate()
            .find(|(_, l)| l.protocol != Protocol::Tcp)
        {
            Some((i, l)) => Err(ProviderError::invalid(
                format!("listeners[{i}].protocol"),
                format!("{} is not supported {why}", l.protocol.as_str()),
            )),
            None => Ok(()),
        }
    }

    /// Checks what every provider relies on. Cloud-specific limits (name
    /// lengths, health check ranges, supported protocols) are the provider's
    /// to check in `ensure_load_balancer`; both report
    /// [`ProviderError::InvalidSpec`].
    pub fn validate(&self) -> Result<()> {
        for (field, value) in [
            ("key.cluster", &self.key.cluster),
            ("key.namespace", &self.key.namespace),
            ("key.name", &self.key.name),
            ("key.uid", &self.key.uid),
        ] {
            if value.is_empty() {
                return Err(ProviderError::invalid(field, "must not be empty"));
            }
        }
        self.validate_listeners()?;
        validate_health_check(&self.health_check)?;
        for (i, range) in self.source_ranges.iter().enumerate() {
            if !is_cidr(range) {
                return Err(ProviderError::invalid(
                    format!("source_ranges[{i}]"),
                    format!("{range:?} is not a CIDR (like 10.0.0.0/8 or 2001:db8::/32)"),
                ));
            }
        }
        for key in self.tags.keys() {
            if key.is_empty() {
                return Err(ProviderError::invalid("tags", "tag keys must not be empty"));
            }
            if key.starts_with(OWNER_TAG_PREFIX) {
                return Err(ProviderError::invalid(
                    format!("tags[{key}]"),
                    format!("the {OWNER_TAG_PREFIX} prefix is reserved for ownership tags"),
                ));
            }
        }
        for (listener, name) in &self.target_group_names {
            if self.listener(listener).is_none() {
                return Err(ProviderError::invalid(
                    format!("target_group_names[{listener}]"),
                    "names no listener",
                ));
            }
            if name.is_empty() {
                return Err(ProviderError::invalid(
                    format!("target_group_names[{listener}]"),
                    "must not be empty",
                ));
            }
        }
        if let Some(subnets) = &self.subnets {
            if subnets.is_empty() {
                return Err(ProviderError::invalid(
                    "subnets",
                    "must name at least one subnet when set",
                ));
            }
            if subnets.iter().any(String::is_empty) {
                return Err(ProviderError::invalid(
                    "subnets",
                    "subnet IDs must not be empty",
                ));
            }
        }
        Ok(())
    }

    fn validate_listeners(&self) -> Result<()> {
        if self.listeners.is_empty() {
            return Err(ProviderError::invalid(
                "listeners",
                "at least one listener is required",
            ));
        }
        for (i, listener) in self.listeners.iter().enumerate() {
            let field = |what: &str| format!("listeners[{i}].{what}");
            if listener.port == 0 {
                return Err(ProviderError::invalid(field("port"), "must be 1-65535"));
            }
            if listener.target_port == 0 {
                return Err(ProviderError::invalid(
                    field("target_port"),
                    "must be 1-65535",
                ));
            }
            for earlier in &self.listeners[..i] {
                if earlier.name == listener.name {
                    return Err(ProviderError::invalid(
                        field("name"),
                        format!("duplicate listener name {:?}", listener.name),
                    ));
                }
                let same_transport = (earlier.protocol.uses_tcp() && listener.protocol.uses_tcp())
                    || (earlier.protocol.uses_udp() && listener.protocol.uses_udp());
                if earlier.port == listener.port && same_transport {
                    return Err(ProviderError::invalid(
                        field("port"),
                        format!(
                            "port {} is used twice ({} and {})",
                            listener.port,
                            earlier.protocol.as_str(),
                            listener.protocol.as_str()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

fn validate_health_check(hc: &HealthCheck) -> Result<()> {
    if hc.interval.is_zero() {
        return Err(ProviderError::invalid(
            "health_check.interval",
            "must be positive",
        ));
    }
    if hc.timeout.is_zero() {
        return Err(ProviderError::invalid(
            "health_check.timeout",
            "must be positive",
        ));
    }
    // A probe that outlives its interval overlaps the next one (GCE rejects it).
    if hc.timeout > hc.interval {
        return Err(ProviderError::invalid(
            "health_check.timeout",
            format!(
                "{:?} is longer than the interval {:?}",
                hc.timeout, hc.interval
            ),
        ));
    }
    if hc.healthy_threshold == 0 {
        return Err(ProviderError::invalid(
            "health_check.healthy_threshold",
            "must be at least 1",
        ));
    }
    if hc.unhealthy_threshold == 0 {
        return Err(ProviderError::invalid(
            "health_check.unhealthy_threshold",
            "must be at least 1",
        ));
    }
    if hc.port == HealthCheckPort::Port(0) {
        return Err(ProviderError::invalid(
            "health_check.port",
            "must be 1-65535 or traffic-port",
        ));
    }
    if let Some(path) = &hc.path
        && !path.starts_with('/')
    {
        return Err(ProviderError::invalid(
            "health_check.path",
            format!("{path:?} must start with '/'"),
        ));
    }
    if !is_success_codes(&hc.success_codes) {
        return Err(ProviderError::invalid(
            "health_check.success_codes",
            format!(
                "{:?} is not a list of HTTP codes or ranges (like 200-399 or 200,204)",
                hc.success_codes
            ),
        ));
    }
    Ok(())
}

/// `addr/prefix` with a prefix length that fits the address family.
fn is_cidr(s: &str) -> bool {
    let Some((addr, prefix)) = s.split_once('/') else {
        return false;
    };
    // u8::parse accepts a leading '+'; a CIDR does not.
    if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let (Ok(addr), Ok(prefix)) = (addr.parse::<IpAddr>(), prefix.parse::<u8>()) else {
        return false;
    };
    match addr {
        IpAddr::V4(_) => prefix <= 32,
        IpAddr::V6(_) => prefix <= 128,
    }
}

/// `200`, `200-399`, `200,204,300-310`: codes within 100..=599.
fn is_success_codes(s: &str) -> bool {
    let code = |c: &str| {
        c.len() == 3
            && c.bytes().all(|b| b.is_ascii_digit())
            && c.parse::<u16>().is_ok_and(|n| (100..=599).contains(&n))
    };
    !s.is_empty()
        && s.split(',').all(|part| match part.split_once('-') {
            Some((lo, hi)) => code(lo) && code(hi) && lo <= hi,
            None => code(part),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> LoadBalancerSpec {
        let mut spec = LoadBalancerSpec::new(LoadBalancerKey::new("c1", "default", "web", "uid-1"));
        spec.scheme = Scheme::InternetFacing;
        spec.ip_address_type = IpAddressType::DualStack;
        spec.listeners = vec![
            Listener {
                name: "https".into(),
                protocol: Protocol::Tls,
                port: 443,
                target_port: 8443,
            },
            Listener {
                name: "dns".into(),
                protocol: Protocol::TcpUdp,
                port: 53,
                target_port: 5353,
            },
        ];
        spec.health_check = HealthCheck {
            protocol: HealthCheckProtocol::Http,
            port: HealthCheckPort::Port(8080),
            path: Some("/healthz".into()),
            ..HealthCheck::default()
        };
        spec.source_ranges = vec!["10.0.0.0/8".into(), "2001:db8::/32".into()];
        spec.attributes
            .insert("load_balancing.cross_zone.enabled".into(), "true".into());
        spec.target_group_attributes
            .insert("deregistration_delay.timeout_seconds".into(), "30".into());
        spec.tags.insert("team".into(), "web".into());
        spec.subnets = Some(vec!["subnet-b".into(), "subnet-a".into()]);
        spec
    }

    #[test]
    fn health_check_default_is_lbc_nlb_default() {
        let hc = HealthCheck::default();
        assert_eq!(hc.protocol, HealthCheckProtocol::Tcp);
        assert_eq!(hc.port, HealthCheckPort::TrafficPort);
        assert_eq!(hc.path, None);
        assert_eq!(hc.interval, Duration::from_secs(10));
        assert_eq!(hc.timeout, Duration::from_secs(10));
        assert_eq!((hc.healthy_threshold, hc.unhealthy_threshold), (3, 3));
        assert_eq!(hc.success_codes, "200-399");
        assert_eq!(LoadBalancerSpec::default().scheme, Scheme::Internal);
    }

    #[test]
    fn serde_round_trip() {
        let spec = spec().normalized();
        let json = serde_json::to_string(&spec).unwrap();
        let back: LoadBalancerSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, spec);

        let value = serde_json::to_value(&spec).unwrap();
        assert_eq!(value["scheme"], "internet-facing");
        assert_eq!(value["ip_address_type"], "dualstack");
        assert_eq!(value["listeners"][0]["protocol"], "TCP_UDP");
        assert_eq!(value["health_check"]["protocol"], "HTTP");
        assert_eq!(value["health_check"]["port"], 8080);

        let default_json = serde_json::to_value(HealthCheck::default()).unwrap();
        assert_eq!(default_json["port"], "traffic-port");
        let back: HealthCheck = serde_json::from_value(default_json).unwrap();
        assert_eq!(back, HealthCheck::default());
        let bad = serde_json::json!({"port": "nine"});
        assert!(serde_json::from_value::<HealthCheckPort>(bad["port"].clone()).is_err());
    }

    #[test]
    fn normalize_makes_equal_specs_equal() {
        let a = spec();
        let mut b = spec();
        b.listeners.reverse();
        b.source_ranges.reverse();
        b.source_ranges.push("10.0.0.0/8".into());
        b.subnets = Some(vec!["subnet-a".into(), "subnet-b".into()]);
        assert_ne!(a, b);
        let (a, b) = (a.normalized(), b.normalized());
        assert_eq!(a, b);
        assert_eq!(a.listeners[0].port, 53);
        assert_eq!(a.listener("https").map(|l| l.target_port), Some(8443));
    }

    #[test]
    fn resource_tags_cannot_be_overridden() {
        let mut spec = spec();
        spec.tags
            .insert(super::super::key::TAG_CLUSTER.into(), "evil".into());
        let tags = spec.resource_tags();
        assert_eq!(tags[super::super::key::TAG_CLUSTER], "c1");
        assert_eq!(tags["team"], "web");
    }

    fn invalid_field(spec: &LoadBalancerSpec) -> String {
        match spec.validate() {
            Err(ProviderError::InvalidSpec { field, .. }) => field,
            other => panic!("expected InvalidSpec, got {other:?}"),
        }
    }

    #[test]
    fn validate() {
        assert_eq!(spec().validate(), Ok(()));

        let mut s = spec();
        s.key.uid.clear();
        assert_eq!(invalid_field(&s), "key.uid");

        let mut s = spec();
        s.listeners.clear();
        assert_eq!(invalid_field(&s), "listeners");

        let mut s = spec();
        s.listeners[1].target_port = 0;
        assert_eq!(invalid_field(&s), "listeners[1].target_port");

        // TCP and UDP on one port are fine; TCP twice (TLS counts) is not.
        let mut s = spec();
        s.listeners.push(Listener {
            name: "dns-tcp".into(),
            protocol: Protocol::Tcp,
            port: 53,
            target_port: 53,
        });
        assert_eq!(invalid_field(&s), "listeners[2].port");
        let mut s = spec();
        s.listeners[1].protocol = Protocol::Udp;
        s.listeners.push(Listener {
            name: "dns-tcp".into(),
            protocol: Protocol::Tcp,
            port: 53,
            target_port: 53,
        });
        assert_eq!(s.validate(), Ok(()));
        s.listeners[2].name = "dns".into();
        assert_eq!(invalid_field(&s), "listeners[2].name");

        let mut s = spec();
        s.source_ranges.push("10.0.0.0/33".into());
        assert_eq!(invalid_field(&s), "source_ranges[2]");
        for bad in [
            "10.0.0.0",
            "10.0.0/8",
            "10.0.0.0/+8",
            "::/129",
            "x/1",
            "10.0.0.0/",
        ] {
            assert!(!is_cidr(bad), "{bad}");
        }
        assert!(is_cidr("0.0.0.0/0") && is_cidr("::/0") && is_cidr("192.168.1.1/32"));

        let mut s = spec();
        s.health_check.timeout = Duration::from_secs(11);
        assert_eq!(invalid_field(&s), "health_check.timeout");
        let mut s = spec();
        s.health_check.path = Some("healthz".into());
        assert_eq!(invalid_field(&s), "health_check.path");
        let mut s = spec();
        s.health_check.success_codes = "200-".into();
        assert_eq!(invalid_field(&s), "health_check.success_codes");
        for good in ["200", "200-399", "200,204,300-310"] {
            assert!(is_success_codes(good), "{good}");
        }
        for bad in ["", "20", "399-200", "200,,204", "600", "2xx"] {
            assert!(!is_success_codes(bad), "{bad}");
        }

        let mut s = spec();
        s.tags.insert("cnlb.dev/cluster".into(), "x".into());
        assert_eq!(invalid_field(&s), "tags[cnlb.dev/cluster]");

        let mut s = spec();
        s.subnets = Some(Vec::new());
        assert_eq!(invalid_field(&s), "subnets");
    }
}
