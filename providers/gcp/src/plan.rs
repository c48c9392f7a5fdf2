//! The desired Compute resources of one load balancer, as the API's JSON
//! bodies, and the rules for comparing them with what exists. Pure: no
//! calls. Bodies are built as JSON (the wire format) and turned into the
//! client's model types at the call site, so that they read like the API
//! reference.
//!
//! Ownership: GCE NEGs, backend services, proxies and health checks carry
//! no labels, so every resource's `description` is the JSON of the
//! ownership tags ([`owner_tags`]); names come from
//! [`LoadBalancerKey::resource_name`] and are never trusted alone.

use std::collections::{BTreeMap, BTreeSet};

use cnlb_provider_core::{
    HealthCheckPort, HealthCheckProtocol, Listener, LoadBalancerKey, LoadBalancerSpec,
    ProviderError, Result, Scheme, key_from_owner_tags, owner_tags,
};
use serde_json::{Value, json};

use crate::{HEALTH_CHECK_SOURCE_RANGES, NEG_TYPE};

/// Target group attribute (aws-load-balancer-controller's key) that sets
/// the backend service's connection draining timeout.
pub const DEREGISTRATION_DELAY: &str = "deregistration_delay.timeout_seconds";
/// Connection draining when the Service does not say: as long as vpc-ipam's
/// default cooldown, so a released Pod IP is not reused while it drains.
pub const DEFAULT_DRAINING_SECONDS: u32 = 300;
/// GCE limit for connection draining.
const MAX_DRAINING_SECONDS: u32 = 3600;
/// With `CONNECTION` balancing a NEG backend needs a capacity; this is high
/// enough never to be the limit.
const MAX_CONNECTIONS_PER_ENDPOINT: u32 = 100_000;

/// Where the load balancers live and what they attach to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcpConfig {
    pub project: String,
    pub region: String,
    /// VPC network name.
    pub network: String,
    /// Subnetwork of the nodes (NEGs, internal forwarding rules and addresses).
    pub subnetwork: String,
    /// Zones of the cluster; every listener gets a NEG in each, up front.
    pub zones: Vec<String>,
    /// Source ranges the proxies connect from besides the health checkers
    /// (the region's proxy-only subnet), admitted by the firewall rule.
    pub proxy_source_ranges: Vec<String>,
}

impl GcpConfig {
    fn project_path(&self) -> String {
        format!("projects/{}", self.project)
    }

    pub fn network_url(&self) -> String {
        format!("{}/global/networks/{}", self.project_path(), self.network)
    }

    pub fn subnetwork_url(&self) -> String {
        format!(
            "{}/regions/{}/subnetworks/{}",
            self.project_path(),
            self.region,
            self.subnetwork
        )
    }

    fn regional(&self, collection: &str, name: &str) -> String {
        format!(
            "{}/regions/{}/{collection}/{name}",
            self.project_path(),
            self.region
        )
    }

    pub fn neg_url(&self, zone: &str, name: &str) -> String {
        format!(
            "{}/zones/{zone}/networkEndpointGroups/{name}",
            self.project_path()
        )
    }

    pub fn instance_url(&self, zone: &str, name: &str) -> String {
        format!("{}/zones/{zone}/instances/{name}", self.project_path())
    }
}

/// Names of the resources of one load balancer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub address: String,
    pub health_check: String,
    pub firewall: String,
}

impl Names {
    pub fn of(key: &LoadBalancerKey) -> Names {
        Names {
            address: key.resource_name("address"),
            health_check: key.resource_name("hc"),
            firewall: key.resource_name("fw"),
        }
    }
}

/// Names of the resources of one listener (one Service port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortNames {
    pub port: u16,
    pub listener: String,
    pub neg: String,
    pub backend_service: String,
    pub proxy: String,
    pub forwarding_rule: String,
}

impl PortNames {
    pub fn of(spec: &LoadBalancerSpec, listener: &Listener) -> PortNames {
        let key = &spec.key;
        let port = listener.port;
        PortNames {
            port,
            listener: listener.name.clone(),
            neg: spec
                .target_group_names
                .get(&listener.name)
                .cloned()
                .unwrap_or_else(|| default_neg_name(key, port)),
            backend_service: key.resource_name(&format!("bs-{port}")),
            proxy: key.resource_name(&format!("tp-{port}")),
            forwarding_rule: key.resource_name(&format!("fr-{port}")),
        }
    }

