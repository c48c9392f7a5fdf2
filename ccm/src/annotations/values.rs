//! Parsers for single annotation values. Each returns the typed value or a
//! reason that completes `<key>: "<value>": <reason>`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use cnlb_provider_core::{HealthCheckPort, HealthCheckProtocol, IpAddressType, Scheme};

use super::RESERVED_TAG_PREFIXES;

pub(super) type Reason = String;

/// An inclusive integer range, the unit of most numeric annotations.
#[derive(Debug, Clone, Copy)]
pub(super) struct IntRange {
    pub min: u32,
    pub max: u32,
}

impl IntRange {
    pub(super) const fn new(min: u32, max: u32) -> Self {
        Self { min, max }
    }

    /// Plain decimal digits within the range (no sign, no unit, no spaces).
    pub(super) fn parse(self, s: &str) -> Result<u32, Reason> {
        // `u32::from_str` accepts a leading '+'; LBC's integers do not.
        s.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| s.parse::<u32>().ok())
            .flatten()
            .filter(|n| (self.min..=self.max).contains(n))
            .ok_or_else(|| format!("must be an integer from {} to {}", self.min, self.max))
    }
}

pub(super) const HC_INTERVAL: IntRange = IntRange::new(5, 300);
pub(super) const HC_TIMEOUT: IntRange = IntRange::new(2, 120);
pub(super) const HC_THRESHOLD: IntRange = IntRange::new(2, 10);
const PORT: IntRange = IntRange::new(1, 65535);
const DEREGISTRATION_DELAY: IntRange = IntRange::new(0, 3600);
/// AWS limits on health check paths and tags.
const HC_PATH_MAX_LEN: usize = 1024;
const TAG_KEY_MAX_LEN: usize = 128;
const TAG_VALUE_MAX_LEN: usize = 256;

/// The value whose name is `s`, or "must be one of ...".
fn one_of<T: Copy>(s: &str, choices: &[(&str, T)]) -> Result<T, Reason> {
    choices
        .iter()
        .find(|(name, _)| *name == s)
        .map(|(_, value)| *value)
        .ok_or_else(|| {
            let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
            format!("must be one of {}", names.join(", "))
        })
}

/// Go's `strconv.ParseBool` spellings: LBC parses booleans with it, so
/// Services written for LBC keep their meaning.
pub(super) fn boolean(s: &str) -> Result<bool, Reason> {
    match s {
        "true" | "True" | "TRUE" | "t" | "T" | "1" => Ok(true),
        "false" | "False" | "FALSE" | "f" | "F" | "0" => Ok(false),
        _ => Err("must be true or false".to_owned()),
    }
}

/// Exact spellings, like LBC: a value LBC rejects is rejected here too.
pub(super) fn scheme(s: &str) -> Result<Scheme, Reason> {
    one_of(
        s,
        &[
            ("internal", Scheme::Internal),
            ("internet-facing", Scheme::InternetFacing),
        ],
    )
}

/// GKE's `networking.gke.io/load-balancer-type` values.
pub(super) fn gke_load_balancer_type(s: &str) -> Result<Scheme, Reason> {
    one_of(
        s,
        &[
            ("Internal", Scheme::Internal),
            ("External", Scheme::InternetFacing),
        ],
    )
}

