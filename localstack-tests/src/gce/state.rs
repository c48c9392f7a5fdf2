//! The world the emulator models: one project, region, network and
//! subnetwork (with secondary ranges), seeded instances, the load-balancing
//! resources created through the API, operations, and the emulator's own
//! knobs (faults, quotas, call counts, health). Everything here is pure and
//! synchronous, behind one lock held by the server; time is passed in.
//!
//! A mutating call is checked at once (GCE's synchronous 400/404/409/412),
//! then becomes an operation whose change is applied, and checked again,
//! when the operation completes: what fails then goes into the operation's
//! `error`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use google_cloud_compute_v1::model as m;
use serde_json::{Value, json};

use super::admin::{Calls, Fault, HealthRow, NegDump, Resources, SeedInstance, WorldConfig};
use super::cidr::Cidr;
use super::config::{GceOptions, QuotaGroup, valid_name};
use super::error::ApiError;
use super::filter::Filter;
use super::util::{
    b64_decode, from_value, merge_patch, now_rfc3339, parse_body, to_value, valid_request_id,
};

/// The base of every `selfLink`, as GCE writes them.
pub const API: &str = "https://www.googleapis.com/compute/v1/";
/// External addresses come from here (TEST-NET-3, documentation only).
pub const EXTERNAL_POOL: Cidr = Cidr::v4([203, 0, 113, 0], 24);
/// GCE's cap on endpoints per attach/detach call.
pub const MAX_ENDPOINTS_PER_CALL: usize = 500;
/// Default and largest page of list calls.
pub const MAX_PAGE: usize = 500;

pub type Result<T> = std::result::Result<T, ApiError>;

/// Where a resource lives.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    Global,
    Region(String),
    Zone(String),
}

impl Scope {
    pub fn path(&self) -> String {
        match self {
            Scope::Global => "global".into(),
            Scope::Region(r) => format!("regions/{r}"),
            Scope::Zone(z) => format!("zones/{z}"),
        }
    }

    /// The scope part of a method name (`zoneOperations`, ...).
    pub fn operations_prefix(&self) -> &'static str {
        match self {
            Scope::Global => "globalOperations",
            Scope::Region(_) => "regionOperations",
            Scope::Zone(_) => "zoneOperations",
        }
    }
}

/// The resource collections created through the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Neg,
    HealthCheck,
    BackendService,
    TargetTcpProxy,
    ForwardingRule,
    Address,
    Firewall,
}

impl Kind {
    pub fn collection(self) -> &'static str {
        match self {
            Kind::Neg => "networkEndpointGroups",
            Kind::HealthCheck => "healthChecks",
            Kind::BackendService => "backendServices",
            Kind::TargetTcpProxy => "targetTcpProxies",
            Kind::ForwardingRule => "forwardingRules",
            Kind::Address => "addresses",
            Kind::Firewall => "firewalls",
        }
    }

    pub fn from_collection(c: &str) -> Option<Kind> {
        [
            Kind::Neg,
            Kind::HealthCheck,
            Kind::BackendService,
            Kind::TargetTcpProxy,
            Kind::ForwardingRule,
            Kind::Address,
            Kind::Firewall,
        ]
        .into_iter()
        .find(|k| k.collection() == c)
    }

    /// `kind` of a resource (`compute#networkEndpointGroup`).
    pub fn resource_kind(self) -> &'static str {
        match self {
            Kind::Neg => "compute#networkEndpointGroup",
            Kind::HealthCheck => "compute#healthCheck",
            Kind::BackendService => "compute#backendService",
            Kind::TargetTcpProxy => "compute#targetTcpProxy",
            Kind::ForwardingRule => "compute#forwardingRule",
            Kind::Address => "compute#address",
            Kind::Firewall => "compute#firewall",
        }
    }

    /// The service part of a method name, as in GCE's discovery document.
    pub fn method_prefix(self) -> &'static str {
        match self {
            Kind::Neg => "networkEndpointGroups",
            Kind::HealthCheck => "regionHealthChecks",
            Kind::BackendService => "regionBackendServices",
            Kind::TargetTcpProxy => "regionTargetTcpProxies",
            Kind::ForwardingRule => "forwardingRules",
            Kind::Address => "addresses",
            Kind::Firewall => "firewalls",
        }
    }

    /// As GCE names it in "resource in use" messages.
    fn label(self) -> &'static str {
        match self {
            Kind::Neg => "network_endpoint_group",
            Kind::HealthCheck => "health_check",
            Kind::BackendService => "backend_service",
            Kind::TargetTcpProxy => "target_tcp_proxy",
            Kind::ForwardingRule => "forwarding_rule",
            Kind::Address => "address",
            Kind::Firewall => "firewall",
        }
    }

    pub fn zonal(self) -> bool {
        self == Kind::Neg
    }

    pub fn global(self) -> bool {
        self == Kind::Firewall
    }

    pub fn supports_patch(self) -> bool {
        matches!(
            self,
            Kind::HealthCheck | Kind::BackendService | Kind::ForwardingRule | Kind::Firewall
        )
    }

    pub fn supports_update(self) -> bool {
        matches!(
            self,
            Kind::HealthCheck | Kind::BackendService | Kind::Firewall
        )
    }

    pub fn supports_set_labels(self) -> bool {
        matches!(self, Kind::ForwardingRule | Kind::Address)
    }

    /// Deserializes into the client library's model type and back: what is
    /// stored and served has exactly the library's wire format.
    fn canonical(self, v: &Value) -> Result<Value> {
        match self {
            Kind::Neg => to_value(&from_value::<m::NetworkEndpointGroup>(v)?),
            Kind::HealthCheck => to_value(&from_value::<m::HealthCheck>(v)?),
            Kind::BackendService => to_value(&from_value::<m::BackendService>(v)?),
            Kind::TargetTcpProxy => to_value(&from_value::<m::TargetTcpProxy>(v)?),
            Kind::ForwardingRule => to_value(&from_value::<m::ForwardingRule>(v)?),
            Kind::Address => to_value(&from_value::<m::Address>(v)?),
            Kind::Firewall => to_value(&from_value::<m::Firewall>(v)?),
        }
    }
}

/// Health of an endpoint under one health check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Unknown,
    Healthy,
    Unhealthy,
    Draining,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "UNKNOWN",
            Health::Healthy => "HEALTHY",
            Health::Unhealthy => "UNHEALTHY",
            Health::Draining => "DRAINING",
        }
    }

    pub fn parse(s: &str) -> Option<Health> {
        match s {
            "UNKNOWN" => Some(Health::Unknown),
            "HEALTHY" => Some(Health::Healthy),
            "UNHEALTHY" => Some(Health::Unhealthy),
            "DRAINING" => Some(Health::Draining),
            _ => None,
        }
    }
}

/// (health check selfLink, ip, port of the endpoint).
pub type HealthKey = (String, Ipv4Addr, u16);

#[derive(Clone, Debug)]
struct HealthEntry {
    state: Health,
    successes: u32,
    failures: u32,
    next_probe: Instant,
    in_flight: bool,
    probes: u64,
}

/// What a probe does.
#[derive(Clone, Debug, PartialEq)]
pub enum Probe {
    /// Connect; if `request` is set, send it; if `response` is set, the
    /// first bytes read must be it.
    Tcp {
        request: Option<String>,
        response: Option<String>,
    },
    /// `GET path` expecting 200 (and a body starting with `response`).
    Http {
        path: String,
        host: Option<String>,
        response: Option<String>,
    },
}

/// One probe to run now.
#[derive(Clone, Debug)]
pub struct ProbeJob {
    pub key: HealthKey,
    pub addr: SocketAddrV4,
    pub probe: Probe,
    pub timeout: Duration,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
}

/// A change waiting for its operation to complete.
#[derive(Clone, Debug)]
enum Mutation {
    Insert {
        kind: Kind,
        scope: Scope,
        name: String,
        id: u64,
        value: Value,
    },
    Change {
        kind: Kind,
        scope: Scope,
        name: String,
        body: Value,
        replace: bool,
    },
    Delete {
        kind: Kind,
        scope: Scope,
        name: String,
    },
    SetLabels {
        kind: Kind,
        scope: Scope,
        name: String,
        labels: Value,
    },
    Endpoints {
        zone: String,
        neg: String,
        endpoints: Vec<m::NetworkEndpoint>,
        attach: bool,
    },
    Nic {
        zone: String,
        instance: String,
        nic: Box<m::NetworkInterface>,
    },
    /// `instances.stop` (`start: false`) or `instances.start`.
    Power {
        zone: String,
        instance: String,
        start: bool,
    },
    DeleteInstance {
        zone: String,
        instance: String,
    },
    Fail(ApiError),
}

struct OpRec {
    op: m::Operation,
    created: Instant,
    due: Instant,
    mutation: Option<Mutation>,
}

struct FaultRec {
    fault: Fault,
    remaining: u32,
}

type EndpointKey = (String, i32, String);

pub struct World {
    cfg: GceOptions,
    secondary: BTreeMap<String, Cidr>,
    op_delay: Duration,
    next_id: u64,
    instances: BTreeMap<(String, String), m::Instance>,
    resources: BTreeMap<(Kind, Scope, String), Value>,
    endpoints: BTreeMap<(String, String), BTreeMap<EndpointKey, m::NetworkEndpoint>>,
    ops: BTreeMap<(Scope, String), OpRec>,
    pending: BTreeMap<(Instant, u64), (Scope, String)>,
    request_ids: HashMap<String, (Scope, String)>,
    faults: Vec<FaultRec>,
    quotas: BTreeMap<QuotaGroup, u32>,
    quota_window: BTreeMap<QuotaGroup, VecDeque<Instant>>,
    calls: Calls,
    health: BTreeMap<HealthKey, HealthEntry>,
    forced: BTreeMap<(Ipv4Addr, u16), Health>,
    static_ids: BTreeMap<String, u64>,
}

/// What every mutating call carries besides its own arguments.
pub struct Mutating<'a> {
    pub now: Instant,
    /// The `requestId` query parameter.
    pub request_id: Option<&'a str>,
    /// An injected fault for the call's operation to end with.
    pub fault: Option<ApiError>,
}

/// Optional query parameters of list calls.
#[derive(Default)]
pub struct ListQuery<'a> {
    pub filter: Option<&'a str>,
    pub max_results: Option<&'a str>,
    pub page_token: Option<&'a str>,
}

impl World {
    pub fn new(cfg: GceOptions) -> std::result::Result<World, String> {
        cfg.validate()?;
        let mut w = World {
            secondary: cfg
                .secondary_ranges
                .iter()
                .map(|r| (r.name.clone(), r.cidr))
                .collect(),
            op_delay: cfg.operation_delay(),
            quotas: cfg.quota_map(),
            cfg,
            next_id: 4_700_000_000_000_000_001,
            instances: BTreeMap::new(),
            resources: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            ops: BTreeMap::new(),
            pending: BTreeMap::new(),
            request_ids: HashMap::new(),
            faults: Vec::new(),
            quota_window: BTreeMap::new(),
            calls: Calls::default(),
            health: BTreeMap::new(),
            forced: BTreeMap::new(),
            static_ids: BTreeMap::new(),
        };
        let mut statics = vec![
            format!("regions/{}", w.cfg.region),
            format!("networks/{}", w.cfg.network),
            format!("subnetworks/{}", w.cfg.subnetwork.name),
        ];
        statics.extend(w.cfg.zones.iter().map(|z| format!("zones/{z}")));
        for s in statics {
            let id = w.id();
            w.static_ids.insert(s, id);
        }
        Ok(w)
    }

    pub fn config(&self) -> WorldConfig {
        WorldConfig {
            project: self.cfg.project.clone(),
            region: self.cfg.region.clone(),
            zones: self.cfg.zones.clone(),
            network: self.cfg.network.clone(),
            subnetwork: self.cfg.subnetwork.clone(),
            secondary_ranges: self.cfg.secondary_ranges.clone(),
            operation_delay_ms: u64::try_from(self.op_delay.as_millis()).unwrap_or(u64::MAX),
            quotas: self.quotas.clone(),
        }
    }

    fn id(&mut self) -> u64 {
        self.next_id += 7919;
        self.next_id
    }