    /// The names of a port of a load balancer known only by its IDs.
    pub fn from_ids(key: &LoadBalancerKey, ids: &BTreeMap<String, String>) -> Vec<PortNames> {
        ids.iter()
            .filter_map(|(k, neg)| {
                let port: u16 = k.strip_prefix(ID_NEG)?.parse().ok()?;
                Some(PortNames {
                    port,
                    listener: ids
                        .get(&format!("{ID_LISTENER}{port}"))
                        .cloned()
                        .unwrap_or_default(),
                    neg: neg.clone(),
                    backend_service: key.resource_name(&format!("bs-{port}")),
                    proxy: key.resource_name(&format!("tp-{port}")),
                    forwarding_rule: key.resource_name(&format!("fr-{port}")),
                })
            })
            .collect()
    }
}

pub fn default_neg_name(key: &LoadBalancerKey, port: u16) -> String {
    key.resource_name(&format!("neg-{port}"))
}

/// Resource ID keys: `neg/<port>` = NEG name (the same in every zone),
/// `listener/<port>` = listener name, `zones` = comma-separated zones,
/// `address` = the reserved address's name, `ip` = its IP.
pub const ID_NEG: &str = "neg/";
pub const ID_LISTENER: &str = "listener/";
pub const ID_ZONES: &str = "zones";
pub const ID_ADDRESS: &str = "address";
pub const ID_IP: &str = "ip";

/// The resource IDs the controller persists.
pub fn ids(
    names: &Names,
    ports: &[PortNames],
    zones: &[String],
    ip: &str,
) -> BTreeMap<String, String> {
    let mut ids = BTreeMap::from([
        (ID_ADDRESS.to_string(), names.address.clone()),
        (ID_IP.to_string(), ip.to_string()),
        (ID_ZONES.to_string(), zones.join(",")),
    ]);
    for p in ports {
        ids.insert(format!("{ID_NEG}{}", p.port), p.neg.clone());
        ids.insert(format!("{ID_LISTENER}{}", p.port), p.listener.clone());
    }
    ids
}

