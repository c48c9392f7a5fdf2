//! Region backend services: at most one health check, zonal NEGs as
//! backends (each once), and a fingerprint that changes with every update.

use serde_json::{Value, json};

use super::resources::set_default;
use super::{API, Kind, Result, Scope, World};
use crate::error::ApiError;

impl World {
    pub(super) fn check_backend_service(&self, scope: &Scope, v: &Value) -> Result<()> {
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

    /// Defaults of a backend service, and its new fingerprint.
    pub(super) fn finish_backend_service(&mut self, v: &mut Value) {
        v["fingerprint"] = json!(self.fingerprint());
        set_default(v, "timeoutSec", json!(30));
        set_default(v, "protocol", json!("TCP"));
        set_default(v, "loadBalancingScheme", json!("EXTERNAL_MANAGED"));
        set_default(v, "connectionDraining", json!({"drainingTimeoutSec": 0}));
    }
}
