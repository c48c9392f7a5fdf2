//! Region target TCP proxies and forwarding rules: what they point at,
//! their load balancing scheme, and the address a forwarding rule takes
//! (reserved, explicit or allocated).

use std::net::Ipv4Addr;

use serde_json::{Value, json};

use super::resources::set_default;
use super::{Kind, Result, Scope, World};
use crate::error::ApiError;

impl World {
    /// A target TCP proxy's backend service exists.
    pub(super) fn check_target_tcp_proxy(&self, scope: &Scope, v: &Value) -> Result<()> {
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

    pub(super) fn check_forwarding_rule(&self, scope: &Scope, name: &str, v: &Value) -> Result<()> {
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

    /// Defaults of a forwarding rule, its new fingerprints, and for a new
    /// one (`new_id`) its address.
    pub(super) fn finish_forwarding_rule(
        &mut self,
        scope: &Scope,
        v: &mut Value,
        new_id: Option<u64>,
    ) -> Result<()> {
        let internal = World::scheme_internal(v)?;
        set_default(v, "loadBalancingScheme", json!("EXTERNAL"));
        set_default(v, "IPProtocol", json!("TCP"));
        v["fingerprint"] = json!(self.fingerprint());
        set_default(v, "labelFingerprint", json!(self.fingerprint()));
        if internal {
            set_default(v, "network", json!(self.network_link()));
            set_default(v, "subnetwork", json!(self.subnetwork_link()));
        } else {
            set_default(v, "networkTier", json!("PREMIUM"));
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
        Ok(())
    }
}

/// Defaults of a target TCP proxy.
pub(super) fn finish_target_tcp_proxy(v: &mut Value) {
    set_default(v, "proxyHeader", json!("NONE"));
}
