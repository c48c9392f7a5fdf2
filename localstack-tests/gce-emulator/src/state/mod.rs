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
//!
//! One job per file: the shared store, its types and the call path are
//! here; `kind.rs` names the collections and scopes, `links.rs` builds and
//! resolves references, `knobs.rs` holds the emulator's own knobs (faults,
//! quotas, call counts, the dump), `operations.rs` runs mutating calls as
//! operations, `resources.rs` is the generic get/list/insert/patch/delete of
//! the resources created through the API and `references.rs` refuses
//! deletes of resources in use; then one file per kind: `negs.rs` (and their
//! endpoints), `health_checks.rs`, `backend_services.rs`, `forwarding.rs`
//! (target TCP proxies and forwarding rules), `addresses.rs` (and IP
//! allocation), `firewalls.rs`, `network.rs` (the static region, zones,
//! network and subnetwork), `instances.rs` and `alias_ranges.rs`;
//! `health.rs` is the endpoints' health (the prober is [`crate::health`])
//! and `list.rs` the paging and filtering of list calls.

mod addresses;
mod alias_ranges;
mod backend_services;
mod firewalls;
mod forwarding;
mod health;
mod health_checks;
mod instances;
mod kind;
mod knobs;
mod links;
mod list;
mod negs;
mod network;
mod operations;
mod references;
mod resources;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use google_cloud_compute_v1::model as m;
use serde_json::Value;

use super::admin::{Calls, Fault, WorldConfig};
use super::cidr::Cidr;
use super::config::{GceOptions, QuotaGroup};
use super::error::ApiError;

pub use health::{Health, HealthKey, Probe, ProbeJob};
pub use kind::{Kind, Scope};
pub use list::ListQuery;

use health::HealthEntry;

/// The base of every `selfLink`, as GCE writes them.
pub const API: &str = "https://www.googleapis.com/compute/v1/";
/// External addresses come from here (TEST-NET-3, documentation only).
pub const EXTERNAL_POOL: Cidr = Cidr::v4([203, 0, 113, 0], 24);
/// GCE's cap on endpoints per attach/detach call.
pub const MAX_ENDPOINTS_PER_CALL: usize = 500;
/// Default and largest page of list calls.
pub const MAX_PAGE: usize = 500;

pub type Result<T> = std::result::Result<T, ApiError>;

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
    /// The last result of each probe, shared for the probe floor.
    probed: HashMap<health::ProbeKey, (Instant, bool)>,
    /// Counts applied mutations: the probe targets are worked out again
    /// only after one.
    generation: u64,
    /// The probe targets, as of a generation, and when worked out.
    probe_targets: Option<(u64, Instant, Vec<health::Target>)>,
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
            probed: HashMap::new(),
            generation: 0,
            probe_targets: None,
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
}
