//! The endpoints' health under each health check: which endpoints are
//! probed and how, the probes due, their results against the thresholds,
//! and health forced through the admin API. The prober itself is
//! [`crate::health`].
//!
//! Checks that probe the same endpoint the same way share one probe: those
//! due together get one job, and a result stays good for the others for
//! the probe floor (`--health-check-min-interval-ms`). A hundred Services
//! in front of the same Pods thus cost what one does, as their answers
//! would be the same.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::health_checks::probe_of;
use super::{Kind, Scope, World};
use crate::admin::HealthRow;

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
pub(super) struct HealthEntry {
    state: Health,
    successes: u32,
    failures: u32,
    next_probe: Instant,
    in_flight: bool,
    probes: u64,
}

/// What a probe does.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
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

/// One probe to run now, for every check in `checks`.
#[derive(Clone, Debug)]
pub struct ProbeJob {
    pub addr: SocketAddrV4,
    pub probe: Probe,
    pub timeout: Duration,
    checks: Vec<Check>,
}

/// One health check's view of an endpoint: its key and thresholds.
#[derive(Clone, Debug)]
struct Check {
    key: HealthKey,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
}

/// A probe of one endpoint, and how it is done: what checks can share.
pub(super) type ProbeKey = (SocketAddrV4, Probe);

/// One endpoint under one health check, with how it is probed and when
/// next.
pub(super) struct Target {
    check: Check,
    probe: Probe,
    probe_port: u16,
    interval: Duration,
    timeout: Duration,
    next_probe: Instant,
}

impl World {
    /// (backend service link, health check link, forwarding rule link) for
    /// every backend service that has the NEG as a backend and a health check.
    pub(super) fn health_refs(
        &self,
        zone: &str,
        neg: &str,
    ) -> Vec<(String, String, Option<String>)> {
        let region = Scope::Region(self.cfg.region.clone());
        let mut out = Vec::new();
        for ((k, s, n), bs) in &self.resources {
            if *k != Kind::BackendService || !self.negs_of(bs).any(|(z, g)| z == zone && g == neg) {
                continue;
            }
            let Some(hc_link) = self.health_check_of(bs) else {
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
            out.push((bs_link, hc_link, fr));
        }
        out
    }

    pub(super) fn health_of(&self, hc_link: &str, ip: Ipv4Addr, port: u16) -> Health {
        if let Some(h) = self.forced.get(&(ip, port)) {
            return *h;
        }
        self.health
            .get(&(hc_link.to_string(), ip, port))
            .map_or(Health::Unknown, |e| e.state)
    }

    /// Health check links per zonal NEG `(zone, name)` that is a backend
    /// of a backend service with a health check: one pass over the
    /// backend services.
    fn neg_health_checks(&self) -> HashMap<(String, String), Vec<String>> {
        let mut out: HashMap<(String, String), Vec<String>> = HashMap::new();
        for ((k, _, _), bs) in &self.resources {
            if *k != Kind::BackendService {
                continue;
            }
            let Some(hc_link) = self.health_check_of(bs) else {
                continue;
            };
            for neg in self.negs_of(bs) {
                out.entry(neg).or_default().push(hc_link.clone());
            }
        }
        out
    }

    /// The zonal NEGs `(zone, name)` among a backend service's backends.
    fn negs_of<'a>(&'a self, bs: &'a Value) -> impl Iterator<Item = (String, String)> + 'a {
        bs.get("backends")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|b| b.get("group").and_then(Value::as_str))
            .filter_map(|g| match self.parse_ref(g, &Scope::Global)? {
                (c, Scope::Zone(zone), name) if c.is_empty() || c == "networkEndpointGroups" => {
                    Some((zone, name))
                }
                _ => None,
            })
    }

    /// The link of a backend service's health check (GCE uses the first).
    fn health_check_of(&self, bs: &Value) -> Option<String> {
        let region = Scope::Region(self.cfg.region.clone());
        let hc = bs
            .get("healthChecks")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .and_then(|h| self.resolve(Kind::HealthCheck, h, &region))?;
        Some(self.link(Kind::HealthCheck, &hc.0, &hc.1))
    }

