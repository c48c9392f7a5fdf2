//! Region addresses, and the IPs of the subnetwork's primary range and of
//! the external pool: which are in use, the first free one, and whether an
//! explicitly requested one may be taken.

use std::net::Ipv4Addr;

use serde_json::{Value, json};

use super::resources::set_default;
use super::{EXTERNAL_POOL, Kind, Result, World};
use crate::cidr::Cidr;
use crate::error::ApiError;

impl World {
    /// IPs in use in the subnetwork's primary range (internal) or the
    /// external pool, except by the resource `(kind, name)`.
    pub(super) fn used_ips(&self, internal: bool, except: Option<(Kind, &str)>) -> Vec<Ipv4Addr> {
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

    pub(super) fn allocate_ip(&self, internal: bool) -> Result<Ipv4Addr> {
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
    pub(super) fn check_explicit_ip(
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

    pub(super) fn check_address(&self, name: &str, v: &Value) -> Result<()> {
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

    /// Defaults of an address, and for a new one (`new_id`) without an
    /// explicit address its allocated one.
    pub(super) fn finish_address(&mut self, v: &mut Value, new_id: Option<u64>) -> Result<()> {
        let internal = v.get("addressType").and_then(Value::as_str) == Some("INTERNAL");
        v["addressType"] = json!(if internal { "INTERNAL" } else { "EXTERNAL" });
        set_default(v, "labelFingerprint", json!(self.fingerprint()));
        set_default(v, "ipVersion", json!("IPV4"));
        if internal {
            set_default(v, "subnetwork", json!(self.subnetwork_link()));
            set_default(v, "purpose", json!("GCE_ENDPOINT"));
        } else {
            set_default(v, "networkTier", json!("PREMIUM"));
        }
        if new_id.is_some() && v.get("address").is_none() {
            v["address"] = json!(self.allocate_ip(internal)?.to_string());
        }
        v["prefixLength"] = json!(32);
        Ok(())
    }
}
