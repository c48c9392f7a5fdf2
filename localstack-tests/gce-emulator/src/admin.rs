//! The emulator's own admin API (`/emulator/v1/...`, JSON): what tests use
//! to seed instances, inject faults, set quotas, force health and read call
//! counts and every resource. Shared by the server and the Rust handle.

use std::collections::BTreeMap;

use google_cloud_compute_v1::model as m;
use serde::{Deserialize, Serialize};

use super::config::{NamedRange, QuotaGroup};

/// `POST /emulator/v1/instances`: a VM in one of the zones, with `nic0` in
/// the subnetwork.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SeedInstance {
    pub zone: String,
    pub name: String,
    /// Primary internal IP, inside the subnetwork's primary range.
    #[serde(rename = "networkIP")]
    pub network_ip: String,
    /// Alias IP ranges: explicit CIDRs inside the named secondary range
    /// (or the primary range when `subnetworkRangeName` is absent).
    #[serde(default)]
    pub alias_ip_ranges: Vec<SeedAliasRange>,
    /// Instance status (default RUNNING; e.g. TERMINATED, STOPPING).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Machine type name (default `e2-standard-2`); `machineType` is its URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_type: Option<String>,
    /// External IPv4 address: `nic0` gets an access config
    /// (`ONE_TO_ONE_NAT`, "External NAT") with this `natIP`.
    #[serde(default, rename = "natIP", skip_serializing_if = "Option::is_none")]
    pub nat_ip: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SeedAliasRange {
    pub ip_cidr_range: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnetwork_range_name: Option<String>,
}

/// `POST /emulator/v1/faults`: the next `count` calls of `method` (any
/// method when absent) fail with this error. Default: 403
/// `rateLimitExceeded` in domain `usageLimits`, like GCE's rate quotas.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    /// `networkEndpointGroups.attachNetworkEndpoints`, ... (see `GET calls`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    pub count: u32,
    #[serde(default = "default_fault_code")]
    pub code: u16,
    #[serde(default = "default_fault_reason")]
    pub reason: String,
    #[serde(default = "default_fault_domain")]
    pub domain: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Fail the operation instead of the call: the call returns an
    /// operation that ends DONE with this error (mutating calls only).
    #[serde(default)]
    pub in_operation: bool,
    /// Also send `status` and a `google.rpc.ErrorInfo` detail (reason in
    /// UPPER_SNAKE_CASE), as Google's front end does for quota errors.
    #[serde(default)]
    pub with_details: bool,
}

fn default_fault_code() -> u16 {
    403
}

fn default_fault_reason() -> String {
    "rateLimitExceeded".into()
}

fn default_fault_domain() -> String {
    "usageLimits".into()
}

impl Fault {
    /// `count` calls of `method` (or any) fail with 403 rateLimitExceeded.
    pub fn rate_limit(method: Option<&str>, count: u32) -> Fault {
        Fault {
            method: method.map(str::to_string),
            count,
            code: default_fault_code(),
            reason: default_fault_reason(),
            domain: default_fault_domain(),
            message: None,
            in_operation: false,
            with_details: false,
        }
    }

    /// Any error, e.g. `Fault::error(Some("regionBackendServices.insert"), 1, 503, "backendError")`.
    pub fn error(method: Option<&str>, count: u32, code: u16, reason: &str) -> Fault {
        Fault {
            code,
            reason: reason.to_string(),
            domain: "global".into(),
            ..Fault::rate_limit(method, count)
        }
    }
}

/// `PUT /emulator/v1/quotas/{group}`: calls per minute, `None` = unlimited.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QuotaSetting {
    pub per_minute: Option<u32>,
}

/// `PUT /emulator/v1/health/{ip}/{port}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ForceHealth {
    /// HEALTHY, UNHEALTHY, UNKNOWN or DRAINING.
    pub health_state: String,
}

/// One row of `GET /emulator/v1/health`: an endpoint under a health check.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HealthRow {
    pub health_check: String,
    pub ip: String,
    pub port: u16,
    /// The probed state (before any override).
    pub probed: String,
    /// The forced state, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forced: Option<String>,
    pub probes: u64,
}

/// `GET /emulator/v1/calls`: calls received per method (faulted and
/// throttled ones included), e.g. `networkEndpointGroups.attachNetworkEndpoints`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Calls {
    pub total: u64,
    pub methods: BTreeMap<String, u64>,
}

impl Calls {
    pub fn get(&self, method: &str) -> u64 {
        self.methods.get(method).copied().unwrap_or(0)
    }

    /// Calls whose method starts with `prefix` (e.g. `networkEndpointGroups.`).
    pub fn with_prefix(&self, prefix: &str) -> u64 {
        self.methods
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v)
            .sum()
    }
}

/// A NEG and its endpoints.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NegDump {
    pub network_endpoint_group: m::NetworkEndpointGroup,
    pub endpoints: Vec<m::NetworkEndpoint>,
}

/// `GET /emulator/v1/resources`: everything that exists (operations that
/// have not finished yet have not taken effect).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    pub instances: Vec<m::Instance>,
    pub network_endpoint_groups: Vec<NegDump>,
    pub health_checks: Vec<m::HealthCheck>,
    pub backend_services: Vec<m::BackendService>,
    pub target_tcp_proxies: Vec<m::TargetTcpProxy>,
    pub forwarding_rules: Vec<m::ForwardingRule>,
    pub addresses: Vec<m::Address>,
    pub firewalls: Vec<m::Firewall>,
    /// Operations not DONE yet.
    pub pending_operations: usize,
}

impl Resources {
    /// Self links of every resource other than instances: what a test
    /// expects to be empty after the code under test cleaned up.
    pub fn load_balancing_links(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut push = |l: &Option<String>| out.extend(l.clone());
        for n in &self.network_endpoint_groups {
            push(&n.network_endpoint_group.self_link);
        }
        self.health_checks.iter().for_each(|r| push(&r.self_link));
        self.backend_services
            .iter()
            .for_each(|r| push(&r.self_link));
        self.target_tcp_proxies
            .iter()
            .for_each(|r| push(&r.self_link));
        self.forwarding_rules
            .iter()
            .for_each(|r| push(&r.self_link));
        self.addresses.iter().for_each(|r| push(&r.self_link));
        self.firewalls.iter().for_each(|r| push(&r.self_link));
        out
    }

    /// The NEG named `name` (any zone).
    pub fn neg(&self, zone: &str, name: &str) -> Option<&NegDump> {
        self.network_endpoint_groups.iter().find(|n| {
            n.network_endpoint_group.name.as_deref() == Some(name)
                && n.network_endpoint_group
                    .zone
                    .as_deref()
                    .is_some_and(|z| z.ends_with(&format!("/zones/{zone}")))
        })
    }
}

/// `GET /emulator/v1/config`: the world the emulator models.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorldConfig {
    pub project: String,
    pub region: String,
    pub zones: Vec<String>,
    pub network: String,
    pub subnetwork: NamedRange,
    pub secondary_ranges: Vec<NamedRange>,
    pub operation_delay_ms: u64,
    pub quotas: BTreeMap<QuotaGroup, u32>,
}