    /// Endpoints under a backend service with a health check, with what
    /// to probe.
    fn health_targets(&self, now: Instant) -> Vec<Target> {
        let mut out = Vec::new();
        let scale = self.cfg.health_check_time_scale;
        let floor = Duration::from_millis(self.cfg.health_check_min_interval_ms);
        for (neg, hc_links) in self.neg_health_checks() {
            let Some(eps) = self.endpoints.get(&neg) else {
                continue;
            };
            for hc_link in hc_links {
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
                    let key = (hc_link.clone(), ip, port);
                    let next_probe = self.health.get(&key).map_or(now, |e| e.next_probe);
                    out.push(Target {
                        next_probe,
                        check: Check {
                            key,
                            healthy_threshold: th("healthyThreshold"),
                            unhealthy_threshold: th("unhealthyThreshold"),
                        },
                        probe: probe.clone(),
                        probe_port: fixed_port.unwrap_or(port),
                        interval,
                        timeout,
                    });
                }
            }
        }
        out
    }

    /// Probes due now (each marked in flight until recorded); forgets the
    /// health of endpoints no longer under a health check. A check due
    /// within the floor of a probe of the same endpoint done the same way
    /// takes its result; checks due together share a job.
    pub fn health_due(&mut self, now: Instant) -> Vec<ProbeJob> {
        let floor = Duration::from_millis(self.cfg.health_check_min_interval_ms);
        // Worked out again after a change, at most once per floor: a new
        // endpoint is probed within the floor, as often as any can be.
        let (generation, built, mut targets) = match self.probe_targets.take() {
            Some((generation, built, targets))
                if generation == self.generation
                    || now.saturating_duration_since(built) < floor =>
            {
                (generation, built, targets)
            }
            _ => {
                let targets = self.health_targets(now);
                let keys: HashSet<&HealthKey> = targets.iter().map(|t| &t.check.key).collect();
                self.health.retain(|k, _| keys.contains(k));
                (self.generation, now, targets)
            }
        };
        self.probed
            .retain(|_, (at, _)| now.saturating_duration_since(*at) < floor);
        let mut jobs: HashMap<ProbeKey, ProbeJob> = HashMap::new();
        let mut shared = Vec::new();
        for t in &mut targets {
            if t.next_probe > now {
                continue;
            }
            let e = self
                .health
                .entry(t.check.key.clone())
                .or_insert(HealthEntry {
                    state: Health::Unknown,
                    successes: 0,
                    failures: 0,
                    next_probe: now,
                    in_flight: false,
                    probes: 0,
                });
            if e.in_flight || e.next_probe > now {
                // Looked up again when due (a rebuild starts every target
                // at `now`).
                t.next_probe = e.next_probe;
                continue;
            }
            e.next_probe = now + t.interval;
            t.next_probe = e.next_probe;
            let addr = SocketAddrV4::new(t.check.key.1, t.probe_port);
            let probe_key = (addr, t.probe.clone());
            if let Some((_, ok)) = self.probed.get(&probe_key) {
                shared.push((t.check.clone(), *ok));
                continue;
            }
            e.in_flight = true;
            let job = jobs
                .entry(probe_key)
                .or_insert_with_key(|(addr, probe)| ProbeJob {
                    addr: *addr,
                    probe: probe.clone(),
                    timeout: t.timeout,
                    checks: Vec::new(),
                });
            job.timeout = job.timeout.min(t.timeout);
            job.checks.push(t.check.clone());
        }
        self.probe_targets = Some((generation, built, targets));
        for (check, ok) in shared {
            self.count(&check, ok);
        }
        jobs.into_values().collect()
    }

    /// A job's probe answered `ok` (or not) at `now`.
    pub fn health_record(&mut self, job: &ProbeJob, ok: bool, now: Instant) {
        self.probed.insert((job.addr, job.probe.clone()), (now, ok));
        for check in &job.checks {
            if let Some(e) = self.health.get_mut(&check.key) {
                e.in_flight = false;
            }
            self.count(check, ok);
        }
    }

    /// One probe result for `check`, against its thresholds.
    fn count(&mut self, check: &Check, ok: bool) {
        let Some(e) = self.health.get_mut(&check.key) else {
            return;
        };
        e.probes += 1;
        if ok {
            e.successes += 1;
            e.failures = 0;
            if e.successes >= check.healthy_threshold {
                e.state = Health::Healthy;
            }
        } else {
            e.failures += 1;
            e.successes = 0;
            if e.failures >= check.unhealthy_threshold {
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
}
