//! Typed parser from a `type: LoadBalancer` Service to the desired
//! [`LoadBalancerSpec`].
//!
//! cnlb reads the aws-load-balancer-controller (LBC) annotation keys where
//! they mean the same thing, so Services written for LBC's NLB IP mode move
//! over unchanged. Unlike LBC, nothing is silently ignored: every bad value,
//! every LBC key cnlb does not support yet and every unknown
//! `aws-load-balancer-*` key is an error, and all of them are reported at once
//! (one [`AnnotationError`] per key). `ccm/ANNOTATIONS.md` is the user-facing
//! table of keys.
//!
//! Pure logic: no kube client calls, no I/O.

mod ports;
mod values;

use std::collections::BTreeMap;
use std::time::Duration;

use cnlb_provider_core::{
    HealthCheck, HealthCheckProtocol, Listener, LoadBalancerKey, LoadBalancerSpec,
    OWNER_TAG_PREFIX, ProviderError, Scheme,
};
use k8s_openapi::api::core::v1::Service;

use values::Reason;

/// Prefix of LBC's Service annotations.
pub const LBC_PREFIX: &str = "service.beta.kubernetes.io/aws-load-balancer-";

/// The full key of LBC's `service.beta.kubernetes.io/aws-load-balancer-<suffix>`.
macro_rules! lbc_key {
    ($suffix:literal) => {
        concat!("service.beta.kubernetes.io/aws-load-balancer-", $suffix)
    };
}

pub const TYPE: &str = lbc_key!("type");
pub const NLB_TARGET_TYPE: &str = lbc_key!("nlb-target-type");
pub const SCHEME: &str = lbc_key!("scheme");
/// Deprecated by LBC in favour of [`SCHEME`].
pub const INTERNAL: &str = lbc_key!("internal");
pub const IP_ADDRESS_TYPE: &str = lbc_key!("ip-address-type");
pub const SUBNETS: &str = lbc_key!("subnets");
pub const HEALTHCHECK_PROTOCOL: &str = lbc_key!("healthcheck-protocol");
pub const HEALTHCHECK_PORT: &str = lbc_key!("healthcheck-port");
pub const HEALTHCHECK_PATH: &str = lbc_key!("healthcheck-path");
pub const HEALTHCHECK_INTERVAL: &str = lbc_key!("healthcheck-interval");
pub const HEALTHCHECK_TIMEOUT: &str = lbc_key!("healthcheck-timeout");
pub const HEALTHCHECK_HEALTHY_THRESHOLD: &str = lbc_key!("healthcheck-healthy-threshold");
pub const HEALTHCHECK_UNHEALTHY_THRESHOLD: &str = lbc_key!("healthcheck-unhealthy-threshold");
pub const HEALTHCHECK_SUCCESS_CODES: &str = lbc_key!("healthcheck-success-codes");
pub const ATTRIBUTES: &str = lbc_key!("attributes");
pub const TARGET_GROUP_ATTRIBUTES: &str = lbc_key!("target-group-attributes");
pub const PROXY_PROTOCOL: &str = lbc_key!("proxy-protocol");
pub const ADDITIONAL_RESOURCE_TAGS: &str = lbc_key!("additional-resource-tags");
/// Not under [`LBC_PREFIX`]: LBC reads the core Kubernetes key.
/// `spec.loadBalancerSourceRanges` wins over it.
pub const SOURCE_RANGES: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";

/// GKE's standalone NEG annotation, `{"exposed_ports":{"80":{"name":"my-neg"}}}`:
/// cnlb gives every Service port a NEG anyway; this one checks the ports
/// and takes the names.
pub const GKE_NEG: &str = "cloud.google.com/neg";
/// GKE's switch between an internal and an external load balancer.
pub const GKE_LOAD_BALANCER_TYPE: &str = "networking.gke.io/load-balancer-type";