/// The zones recorded in `ids`.
pub fn zones_of(ids: &BTreeMap<String, String>) -> Vec<String> {
    ids.get(ID_ZONES)
        .map(|z| {
            z.split(',')
                .filter(|z| !z.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// `description` of every resource of `key`.
pub fn description(key: &LoadBalancerKey) -> String {
    serde_json::to_string(&owner_tags(key)).unwrap_or_default()
}

/// The owner recorded in a resource's `description`, if it is ours.
pub fn owner(description: Option<&str>) -> Option<LoadBalancerKey> {
    let tags: BTreeMap<String, String> = serde_json::from_str(description?).ok()?;
    key_from_owner_tags(&tags)
}

/// `EXTERNAL_MANAGED` or `INTERNAL_MANAGED`.
pub fn load_balancing_scheme(scheme: Scheme) -> &'static str {
    match scheme {
        Scheme::InternetFacing => "EXTERNAL_MANAGED",
        Scheme::Internal => "INTERNAL_MANAGED",
    }
}

/// What a regional proxy Network Load Balancer cannot do (or cnlb does
/// not do on GCP yet), as user errors naming the field.
pub fn validate(spec: &LoadBalancerSpec) -> Result<()> {
    spec.validate()?;
    spec.require_tcp("on GCP: Pod IPs can only back a proxy load balancer, which is TCP")?;
    let unsupported = |field: &str, what: &str| {
        Err(ProviderError::invalid(
            field,
            format!("{what} is not supported on GCP yet"),
        ))
    };
    if spec.ip_address_type != Default::default() {
        return unsupported("ip_address_type", "dualstack");
    }
    if !spec.source_ranges.is_empty() {
        return unsupported(
            "source_ranges",
            "restricting client ranges of a proxy load balancer",
        );
    }
    if let Some(key) = spec.attributes.keys().next() {
        return unsupported(
            &format!("attributes[{key}]"),
            "this load balancer attribute",
        );
    }
    for (key, value) in &spec.target_group_attributes {
        if key != DEREGISTRATION_DELAY {
            return unsupported(&format!("target_group_attributes[{key}]"), "this attribute");
        }
        draining_seconds(value)?;
    }
    if !spec.tags.is_empty() {
        return unsupported("tags", "tagging (GCE load balancer parts take no labels)");
    }
    if spec.subnets.is_some() {
        return unsupported(
            "subnets",
            "choosing subnets (the forwarding rule uses --gcp-subnetwork)",
        );
    }
    let hc = &spec.health_check;
    if hc.protocol != HealthCheckProtocol::Tcp
        && !matches!(hc.success_codes.as_str(), "200" | "200-399")
    {
        return Err(ProviderError::invalid(
            "health_check.success_codes",
            "GCE HTTP(S) health checks accept 200 only",
        ));
    }
    for name in spec.target_group_names.values() {
        if !is_gce_name(name) {
            return Err(ProviderError::invalid(
                "target_group_names",
                format!(
                    "{name:?} is not a GCE name: 1-63 of a-z, 0-9, '-', starting with a letter, not ending with '-'"
                ),
            ));
        }
    }
    Ok(())
}

fn draining_seconds(value: &str) -> Result<u32> {
    value
        .parse::<u32>()
        .ok()
        .filter(|s| *s <= MAX_DRAINING_SECONDS)
        .ok_or_else(|| {
            ProviderError::invalid(
                format!("target_group_attributes[{DEREGISTRATION_DELAY}]"),
                format!("{value:?} must be 0-{MAX_DRAINING_SECONDS} seconds"),
            )
        })
}

/// `[a-z]([-a-z0-9]{0,61}[a-z0-9])?`
pub fn is_gce_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && !name.ends_with('-')
}

pub fn address(spec: &LoadBalancerSpec, cfg: &GcpConfig, names: &Names) -> Value {
    let mut body = json!({
        "name": names.address,
        "description": description(&spec.key),
    });
    match spec.scheme {
        Scheme::InternetFacing => {
            body["addressType"] = json!("EXTERNAL");
            // Regional external proxy load balancers are Standard Tier.
            body["networkTier"] = json!("STANDARD");
        }
        Scheme::Internal => {
            body["addressType"] = json!("INTERNAL");
            body["subnetwork"] = json!(cfg.subnetwork_url());
            // Several forwarding rules (one per port) share it.
            body["purpose"] = json!("SHARED_LOADBALANCER_VIP");
        }
    }
    body
}

pub fn health_check(spec: &LoadBalancerSpec, names: &Names) -> Value {
    let hc = &spec.health_check;
    let mut probe = match hc.port {
        HealthCheckPort::TrafficPort => json!({"portSpecification": "USE_SERVING_PORT"}),
        HealthCheckPort::Port(port) => json!({"portSpecification": "USE_FIXED_PORT", "port": port}),
    };
    let (kind, field) = match hc.protocol {
        HealthCheckProtocol::Tcp => ("TCP", "tcpHealthCheck"),
        HealthCheckProtocol::Http => ("HTTP", "httpHealthCheck"),
        HealthCheckProtocol::Https => ("HTTPS", "httpsHealthCheck"),
    };
    if hc.protocol != HealthCheckProtocol::Tcp {
        probe["requestPath"] = json!(hc.path.as_deref().unwrap_or("/"));
    }
    json!({
        "name": names.health_check,
        "description": description(&spec.key),
        "type": kind,
        field: probe,
        "checkIntervalSec": hc.interval.as_secs(),
        "timeoutSec": hc.timeout.as_secs(),
        "healthyThreshold": hc.healthy_threshold,
        "unhealthyThreshold": hc.unhealthy_threshold,
    })
}

/// Admits the health checkers and the proxies to every port a Pod may be
/// probed or served on.
pub fn firewall(spec: &LoadBalancerSpec, cfg: &GcpConfig, names: &Names) -> Value {
    let mut ports: BTreeSet<u16> = spec.listeners.iter().map(|l| l.target_port).collect();
    if let HealthCheckPort::Port(port) = spec.health_check.port {
        ports.insert(port);
    }
    let mut sources: Vec<String> = HEALTH_CHECK_SOURCE_RANGES
        .iter()
        .map(|r| r.to_string())
        .collect();
    sources.extend(cfg.proxy_source_ranges.iter().cloned());
    json!({
        "name": names.firewall,
        "description": description(&spec.key),
        "network": cfg.network_url(),
        "direction": "INGRESS",
        "priority": 1000,
        "sourceRanges": sources,
        "allowed": [{
            "IPProtocol": "tcp",
            "ports": ports.iter().map(u16::to_string).collect::<Vec<_>>(),
        }],
    })
}

pub fn neg(spec: &LoadBalancerSpec, cfg: &GcpConfig, listener: &Listener, name: &str) -> Value {
    json!({
        "name": name,
        "description": description(&spec.key),
        "networkEndpointType": NEG_TYPE,
        "network": cfg.network_url(),
        "subnetwork": cfg.subnetwork_url(),
        "defaultPort": listener.target_port,
    })
}

pub fn backend_service(
    spec: &LoadBalancerSpec,
    cfg: &GcpConfig,
    names: &Names,
    port: &PortNames,
    zones: &[String],
) -> Result<Value> {
    let draining = spec
        .target_group_attributes
        .get(DEREGISTRATION_DELAY)
        .map(|v| draining_seconds(v))
        .transpose()?
        .unwrap_or(DEFAULT_DRAINING_SECONDS);
    let backends: Vec<Value> = zones
        .iter()
        .map(|zone| neg_backend(cfg, zone, &port.neg))
        .collect();
    Ok(json!({
        "name": port.backend_service,
        "description": description(&spec.key),
        "protocol": "TCP",
        "loadBalancingScheme": load_balancing_scheme(spec.scheme),
        "healthChecks": [cfg.regional("healthChecks", &names.health_check)],
        "backends": backends,
        "connectionDraining": {"drainingTimeoutSec": draining},
    }))
}

/// One zone's NEG as a backend of a backend service.
pub fn neg_backend(cfg: &GcpConfig, zone: &str, neg: &str) -> Value {
    json!({
        "group": cfg.neg_url(zone, neg),
        "balancingMode": "CONNECTION",
        "maxConnectionsPerEndpoint": MAX_CONNECTIONS_PER_ENDPOINT,
    })
}

pub fn proxy(spec: &LoadBalancerSpec, cfg: &GcpConfig, port: &PortNames) -> Value {
    json!({
        "name": port.proxy,
        "description": description(&spec.key),
        "service": cfg.regional("backendServices", &port.backend_service),
        "proxyHeader": "NONE",
    })
}

pub fn forwarding_rule(
    spec: &LoadBalancerSpec,
    cfg: &GcpConfig,
    port: &PortNames,
    ip: &str,
) -> Value {
    let mut body = json!({
        "name": port.forwarding_rule,
        "description": description(&spec.key),
        "IPAddress": ip,
        "IPProtocol": "TCP",
        "portRange": port.port.to_string(),
        "target": cfg.regional("targetTcpProxies", &port.proxy),
        "loadBalancingScheme": load_balancing_scheme(spec.scheme),
        "network": cfg.network_url(),
    });
    match spec.scheme {
        Scheme::InternetFacing => body["networkTier"] = json!("STANDARD"),
        Scheme::Internal => body["subnetwork"] = json!(cfg.subnetwork_url()),
    }
    body
}

/// Fields whose difference means the resource must be replaced (GCE cannot
/// change them in place), per collection.
pub const ADDRESS_IMMUTABLE: &[&str] = &["addressType", "subnetwork"];
pub const FIREWALL_IMMUTABLE: &[&str] = &["network", "direction"];
pub const BACKEND_SERVICE_IMMUTABLE: &[&str] = &["loadBalancingScheme", "protocol"];
pub const FORWARDING_RULE_IMMUTABLE: &[&str] = &[
    "IPAddress",
    "IPProtocol",
    "portRange",
    "target",
    "loadBalancingScheme",
    "network",
    "subnetwork",
];
pub const PROXY_IMMUTABLE: &[&str] = &["service", "proxyHeader"];

/// True if any of `fields` of `desired` differs in `existing`. References
/// compare by their `projects/...` part (GCE returns full URLs for the
/// partial ones it was given); lists of objects compare as sets.
pub fn differs(existing: &Value, desired: &Value, fields: &[&str]) -> bool {
    fields
        .iter()
        .any(|f| !same(existing.get(*f), desired.get(*f)))
}

/// The top-level fields of `desired` that differ in `existing`.
pub fn drifted<'a>(existing: &Value, desired: &'a Value) -> Vec<&'a str> {
    desired
        .as_object()
        .map(|o| {
            o.iter()
                .filter(|(k, v)| !same(existing.get(k.as_str()), Some(v)))
                .map(|(k, _)| k.as_str())
                .collect()
        })
        .unwrap_or_default()
}

