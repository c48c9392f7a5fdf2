//! What refers to what: a resource in use by another cannot be deleted.

use serde_json::Value;

use super::{API, Kind, Result, Scope, World};
use crate::error::ApiError;

impl World {
    /// Resources that reference `(kind, scope, name)`.
    pub(super) fn users_of(&self, kind: Kind, scope: &Scope, name: &str) -> Vec<String> {
        let mut out = Vec::new();
        let refers = |v: Option<&Value>, target: Kind, default: &Scope| -> bool {
            v.and_then(Value::as_str).is_some_and(|s| {
                self.parse_ref(s, default).is_some_and(|(c, sc, n)| {
                    (c.is_empty() || c == target.collection()) && sc == *scope && n == name
                })
            })
        };
        for ((k, s, n), v) in &self.resources {
            let used = match (kind, k) {
                (Kind::Neg, Kind::BackendService) => v
                    .get("backends")
                    .and_then(Value::as_array)
                    .is_some_and(|bs| bs.iter().any(|b| refers(b.get("group"), kind, s))),
                (Kind::HealthCheck, Kind::BackendService) => v
                    .get("healthChecks")
                    .and_then(Value::as_array)
                    .is_some_and(|hs| hs.iter().any(|h| refers(Some(h), kind, s))),
                (Kind::BackendService, Kind::TargetTcpProxy) => refers(v.get("service"), kind, s),
                (Kind::BackendService, Kind::ForwardingRule) => {
                    refers(v.get("backendService"), kind, s)
                }
                (Kind::TargetTcpProxy, Kind::ForwardingRule) => refers(v.get("target"), kind, s),
                (Kind::Address, Kind::ForwardingRule) => {
                    let ip = self
                        .resources
                        .get(&(Kind::Address, scope.clone(), name.to_string()))
                        .and_then(|a| a.get("address"))
                        .and_then(Value::as_str);
                    s == scope && ip.is_some() && v.get("IPAddress").and_then(Value::as_str) == ip
                }
                _ => false,
            };
            if used {
                out.push(self.link(*k, s, n));
            }
        }
        out
    }

    pub(super) fn check_delete(&self, kind: Kind, scope: &Scope, name: &str) -> Result<()> {
        self.stored(kind, scope, name)?;
        if let Some(user) = self.users_of(kind, scope, name).first() {
            return Err(ApiError::in_use(
                kind.label(),
                &self.rel(kind, scope, name),
                user.trim_start_matches(API),
            ));
        }
        Ok(())
    }
}