    /// A fingerprint: 12 base64 characters that read the same in every
    /// base64 alphabet (9 bytes, no padding).
    fn fingerprint(&mut self) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        let mut x = self.id() ^ 0x9E37_79B9_7F4A_7C15;
        let mut s = String::new();
        for _ in 0..12 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s.push(char::from(ALPHABET[usize::try_from(x % 62).unwrap_or(0)]));
        }
        s
    }

    // ------------------------------------------------------------ links

    pub fn project(&self) -> &str {
        &self.cfg.project
    }

    fn project_path(&self) -> String {
        format!("projects/{}", self.cfg.project)
    }

    fn rel(&self, kind: Kind, scope: &Scope, name: &str) -> String {
        format!(
            "projects/{}/{}/{}/{name}",
            self.cfg.project,
            scope.path(),
            kind.collection()
        )
    }

    fn link(&self, kind: Kind, scope: &Scope, name: &str) -> String {
        format!("{API}{}", self.rel(kind, scope, name))
    }

    pub fn region_link(&self) -> String {
        format!("{API}{}/regions/{}", self.project_path(), self.cfg.region)
    }

    pub fn zone_link(&self, zone: &str) -> String {
        format!("{API}{}/zones/{zone}", self.project_path())
    }

    pub fn network_link(&self) -> String {
        format!(
            "{API}{}/global/networks/{}",
            self.project_path(),
            self.cfg.network
        )
    }

    pub fn subnetwork_link(&self) -> String {
        format!(
            "{API}{}/regions/{}/subnetworks/{}",
            self.project_path(),
            self.cfg.region,
            self.cfg.subnetwork.name
        )
    }

    fn instance_rel(&self, zone: &str, name: &str) -> String {
        format!("{}/zones/{zone}/instances/{name}", self.project_path())
    }

    fn instance_link(&self, zone: &str, name: &str) -> String {
        format!("{API}{}", self.instance_rel(zone, name))
    }

    /// `(collection, scope, name)` of a reference: a full URL (any host),
    /// `projects/p/...`, or a scope-relative path (`zones/z/...`,
    /// `regions/r/...`, `global/...`). A bare name is taken in
    /// `default_scope`.
    fn parse_ref(&self, s: &str, default_scope: &Scope) -> Option<(String, Scope, String)> {
        if !s.contains('/') {
            return Some((String::new(), default_scope.clone(), s.to_string()));
        }
        let rest = match s.find("/projects/") {
            Some(i) => &s[i + 1..],
            None => s,
        };
        let rest = match rest.strip_prefix("projects/") {
            Some(r) => {
                let (project, r) = r.split_once('/')?;
                if project != self.cfg.project {
                    return None;
                }
                r
            }
            None => rest,
        };
        let segs: Vec<&str> = rest.split('/').collect();
        match segs.as_slice() {
            ["global", coll, name] => Some((coll.to_string(), Scope::Global, name.to_string())),
            ["regions", r, coll, name] => Some((
                coll.to_string(),
                Scope::Region(r.to_string()),
                name.to_string(),
            )),
            ["zones", z, coll, name] => Some((
                coll.to_string(),
                Scope::Zone(z.to_string()),
                name.to_string(),
            )),
            _ => None,
        }
    }

    /// A reference to an existing resource of `kind`.
    fn resolve(&self, kind: Kind, s: &str, default_scope: &Scope) -> Option<(Scope, String)> {
        let (coll, scope, name) = self.parse_ref(s, default_scope)?;
        if !coll.is_empty() && coll != kind.collection() {
            return None;
        }
        self.resources
            .contains_key(&(kind, scope.clone(), name.clone()))
            .then_some((scope, name))
    }

    fn is_network(&self, s: &str) -> bool {
        matches!(self.parse_ref(s, &Scope::Global),
            Some((c, Scope::Global, n)) if (c.is_empty() || c == "networks") && n == self.cfg.network)
    }

    fn is_subnetwork(&self, s: &str) -> bool {
        let region = Scope::Region(self.cfg.region.clone());
        matches!(self.parse_ref(s, &region),
            Some((c, sc, n)) if (c.is_empty() || c == "subnetworks") && sc == region && n == self.cfg.subnetwork.name)
    }

    pub fn check_scope(&self, scope: &Scope) -> Result<()> {
        match scope {
            Scope::Global => Ok(()),
            Scope::Region(r) if *r == self.cfg.region => Ok(()),
            Scope::Zone(z) if self.cfg.zones.contains(z) => Ok(()),
            other => Err(ApiError::not_found(&format!(
                "{}/{}",
                self.project_path(),
                other.path()
            ))),
        }
    }

    pub fn check_project(&self, project: &str) -> Result<()> {
        if project == self.cfg.project {
            Ok(())
        } else {
            Err(ApiError::not_found(&format!("projects/{project}")))
        }
    }

    // ------------------------------------------------------------ admission

    /// Counts the call, then applies injected faults and rate quotas. An
    /// `Ok(Some(e))` is a fault for the call's operation to end with.
    pub fn admit(
        &mut self,
        method: &str,
        group: QuotaGroup,
        mutating: bool,
        now: Instant,
    ) -> Result<Option<ApiError>> {
        self.calls.total += 1;
        *self.calls.methods.entry(method.to_string()).or_insert(0) += 1;
        let hit = self.faults.iter_mut().find(|f| {
            f.remaining > 0
                && f.fault.method.as_deref().is_none_or(|m| m == method)
                && (!f.fault.in_operation || mutating)
        });
        if let Some(f) = hit {
            f.remaining -= 1;
            let e = ApiError {
                code: f.fault.code,
                reason: f.fault.reason.clone(),
                domain: f.fault.domain.clone(),
                message: f
                    .fault
                    .message
                    .clone()
                    .unwrap_or_else(|| default_fault_message(&f.fault.reason, method)),
                with_details: f.fault.with_details,
            };
            let in_op = f.fault.in_operation;
            self.faults.retain(|f| f.remaining > 0);
            return if in_op { Ok(Some(e)) } else { Err(e) };
        }
        if let Some(&limit) = self.quotas.get(&group) {
            let window = self.quota_window.entry(group).or_default();
            while window
                .front()
                .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
            {
                window.pop_front();
            }
            if window.len() >= usize::try_from(limit).unwrap_or(usize::MAX) {
                let metric = match group {
                    QuotaGroup::Read => "Read requests",
                    QuotaGroup::Endpoints => "Network endpoint requests",
                    QuotaGroup::Write => "Write requests",
                };
                return Err(ApiError::rate_limited(format!(
                    "Quota exceeded for quota metric '{metric}' and limit '{metric} per minute' of service 'compute.googleapis.com' for consumer 'project:{}'.",
                    self.cfg.project
                )));
            }
            window.push_back(now);
        }
        Ok(None)
    }

    /// Counts a call the emulator does not serve (as `notServed`), so a
    /// test that checks call counts notices it.
    pub fn count_not_served(&mut self) {
        self.calls.total += 1;
        *self
            .calls
            .methods
            .entry("notServed".to_string())
            .or_insert(0) += 1;
    }

    pub fn add_fault(&mut self, fault: Fault) {
        let remaining = fault.count;
        self.faults.push(FaultRec { fault, remaining });
    }

    pub fn clear_faults(&mut self) {
        self.faults.clear();
    }

    pub fn set_quota(&mut self, group: QuotaGroup, per_minute: Option<u32>) {
        match per_minute {
            Some(n) => {
                self.quotas.insert(group, n);
            }
            None => {
                self.quotas.remove(&group);
            }
        }
        self.quota_window.remove(&group);
    }

    pub fn calls(&self) -> Calls {
        self.calls.clone()
    }

    pub fn reset_calls(&mut self) {
        self.calls = Calls::default();
    }

    pub fn set_operation_delay(&mut self, d: Duration) {
        self.op_delay = d;
    }

    // ------------------------------------------------------------ operations

    /// Completes every operation whose time has come, oldest first, and
    /// moves the ones half-way there to RUNNING.
    pub fn advance(&mut self, now: Instant) {
        while let Some((&(due, seq), _)) = self.pending.first_key_value() {
            if due > now {
                break;
            }
            let Some(key) = self.pending.remove(&(due, seq)) else {
                break;
            };
            let mutation = self.ops.get_mut(&key).and_then(|r| r.mutation.take());
            let result = match mutation {
                Some(mu) => self.apply(mu),
                None => Ok(()),
            };
            if let Some(rec) = self.ops.get_mut(&key) {
                let t = now_rfc3339();
                rec.op.status = Some(m::operation::Status::Done);
                rec.op.progress = Some(100);
                rec.op.start_time.get_or_insert_with(|| t.clone());
                rec.op.end_time = Some(t);
                if let Err(e) = result {
                    e.fill_operation(&mut rec.op);
                }
            }
        }
        for key in self.pending.values() {
            if let Some(rec) = self.ops.get_mut(key)
                && rec.op.status == Some(m::operation::Status::Pending)
                && now >= rec.created + (rec.due - rec.created) / 2
            {
                rec.op.status = Some(m::operation::Status::Running);
                rec.op.start_time = Some(now_rfc3339());
            }
        }
    }

    pub fn pending_operations(&self) -> usize {
        self.pending.len()
    }

    /// GET of an operation (`zones/z/operations/name`, ...).
    pub fn operation(&self, scope: &Scope, name: &str) -> Result<Value> {
        match self.ops.get(&(scope.clone(), name.to_string())) {
            Some(r) => to_value(&r.op),
            None => Err(ApiError::not_found(&format!(
                "{}/{}/operations/{name}",
                self.project_path(),
                scope.path()
            ))),
        }
    }

    pub fn operation_done(&self, scope: &Scope, name: &str) -> bool {
        self.ops
            .get(&(scope.clone(), name.to_string()))
            .is_none_or(|r| r.op.status == Some(m::operation::Status::Done))
    }

    /// The common path of every mutating call: a repeated `requestId`
    /// returns the first call's operation and changes nothing; otherwise
    /// `prepare` checks the call and names the change, which becomes an
    /// operation (failing with `fault` instead, if one was injected).
    fn mutate(
        &mut self,
        ctx: Mutating,
        prepare: impl FnOnce(&mut World) -> Result<(Scope, &'static str, String, Option<u64>, Mutation)>,
    ) -> Result<Value> {
        let Mutating {
            now,
            request_id,
            fault,
        } = ctx;
        if let Some(rid) = request_id {
            if !valid_request_id(rid) {
                return Err(ApiError::invalid_field(
                    "requestId",
                    rid,
                    "The request ID must be a valid UUID with the exception that zero UUID is not supported.",
                ));
            }
            if let Some(key) = self.request_ids.get(rid).cloned() {
                return self.operation(&key.0, &key.1);
            }
        }
        let (scope, op_type, target, target_id, mutation) = prepare(self)?;
        let mutation = match fault {
            Some(e) => Mutation::Fail(e),
            None => mutation,
        };
        let id = self.id();
        let name = format!("operation-{}-{:x}", unix_millis(), id);
        let mut op = m::Operation::default();
        op.kind = Some("compute#operation".into());
        op.id = Some(id);
        op.name = Some(name.clone());
        op.operation_type = Some(op_type.to_string());
        op.target_link = Some(target);
        op.target_id = target_id;
        op.status = Some(m::operation::Status::Pending);
        op.progress = Some(0);
        op.insert_time = Some(now_rfc3339());
        op.user = Some(format!(
            "cnlb-test@{}.iam.gserviceaccount.com",
            self.cfg.project
        ));
        op.self_link = Some(format!(
            "{API}{}/{}/operations/{name}",
            self.project_path(),
            scope.path()
        ));
        match &scope {
            Scope::Zone(z) => op.zone = Some(self.zone_link(z)),
            Scope::Region(_) => op.region = Some(self.region_link()),
            Scope::Global => {}
        }
        let key = (scope.clone(), name.clone());
        let due = now + self.op_delay;
        self.ops.insert(
            key.clone(),
            OpRec {
                op,
                created: now,
                due,
                mutation: Some(mutation),
            },
        );
        self.pending.insert((due, id), key.clone());
        if let Some(rid) = request_id {
            self.request_ids.insert(rid.to_string(), key.clone());
        }
        // Done at once when there is no delay.
        self.advance(now);
        self.operation(&scope, &name)
    }

    fn apply(&mut self, mutation: Mutation) -> Result<()> {
        match mutation {
            Mutation::Fail(e) => Err(e),
            Mutation::Insert {
                kind,
                scope,
                name,
                id,
                value,
            } => {
                if self
                    .resources
                    .contains_key(&(kind, scope.clone(), name.clone()))
                {
                    return Err(ApiError::already_exists(&self.rel(kind, &scope, &name)));
                }
                self.check(kind, &scope, &name, &value)?;
                let v = self.finish(kind, &scope, &name, value, Some(id))?;
                if kind == Kind::Neg
                    && let Scope::Zone(z) = &scope
                {
                    self.endpoints
                        .insert((z.clone(), name.clone()), BTreeMap::new());
                }
                self.resources.insert((kind, scope, name), v);
                Ok(())
            }
            Mutation::Change {
                kind,
                scope,
                name,
                body,
                replace,
            } => {
                let next = self.changed(kind, &scope, &name, &body, replace)?;
                self.resources.insert((kind, scope, name), next);
                Ok(())
            }
            Mutation::Delete { kind, scope, name } => {
                self.check_delete(kind, &scope, &name)?;
                self.resources.remove(&(kind, scope.clone(), name.clone()));
                if let Scope::Zone(z) = &scope {
                    self.endpoints.remove(&(z.clone(), name));
                }
                Ok(())
            }
            Mutation::SetLabels {
                kind,
                scope,
                name,
                labels,
            } => {
                let fp = self.fingerprint();
                let key = (kind, scope.clone(), name.clone());
                let Some(v) = self.resources.get_mut(&key) else {
                    return Err(ApiError::not_found(&self.rel(kind, &scope, &name)));
                };
                v["labels"] = labels;
                v["labelFingerprint"] = json!(fp);
                Ok(())
            }
            Mutation::Endpoints {
                zone,
                neg,
                endpoints,
                attach,
            } => {
                let eps = self.check_endpoints(&zone, &neg, &endpoints)?;
                let set = self.endpoints.entry((zone, neg)).or_default();
                for ep in eps {
                    let key = endpoint_key(&ep);
                    if attach {
                        set.entry(key).or_insert(ep);
                    } else {
                        set.remove(&key);
                    }
                }
                Ok(())
            }
            Mutation::Nic {
                zone,
                instance,
                nic,
            } => self.apply_nic(&zone, &instance, &nic),
            Mutation::Power {
                zone,
                instance,
                start,
            } => {
                let link = self.instance_rel(&zone, &instance);
                let inst = self
                    .instances
                    .get_mut(&(zone, instance))
                    .ok_or_else(|| ApiError::not_found(&link))?;
                inst.status = Some(m::instance::Status::from(if start {
                    "RUNNING"
                } else {
                    "TERMINATED"
                }));
                Ok(())
            }
            Mutation::DeleteInstance { zone, instance } => self.delete_instance(&zone, &instance),
        }
    }

    // ------------------------------------------------------------ generic resources

    fn stored(&self, kind: Kind, scope: &Scope, name: &str) -> Result<&Value> {
        self.resources
            .get(&(kind, scope.clone(), name.to_string()))
            .ok_or_else(|| ApiError::not_found(&self.rel(kind, scope, name)))
    }

    /// What GET returns: the stored resource plus derived fields.
    fn render(&self, kind: Kind, scope: &Scope, name: &str, v: &Value) -> Value {
        let mut v = v.clone();
        match kind {
            Kind::Neg => {
                let n = match scope {
                    Scope::Zone(z) => self
                        .endpoints
                        .get(&(z.clone(), name.to_string()))
                        .map_or(0, BTreeMap::len),
                    _ => 0,
                };
                v["size"] = json!(n);
            }
            Kind::Address => {
                let ip = v.get("address").and_then(Value::as_str).unwrap_or("");
                let users: Vec<String> = self
                    .resources
                    .iter()
                    .filter(|((k, s, _), fr)| {
                        *k == Kind::ForwardingRule
                            && s == scope
                            && fr.get("IPAddress").and_then(Value::as_str) == Some(ip)
                    })
                    .map(|((k, s, n), _)| self.link(*k, s, n))
                    .collect();
                v["status"] = json!(if users.is_empty() {
                    "RESERVED"
                } else {
                    "IN_USE"
                });
                if !users.is_empty() {
                    v["users"] = json!(users);
                }
            }
            _ => {}
        }
        v
    }

    pub fn get(&self, kind: Kind, scope: &Scope, name: &str) -> Result<Value> {
        let v = self.stored(kind, scope, name)?;
        Ok(self.render(kind, scope, name, v))
    }

    pub fn list(&self, kind: Kind, scope: &Scope, q: &ListQuery) -> Result<Value> {
        let items: Vec<Value> = self
            .resources
            .iter()
            .filter(|((k, s, _), _)| *k == kind && s == scope)
            .map(|((_, s, n), v)| self.render(kind, s, n, v))
            .collect();
        let kind_list = format!("{}List", kind.resource_kind());
        let self_link = format!(
            "{API}{}/{}/{}",
            self.project_path(),
            scope.path(),
            kind.collection()
        );
        list_page(items, q, &kind_list, &self_link)
    }

    pub fn insert(
        &mut self,
        kind: Kind,
        scope: &Scope,
        body: &[u8],
        ctx: Mutating,
    ) -> Result<Value> {
        let scope = scope.clone();
        self.mutate(ctx, move |w| {
            let raw: Value = parse_body(body)?;
            if !raw.is_object() {
                return Err(ApiError::invalid(
                    "Invalid JSON payload received. Expected an object.",
                ));
            }
            let value = kind.canonical(&raw)?;
            let name = value
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::required("resource.name"))?
                .to_string();
            if !valid_name(&name) {
                return Err(ApiError::invalid_field(
                    "resource.name",
                    &name,
                    "Must be a match of regex '(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)'",
                ));
            }
            let pending_insert = w.ops.values().any(|r| {
                matches!(&r.mutation, Some(Mutation::Insert { kind: k, scope: s, name: n, .. })
                    if *k == kind && *s == scope && *n == name)
            });
            if pending_insert
                || w.resources
                    .contains_key(&(kind, scope.clone(), name.clone()))
            {
                return Err(ApiError::already_exists(&w.rel(kind, &scope, &name)));
            }
            w.check(kind, &scope, &name, &value)?;
            let id = w.id();
            let link = w.link(kind, &scope, &name);
            Ok((
                scope.clone(),
                "insert",
                link,
                Some(id),
                Mutation::Insert {
                    kind,
                    scope,
                    name,
                    id,
                    value,
                },
            ))
        })
    }

    /// PATCH (merge) or PUT (`replace`).
    pub fn change(
        &mut self,
        kind: Kind,
        scope: &Scope,
        name: &str,
        body: &[u8],
        replace: bool,
        ctx: Mutating,
    ) -> Result<Value> {
        let scope = scope.clone();
        let name = name.to_string();
        self.mutate(ctx, move |w| {
            let body: Value = parse_body(body)?;
            if !body.is_object() {
                return Err(ApiError::invalid(
                    "Invalid JSON payload received. Expected an object.",
                ));
            }
            // Checked now, applied (and checked again) when the operation completes.
            w.changed(kind, &scope, &name, &body, replace)?;
            let target = w.stored(kind, &scope, &name)?;
            let id = target
                .get("id")
                .and_then(Value::as_str)
                .and_then(|s| s.parse().ok());
            let link = w.link(kind, &scope, &name);
            Ok((
                scope.clone(),
                if replace { "update" } else { "patch" },
                link,
                id,
                Mutation::Change {
                    kind,
                    scope,
                    name,
                    body,
                    replace,
                },
            ))
        })
    }

    /// The resource after a PATCH or PUT with `body`, checked.
    fn changed(
        &mut self,
        kind: Kind,
        scope: &Scope,
        name: &str,
        body: &Value,
        replace: bool,
    ) -> Result<Value> {
        let current = self.stored(kind, scope, name)?.clone();
        if let Some(n) = body.get("name").and_then(Value::as_str)
            && n != name
        {
            return Err(ApiError::invalid_field(
                "resource.name",
                n,
                "The name of a resource cannot be changed.",
            ));
        }
        if let (Some(given), Some(have)) = (body.get("fingerprint"), current.get("fingerprint"))
            && given != have
        {
            return Err(ApiError::condition_not_met(format!(
                "Supplied fingerprint does not match current fingerprint of '{}'.",
                self.rel(kind, scope, name)
            )));
        }
        let mut next = if replace {
            body.clone()
        } else {
            let mut c = current.clone();
            merge_patch(&mut c, body);
            c
        };
        let next_obj = next
            .as_object_mut()
            .ok_or_else(|| ApiError::invalid("Invalid JSON payload received."))?;
        // Output-only and immutable fields; labels change through setLabels.
        for k in [
            "id",
            "selfLink",
            "creationTimestamp",
            "kind",
            "name",
            "region",
            "zone",
            "IPAddress",
            "labels",
            "labelFingerprint",
        ] {
            match current.get(k) {
                Some(v) => {
                    next_obj.insert(k.to_string(), v.clone());
                }
                None => {
                    next_obj.remove(k);
                }
            }
        }
        let next = kind.canonical(&next)?;
        self.check(kind, scope, name, &next)?;
        self.finish(kind, scope, name, next, None)
    }

    pub fn delete(
        &mut self,
        kind: Kind,
        scope: &Scope,
        name: &str,
        ctx: Mutating,
    ) -> Result<Value> {
        let scope = scope.clone();
        let name = name.to_string();
        self.mutate(ctx, move |w| {
            w.check_delete(kind, &scope, &name)?;
            let id = w
                .stored(kind, &scope, &name)?
                .get("id")
                .and_then(Value::as_str)
                .and_then(|s| s.parse().ok());
            let link = w.link(kind, &scope, &name);
            Ok((
                scope.clone(),
                "delete",
                link,
                id,
                Mutation::Delete { kind, scope, name },
            ))
        })
    }

    pub fn set_labels(
        &mut self,
        kind: Kind,
        scope: &Scope,
        name: &str,
        body: &[u8],
        ctx: Mutating,
    ) -> Result<Value> {
        let scope = scope.clone();
        let name = name.to_string();
        self.mutate(ctx, move |w| {
            let body: Value = parse_body(body)?;
            let current = w.stored(kind, &scope, &name)?;
            if body.get("labelFingerprint") != current.get("labelFingerprint") {
                return Err(ApiError::condition_not_met(format!(
                    "Labels fingerprint either invalid or resource labels have changed for '{}'.",
                    w.rel(kind, &scope, &name)
                )));
            }
            let labels = body.get("labels").cloned().unwrap_or_else(|| json!({}));
            if !labels
                .as_object()
                .is_some_and(|o| o.values().all(Value::is_string))
            {
                return Err(ApiError::invalid_field(
                    "labels",
                    &labels.to_string(),
                    "Labels must map strings to strings.",
                ));
            }
            let id = current
                .get("id")
                .and_then(Value::as_str)
                .and_then(|s| s.parse().ok());
            let link = w.link(kind, &scope, &name);
            Ok((
                scope.clone(),
                "setLabels",
                link,
                id,
                Mutation::SetLabels {
                    kind,
                    scope,
                    name,
                    labels,
                },
            ))
        })
    }

    /// Resources that reference `(kind, scope, name)`.
    fn users_of(&self, kind: Kind, scope: &Scope, name: &str) -> Vec<String> {
        let mut out = Vec::new();
        let refers = |v: Option<&Value>, target: Kind, default: &Scope| -> bool {
            v.and_then(Value::as_str).is_some_and(|s| {
                self.parse_ref(s, default).is_some_and(|(c, sc, n)| {
                    (c.is_empty() || c == target.collection()) && sc == *scope && n == name
                })
            })
        };
        for ((k, s, n), v) in &self.resources {
            let used = match (kind, k) {
                (Kind::Neg, Kind::BackendService) => v
                    .get("backends")
                    .and_then(Value::as_array)
                    .is_some_and(|bs| bs.iter().any(|b| refers(b.get("group"), kind, s))),
                (Kind::HealthCheck, Kind::BackendService) => v
                    .get("healthChecks")
                    .and_then(Value::as_array)
                    .is_some_and(|hs| hs.iter().any(|h| refers(Some(h), kind, s))),
                (Kind::BackendService, Kind::TargetTcpProxy) => refers(v.get("service"), kind, s),
                (Kind::BackendService, Kind::ForwardingRule) => {
                    refers(v.get("backendService"), kind, s)
                }
                (Kind::TargetTcpProxy, Kind::ForwardingRule) => refers(v.get("target"), kind, s),
                (Kind::Address, Kind::ForwardingRule) => {
                    let ip = self
                        .resources
                        .get(&(Kind::Address, scope.clone(), name.to_string()))
                        .and_then(|a| a.get("address"))
                        .and_then(Value::as_str);
                    s == scope && ip.is_some() && v.get("IPAddress").and_then(Value::as_str) == ip
                }
                _ => false,
            };
            if used {
                out.push(self.link(*k, s, n));
            }
        }
        out
    }

    fn check_delete(&self, kind: Kind, scope: &Scope, name: &str) -> Result<()> {
        self.stored(kind, scope, name)?;
        if let Some(user) = self.users_of(kind, scope, name).first() {
            return Err(ApiError::in_use(
                kind.label(),
                &self.rel(kind, scope, name),
                user.trim_start_matches(API),
            ));
        }
        Ok(())
    }

    // ------------------------------------------------------------ per-kind checks

    /// What GCE checks on insert and update, for `v` in canonical form.
    fn check(&self, kind: Kind, scope: &Scope, name: &str, v: &Value) -> Result<()> {
        match kind {
            Kind::Neg => self.check_neg(v),
            Kind::HealthCheck => check_health_check(v),
            Kind::BackendService => self.check_backend_service(scope, v),
            Kind::TargetTcpProxy => {
                let service = v
                    .get("service")
                    .and_then(Value::as_str)
                    .ok_or_else(|| ApiError::required("resource.service"))?;
                if self.resolve(Kind::BackendService, service, scope).is_none() {
                    return Err(ApiError::invalid_field(
                        "resource.service",
                        service,
                        "The resource was not found.",
                    ));
                }
                Ok(())
            }
            Kind::ForwardingRule => self.check_forwarding_rule(scope, name, v),
            Kind::Address => self.check_address(name, v),
            Kind::Firewall => self.check_firewall(v),
        }
    }

    fn check_neg(&self, v: &Value) -> Result<()> {
        match v.get("networkEndpointType").and_then(Value::as_str) {
            None | Some("GCE_VM_IP_PORT") => {}
            Some(t) => {
                return Err(ApiError::invalid_field(
                    "resource.networkEndpointType",
                    t,
                    "The emulator models only zonal GCE_VM_IP_PORT network endpoint groups.",
                ));
            }
        }
        if let Some(n) = v.get("network").and_then(Value::as_str)
            && !self.is_network(n)
        {
            return Err(ApiError::invalid_field(
                "resource.network",
                n,
                "The referenced network resource cannot be found.",
            ));
        }
        if let Some(s) = v.get("subnetwork").and_then(Value::as_str)
            && !self.is_subnetwork(s)
        {
            return Err(ApiError::invalid_field(
                "resource.subnetwork",
                s,
                "The referenced subnetwork resource cannot be found.",
            ));
        }
        if let Some(p) = v.get("defaultPort").and_then(Value::as_i64)
            && !(1..=65535).contains(&p)
        {
            return Err(ApiError::invalid_field(
                "resource.defaultPort",
                &p.to_string(),
                "Must be between 1 and 65535.",
            ));
        }
        Ok(())
    }

    fn check_backend_service(&self, scope: &Scope, v: &Value) -> Result<()> {
        let hcs = v
            .get("healthChecks")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if hcs.len() > 1 {
            return Err(ApiError::invalid_field(
                "resource.healthChecks",
                &json!(hcs).to_string(),
                "A backend service takes at most one health check.",
            ));
        }
        for (i, hc) in hcs.iter().enumerate() {
            let s = hc.as_str().unwrap_or("");
            if self.resolve(Kind::HealthCheck, s, scope).is_none() {
                return Err(ApiError::invalid_field(
                    &format!("resource.healthChecks[{i}]"),
                    s,
                    &format!(
                        "The resource '{}' was not found.",
                        s.trim_start_matches(API)
                    ),
                ));
            }
        }
        let backends = v
            .get("backends")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut seen = Vec::new();
        for (i, b) in backends.iter().enumerate() {
            let field = format!("resource.backends[{i}].group");
            let g = b
                .get("group")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::required(&field))?;
            let Some(key) = self
                .resolve(Kind::Neg, g, &Scope::Global)
                .filter(|(s, _)| matches!(s, Scope::Zone(_)))
            else {
                return Err(ApiError::invalid_field(
                    &field,
                    g,
                    &format!(
                        "The resource '{}' was not found (the emulator models zonal network endpoint groups only).",
                        g.trim_start_matches(API)
                    ),
                ));
            };
            if seen.contains(&key) {
                return Err(ApiError::invalid_field(
                    &field,
                    g,
                    "Duplicate backend group in the backend service.",
                ));
            }
            seen.push(key);
        }
        Ok(())
    }

    /// IPs in use in the subnetwork's primary range (internal) or the
    /// external pool, except by the resource `(kind, name)`.
    fn used_ips(&self, internal: bool, except: Option<(Kind, &str)>) -> Vec<Ipv4Addr> {
        let mut out: Vec<Ipv4Addr> = Vec::new();
        if internal {
            out.extend(self.instances.values().filter_map(|i| {
                i.network_interfaces
                    .first()
                    .and_then(|n| n.network_ip.as_deref())
                    .and_then(|s| s.parse::<Ipv4Addr>().ok())
            }));
        }
        for ((k, _, n), v) in &self.resources {
            if except.is_some_and(|(ek, en)| ek == *k && en == n) {
                continue;
            }
            let ip = match k {
                Kind::Address => v.get("address"),
                Kind::ForwardingRule => v.get("IPAddress"),
                _ => None,
            };
            if let Some(ip) = ip.and_then(Value::as_str).and_then(|s| s.parse().ok()) {
                out.push(ip);
            }
        }
        let range = if internal {
            self.cfg.subnetwork.cidr
        } else {
            EXTERNAL_POOL
        };
        out.retain(|ip| range.contains_ip(*ip));
        out
    }

    fn allocate_ip(&self, internal: bool) -> Result<Ipv4Addr> {
        let range = if internal {
            self.cfg.subnetwork.cidr
        } else {
            EXTERNAL_POOL
        };
        let mut reserved = self.used_ips(internal, None);
        reserved.extend(range.gce_reserved());
        // Alias ranges taken from the primary range.
        let aliases: Vec<Cidr> = if internal {
            self.used_ranges(range, ("", ""))
                .into_iter()
                .map(|(c, _)| c)
                .collect()
        } else {
            Vec::new()
        };
        range
            .first_free(32, &aliases, &reserved)
            .map(|c| c.network())
            .ok_or_else(|| {
                ApiError::new(
                    400,
                    "ipSpaceExhausted",
                    format!("IP space of '{range}' is exhausted."),
                )
            })
    }

    /// An explicitly requested address: inside the range and free.
    fn check_explicit_ip(
        &self,
        field: &str,
        ip: &str,
        internal: bool,
        except: (Kind, &str),
    ) -> Result<()> {
        let parsed: Ipv4Addr = ip
            .parse()
            .map_err(|_| ApiError::invalid_field(field, ip, "Not a valid IPv4 address."))?;
        let range = if internal {
            self.cfg.subnetwork.cidr
        } else {
            EXTERNAL_POOL
        };
        if !range.contains_ip(parsed) || range.gce_reserved().contains(&parsed) {
            return Err(ApiError::invalid_field(
                field,
                ip,
                &format!(
                    "The IP address must be a usable address of {} {range}.",
                    if internal {
                        "subnetwork range"
                    } else {
                        "the emulator's external pool"
                    }
                ),
            ));
        }
        let in_alias = internal
            && self
                .used_ranges(range, ("", ""))
                .iter()
                .any(|(c, _)| c.contains_ip(parsed));
        if in_alias || self.used_ips(internal, Some(except)).contains(&parsed) {
            return Err(ApiError::invalid_field(
                field,
                ip,
                "IP address is already being used by another resource.",
            ));
        }
        Ok(())
    }

    fn check_address(&self, name: &str, v: &Value) -> Result<()> {
        let internal = match v.get("addressType").and_then(Value::as_str) {
            None | Some("EXTERNAL") => false,
            Some("INTERNAL") => true,
            Some(t) => {
                return Err(ApiError::invalid_field(
                    "resource.addressType",
                    t,
                    "Must be INTERNAL or EXTERNAL.",
                ));
            }
        };
        if let Some(s) = v.get("subnetwork").and_then(Value::as_str)
            && (!internal || !self.is_subnetwork(s))
        {
            return Err(ApiError::invalid_field(
                "resource.subnetwork",
                s,
                "The referenced subnetwork resource cannot be found (or the address is external).",
            ));
        }
        if let Some(ip) = v.get("address").and_then(Value::as_str) {
            self.check_explicit_ip("resource.address", ip, internal, (Kind::Address, name))?;
        }
        Ok(())
    }

    fn scheme_internal(v: &Value) -> Result<bool> {
        match v.get("loadBalancingScheme").and_then(Value::as_str) {
            None | Some("EXTERNAL") | Some("EXTERNAL_MANAGED") => Ok(false),
            Some("INTERNAL") | Some("INTERNAL_MANAGED") => Ok(true),
            Some(s) => Err(ApiError::invalid_field(
                "resource.loadBalancingScheme",
                s,
                "The emulator models EXTERNAL, EXTERNAL_MANAGED, INTERNAL and INTERNAL_MANAGED.",
            )),
        }
    }

    /// The reserved address (in the region) a forwarding rule's `IPAddress`
    /// names, by IP, name or URL.
    fn reserved_address(&self, scope: &Scope, s: &str) -> Option<Value> {
        if s.parse::<Ipv4Addr>().is_ok() {
            return self
                .resources
                .iter()
                .find(|((k, sc, _), a)| {
                    *k == Kind::Address
                        && sc == scope
                        && a.get("address").and_then(Value::as_str) == Some(s)
                })
                .map(|(_, a)| a.clone());
        }
        let (sc, n) = self.resolve(Kind::Address, s, scope)?;
        self.resources.get(&(Kind::Address, sc, n)).cloned()
    }

    fn check_forwarding_rule(&self, scope: &Scope, name: &str, v: &Value) -> Result<()> {
        let internal = World::scheme_internal(v)?;
        match (
            v.get("target").and_then(Value::as_str),
            v.get("backendService").and_then(Value::as_str),
        ) {
            (Some(t), None) => {
                if self.resolve(Kind::TargetTcpProxy, t, scope).is_none() {
                    return Err(ApiError::invalid_field(
                        "resource.target",
                        t,
                        "The resource was not found (the emulator models regional target TCP proxies only).",
                    ));
                }
            }
            (None, Some(b)) => {
                if self.resolve(Kind::BackendService, b, scope).is_none() {
                    return Err(ApiError::invalid_field(
                        "resource.backendService",
                        b,
                        "The resource was not found.",
                    ));
                }
            }
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid(
                    "A forwarding rule takes either a target or a backend service, not both.",
                ));
            }
            (None, None) => return Err(ApiError::required("resource.target")),
        }
        for field in ["network", "subnetwork"] {
            if let Some(s) = v.get(field).and_then(Value::as_str) {
                let ok = if field == "network" {
                    self.is_network(s)
                } else {
                    self.is_subnetwork(s)
                };
                if !ok {
                    return Err(ApiError::invalid_field(
                        &format!("resource.{field}"),
                        s,
                        &format!("The referenced {field} resource cannot be found."),
                    ));
                }
            }
        }
        if let Some(ip) = v.get("IPAddress").and_then(Value::as_str) {
            match self.reserved_address(scope, ip) {
                Some(a) => {
                    let a_internal =
                        a.get("addressType").and_then(Value::as_str) == Some("INTERNAL");
                    if a_internal != internal {
                        return Err(ApiError::invalid_field(
                            "resource.IPAddress",
                            ip,
                            "The address type does not match the load balancing scheme.",
                        ));
                    }
                }
                None if internal && ip.parse::<Ipv4Addr>().is_ok() => {
                    self.check_explicit_ip(
                        "resource.IPAddress",
                        ip,
                        true,
                        (Kind::ForwardingRule, name),
                    )?;
                }
                None => {
                    return Err(ApiError::invalid_field(
                        "resource.IPAddress",
                        ip,
                        "Specified IP address is not reserved in this region (external rules need a reserved address).",
                    ));
                }
            }
        }
        if let Some(pr) = v.get("portRange").and_then(Value::as_str) {
            let ok = pr
                .split_once('-')
                .map_or_else(|| vec![pr], |(a, b)| vec![a, b])
                .iter()
                .all(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
            if !ok {
                return Err(ApiError::invalid_field(
                    "resource.portRange",
                    pr,
                    "Must be a port or a range of ports (80 or 80-90).",
                ));
            }
        }
        Ok(())
    }

    fn check_firewall(&self, v: &Value) -> Result<()> {
        if let Some(n) = v.get("network").and_then(Value::as_str)
            && !self.is_network(n)
        {
            return Err(ApiError::invalid_field(
                "resource.network",
                n,
                "The referenced network resource cannot be found.",
            ));
        }
        let nonempty = |k: &str| {
            v.get(k)
                .and_then(Value::as_array)
                .is_some_and(|a| !a.is_empty())
        };
        if nonempty("allowed") == nonempty("denied") {
            return Err(ApiError::invalid(
                "Exactly one of 'allowed' or 'denied' must be specified.",
            ));
        }
        for field in ["sourceRanges", "destinationRanges"] {
            for r in v.get(field).and_then(Value::as_array).into_iter().flatten() {
                let s = r.as_str().unwrap_or("");
                if Cidr::parse_or_host(s).is_none() {
                    return Err(ApiError::invalid_field(
                        &format!("resource.{field}"),
                        s,
                        "Must be an IPv4 CIDR range.",
                    ));
                }
            }
        }
        if let Some(p) = v.get("priority").and_then(Value::as_i64)
            && !(0..=65535).contains(&p)
        {
            return Err(ApiError::invalid_field(
                "resource.priority",
                &p.to_string(),
                "Must be between 0 and 65535.",
            ));
        }
        Ok(())
    }

    /// Output fields and defaults; `Some(id)` for a new resource (which
    /// also gets its addresses allocated).
    fn finish(
        &mut self,
        kind: Kind,
        scope: &Scope,
        name: &str,
        mut v: Value,
        new_id: Option<u64>,
    ) -> Result<Value> {
        let set_default = |v: &mut Value, k: &str, d: Value| {
            if v.get(k).is_none_or(Value::is_null) {
                v[k] = d;
            }
        };
        if let Some(id) = new_id {
            v["id"] = json!(id.to_string());
            v["creationTimestamp"] = json!(now_rfc3339());
            v["selfLink"] = json!(self.link(kind, scope, name));
            v["kind"] = json!(kind.resource_kind());
            v["name"] = json!(name);
            match scope {
                Scope::Zone(z) => v["zone"] = json!(self.zone_link(z)),
                Scope::Region(_) => v["region"] = json!(self.region_link()),
                Scope::Global => {}
            }
        }
        match kind {
            Kind::Neg => {
                v["networkEndpointType"] = json!("GCE_VM_IP_PORT");
                v["network"] = json!(self.network_link());
                v["subnetwork"] = json!(self.subnetwork_link());
            }
            Kind::HealthCheck => {
                let ty = health_check_type(&v)?;
                v["type"] = json!(ty);
                set_default(&mut v, "checkIntervalSec", json!(5));
                set_default(&mut v, "timeoutSec", json!(5));
                set_default(&mut v, "healthyThreshold", json!(2));
                set_default(&mut v, "unhealthyThreshold", json!(2));
                let field = health_check_field(ty);
                set_default(&mut v, field, json!({}));
                let sub = &mut v[field];
                let serving = sub.get("portSpecification").and_then(Value::as_str)
                    == Some("USE_SERVING_PORT");
                if !serving {
                    set_default(sub, "port", json!(default_port(ty)));
                    set_default(sub, "portSpecification", json!("USE_FIXED_PORT"));
                }
                set_default(sub, "proxyHeader", json!("NONE"));
                if matches!(ty, "HTTP" | "HTTPS" | "HTTP2") {
                    set_default(sub, "requestPath", json!("/"));
                }
            }
            Kind::BackendService => {
                v["fingerprint"] = json!(self.fingerprint());
                set_default(&mut v, "timeoutSec", json!(30));
                set_default(&mut v, "protocol", json!("TCP"));
                set_default(&mut v, "loadBalancingScheme", json!("EXTERNAL_MANAGED"));
                set_default(
                    &mut v,
                    "connectionDraining",
                    json!({"drainingTimeoutSec": 0}),
                );
            }
            Kind::TargetTcpProxy => {
                set_default(&mut v, "proxyHeader", json!("NONE"));
            }
            Kind::ForwardingRule => {
                let internal = World::scheme_internal(&v)?;
                set_default(&mut v, "loadBalancingScheme", json!("EXTERNAL"));
                set_default(&mut v, "IPProtocol", json!("TCP"));
                v["fingerprint"] = json!(self.fingerprint());
                set_default(&mut v, "labelFingerprint", json!(self.fingerprint()));
                if internal {
                    set_default(&mut v, "network", json!(self.network_link()));
                    set_default(&mut v, "subnetwork", json!(self.subnetwork_link()));
                } else {
                    set_default(&mut v, "networkTier", json!("PREMIUM"));
                }
                if new_id.is_some() {
                    let ip = match v.get("IPAddress").and_then(Value::as_str) {
                        Some(s) => match self.reserved_address(scope, s) {
                            Some(a) => a
                                .get("address")
                                .and_then(Value::as_str)
                                .unwrap_or(s)
                                .to_string(),
                            None => s.to_string(),
                        },
                        None => self.allocate_ip(internal)?.to_string(),
                    };
                    v["IPAddress"] = json!(ip);
                }
            }
            Kind::Address => {
                let internal = v.get("addressType").and_then(Value::as_str) == Some("INTERNAL");
                v["addressType"] = json!(if internal { "INTERNAL" } else { "EXTERNAL" });
                set_default(&mut v, "labelFingerprint", json!(self.fingerprint()));
                set_default(&mut v, "ipVersion", json!("IPV4"));
                if internal {
                    set_default(&mut v, "subnetwork", json!(self.subnetwork_link()));
                    set_default(&mut v, "purpose", json!("GCE_ENDPOINT"));
                } else {
                    set_default(&mut v, "networkTier", json!("PREMIUM"));
                }
                if new_id.is_some() && v.get("address").is_none() {
                    v["address"] = json!(self.allocate_ip(internal)?.to_string());
                }
                v["prefixLength"] = json!(32);
            }
            Kind::Firewall => {
                set_default(&mut v, "network", json!(self.network_link()));
                set_default(&mut v, "priority", json!(1000));
                set_default(&mut v, "direction", json!("INGRESS"));
                set_default(&mut v, "disabled", json!(false));
                if v.get("direction").and_then(Value::as_str) == Some("INGRESS") {
                    set_default(&mut v, "sourceRanges", json!(["0.0.0.0/0"]));
                }
            }
        }
        kind.canonical(&v)
    }

    // ------------------------------------------------------------ static world

    fn static_id(&self, key: &str) -> String {
        self.static_ids.get(key).copied().unwrap_or(0).to_string()
    }

    pub fn region(&self, r: &str) -> Result<Value> {
        self.check_scope(&Scope::Region(r.to_string()))?;
        let mut region = m::Region::default();
        region.kind = Some("compute#region".into());
        region.id = self.static_id(&format!("regions/{r}")).parse().ok();
        region.name = Some(r.to_string());
        region.description = Some(r.to_string());
        region.self_link = Some(self.region_link());
        region.status = Some(m::region::Status::Up);
        region.zones = self.cfg.zones.iter().map(|z| self.zone_link(z)).collect();
        region.creation_timestamp = Some("1969-12-31T16:00:00.000-08:00".into());
        to_value(&region)
    }

    pub fn regions(&self) -> Result<Value> {
        let items = vec![self.region(&self.cfg.region)?];
        let link = format!("{API}{}/regions", self.project_path());
        list_page(items, &ListQuery::default(), "compute#regionList", &link)
    }

    /// Zones are served as plain JSON (the library's `Zone` type is behind
    /// a feature cnlb does not build).
    pub fn zone(&self, z: &str) -> Result<Value> {
        self.check_scope(&Scope::Zone(z.to_string()))?;
        Ok(json!({
            "kind": "compute#zone",
            "id": self.static_id(&format!("zones/{z}")),
            "creationTimestamp": "1969-12-31T16:00:00.000-08:00",
            "name": z,
            "description": z,
            "status": "UP",
            "region": self.region_link(),
            "selfLink": self.zone_link(z),
            "supportsPzs": false,
        }))
    }

    pub fn zones(&self) -> Result<Value> {
        let items = self
            .cfg
            .zones
            .iter()
            .map(|z| self.zone(z))
            .collect::<Result<Vec<_>>>()?;
        let link = format!("{API}{}/zones", self.project_path());
        list_page(items, &ListQuery::default(), "compute#zoneList", &link)
    }

    /// Plain JSON too (`Network` is behind a feature cnlb does not build).
    pub fn network(&self, n: &str) -> Result<Value> {
        if n != self.cfg.network {
            return Err(ApiError::not_found(&format!(
                "{}/global/networks/{n}",
                self.project_path()
            )));
        }
        Ok(json!({
            "kind": "compute#network",
            "id": self.static_id(&format!("networks/{n}")),
            "creationTimestamp": "1969-12-31T16:00:00.000-08:00",
            "name": n,
            "selfLink": self.network_link(),
            "autoCreateSubnetworks": false,
            "subnetworks": [self.subnetwork_link()],
            "routingConfig": {"routingMode": "REGIONAL"},
            "mtu": 1460,
            "networkFirewallPolicyEnforcementOrder": "AFTER_CLASSIC_FIREWALL",
        }))
    }

    pub fn subnetwork(&self, r: &str, s: &str) -> Result<Value> {
        self.check_scope(&Scope::Region(r.to_string()))?;
        if s != self.cfg.subnetwork.name {
            return Err(ApiError::not_found(&format!(
                "{}/regions/{r}/subnetworks/{s}",
                self.project_path()
            )));
        }
        let primary = self.cfg.subnetwork.cidr;
        let mut sn = m::Subnetwork::default();
        sn.kind = Some("compute#subnetwork".into());
        sn.id = self.static_id(&format!("subnetworks/{s}")).parse().ok();
        sn.creation_timestamp = Some("1969-12-31T16:00:00.000-08:00".into());
        sn.name = Some(s.to_string());
        sn.network = Some(self.network_link());
        sn.region = Some(self.region_link());
        sn.self_link = Some(self.subnetwork_link());
        sn.ip_cidr_range = Some(primary.to_string());
        sn.gateway_address = primary.gce_reserved().get(1).map(ToString::to_string);
        sn.private_ip_google_access = Some(false);
        sn.purpose = Some(m::subnetwork::Purpose::from("PRIVATE"));
        sn.stack_type = Some(m::subnetwork::StackType::from("IPV4_ONLY"));
        sn.fingerprint = Some(b64_decode("c3VibmV0d29yaw==").into());
        sn.secondary_ip_ranges = self
            .cfg
            .secondary_ranges
            .iter()
            .map(|r| {
                let mut s = m::SubnetworkSecondaryRange::default();
                s.range_name = Some(r.name.clone());
                s.ip_cidr_range = Some(r.cidr.to_string());
                s
            })
            .collect();
        to_value(&sn)
    }

    pub fn subnetworks(&self, r: &str, q: &ListQuery) -> Result<Value> {
        let items = vec![self.subnetwork(r, &self.cfg.subnetwork.name)?];
        let link = format!("{API}{}/regions/{r}/subnetworks", self.project_path());
        list_page(items, q, "compute#subnetworkList", &link)
    }

    // ------------------------------------------------------------ instances

    fn alias_ranges_of(i: &m::Instance) -> Vec<(Cidr, Option<String>)> {
        i.network_interfaces
            .first()
            .map(|n| {
                n.alias_ip_ranges
                    .iter()
                    .filter_map(|a| {
                        let c = Cidr::parse_or_host(a.ip_cidr_range.as_deref()?)?;
                        Some((c, a.subnetwork_range_name.clone()))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The range an alias range is taken from: a secondary range by name,
    /// or the primary range.
    fn alias_parent(&self, range_name: Option<&str>) -> Option<Cidr> {
        match range_name {
            None => Some(self.cfg.subnetwork.cidr),
            Some(n) => self.secondary.get(n).copied(),
        }
    }

    /// Ranges in use in `parent` by instances other than `(zone, name)`:
    /// their alias ranges and (in the primary range) their primary IPs.
    fn used_ranges(&self, parent: Cidr, except: (&str, &str)) -> Vec<(Cidr, String)> {
        let mut out = Vec::new();
        for ((z, n), i) in &self.instances {
            if (z.as_str(), n.as_str()) == except {
                continue;
            }
            for (c, _) in World::alias_ranges_of(i) {
                if parent.overlaps(&c) {
                    out.push((c, n.clone()));
                }
            }
            if let Some(ip) = i
                .network_interfaces
                .first()
                .and_then(|nic| nic.network_ip.as_deref())
                .and_then(|s| s.parse().ok())
                && parent.contains_ip(ip)
            {
                out.push((Cidr::host(ip), n.clone()));
            }
        }
        out
    }

    /// Checks the alias ranges asked for `(zone, name)` and returns them
    /// with every `/n` allocated.
    fn resolve_alias_ranges(
        &self,
        zone: &str,
        name: &str,
        ranges: &[m::AliasIpRange],
        allocate: bool,
    ) -> Result<Vec<m::AliasIpRange>> {
        let mut chosen: Vec<Cidr> = Vec::new();
        let mut out = Vec::new();
        let primary_ip: Option<Ipv4Addr> = self
            .instances
            .get(&(zone.to_string(), name.to_string()))
            .and_then(|i| i.network_interfaces.first())
            .and_then(|n| n.network_ip.as_deref())
            .and_then(|s| s.parse().ok());
        for (i, r) in ranges.iter().enumerate() {
            let field = format!("resource.aliasIpRanges[{i}].ipCidrRange");
            let spec = r
                .ip_cidr_range
                .as_deref()
                .ok_or_else(|| ApiError::required(&field))?;
            let range_name = r.subnetwork_range_name.as_deref();
            let parent = self.alias_parent(range_name).ok_or_else(|| {
                ApiError::invalid_field(
                    &format!("resource.aliasIpRanges[{i}].subnetworkRangeName"),
                    range_name.unwrap_or(""),
                    &format!(
                        "Subnetwork '{}' has no secondary range of that name.",
                        self.cfg.subnetwork.name
                    ),
                )
            })?;
            let parent_name = range_name.map_or_else(
                || format!("primary range {parent}"),
                |n| format!("secondary range '{n}' ({parent})"),
            );
            let mut used = self.used_ranges(parent, (zone, name));
            used.extend(chosen.iter().map(|c| (*c, name.to_string())));
            let mut reserved = Vec::new();
            if range_name.is_none() {
                reserved.extend(parent.gce_reserved());
                reserved.extend(primary_ip);
            }
            let cidr = if let Some(len) = spec.strip_prefix('/') {
                let len: u8 =
                    len.parse().ok().filter(|l| *l <= 32).ok_or_else(|| {
                        ApiError::invalid_field(&field, spec, "Not a valid netmask.")
                    })?;
                if !allocate {
                    out.push(r.clone());
                    continue;
                }
                let used: Vec<Cidr> = used.iter().map(|(c, _)| *c).collect();
                parent.first_free(len, &used, &reserved).ok_or_else(|| {
                    ApiError::new(
                        400,
                        "ipSpaceExhausted",
                        format!(
                            "Invalid value for field '{field}': '{spec}'. IP space of {parent_name} of subnetwork '{}' is exhausted.",
                            self.cfg.subnetwork.name
                        ),
                    )
                })?
            } else {
                let c = Cidr::parse_or_host(spec).ok_or_else(|| {
                    ApiError::invalid_field(
                        &field,
                        spec,
                        "Must be a CIDR range with zero host bits, an IP address or a netmask (/24).",
                    )
                })?;
                if !parent.contains(&c) {
                    return Err(ApiError::invalid_field(
                        &field,
                        spec,
                        &format!(
                            "The alias IP range must be within {parent_name} of subnetwork '{}'.",
                            self.cfg.subnetwork.name
                        ),
                    ));
                }
                if let Some((_, owner)) = used.iter().find(|(u, _)| u.overlaps(&c)) {
                    return Err(ApiError::invalid_field(
                        &field,
                        spec,
                        &format!(
                            "The range conflicts with an IP range in use by instance '{owner}'."
                        ),
                    ));
                }
                if reserved.iter().any(|ip| c.contains_ip(*ip)) {
                    return Err(ApiError::invalid_field(
                        &field,
                        spec,
                        "The range contains a reserved or primary IP address.",
                    ));
                }
                c
            };
            chosen.push(cidr);
            let mut a = m::AliasIpRange::default();
            a.ip_cidr_range = Some(cidr.to_string());
            a.subnetwork_range_name = r.subnetwork_range_name.clone();
            out.push(a);
        }
        Ok(out)
    }

    /// `POST /emulator/v1/instances`.
    pub fn seed_instance(&mut self, s: &SeedInstance) -> Result<Value> {
        self.check_scope(&Scope::Zone(s.zone.clone()))?;
        if !valid_name(&s.name) {
            return Err(ApiError::invalid_field(
                "name",
                &s.name,
                "Not a valid GCE name.",
            ));
        }
        let key = (s.zone.clone(), s.name.clone());
        if self.instances.contains_key(&key) {
            return Err(ApiError::already_exists(
                &self.instance_rel(&s.zone, &s.name),
            ));
        }
        let ip: Ipv4Addr = s.network_ip.parse().map_err(|_| {
            ApiError::invalid_field("networkIP", &s.network_ip, "Not an IPv4 address.")
        })?;
        let primary = self.cfg.subnetwork.cidr;
        if !primary.contains_ip(ip) || primary.gce_reserved().contains(&ip) {
            return Err(ApiError::invalid_field(
                "networkIP",
                &s.network_ip,
                &format!("Must be a usable address of the subnetwork's primary range {primary}."),
            ));
        }
        if self.used_ips(true, None).contains(&ip)
            || self
                .used_ranges(primary, ("", ""))
                .iter()
                .any(|(c, _)| c.contains_ip(ip))
        {
            return Err(ApiError::invalid_field(
                "networkIP",
                &s.network_ip,
                "IP address is already being used by another resource.",
            ));
        }
        let id = self.id();
        let mut nic = m::NetworkInterface::default();
        nic.kind = Some("compute#networkInterface".into());
        nic.name = Some("nic0".into());
        nic.network = Some(self.network_link());
        nic.subnetwork = Some(self.subnetwork_link());
        nic.network_ip = Some(ip.to_string());
        nic.stack_type = Some(m::network_interface::StackType::from("IPV4_ONLY"));
        nic.fingerprint = Some(b64_decode(&self.fingerprint()).into());
        if let Some(nat) = &s.nat_ip {
            let nat: Ipv4Addr = nat
                .parse()
                .map_err(|_| ApiError::invalid_field("natIP", nat, "Not an IPv4 address."))?;
            let mut config = m::AccessConfig::default();
            config.kind = Some("compute#accessConfig".into());
            config.r#type = Some(m::access_config::Type::from("ONE_TO_ONE_NAT"));
            config.name = Some("External NAT".into());
            config.nat_ip = Some(nat.to_string());
            config.network_tier = Some(m::access_config::NetworkTier::from("PREMIUM"));
            nic.access_configs = vec![config];
        }
        let mut inst = m::Instance::default();
        inst.kind = Some("compute#instance".into());
        inst.id = Some(id);
        inst.name = Some(s.name.clone());
        inst.creation_timestamp = Some(now_rfc3339());
        inst.zone = Some(self.zone_link(&s.zone));
        inst.self_link = Some(self.instance_link(&s.zone, &s.name));
        inst.machine_type = Some(format!(
            "{API}{}/zones/{}/machineTypes/{}",
            self.project_path(),
            s.zone,
            s.machine_type.as_deref().unwrap_or("e2-standard-2")
        ));
        inst.status = Some(m::instance::Status::from(
            s.status.as_deref().unwrap_or("RUNNING"),
        ));
        inst.hostname = Some(format!(
            "{}.{}.c.{}.internal",
            s.name, s.zone, self.cfg.project
        ));
        inst.labels = s.labels.clone().into_iter().collect();
        inst.fingerprint = Some(b64_decode(&self.fingerprint()).into());
        inst.can_ip_forward = Some(false);
        inst.network_interfaces = vec![nic];
        // Checked against everyone else first; the instance is not in the map yet.
        let asked: Vec<m::AliasIpRange> = s
            .alias_ip_ranges
            .iter()
            .map(|a| {
                let mut r = m::AliasIpRange::default();
                r.ip_cidr_range = Some(a.ip_cidr_range.clone());
                r.subnetwork_range_name = a.subnetwork_range_name.clone();
                r
            })
            .collect();
        self.instances.insert(key.clone(), inst);
        match self.resolve_alias_ranges(&s.zone, &s.name, &asked, true) {
            Ok(ranges) => {
                if let Some(i) = self.instances.get_mut(&key)
                    && let Some(n) = i.network_interfaces.first_mut()
                {
                    n.alias_ip_ranges = ranges;
                }
            }
            Err(e) => {
                self.instances.remove(&key);
                return Err(e);
            }
        }
        self.instance(&s.zone, &s.name)
    }

    /// Removes an instance; its endpoints leave every NEG, as in GCE.
    pub fn delete_instance(&mut self, zone: &str, name: &str) -> Result<()> {
        if self
            .instances
            .remove(&(zone.to_string(), name.to_string()))
            .is_none()
        {
            return Err(ApiError::not_found(&self.instance_rel(zone, name)));
        }
        for ((z, _), eps) in self.endpoints.iter_mut() {
            if z == zone {
                eps.retain(|(_, _, inst), _| inst != name);
            }
        }
        Ok(())
    }

    /// The status an instance shows while an operation on it runs: STOPPING
    /// while it is being stopped or deleted, STAGING while it is being
    /// started (the last such operation wins).
    fn transitional_status(&self, zone: &str, name: &str) -> Option<&'static str> {
        let mut status = None;
        for key in self.pending.values() {
            match self.ops.get(key).and_then(|r| r.mutation.as_ref()) {
                Some(Mutation::Power {
                    zone: z,
                    instance: i,
                    start,
                }) if z == zone && i == name => {
                    status = Some(if *start { "STAGING" } else { "STOPPING" });
                }
                Some(Mutation::DeleteInstance {
                    zone: z,
                    instance: i,
                }) if z == zone && i == name => status = Some("STOPPING"),
                _ => {}
            }
        }
        status
    }

    /// An instance as GET and list show it.
    fn render_instance(&self, zone: &str, name: &str, i: &m::Instance) -> Result<Value> {
        let mut v = to_value(i)?;
        if let Some(status) = self.transitional_status(zone, name) {
            v["status"] = json!(status);
        }
        Ok(v)
    }

    pub fn instance(&self, zone: &str, name: &str) -> Result<Value> {
        self.check_scope(&Scope::Zone(zone.to_string()))?;
        match self.instances.get(&(zone.to_string(), name.to_string())) {
            Some(i) => self.render_instance(zone, name, i),
            None => Err(ApiError::not_found(&self.instance_rel(zone, name))),
        }
    }

    pub fn instances(&self, zone: &str, q: &ListQuery) -> Result<Value> {
        self.check_scope(&Scope::Zone(zone.to_string()))?;
        let items = self
            .instances
            .iter()
            .filter(|((z, _), _)| z == zone)
            .map(|((z, n), i)| self.render_instance(z, n, i))
            .collect::<Result<Vec<_>>>()?;
        let link = format!("{API}{}/zones/{zone}/instances", self.project_path());
        list_page(items, q, "compute#instanceList", &link)
    }

    /// `instances.stop` (`start: false`) and `instances.start`: the
    /// instance must exist; it is TERMINATED (GCE's "stopped") or RUNNING
    /// when the operation completes. Stopping a stopped instance or
    /// starting a running one succeeds and changes nothing, as in GCE.
    pub fn power_instance(
        &mut self,
        zone: &str,
        name: &str,
        start: bool,
        ctx: Mutating,
    ) -> Result<Value> {
        let zone = zone.to_string();
        let name = name.to_string();
        self.mutate(ctx, move |w| {
            let inst = w
                .instances
                .get(&(zone.clone(), name.clone()))
                .ok_or_else(|| ApiError::not_found(&w.instance_rel(&zone, &name)))?;
            let id = inst.id;
            let link = w.instance_link(&zone, &name);
            Ok((
                Scope::Zone(zone.clone()),
                if start { "start" } else { "stop" },
                link,
                id,
                Mutation::Power {
                    zone,
                    instance: name,
                    start,
                },
            ))
        })
    }

    /// `instances.delete`: gone (and out of every NEG) when the operation
    /// completes, STOPPING until then.
    pub fn delete_instance_op(&mut self, zone: &str, name: &str, ctx: Mutating) -> Result<Value> {
        let zone = zone.to_string();
        let name = name.to_string();
        self.mutate(ctx, move |w| {
            let inst = w
                .instances
                .get(&(zone.clone(), name.clone()))
                .ok_or_else(|| ApiError::not_found(&w.instance_rel(&zone, &name)))?;
            let id = inst.id;
            let link = w.instance_link(&zone, &name);
            Ok((
                Scope::Zone(zone.clone()),
                "delete",
                link,
                id,
                Mutation::DeleteInstance {
                    zone,
                    instance: name,
                },
            ))
        })
    }

    fn check_nic_fingerprint(
        &self,
        zone: &str,
        name: &str,
        nic: &m::NetworkInterface,
    ) -> Result<()> {
        let inst = self
            .instances
            .get(&(zone.to_string(), name.to_string()))
            .ok_or_else(|| ApiError::not_found(&self.instance_rel(zone, name)))?;
        let have = inst
            .network_interfaces
            .first()
            .and_then(|n| n.fingerprint.as_ref());
        match (&nic.fingerprint, have) {
            (Some(given), Some(have)) if given == have => Ok(()),
            (None, _) => Err(ApiError::condition_not_met(
                "Required 'fingerprint' of the network interface not specified: read the instance and send its networkInterfaces[].fingerprint.",
            )),
            _ => Err(ApiError::condition_not_met(
                "Supplied fingerprint does not match current fingerprint.",
            )),
        }
    }

    /// `instances.updateNetworkInterface`: only `aliasIpRanges` changes.
    pub fn update_nic(
        &mut self,
        zone: &str,
        name: &str,
        nic_name: Option<&str>,
        body: &[u8],
        ctx: Mutating,
    ) -> Result<Value> {
        let zone = zone.to_string();
        let name = name.to_string();
        let nic_name = nic_name.map(str::to_string);
        self.mutate(ctx, move |w| {
            w.check_scope(&Scope::Zone(zone.clone()))?;
            let inst = w
                .instances
                .get(&(zone.clone(), name.clone()))
                .ok_or_else(|| ApiError::not_found(&w.instance_rel(&zone, &name)))?;
            let id = inst.id;
            match nic_name.as_deref() {
                Some("nic0") => {}
                Some(other) => {
                    return Err(ApiError::invalid_field(
                        "networkInterface",
                        other,
                        "The instance has no network interface of that name.",
                    ));
                }
                None => return Err(ApiError::required("networkInterface")),
            }
            let nic: m::NetworkInterface = parse_body(body)?;
            w.check_nic_fingerprint(&zone, &name, &nic)?;
            w.resolve_alias_ranges(&zone, &name, &nic.alias_ip_ranges, false)?;
            let link = w.instance_link(&zone, &name);
            Ok((
                Scope::Zone(zone.clone()),
                "updateNetworkInterface",
                link,
                id,
                Mutation::Nic {
                    zone,
                    instance: name,
                    nic: Box::new(nic),
                },
            ))
        })
    }

    fn apply_nic(&mut self, zone: &str, name: &str, nic: &m::NetworkInterface) -> Result<()> {
        self.check_nic_fingerprint(zone, name, nic)?;
        let ranges = self.resolve_alias_ranges(zone, name, &nic.alias_ip_ranges, true)?;
        let fp = b64_decode(&self.fingerprint());
        let inst = self
            .instances
            .get_mut(&(zone.to_string(), name.to_string()))
            .ok_or_else(|| ApiError::not_found(name))?;
        if let Some(n) = inst.network_interfaces.first_mut() {
            n.alias_ip_ranges = ranges;
            n.fingerprint = Some(fp.into());
        }
        Ok(())
    }

    // ------------------------------------------------------------ endpoints

    /// Checks endpoints for the NEG and returns them normalized: instance
    /// by name, IP and port filled in.
    fn check_endpoints(
        &self,
        zone: &str,
        neg: &str,
        endpoints: &[m::NetworkEndpoint],
    ) -> Result<Vec<m::NetworkEndpoint>> {
        let scope = Scope::Zone(zone.to_string());
        let n = self.stored(Kind::Neg, &scope, neg)?;
        if endpoints.len() > MAX_ENDPOINTS_PER_CALL {
            return Err(ApiError::invalid_field(
                "resource.networkEndpoints",
                &endpoints.len().to_string(),
                &format!(
                    "Exceeded maximum allowed number of network endpoints per request: {MAX_ENDPOINTS_PER_CALL}."
                ),
            ));
        }
        let default_port = n.get("defaultPort").and_then(Value::as_i64);
        let mut out = Vec::with_capacity(endpoints.len());
        for (i, ep) in endpoints.iter().enumerate() {
            let field = |f: &str| format!("resource.networkEndpoints[{i}].{f}");
            let inst_ref = ep
                .instance
                .as_deref()
                .ok_or_else(|| ApiError::required(&field("instance")))?;
            let inst_name = match self.parse_ref(inst_ref, &scope) {
                Some((c, Scope::Zone(z), n)) if (c.is_empty() || c == "instances") && z == zone => {
                    n
                }
                _ => {
                    return Err(ApiError::invalid_field(
                        &field("instance"),
                        inst_ref,
                        &format!(
                            "The instance must be in zone {zone}, the zone of the network endpoint group."
                        ),
                    ));
                }
            };
            let inst = self
                .instances
                .get(&(zone.to_string(), inst_name.clone()))
                .ok_or_else(|| {
                    ApiError::invalid_field(
                        &field("instance"),
                        inst_ref,
                        &format!(
                            "The resource '{}' was not found.",
                            self.instance_rel(zone, &inst_name)
                        ),
                    )
                })?;
            let primary = inst
                .network_interfaces
                .first()
                .and_then(|n| n.network_ip.clone())
                .unwrap_or_default();
            let ip_s = ep.ip_address.clone().unwrap_or(primary.clone());
            let ip: Ipv4Addr = ip_s.parse().map_err(|_| {
                ApiError::invalid_field(&field("ipAddress"), &ip_s, "Not a valid IPv4 address.")
            })?;
            let in_alias = World::alias_ranges_of(inst)
                .iter()
                .any(|(c, _)| c.contains_ip(ip));
            if ip_s != primary && !in_alias {
                return Err(ApiError::invalid_field(
                    &field("ipAddress"),
                    &ip_s,
                    &format!(
                        "Specified IP address {ip_s} doesn't belong to instance {inst_name} (neither its primary IP nor in one of its alias IP ranges)."
                    ),
                ));
            }
            let port = ep.port.map(i64::from).or(default_port).ok_or_else(|| {
                ApiError::invalid_field(
                    &field("port"),
                    "",
                    "Port must be specified: the network endpoint group has no default port.",
                )
            })?;
            if !(1..=65535).contains(&port) {
                return Err(ApiError::invalid_field(
                    &field("port"),
                    &port.to_string(),
                    "Must be between 1 and 65535.",
                ));
            }
            let mut e = m::NetworkEndpoint::default();
            e.instance = Some(inst_name);
            e.ip_address = Some(ip.to_string());
            e.port = i32::try_from(port).ok();
            e.annotations = ep.annotations.clone();
            out.push(e);
        }
        Ok(out)
    }

    /// attachNetworkEndpoints / detachNetworkEndpoints.
    pub fn endpoints_change(
        &mut self,
        zone: &str,
        neg: &str,
        body: &[u8],
        attach: bool,
        ctx: Mutating,
    ) -> Result<Value> {
        let zone = zone.to_string();
        let neg = neg.to_string();
        self.mutate(ctx, move |w| {
            let endpoints = if attach {
                parse_body::<m::NetworkEndpointGroupsAttachEndpointsRequest>(body)?
                    .network_endpoints
            } else {
                parse_body::<m::NetworkEndpointGroupsDetachEndpointsRequest>(body)?
                    .network_endpoints
            };
            w.check_endpoints(&zone, &neg, &endpoints)?;
            let scope = Scope::Zone(zone.clone());
            let id = w
                .stored(Kind::Neg, &scope, &neg)?
                .get("id")
                .and_then(Value::as_str)
                .and_then(|s| s.parse().ok());
            let link = w.link(Kind::Neg, &scope, &neg);
            Ok((
                scope,
                if attach {
                    "attachNetworkEndpoints"
                } else {
                    "detachNetworkEndpoints"
                },
                link,
                id,
                Mutation::Endpoints {
                    zone,
                    neg,
                    endpoints,
                    attach,
                },
            ))
        })
    }

    /// (backend service link, health check link, forwarding rule link) for
    /// every backend service that has the NEG as a backend and a health check.
    fn health_refs(&self, zone: &str, neg: &str) -> Vec<(String, String, Option<String>)> {
        let region = Scope::Region(self.cfg.region.clone());
        let mut out = Vec::new();
        for ((k, s, n), bs) in &self.resources {
            if *k != Kind::BackendService {
                continue;
            }
            let has_neg = bs
                .get("backends")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|b| b.get("group").and_then(Value::as_str))
                .any(|g| {
                    self.parse_ref(g, &Scope::Global)
                        .is_some_and(|(c, sc, gn)| {
                            (c.is_empty() || c == "networkEndpointGroups")
                                && sc == Scope::Zone(zone.to_string())
                                && gn == neg
                        })
                });
            if !has_neg {
                continue;
            }
            let Some(hc) = bs
                .get("healthChecks")
                .and_then(Value::as_array)
                .and_then(|a| a.first())
                .and_then(Value::as_str)
                .and_then(|h| self.resolve(Kind::HealthCheck, h, &region))
            else {
                continue;
            };
            let bs_link = self.link(*k, s, n);
            let users = self.users_of(Kind::BackendService, s, n);
            let fr = users
                .iter()
                .find(|u| u.contains("/forwardingRules/"))
                .cloned()
                .or_else(|| {
                    users.iter().find_map(|proxy| {
                        let (_, ps, pn) = self.parse_ref(proxy, &region)?;
                        self.users_of(Kind::TargetTcpProxy, &ps, &pn)
                            .into_iter()
                            .next()
                    })
                });
            out.push((bs_link, self.link(Kind::HealthCheck, &hc.0, &hc.1), fr));
        }
        out
    }

    fn health_of(&self, hc_link: &str, ip: Ipv4Addr, port: u16) -> Health {
        if let Some(h) = self.forced.get(&(ip, port)) {
            return *h;
        }
        self.health
            .get(&(hc_link.to_string(), ip, port))
            .map_or(Health::Unknown, |e| e.state)
    }

    /// listNetworkEndpoints: `healths` only with `healthStatus: SHOW` and
    /// only under backend services that have a health check.
    pub fn list_endpoints(
        &self,
        zone: &str,
        neg: &str,
        body: &[u8],
        q: &ListQuery,
    ) -> Result<Value> {
        let scope = Scope::Zone(zone.to_string());
        self.stored(Kind::Neg, &scope, neg)?;
        let req: m::NetworkEndpointGroupsListEndpointsRequest = parse_body(body)?;
        let show = req.health_status.as_ref().and_then(|h| h.name()) == Some("SHOW");
        let refs = if show {
            self.health_refs(zone, neg)
        } else {
            Vec::new()
        };
        let mut items = Vec::new();
        for ep in self
            .endpoints
            .get(&(zone.to_string(), neg.to_string()))
            .into_iter()
            .flat_map(BTreeMap::values)
        {
            let mut item = m::NetworkEndpointWithHealthStatus::default();
            item.network_endpoint = Some(ep.clone());
            let ip = ep.ip_address.as_deref().and_then(|s| s.parse().ok());
            let port = ep.port.and_then(|p| u16::try_from(p).ok());
            if let (Some(ip), Some(port)) = (ip, port) {
                for (bs, hc, fr) in &refs {
                    let mut h = m::HealthStatusForNetworkEndpoint::default();
                    h.health_state =
                        Some(m::health_status_for_network_endpoint::HealthState::from(
                            self.health_of(hc, ip, port).as_str(),
                        ));
                    let mut hr = m::HealthCheckReference::default();
                    hr.health_check = Some(hc.clone());
                    h.health_check = Some(hr);
                    let mut br = m::BackendServiceReference::default();
                    br.backend_service = Some(bs.clone());
                    h.backend_service = Some(br);
                    if let Some(fr) = fr {
                        let mut frr = m::ForwardingRuleReference::default();
                        frr.forwarding_rule = Some(fr.clone());
                        h.forwarding_rule = Some(frr);
                    }
                    item.healths.push(h);
                }
            }
            items.push(to_value(&item)?);
        }
        let mut page = list_page(
            items,
            q,
            "compute#networkEndpointGroupsListNetworkEndpoints",
            &self.link(Kind::Neg, &scope, neg),
        )?;
        if let Some(o) = page.as_object_mut() {
            o.remove("selfLink");
        }
        // Through the library's type: its exact wire format.
        to_value(&from_value::<m::NetworkEndpointGroupsListNetworkEndpoints>(
            &page,
        )?)
    }

    // ------------------------------------------------------------ health

    /// Endpoints under a backend service with a health check, with what
    /// to probe: `(key, probe, port to probe, interval, timeout, thresholds)`.
    fn health_targets(&self) -> Vec<(HealthKey, Probe, u16, Duration, Duration, u32, u32)> {
        let mut out = Vec::new();
        let scale = self.cfg.health_check_time_scale;
        let floor = Duration::from_millis(self.cfg.health_check_min_interval_ms);
        for ((zone, neg), eps) in &self.endpoints {
            for (_, hc_link, _) in self.health_refs(zone, neg) {
                let Some((_, hs, hn)) = self.parse_ref(&hc_link, &Scope::Global) else {
                    continue;
                };
                let Some(hc) = self.resources.get(&(Kind::HealthCheck, hs, hn)) else {
                    continue;
                };
                let Some((probe, fixed_port)) = probe_of(hc) else {
                    continue;
                };
                let secs = |k: &str, d: i64| {
                    let s = hc.get(k).and_then(Value::as_i64).unwrap_or(d).max(1);
                    Duration::from_secs_f64(s as f64 * scale)
                };
                let interval = secs("checkIntervalSec", 5).max(floor);
                let timeout = secs("timeoutSec", 5).clamp(Duration::from_millis(50), interval);
                let th = |k: &str| {
                    hc.get(k)
                        .and_then(Value::as_u64)
                        .and_then(|v| u32::try_from(v).ok())
                        .unwrap_or(2)
                        .max(1)
                };
                for ep in eps.values() {
                    let (Some(ip), Some(port)) = (
                        ep.ip_address.as_deref().and_then(|s| s.parse().ok()),
                        ep.port.and_then(|p| u16::try_from(p).ok()),
                    ) else {
                        continue;
                    };
                    out.push((
                        (hc_link.clone(), ip, port),
                        probe.clone(),
                        fixed_port.unwrap_or(port),
                        interval,
                        timeout,
                        th("healthyThreshold"),
                        th("unhealthyThreshold"),
                    ));
                }
            }
        }
        out
    }

    /// Probes due now (each marked in flight until recorded); forgets the
    /// health of endpoints no longer under a health check.
    pub fn health_due(&mut self, now: Instant) -> Vec<ProbeJob> {
        let targets = self.health_targets();
        let keys: std::collections::BTreeSet<&HealthKey> = targets.iter().map(|t| &t.0).collect();
        self.health.retain(|k, _| keys.contains(k));
        let mut jobs = Vec::new();
        for (key, probe, probe_port, interval, timeout, healthy, unhealthy) in targets {
            let e = self.health.entry(key.clone()).or_insert(HealthEntry {
                state: Health::Unknown,
                successes: 0,
                failures: 0,
                next_probe: now,
                in_flight: false,
                probes: 0,
            });
            if e.in_flight || e.next_probe > now {
                continue;
            }
            e.in_flight = true;
            e.next_probe = now + interval;
            jobs.push(ProbeJob {
                addr: SocketAddrV4::new(key.1, probe_port),
                key,
                probe,
                timeout,
                healthy_threshold: healthy,
                unhealthy_threshold: unhealthy,
            });
        }
        jobs
    }

    pub fn health_record(&mut self, job: &ProbeJob, ok: bool) {
        let Some(e) = self.health.get_mut(&job.key) else {
            return;
        };
        e.in_flight = false;
        e.probes += 1;
        if ok {
            e.successes += 1;
            e.failures = 0;
            if e.successes >= job.healthy_threshold {
                e.state = Health::Healthy;
            }
        } else {
            e.failures += 1;
            e.successes = 0;
            if e.failures >= job.unhealthy_threshold {
                e.state = Health::Unhealthy;
            }
        }
    }

    pub fn force_health(&mut self, ip: Ipv4Addr, port: u16, h: Option<Health>) {
        match h {
            Some(h) => {
                self.forced.insert((ip, port), h);
            }
            None => {
                self.forced.remove(&(ip, port));
            }
        }
    }

    pub fn health_rows(&self) -> Vec<HealthRow> {
        let mut rows: Vec<HealthRow> = self
            .health
            .iter()
            .map(|((hc, ip, port), e)| HealthRow {
                health_check: hc.clone(),
                ip: ip.to_string(),
                port: *port,
                probed: e.state.as_str().into(),
                forced: self.forced.get(&(*ip, *port)).map(|h| h.as_str().into()),
                probes: e.probes,
            })
            .collect();
        for ((ip, port), h) in &self.forced {
            if !self.health.keys().any(|(_, i, p)| i == ip && p == port) {
                rows.push(HealthRow {
                    health_check: String::new(),
                    ip: ip.to_string(),
                    port: *port,
                    probed: Health::Unknown.as_str().into(),
                    forced: Some(h.as_str().into()),
                    probes: 0,
                });
            }
        }
        rows
    }

    // ------------------------------------------------------------ dump

    pub fn resources(&self) -> Result<Resources> {
        fn all<T: serde::de::DeserializeOwned>(w: &World, kind: Kind) -> Result<Vec<T>> {
            w.resources
                .iter()
                .filter(|((k, _, _), _)| *k == kind)
                .map(|((_, s, n), v)| from_value(&w.render(kind, s, n, v)))
                .collect()
        }
        let mut negs = Vec::new();
        for ((_, s, n), v) in self
            .resources
            .iter()
            .filter(|((k, _, _), _)| *k == Kind::Neg)
        {
            let endpoints = match s {
                Scope::Zone(z) => self
                    .endpoints
                    .get(&(z.clone(), n.clone()))
                    .map(|e| e.values().cloned().collect())
                    .unwrap_or_default(),
                _ => Vec::new(),
            };
            negs.push(NegDump {
                network_endpoint_group: from_value(&self.render(Kind::Neg, s, n, v))?,
                endpoints,
            });
        }
        Ok(Resources {
            instances: self.instances.values().cloned().collect(),
            network_endpoint_groups: negs,
            health_checks: all(self, Kind::HealthCheck)?,
            backend_services: all(self, Kind::BackendService)?,
            target_tcp_proxies: all(self, Kind::TargetTcpProxy)?,
            forwarding_rules: all(self, Kind::ForwardingRule)?,
            addresses: all(self, Kind::Address)?,
            firewalls: all(self, Kind::Firewall)?,
            pending_operations: self.pending.len(),
        })
    }
}

fn endpoint_key(ep: &m::NetworkEndpoint) -> EndpointKey {
    (
        ep.ip_address.clone().unwrap_or_default(),
        ep.port.unwrap_or(0),
        ep.instance.clone().unwrap_or_default(),
    )
}

fn default_fault_message(reason: &str, method: &str) -> String {
    match reason {
        "rateLimitExceeded" => format!("Rate Limit Exceeded (injected, {method})"),
        other => format!("{other} (injected, {method})"),
    }
}

/// `operation-<unix millis>`-style names.
fn unix_millis() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

fn health_check_type(v: &Value) -> Result<&'static str> {
    const TYPES: [(&str, &str); 7] = [
        ("TCP", "tcpHealthCheck"),
        ("HTTP", "httpHealthCheck"),
        ("HTTPS", "httpsHealthCheck"),
        ("HTTP2", "http2HealthCheck"),
        ("SSL", "sslHealthCheck"),
        ("GRPC", "grpcHealthCheck"),
        ("GRPC_WITH_TLS", "grpcTlsHealthCheck"),
    ];
    match v.get("type").and_then(Value::as_str) {
        Some(t) => TYPES
            .iter()
            .find(|(n, _)| *n == t)
            .map(|(n, _)| *n)
            .ok_or_else(|| {
                ApiError::invalid_field("resource.type", t, "Unknown health check type.")
            }),
        None => TYPES
            .iter()
            .find(|(_, f)| v.get(*f).is_some())
            .map(|(n, _)| *n)
            .ok_or_else(|| ApiError::required("resource.type")),
    }
}

fn health_check_field(ty: &str) -> &'static str {
    match ty {
        "HTTP" => "httpHealthCheck",
        "HTTPS" => "httpsHealthCheck",
        "HTTP2" => "http2HealthCheck",
        "SSL" => "sslHealthCheck",
        "GRPC" => "grpcHealthCheck",
        "GRPC_WITH_TLS" => "grpcTlsHealthCheck",
        _ => "tcpHealthCheck",
    }
}

