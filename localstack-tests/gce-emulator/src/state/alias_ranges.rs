//! Alias IP ranges of instances (`nic0`): from the primary range or a
//! secondary range by name, checked against every other instance's
//! ranges and primary IP, `/n` requests allocated.

use std::net::Ipv4Addr;

use google_cloud_compute_v1::model as m;

use super::{Result, World};
use crate::cidr::Cidr;
use crate::error::ApiError;

impl World {
    pub(super) fn alias_ranges_of(i: &m::Instance) -> Vec<(Cidr, Option<String>)> {
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
    pub(super) fn used_ranges(&self, parent: Cidr, except: (&str, &str)) -> Vec<(Cidr, String)> {
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
    pub(super) fn resolve_alias_ranges(
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
}