/// Every annotation key the parser reads.
pub const SUPPORTED: &[&str] = &[
    GKE_NEG,
    GKE_LOAD_BALANCER_TYPE,
    TYPE,
    NLB_TARGET_TYPE,
    SCHEME,
    INTERNAL,
    IP_ADDRESS_TYPE,
    SUBNETS,
    HEALTHCHECK_PROTOCOL,
    HEALTHCHECK_PORT,
    HEALTHCHECK_PATH,
    HEALTHCHECK_INTERVAL,
    HEALTHCHECK_TIMEOUT,
    HEALTHCHECK_HEALTHY_THRESHOLD,
    HEALTHCHECK_UNHEALTHY_THRESHOLD,
    HEALTHCHECK_SUCCESS_CODES,
    ATTRIBUTES,
    TARGET_GROUP_ATTRIBUTES,
    PROXY_PROTOCOL,
    ADDITIONAL_RESOURCE_TAGS,
    SOURCE_RANGES,
];

/// LBC Service keys cnlb does not support yet, each with a hint (may be
/// empty). A present one is an error rather than ignored: the user asked for
/// something the load balancer would silently lack. A key also matches its
/// `<key>.<suffix>` forms (`listener-attributes.TCP-80`).
pub const UNSUPPORTED: &[(&str, &str)] = &[
    (
        lbc_key!("name"),
        "names derive from the Service identity, see LoadBalancerKey::short_name",
    ),
    (lbc_key!("ssl-cert"), "no TLS listeners yet"),
    (lbc_key!("ssl-ports"), "no TLS listeners yet"),
    (lbc_key!("ssl-negotiation-policy"), "no TLS listeners yet"),
    (lbc_key!("backend-protocol"), ""),
    (lbc_key!("alpn-policy"), "no TLS listeners yet"),
    (lbc_key!("eip-allocations"), ""),
    (lbc_key!("eip-allocations-discovery-tags"), ""),
    (lbc_key!("private-ipv4-addresses"), ""),
    (lbc_key!("ipv6-addresses"), ""),
    (lbc_key!("security-groups"), ""),
    (lbc_key!("manage-backend-security-group-rules"), ""),
    (lbc_key!("inbound-sg-rules-on-private-link-traffic"), ""),
    (lbc_key!("security-group-prefix-lists"), ""),
    (lbc_key!("disable-nlb-sg"), ""),
    (
        lbc_key!("target-node-labels"),
        "it selects nodes for instance targets; cnlb targets Pod IPs",
    ),
    (
        lbc_key!("access-log-enabled"),
        "use aws-load-balancer-attributes access_logs.s3.enabled",
    ),
    (
        lbc_key!("access-log-s3-bucket-name"),
        "use aws-load-balancer-attributes access_logs.s3.bucket",
    ),
    (
        lbc_key!("access-log-s3-bucket-prefix"),
        "use aws-load-balancer-attributes access_logs.s3.prefix",
    ),
    (
        lbc_key!("cross-zone-load-balancing-enabled"),
        "use aws-load-balancer-attributes load_balancing.cross_zone.enabled",
    ),
    (
        lbc_key!("proxy-protocol-per-target-group"),
        "aws-load-balancer-proxy-protocol \"*\" enables it for all",
    ),
    (lbc_key!("listener-attributes"), ""),
    (lbc_key!("multi-cluster-target-group"), ""),
    (lbc_key!("enable-prefix-for-ipv6-source-nat"), ""),
    (lbc_key!("source-nat-ipv6-prefixes"), ""),
    (lbc_key!("minimum-load-balancer-capacity"), ""),
    (lbc_key!("enable-icmp-for-path-mtu-discovery"), ""),
    (
        lbc_key!("enable-tcp-udp-listener"),
        "cnlb always merges TCP and UDP on one port into TCP_UDP",
    ),
    (lbc_key!("quic-enabled-ports"), ""),
];

/// Tag prefixes a user tag may not use: cnlb's ownership tags and LBC's,
/// so a Service can never make its load balancer look like another owner's.
pub const RESERVED_TAG_PREFIXES: &[&str] =
    &[OWNER_TAG_PREFIX, "elbv2.k8s.aws/", "service.k8s.aws/"];

