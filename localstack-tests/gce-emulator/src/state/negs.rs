//! Zonal GCE_VM_IP_PORT network endpoint groups and their endpoints:
//! attach and detach (at most 500 per call), and listNetworkEndpoints with
//! the endpoints' health.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use google_cloud_compute_v1::model as m;
use serde_json::{Value, json};

use super::list::{ListQuery, list_page};
use super::{EndpointKey, Kind, MAX_ENDPOINTS_PER_CALL, Mutating, Mutation, Result, Scope, World};
use crate::error::ApiError;
use crate::util::{from_value, parse_body, to_value};

impl World {
    pub(super) fn check_neg(&self, v: &Value) -> Result<()> {
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

    /// Fixed fields of a NEG: its type, network and subnetwork.
    pub(super) fn finish_neg(&self, v: &mut Value) {
        v["networkEndpointType"] = json!("GCE_VM_IP_PORT");
        v["network"] = json!(self.network_link());
        v["subnetwork"] = json!(self.subnetwork_link());
    }

    /// Checks endpoints for the NEG and returns them normalized: instance
    /// by name, IP and port filled in.
    pub(super) fn check_endpoints(
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
}

pub(super) fn endpoint_key(ep: &m::NetworkEndpoint) -> EndpointKey {
    (
        ep.ip_address.clone().unwrap_or_default(),
        ep.port.unwrap_or(0),
        ep.instance.clone().unwrap_or_default(),
    )
}
