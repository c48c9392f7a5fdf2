//! The emulator's own knobs: every call counted, injected faults and rate
//! quotas applied on admission, and the dump of every resource.

use std::time::{Duration, Instant};

use super::{FaultRec, Kind, Result, Scope, World};
use crate::admin::{Calls, Fault, NegDump, Resources};
use crate::config::QuotaGroup;
use crate::error::ApiError;
use crate::util::from_value;

impl World {
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

fn default_fault_message(reason: &str, method: &str) -> String {
    match reason {
        "rateLimitExceeded" => format!("Rate Limit Exceeded (injected, {method})"),
        other => format!("{other} (injected, {method})"),
    }
}