/// One problem with one key: an annotation, or a field path such as
/// `spec.ports[1].protocol`. Displays as `<key>: "<value>": <reason>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {value:?}: {reason}")]
pub struct AnnotationError {
    pub key: String,
    pub value: String,
    pub reason: String,
}

impl AnnotationError {
    pub fn new(
        key: impl Into<String>,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            key: key.into(),
            value: value.into(),
            reason: reason.into(),
        }
    }
}

/// Whether cnlb handles `service`: a `type: LoadBalancer` Service whose
/// `spec.loadBalancerClass` is `class`, or, without a class, when
/// `manage_unclassed` is set, or when `manage_lbc_annotated` is set and the
/// Service carries LBC's NLB IP mode opt-in (`aws-load-balancer-type:
/// external` + `aws-load-balancer-nlb-target-type: ip`, or LBC's deprecated
/// `aws-load-balancer-type: nlb-ip`). Both are off by default, so a cluster
/// that still runs LBC does not get two controllers for one Service.
pub fn opted_in(
    service: &Service,
    class: &str,
    manage_unclassed: bool,
    manage_lbc_annotated: bool,
) -> bool {
    let Some(spec) = &service.spec else {
        return false;
    };
    if spec.type_.as_deref() != Some("LoadBalancer") {
        return false;
    }
    match spec.load_balancer_class.as_deref() {
        Some(other) => other == class,
        None => manage_unclassed || (manage_lbc_annotated && lbc_ip_mode(service)),
    }
}

/// LBC's own test, with its exact spellings.
fn lbc_ip_mode(service: &Service) -> bool {
    let annotation = |key: &str| {
        service
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .map(String::as_str)
    };
    match annotation(TYPE) {
        Some("external") => annotation(NLB_TARGET_TYPE) == Some("ip"),
        Some("nlb-ip") => true,
        _ => false,
    }
}

/// The desired load balancer for `service` in cluster `cluster`, or every
/// problem found. Does not check [`opted_in`]; the caller does.
pub fn parse_service(
    service: &Service,
    cluster: &str,
) -> Result<LoadBalancerSpec, Vec<AnnotationError>> {
    let no_annotations = BTreeMap::new();
    let mut p = Parser {
        annotations: service
            .metadata
            .annotations
            .as_ref()
            .unwrap_or(&no_annotations),
        errors: Vec::new(),
    };
    let svc = service.spec.as_ref();

    let mut spec = LoadBalancerSpec::new(p.key(service, cluster));
    spec.listeners = ports::listeners(
        svc.and_then(|s| s.ports.as_deref()).unwrap_or_default(),
        &mut p.errors,
    );
    // Checked only to reject instance targets; IP targets are all cnlb does.
    p.value(TYPE, values::load_balancer_type);
    p.value(NLB_TARGET_TYPE, values::nlb_target_type);
    spec.scheme = p.scheme();
    spec.ip_address_type = p
        .value(IP_ADDRESS_TYPE, values::ip_address_type)
        .unwrap_or_default();
    spec.subnets = p.value(SUBNETS, values::subnets);
    spec.health_check = p.health_check();
    let (source_ranges_key, source_ranges) = p.source_ranges(
        svc.and_then(|s| s.load_balancer_source_ranges.as_deref())
            .unwrap_or_default(),
    );
    spec.source_ranges = source_ranges;
    spec.attributes = p
        .value(ATTRIBUTES, |s| {
            values::attributes(s, values::KNOWN_LB_ATTRIBUTES)
        })
        .unwrap_or_default();
    spec.target_group_attributes = p.target_group_attributes();
    spec.tags = p
        .value(ADDITIONAL_RESOURCE_TAGS, values::tags)
        .unwrap_or_default();
    spec.target_group_names = p.neg_names(&spec.listeners);
    p.unsupported_keys();

    if !p.errors.is_empty() {
        return Err(p.errors);
    }
    spec.normalize();
    // A backstop for the model's own rules, all of which are checked above.
    // It stops at its first problem and would repeat ones already reported,
    // so it runs on a clean parse only.
    spec.validate()
        .map_err(|err| vec![p.model_error(err, source_ranges_key)])?;
    Ok(spec)
}