fn default_port(ty: &str) -> u16 {
    match ty {
        "HTTPS" | "HTTP2" | "SSL" => 443,
        _ => 80,
    }
}

fn check_health_check(v: &Value) -> Result<()> {
    let ty = health_check_type(v)?;
    let field = health_check_field(ty);
    for other in [
        "tcpHealthCheck",
        "httpHealthCheck",
        "httpsHealthCheck",
        "http2HealthCheck",
        "sslHealthCheck",
        "grpcHealthCheck",
        "grpcTlsHealthCheck",
    ] {
        if other != field && v.get(other).is_some() {
            return Err(ApiError::invalid_field(
                &format!("resource.{other}"),
                "",
                &format!("A health check of type {ty} takes only {field}."),
            ));
        }
    }
    let num = |k: &str| v.get(k).and_then(Value::as_i64);
    for (k, lo, hi) in [
        ("checkIntervalSec", 1, 300),
        ("timeoutSec", 1, 300),
        ("healthyThreshold", 1, 10),
        ("unhealthyThreshold", 1, 10),
    ] {
        if let Some(n) = num(k)
            && !(lo..=hi).contains(&n)
        {
            return Err(ApiError::invalid_field(
                &format!("resource.{k}"),
                &n.to_string(),
                &format!("Must be between {lo} and {hi}."),
            ));
        }
    }
    if num("timeoutSec").unwrap_or(5) > num("checkIntervalSec").unwrap_or(5) {
        return Err(ApiError::invalid(
            "Invalid value for field 'resource.timeoutSec': timeout must be less than or equal to checkIntervalSec.",
        ));
    }
    if let Some(sub) = v.get(field) {
        let spec = sub.get("portSpecification").and_then(Value::as_str);
        let port = sub.get("port").and_then(Value::as_i64);
        if spec == Some("USE_SERVING_PORT") && port.is_some() {
            return Err(ApiError::invalid_field(
                &format!("resource.{field}.port"),
                &port.unwrap_or(0).to_string(),
                "A port must not be given with portSpecification USE_SERVING_PORT.",
            ));
        }
        if let Some(p) = port
            && !(1..=65535).contains(&p)
        {
            return Err(ApiError::invalid_field(
                &format!("resource.{field}.port"),
                &p.to_string(),
                "Must be between 1 and 65535.",
            ));
        }
    }
    Ok(())
}

