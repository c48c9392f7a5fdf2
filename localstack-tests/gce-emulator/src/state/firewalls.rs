//! Global firewall rules: network, allowed or denied, ranges, priority.

use serde_json::{Value, json};

use super::resources::set_default;
use super::{Result, World};
use crate::cidr::Cidr;
use crate::error::ApiError;

impl World {
    pub(super) fn check_firewall(&self, v: &Value) -> Result<()> {
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

    /// Defaults of a firewall rule.
    pub(super) fn finish_firewall(&self, v: &mut Value) {
        set_default(v, "network", json!(self.network_link()));
        set_default(v, "priority", json!(1000));
        set_default(v, "direction", json!("INGRESS"));
        set_default(v, "disabled", json!(false));
        if v.get("direction").and_then(Value::as_str) == Some("INGRESS") {
            set_default(v, "sourceRanges", json!(["0.0.0.0/0"]));
        }
    }
}