/// `existing` (a) as GCE returns it holds what `desired` (b) asks for.
fn same(a: Option<&Value>, b: Option<&Value>) -> bool {
    match (a, b) {
        (None | Some(Value::Null), None | Some(Value::Null)) => true,
        (Some(a), Some(b)) => covers(a, b),
        _ => false,
    }
}

/// Every field `desired` sets, at any depth, is the same in `existing`;
/// fields only `existing` has are what GCE fills in by default (a health
/// check's `proxyHeader: NONE`), not drift.
fn covers(existing: &Value, desired: &Value) -> bool {
    match (existing, desired) {
        (Value::Object(e), Value::Object(d)) => {
            d.iter().all(|(k, v)| same(e.get(k.as_str()), Some(v)))
        }
        _ => normalized(existing) == normalized(desired),
    }
}

/// Numbers as numbers, references from `projects/` on, arrays sorted,
/// object fields that are null left out.
fn normalized(v: &Value) -> Value {
    match v {
        Value::String(s) => match s.find("projects/") {
            Some(i) => Value::String(s[i..].to_string()),
            None => match s.parse::<i64>() {
                // int64 fields come back as strings.
                Ok(n) if !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()) => json!(n),
                _ => v.clone(),
            },
        },
        Value::Array(items) => {
            let mut items: Vec<Value> = items.iter().map(normalized).collect();
            items.sort_by_key(|i| i.to_string());
            Value::Array(items)
        }
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), normalized(v)))
                .collect(),
        ),
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9e15 => json!(f as i64),
            _ => v.clone(),
        },
        _ => v.clone(),
    }
}