/// A value that failed to parse; its error is already recorded.
struct Invalid;

/// The annotations being read and the errors found so far.
struct Parser<'a> {
    annotations: &'a BTreeMap<String, String>,
    errors: Vec<AnnotationError>,
}

impl Parser<'_> {
    /// `Ok(None)` if `key` is absent, the parsed value, or `Err(Invalid)`
    /// after recording why. Values are trimmed first.
    fn get<T>(
        &mut self,
        key: &str,
        parse: impl FnOnce(&str) -> Result<T, Reason>,
    ) -> Result<Option<T>, Invalid> {
        let Some(raw) = self.annotations.get(key) else {
            return Ok(None);
        };
        parse(raw.trim()).map(Some).map_err(|reason| {
            self.errors
                .push(AnnotationError::new(key, raw.as_str(), reason));
            Invalid
        })
    }

    /// [`get`](Self::get) when absent and invalid lead to the same default.
    fn value<T>(&mut self, key: &str, parse: impl FnOnce(&str) -> Result<T, Reason>) -> Option<T> {
        self.get(key, parse).ok().flatten()
    }

    /// Records a problem with annotation `key` as a whole.
    fn error(&mut self, key: &str, reason: impl Into<String>) {
        let value = self.annotations.get(key).map_or("", String::as_str);
        self.errors.push(AnnotationError::new(key, value, reason));
    }

    fn key(&mut self, service: &Service, cluster: &str) -> LoadBalancerKey {
        let meta = &service.metadata;
        for (field, value) in [
            ("metadata.namespace", &meta.namespace),
            ("metadata.name", &meta.name),
            // The UID keeps a recreated Service from adopting the old load balancer.
            ("metadata.uid", &meta.uid),
        ] {
            if value.as_deref().is_none_or(str::is_empty) {
                self.errors
                    .push(AnnotationError::new(field, "", "must be set"));
            }
        }
        LoadBalancerKey::new(
            cluster,
            meta.namespace.clone().unwrap_or_default(),
            meta.name.clone().unwrap_or_default(),
            meta.uid.clone().unwrap_or_default(),
        )
    }

    /// [`SCHEME`], else the deprecated [`INTERNAL`] (`false` means
    /// internet-facing, as with LBC), else GKE's [`GKE_LOAD_BALANCER_TYPE`],
    /// else internal. Two of them given and disagreeing is an error rather
    /// than LBC's "scheme wins".
    fn scheme(&mut self) -> Scheme {
        let scheme = self.get(SCHEME, values::scheme);
        let internal = self.get(INTERNAL, values::boolean).map(|internal| {
            internal.map(|yes| {
                if yes {
                    Scheme::Internal
                } else {
                    Scheme::InternetFacing
                }
            })
        });
        let gke = self.get(GKE_LOAD_BALANCER_TYPE, values::gke_load_balancer_type);
        let mut chosen: Option<(&str, Scheme)> = None;
        for (key, value) in [
            (SCHEME, scheme),
            (INTERNAL, internal),
            (GKE_LOAD_BALANCER_TYPE, gke),
        ] {
            let Ok(Some(value)) = value else {
                continue;
            };
            match chosen {
                None => chosen = Some((key, value)),
                Some((first, earlier)) if earlier != value => self.error(
                    key,
                    format!("conflicts with {first}: {:?}", earlier.as_str()),
                ),
                Some(_) => {}
            }
        }
        chosen.map(|(_, s)| s).unwrap_or_default()
    }

    /// NEG names from [`GKE_NEG`], by listener name; each exposed port must
    /// be a Service port.
    fn neg_names(&mut self, listeners: &[Listener]) -> BTreeMap<String, String> {
        let Some(ports) = self.value(GKE_NEG, values::gke_neg) else {
            return BTreeMap::new();
        };
        let mut names = BTreeMap::new();
        for (port, name) in ports {
            match listeners.iter().find(|l| l.port == port) {
                None => self.error(
                    GKE_NEG,
                    format!("exposed port {port} is not a port of the Service"),
                ),
                Some(listener) => {
                    if let Some(name) = name {
                        names.insert(listener.name.clone(), name);
                    }
                }
            }
        }
        names
    }

    fn health_check(&mut self) -> HealthCheck {
        let mut hc = HealthCheck::default();
        let protocol = self.get(HEALTHCHECK_PROTOCOL, values::health_check_protocol);
        if let Ok(Some(protocol)) = protocol {
            hc.protocol = protocol;
        }
        if let Some(port) = self.value(HEALTHCHECK_PORT, values::health_check_port) {
            hc.port = port;
        }
        let seconds = |n: u32| Duration::from_secs(u64::from(n));
        let interval = self.get(HEALTHCHECK_INTERVAL, |s| values::HC_INTERVAL.parse(s));
        let timeout = self.get(HEALTHCHECK_TIMEOUT, |s| values::HC_TIMEOUT.parse(s));
        if let Ok(Some(n)) = interval {
            hc.interval = seconds(n);
        }
        if let Ok(Some(n)) = timeout {
            hc.timeout = seconds(n);
        }
        // The model's rule (a probe may not outlive its interval), checked
        // here so that it is reported with the other errors.
        if let (Ok(interval), Ok(timeout)) = (&interval, &timeout)
            && hc.timeout > hc.interval
        {
            if timeout.is_some() {
                self.error(
                    HEALTHCHECK_TIMEOUT,
                    format!(
                        "must not be longer than the interval ({}s)",
                        hc.interval.as_secs()
                    ),
                );
            } else if interval.is_some() {
                self.error(
                    HEALTHCHECK_INTERVAL,
                    format!(
                        "must not be shorter than the timeout ({}s)",
                        hc.timeout.as_secs()
                    ),
                );
            }
        }
        let threshold = |s: &str| values::HC_THRESHOLD.parse(s);
        if let Some(n) = self.value(HEALTHCHECK_HEALTHY_THRESHOLD, threshold) {
            hc.healthy_threshold = n;
        }
        if let Some(n) = self.value(HEALTHCHECK_UNHEALTHY_THRESHOLD, threshold) {
            hc.unhealthy_threshold = n;
        }

        // Path and success codes mean something to HTTP(S) probes only. With
        // an invalid protocol we cannot tell; its own error is enough.
        let http = hc.protocol != HealthCheckProtocol::Tcp;
        let tcp_only = "only applies to http and https health checks";
        if let Ok(Some(path)) = self.get(HEALTHCHECK_PATH, values::health_check_path) {
            if http {
                hc.path = Some(path);
            } else if protocol.is_ok() {
                self.error(HEALTHCHECK_PATH, tcp_only);
            }
        }
        if http && hc.path.is_none() {
            // LBC's default for HTTP(S) checks.
            hc.path = Some("/".to_owned());
        }
        if let Ok(Some(codes)) = self.get(HEALTHCHECK_SUCCESS_CODES, values::success_codes) {
            if http {
                hc.success_codes = codes;
            } else if protocol.is_ok() {
                // LBC ignores them for TCP checks; the user would not get what
                // they asked for.
                self.error(HEALTHCHECK_SUCCESS_CODES, tcp_only);
            }
        }
        hc
    }

    /// `spec.loadBalancerSourceRanges` if set (it wins, as with LBC, and the
    /// annotation is then not read), else the [`SOURCE_RANGES`] annotation.
    /// Returns the key the ranges came from, for error messages.
    fn source_ranges(&mut self, from_spec: &[String]) -> (&'static str, Vec<String>) {
        if from_spec.is_empty() {
            let ranges = self.value(SOURCE_RANGES, values::cidrs);
            return (SOURCE_RANGES, ranges.unwrap_or_default());
        }
        for (i, range) in from_spec.iter().enumerate() {
            if !values::is_cidr(range.trim()) {
                self.errors.push(AnnotationError::new(
                    format!("spec.loadBalancerSourceRanges[{i}]"),
                    range.as_str(),
                    format!("must be a CIDR ({})", values::CIDR_EXAMPLE),
                ));
            }
        }
        let ranges = from_spec.iter().map(|r| r.trim().to_owned()).collect();
        ("spec.loadBalancerSourceRanges", ranges)
    }

    /// [`TARGET_GROUP_ATTRIBUTES`] plus `proxy_protocol_v2.enabled=true` from
    /// [`PROXY_PROTOCOL`]; the two disagreeing is an error.
    fn target_group_attributes(&mut self) -> BTreeMap<String, String> {
        let mut attributes = self
            .value(TARGET_GROUP_ATTRIBUTES, |s| {
                values::attributes(s, values::KNOWN_TG_ATTRIBUTES)
            })
            .unwrap_or_default();
        if self.value(PROXY_PROTOCOL, values::proxy_protocol).is_some() {
            let v2 = values::PROXY_PROTOCOL_V2;
            // Values of known attributes are canonical by now.
            if attributes.get(v2).is_some_and(|v| v == "false") {
                self.error(
                    PROXY_PROTOCOL,
                    format!("conflicts with {v2}=false in {TARGET_GROUP_ATTRIBUTES}"),
                );
            } else {
                attributes.insert(v2.to_owned(), "true".to_owned());
            }
        }
        attributes
    }

    /// One error per present LBC key that cnlb does not support, and per
    /// unknown key under [`LBC_PREFIX`] (most likely a typo LBC would have
    /// ignored).
    fn unsupported_keys(&mut self) {
        let annotations = self.annotations;
        for (key, value) in annotations {
            let unsupported = UNSUPPORTED.iter().find(|(k, _)| {
                key.strip_prefix(k)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
            });
            let reason = match unsupported {
                Some((_, "")) => "not supported by cnlb yet".to_owned(),
                Some((_, hint)) => format!("not supported by cnlb yet: {hint}"),
                None if key.starts_with(LBC_PREFIX) && !SUPPORTED.contains(&key.as_str()) => {
                    "unknown annotation (see ccm/ANNOTATIONS.md for the supported keys)".to_owned()
                }
                None => continue,
            };
            self.errors
                .push(AnnotationError::new(key.as_str(), value.as_str(), reason));
        }
    }

    /// Maps a [`LoadBalancerSpec::validate`] error back to the key the user
    /// wrote.
    fn model_error(&self, err: ProviderError, source_ranges_key: &str) -> AnnotationError {
        let ProviderError::InvalidSpec { field, reason } = err else {
            return AnnotationError::new("spec", "", err.to_string());
        };
        const FIELDS: &[(&str, &str)] = &[
            ("key.cluster", "cluster name"),
            ("key.namespace", "metadata.namespace"),
            ("key.name", "metadata.name"),
            ("key.uid", "metadata.uid"),
            ("listeners", "spec.ports"),
            ("health_check.interval", HEALTHCHECK_INTERVAL),
            ("health_check.timeout", HEALTHCHECK_TIMEOUT),
            (
                "health_check.healthy_threshold",
                HEALTHCHECK_HEALTHY_THRESHOLD,
            ),
            (
                "health_check.unhealthy_threshold",
                HEALTHCHECK_UNHEALTHY_THRESHOLD,
            ),
            ("health_check.port", HEALTHCHECK_PORT),
            ("health_check.path", HEALTHCHECK_PATH),
            ("health_check.success_codes", HEALTHCHECK_SUCCESS_CODES),
            ("tags", ADDITIONAL_RESOURCE_TAGS),
            ("subnets", SUBNETS),
            ("target_group_names", GKE_NEG),
        ];
        let key = FIELDS
            .iter()
            .find(|(prefix, _)| field.starts_with(prefix))
            .map(|(_, key)| *key)
            .or_else(|| {
                field
                    .starts_with("source_ranges")
                    .then_some(source_ranges_key)
            })
            .unwrap_or(field.as_str());
        let value = self.annotations.get(key).map_or("", String::as_str);
        AnnotationError::new(key, value, format!("{reason} ({field})"))
    }
}

// Last: the tests use `lbc_key!`, visible only after its definition.
#[cfg(test)]
mod properties;
#[cfg(test)]
mod tests;
