//! The endpoints' health under each health check: which endpoints are
//! probed and how, the probes due, their results against the thresholds,
//! and health forced through the admin API. The prober itself is
//! [`crate::health`].

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

    pub(super) fn health_of(&self, hc_link: &str, ip: Ipv4Addr, port: u16) -> Health {
        if let Some(h) = self.forced.get(&(ip, port)) {
            return *h;
        }
        self.health
            .get(&(hc_link.to_string(), ip, port))
            .map_or(Health::Unknown, |e| e.state)
    }

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
}