/// What to probe for a stored health check, and the fixed port (None: the
/// endpoint's own port, `USE_SERVING_PORT`). Types other than TCP and HTTP
/// are probed by a TCP connect.
fn probe_of(hc: &Value) -> Option<(Probe, Option<u16>)> {
    let ty = health_check_type(hc).ok()?;
    let sub = hc.get(health_check_field(ty)).cloned().unwrap_or(json!({}));
    let s = |k: &str| sub.get(k).and_then(Value::as_str).map(str::to_string);
    let fixed = match s("portSpecification").as_deref() {
        Some("USE_SERVING_PORT") | Some("USE_NAMED_PORT") => None,
        _ => Some(
            sub.get("port")
                .and_then(Value::as_u64)
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or(default_port(ty)),
        ),
    };
    let probe = match ty {
        "HTTP" => Probe::Http {
            path: s("requestPath").unwrap_or_else(|| "/".into()),
            host: s("host"),
            response: s("response"),
        },
        "TCP" => Probe::Tcp {
            request: s("request"),
            response: s("response"),
        },
        _ => Probe::Tcp {
            request: None,
            response: None,
        },
    };
    Some((probe, fixed))
}

/// One page of a list: `maxResults` (default and at most 500), an opaque
/// `pageToken`, and `filter` (see `filter.rs`).
fn list_page(items: Vec<Value>, q: &ListQuery, kind: &str, self_link: &str) -> Result<Value> {
    let items: Vec<Value> = match q.filter.filter(|f| !f.trim().is_empty()) {
        Some(f) => {
            let filter = Filter::parse(f).map_err(|e| {
                ApiError::invalid_field(
                    "filter",
                    f,
                    &format!("Invalid list filter expression: {e}."),
                )
            })?;
            items.into_iter().filter(|v| filter.matches(v)).collect()
        }
        None => items,
    };
    let max = match q.max_results {
        None => MAX_PAGE,
        Some(s) => match s.parse::<usize>() {
            Ok(0) => MAX_PAGE,
            Ok(n) if n <= MAX_PAGE => n,
            _ => {
                return Err(ApiError::invalid_field(
                    "maxResults",
                    s,
                    &format!("Must be between 0 and {MAX_PAGE}."),
                ));
            }
        },
    };
    let start = match q.page_token {
        None | Some("") => 0,
        Some(t) => t
            .strip_prefix("cnlb-page-")
            .and_then(|n| usize::from_str_radix(n, 16).ok())
            .filter(|n| *n <= items.len())
            .ok_or_else(|| ApiError::invalid_field("pageToken", t, "Invalid page token."))?,
    };
    let end = (start + max).min(items.len());
    let mut out = json!({
        "kind": kind,
        "id": self_link,
        "selfLink": self_link,
    });
    let page: Vec<Value> = items[start..end].to_vec();
    if !page.is_empty() {
        out["items"] = json!(page);
    }
    if end < items.len() {
        out["nextPageToken"] = json!(format!("cnlb-page-{end:x}"));
    }
    Ok(out)
}