/// GKE's `cloud.google.com/neg` value: `{"exposed_ports": {"<port>":
/// {"name": "<neg>"}}}` (names optional), as Service port numbers to NEG
/// names. `"ingress": true` asks for Ingress NEGs, which cnlb does not
/// build; unknown keys are errors, as GKE rejects them.
pub(super) fn gke_neg(s: &str) -> Result<BTreeMap<u16, Option<String>>, Reason> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Neg {
        #[serde(default)]
        ingress: bool,
        #[serde(default)]
        exposed_ports: BTreeMap<String, ExposedPort>,
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ExposedPort {
        name: Option<String>,
    }
    let neg: Neg = serde_json::from_str(s).map_err(|e| {
        format!(r#"must be JSON like {{"exposed_ports":{{"80":{{"name":"my-neg"}}}}}}: {e}"#)
    })?;
    if neg.ingress {
        return Err("\"ingress\": true asks for Ingress NEGs, which cnlb does not build; every Service port gets a NEG anyway".to_owned());
    }
    neg.exposed_ports
        .into_iter()
        .map(|(port, exposed)| {
            let number = PORT
                .parse(&port)
                .map_err(|_| format!("exposed_ports key {port:?} is not a port number"))?;
            Ok((
                u16::try_from(number).map_err(|e| e.to_string())?,
                exposed.name,
            ))
        })
        .collect()
}

pub(super) fn ip_address_type(s: &str) -> Result<IpAddressType, Reason> {
    one_of(
        s,
        &[
            ("ipv4", IpAddressType::Ipv4),
            ("dualstack", IpAddressType::DualStack),
        ],
    )
}

/// `aws-load-balancer-type`: only the values that mean "NLB with IP targets".
pub(super) fn load_balancer_type(s: &str) -> Result<(), Reason> {
    match s {
        "external" | "nlb-ip" => Ok(()),
        "nlb" => Err(
            "\"nlb\" means instance targets (the in-tree cloud provider); cnlb targets Pod IPs \
             only: use external with nlb-target-type ip"
                .to_owned(),
        ),
        _ => Err("must be one of external, nlb-ip".to_owned()),
    }
}

pub(super) fn nlb_target_type(s: &str) -> Result<(), Reason> {
    match s {
        "ip" => Ok(()),
        "instance" => Err("cnlb targets Pod IPs only: use ip".to_owned()),
        _ => Err("must be ip".to_owned()),
    }
}

/// `aws-load-balancer-proxy-protocol`: LBC knows only `*` (all targets).
pub(super) fn proxy_protocol(s: &str) -> Result<(), Reason> {
    match s {
        "*" => Ok(()),
        _ => Err("must be \"*\" (proxy protocol v2 to every target)".to_owned()),
    }
}

/// Case-insensitive: LBC upper-cases the value before use.
pub(super) fn health_check_protocol(s: &str) -> Result<HealthCheckProtocol, Reason> {
    one_of(
        &s.to_ascii_lowercase(),
        &[
            ("tcp", HealthCheckProtocol::Tcp),
            ("http", HealthCheckProtocol::Http),
            ("https", HealthCheckProtocol::Https),
        ],
    )
}

pub(super) fn health_check_port(s: &str) -> Result<HealthCheckPort, Reason> {
    if s == "traffic-port" {
        return Ok(HealthCheckPort::TrafficPort);
    }
    PORT.parse(s)
        .ok()
        .and_then(|n| u16::try_from(n).ok())
        .map(HealthCheckPort::Port)
        .ok_or_else(|| "must be traffic-port or an integer from 1 to 65535".to_owned())
}

pub(super) fn health_check_path(s: &str) -> Result<String, Reason> {
    if !s.starts_with('/') {
        return Err("must start with '/'".to_owned());
    }
    if s.len() > HC_PATH_MAX_LEN || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "must be a URL path of at most {HC_PATH_MAX_LEN} characters without spaces"
        ));
    }
    Ok(s.to_owned())
}

/// `200`, `200-399`, `200,204,300-310`: NLB accepts codes from 200 to 599.
/// Returned without spaces, as the cloud API wants it.
pub(super) fn success_codes(s: &str) -> Result<String, Reason> {
    let code = |c: &str| {
        c.len() == 3
            && c.bytes().all(|b| b.is_ascii_digit())
            && c.parse::<u16>().is_ok_and(|n| (200..=599).contains(&n))
    };
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    let valid = parts.iter().all(|part| match part.split_once('-') {
        // Equal-length digit strings compare like the numbers.
        Some((lo, hi)) => code(lo) && code(hi) && lo <= hi,
        None => code(part),
    });
    if valid {
        Ok(parts.join(","))
    } else {
        Err("must be HTTP codes from 200 to 599 or ranges of them, like 200-399 or 200,204".into())
    }
}

/// Comma-separated items, trimmed, empty ones skipped (LBC's `stringList`).
pub(super) fn list(s: &str) -> Vec<&str> {
    s.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .collect()
}

/// `aws-load-balancer-subnets`: subnet IDs or Name tags; the provider
/// resolves names. Set but empty would silently mean "discover", so it is an
/// error.
pub(super) fn subnets(s: &str) -> Result<Vec<String>, Reason> {
    let subnets: Vec<String> = list(s).into_iter().map(str::to_owned).collect();
    if subnets.is_empty() {
        return Err("must name at least one subnet (ID or Name tag)".to_owned());
    }
    Ok(subnets)
}

/// `addr/prefix` with a prefix length that fits the address family.
pub(super) fn is_cidr(s: &str) -> bool {
    let Some((addr, prefix)) = s.split_once('/') else {
        return false;
    };
    if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    match (addr.parse::<IpAddr>(), prefix.parse::<u8>()) {
        (Ok(IpAddr::V4(_)), Ok(prefix)) => prefix <= 32,
        (Ok(IpAddr::V6(_)), Ok(prefix)) => prefix <= 128,
        _ => false,
    }
}

pub(super) const CIDR_EXAMPLE: &str = "like 10.0.0.0/8 or 2001:db8::/32";

/// A CIDR list; the reason names every bad item.
pub(super) fn cidrs(s: &str) -> Result<Vec<String>, Reason> {
    let items = list(s);
    let bad: Vec<String> = items
        .iter()
        .filter(|item| !is_cidr(item))
        .map(|item| format!("{item:?}"))
        .collect();
    if !bad.is_empty() {
        return Err(format!("not CIDRs ({CIDR_EXAMPLE}): {}", bad.join(", ")));
    }
    Ok(items.into_iter().map(str::to_owned).collect())
}

/// LBC's `stringMap`: `k=v,k2=v2`. Unlike LBC, a key given twice is an
/// error instead of "last one wins".
fn key_values(s: &str) -> Result<BTreeMap<String, String>, Reason> {
    let mut map = BTreeMap::new();
    for pair in list(s) {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(format!("{pair:?} is not key=value"));
        };
        let (key, value) = (key.trim(), value.trim());
        if key.is_empty() {
            return Err(format!("{pair:?} has an empty key"));
        }
        if map.insert(key.to_owned(), value.to_owned()).is_some() {
            return Err(format!("key {key:?} is given twice"));
        }
    }
    Ok(map)
}