/// The fields of `existing` that `desired` does not set, and the desired
/// ones, merged: the body of an update that must not drop what GCE filled
/// in (fingerprint, ids).
pub fn merged(existing: &Value, desired: &Value) -> Value {
    let mut out = existing.clone();
    if let (Some(out), Some(desired)) = (out.as_object_mut(), desired.as_object()) {
        for (k, v) in desired {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use cnlb_provider_core::Protocol;

    use super::*;

    fn cfg() -> GcpConfig {
        GcpConfig {
            project: "p".into(),
            region: "us-central1".into(),
            network: "net".into(),
            subnetwork: "nodes".into(),
            zones: vec!["us-central1-a".into(), "us-central1-b".into()],
            proxy_source_ranges: vec!["10.129.0.0/23".into()],
        }
    }

    fn spec() -> LoadBalancerSpec {
        let mut spec = LoadBalancerSpec::new(LoadBalancerKey::new("c1", "default", "web", "uid-1"));
        spec.listeners.push(Listener {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 80,
            target_port: 8080,
        });
        spec
    }

    #[test]
    fn names_are_gce_names_and_distinct() {
        let spec = spec();
        let names = Names::of(&spec.key);
        let port = PortNames::of(&spec, &spec.listeners[0]);
        let all = [
            &names.address,
            &names.health_check,
            &names.firewall,
            &port.neg,
            &port.backend_service,
            &port.proxy,
            &port.forwarding_rule,
        ];
        assert!(all.iter().all(|n| is_gce_name(n)), "{all:?}");
        assert_eq!(all.iter().collect::<BTreeSet<_>>().len(), all.len());
        let mut custom = spec.clone();
        custom
            .target_group_names
            .insert("http".into(), "my-neg".into());
        assert_eq!(PortNames::of(&custom, &custom.listeners[0]).neg, "my-neg");
    }

    #[test]
    fn ownership_round_trips_through_descriptions() {
        let spec = spec();
        let d = description(&spec.key);
        assert_eq!(owner(Some(&d)), Some(spec.key.clone()));
        assert_eq!(owner(Some("created by hand")), None);
        assert_eq!(owner(None), None);
    }

    #[test]
    fn ids_round_trip() {
        let spec = spec();
        let names = Names::of(&spec.key);
        let ports = vec![PortNames::of(&spec, &spec.listeners[0])];
        let ids = ids(&names, &ports, &cfg().zones, "203.0.113.1");
        assert_eq!(PortNames::from_ids(&spec.key, &ids), ports);
        assert_eq!(zones_of(&ids), cfg().zones);
    }

    #[test]
    fn bodies_follow_the_spec() {
        let mut spec = spec();
        spec.scheme = Scheme::InternetFacing;
        spec.health_check.protocol = HealthCheckProtocol::Http;
        spec.health_check.path = Some("/healthz".into());
        spec.health_check.interval = Duration::from_secs(5);
        spec.target_group_attributes
            .insert(DEREGISTRATION_DELAY.into(), "30".into());
        let cfg = cfg();
        let names = Names::of(&spec.key);
        let port = PortNames::of(&spec, &spec.listeners[0]);
        let hc = health_check(&spec, &names);
        assert_eq!(hc["type"], "HTTP");
        assert_eq!(hc["httpHealthCheck"]["requestPath"], "/healthz");
        assert_eq!(
            hc["httpHealthCheck"]["portSpecification"],
            "USE_SERVING_PORT"
        );
        assert_eq!(hc["checkIntervalSec"], 5);
        let bs = backend_service(&spec, &cfg, &names, &port, &cfg.zones).unwrap();
        assert_eq!(bs["loadBalancingScheme"], "EXTERNAL_MANAGED");
        assert_eq!(bs["backends"].as_array().unwrap().len(), 2);
        assert_eq!(bs["connectionDraining"]["drainingTimeoutSec"], 30);
        let fr = forwarding_rule(&spec, &cfg, &port, "203.0.113.1");
        assert_eq!(fr["portRange"], "80");
        assert_eq!(fr["networkTier"], "STANDARD");
        let fw = firewall(&spec, &cfg, &names);
        assert_eq!(fw["allowed"][0]["ports"], json!(["8080"]));
        assert_eq!(fw["sourceRanges"].as_array().unwrap().len(), 3);
        // Fields can be read back as the client's model types.
        let _: google_cloud_compute_v1::model::BackendService = serde_json::from_value(bs).unwrap();
        let _: google_cloud_compute_v1::model::HealthCheck = serde_json::from_value(hc).unwrap();
        let _: google_cloud_compute_v1::model::ForwardingRule = serde_json::from_value(fr).unwrap();
        let _: google_cloud_compute_v1::model::Firewall = serde_json::from_value(fw).unwrap();
    }

    #[test]
    fn what_gcp_cannot_build_is_a_user_error() {
        let mut udp = spec();
        udp.listeners[0].protocol = Protocol::Udp;
        assert!(validate(&udp).unwrap_err().is_user_error());
        let mut attrs = spec();
        attrs
            .target_group_attributes
            .insert("stickiness.enabled".into(), "true".into());
        assert!(validate(&attrs).unwrap_err().is_user_error());
        let mut delay = spec();
        delay
            .target_group_attributes
            .insert(DEREGISTRATION_DELAY.into(), "9999".into());
        assert!(validate(&delay).unwrap_err().is_user_error());
        let mut name = spec();
        name.target_group_names
            .insert("http".into(), "Bad_Name".into());
        assert!(validate(&name).unwrap_err().is_user_error());
        assert!(validate(&spec()).is_ok());
    }

    #[test]
    fn comparison_ignores_url_forms_order_and_number_spelling() {
        let existing = json!({
            "healthChecks": ["https://compute.googleapis.com/compute/v1/projects/p/regions/r/healthChecks/hc"],
            "checkIntervalSec": 10,
            "id": "123",
            "backends": [{"group": "projects/p/zones/b/networkEndpointGroups/n"}, {"group": "projects/p/zones/a/networkEndpointGroups/n"}],
        });
        let desired = json!({
            "healthChecks": ["projects/p/regions/r/healthChecks/hc"],
            "checkIntervalSec": 10,
            "backends": [{"group": "projects/p/zones/a/networkEndpointGroups/n"}, {"group": "projects/p/zones/b/networkEndpointGroups/n"}],
        });
        assert!(drifted(&existing, &desired).is_empty());
        assert!(!differs(&existing, &desired, &["healthChecks", "backends"]));
        let changed = json!({"checkIntervalSec": 5});
        assert_eq!(drifted(&existing, &changed), vec!["checkIntervalSec"]);
        assert_eq!(merged(&existing, &changed)["id"], "123");
    }

    /// GCE fills in defaults (a health check's proxyHeader): not drift,
    /// or every restart would patch every health check. What cnlb sets,
    /// at any depth, still is.
    #[test]
    fn fields_gce_fills_in_are_not_drift() {
        let existing = json!({"tcpHealthCheck": {"portSpecification": "USE_SERVING_PORT", "proxyHeader": "NONE"}});
        let desired = json!({"tcpHealthCheck": {"portSpecification": "USE_SERVING_PORT"}});
        assert!(drifted(&existing, &desired).is_empty());
        for changed in [
            json!({"tcpHealthCheck": {"portSpecification": "USE_FIXED_PORT", "port": 8080}}),
            json!({"tcpHealthCheck": {"portSpecification": "USE_SERVING_PORT", "proxyHeader": "PROXY_V1"}}),
            json!({"httpHealthCheck": {"portSpecification": "USE_SERVING_PORT"}}),
        ] {
            assert_eq!(drifted(&existing, &changed).len(), 1, "{changed}");
        }
    }
}