/// What values an attribute we know takes.
#[derive(Debug, Clone, Copy)]
pub(super) enum AttributeValue {
    Bool,
    Int(IntRange),
    OneOf(&'static [&'static str]),
}

/// NLB attributes whose values are checked here, so that a typo fails with
/// the annotation's name instead of a cloud error later. Other keys pass
/// through unchecked: AWS adds attributes faster than we can list them.
pub(super) const KNOWN_LB_ATTRIBUTES: &[(&str, AttributeValue)] = &[
    ("deletion_protection.enabled", AttributeValue::Bool),
    ("load_balancing.cross_zone.enabled", AttributeValue::Bool),
    ("access_logs.s3.enabled", AttributeValue::Bool),
    ("ipv6.deny_all_igw_traffic", AttributeValue::Bool),
    ("zonal_shift.config.enabled", AttributeValue::Bool),
    (
        "dns_record.client_routing_policy",
        AttributeValue::OneOf(&[
            "any_availability_zone",
            "availability_zone_affinity",
            "partial_availability_zone_affinity",
        ]),
    ),
];

pub(super) const PROXY_PROTOCOL_V2: &str = "proxy_protocol_v2.enabled";

/// Target group attributes whose values are checked here (see [`KNOWN_LB_ATTRIBUTES`]).
pub(super) const KNOWN_TG_ATTRIBUTES: &[(&str, AttributeValue)] = &[
    (
        "deregistration_delay.timeout_seconds",
        AttributeValue::Int(DEREGISTRATION_DELAY),
    ),
    (
        "deregistration_delay.connection_termination.enabled",
        AttributeValue::Bool,
    ),
    ("preserve_client_ip.enabled", AttributeValue::Bool),
    (PROXY_PROTOCOL_V2, AttributeValue::Bool),
    ("stickiness.enabled", AttributeValue::Bool),
    ("stickiness.type", AttributeValue::OneOf(&["source_ip"])),
    (
        "load_balancing.cross_zone.enabled",
        AttributeValue::OneOf(&["true", "false", "use_load_balancer_configuration"]),
    ),
    (
        "target_health_state.unhealthy.connection_termination.enabled",
        AttributeValue::Bool,
    ),
];

/// The canonical spelling of `value` (`true`/`false`, plain decimal), as
/// the cloud API wants it.
fn attribute_value(kind: AttributeValue, value: &str) -> Result<String, Reason> {
    match kind {
        AttributeValue::Bool => boolean(value).map(|b| b.to_string()),
        AttributeValue::Int(range) => range.parse(value).map(|n| n.to_string()),
        AttributeValue::OneOf(names) => names
            .contains(&value)
            .then(|| value.to_owned())
            .ok_or_else(|| format!("must be one of {}", names.join(", "))),
    }
}

/// A `k=v` attribute list; the known keys' values are checked and
/// canonicalised. The reason lists every bad attribute.
pub(super) fn attributes(
    s: &str,
    known: &[(&str, AttributeValue)],
) -> Result<BTreeMap<String, String>, Reason> {
    let mut map = key_values(s)?;
    let mut problems = Vec::new();
    for (key, value) in &mut map {
        let Some((_, kind)) = known.iter().find(|(name, _)| name == key) else {
            continue;
        };
        match attribute_value(*kind, value) {
            Ok(canonical) => *value = canonical,
            Err(reason) => problems.push(format!("{key}={value:?} {reason}")),
        }
    }
    if problems.is_empty() {
        Ok(map)
    } else {
        Err(problems.join("; "))
    }
}

/// User tags: a key may not take over an ownership tag (ours or LBC's, so a
/// Service cannot make its load balancer look like another controller's) nor
/// use the `aws:` prefix AWS reserves; AWS length limits apply.
pub(super) fn tags(s: &str) -> Result<BTreeMap<String, String>, Reason> {
    let map = key_values(s)?;
    let mut problems = Vec::new();
    for (key, value) in &map {
        if let Some(prefix) = RESERVED_TAG_PREFIXES.iter().find(|p| key.starts_with(*p)) {
            problems.push(format!(
                "tag {key:?}: the prefix {prefix} is reserved for ownership tags"
            ));
        } else if key.to_ascii_lowercase().starts_with("aws:") {
            problems.push(format!("tag {key:?}: the prefix aws: is reserved by AWS"));
        } else if key.chars().count() > TAG_KEY_MAX_LEN {
            problems.push(format!(
                "tag {key:?}: keys are at most {TAG_KEY_MAX_LEN} characters"
            ));
        } else if value.chars().count() > TAG_VALUE_MAX_LEN {
            problems.push(format!(
                "tag {key:?}: values are at most {TAG_VALUE_MAX_LEN} characters"
            ));
        }
    }
    if problems.is_empty() {
        Ok(map)
    } else {
        Err(problems.join("; "))
    }
}
