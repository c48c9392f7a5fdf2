//! The resources created through the API (NEGs, health checks, backend
//! services, target TCP proxies, forwarding rules, addresses, firewalls),
//! whatever their kind: get, list, insert, patch and update, delete and
//! setLabels, and the per-kind checks and defaults they go through.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::forwarding::finish_target_tcp_proxy;
use super::health_checks::{check_health_check, finish_health_check};
use super::list::{ListQuery, list_page};
use super::{API, Kind, Mutating, Mutation, Result, Scope, World};
use crate::config::valid_name;
use crate::error::ApiError;
use crate::util::{merge_patch, now_rfc3339, parse_body};

impl World {
    pub(super) fn stored(&self, kind: Kind, scope: &Scope, name: &str) -> Result<&Value> {
        self.resources
            .get(&(kind, scope.clone(), name.to_string()))
            .ok_or_else(|| ApiError::not_found(&self.rel(kind, scope, name)))
    }

    /// What GET returns: the stored resource plus derived fields.
    pub(super) fn render(&self, kind: Kind, scope: &Scope, name: &str, v: &Value) -> Value {
        let mut v = v.clone();
        match kind {
            Kind::Neg => {
                let n = match scope {
                    Scope::Zone(z) => self
                        .endpoints
                        .get(&(z.clone(), name.to_string()))
                        .map_or(0, BTreeMap::len),
                    _ => 0,
                };
                v["size"] = json!(n);
            }
            Kind::Address => {
                let ip = v.get("address").and_then(Value::as_str).unwrap_or("");
                let users: Vec<String> = self
                    .resources
                    .iter()
                    .filter(|((k, s, _), fr)| {
                        *k == Kind::ForwardingRule
                            && s == scope
                            && fr.get("IPAddress").and_then(Value::as_str) == Some(ip)
                    })
                    .map(|((k, s, n), _)| self.link(*k, s, n))
                    .collect();
                v["status"] = json!(if users.is_empty() {
                    "RESERVED"
                } else {
                    "IN_USE"
                });
                if !users.is_empty() {
                    v["users"] = json!(users);
                }
            }
            _ => {}
        }
        v
    }

    pub fn get(&self, kind: Kind, scope: &Scope, name: &str) -> Result<Value> {
        let v = self.stored(kind, scope, name)?;
        Ok(self.render(kind, scope, name, v))
    }

    pub fn list(&self, kind: Kind, scope: &Scope, q: &ListQuery) -> Result<Value> {
        let items: Vec<Value> = self
            .resources
            .iter()
            .filter(|((k, s, _), _)| *k == kind && s == scope)
            .map(|((_, s, n), v)| self.render(kind, s, n, v))
            .collect();
        let kind_list = format!("{}List", kind.resource_kind());
        let self_link = format!(
            "{API}{}/{}/{}",
            self.project_path(),
            scope.path(),
            kind.collection()
        );
        list_page(items, q, &kind_list, &self_link)
    }

    pub fn insert(
        &mut self,
        kind: Kind,
        scope: &Scope,
        body: &[u8],
        ctx: Mutating,
    ) -> Result<Value> {
        let scope = scope.clone();
        self.mutate(ctx, move |w| {
            let raw: Value = parse_body(body)?;
            if !raw.is_object() {
                return Err(ApiError::invalid(
                    "Invalid JSON payload received. Expected an object.",
                ));
            }
            let value = kind.canonical(&raw)?;
            let name = value
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::required("resource.name"))?
                .to_string();
            if !valid_name(&name) {
                return Err(ApiError::invalid_field(
                    "resource.name",
                    &name,
                    "Must be a match of regex '(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)'",
                ));
            }
            // Only pending operations still hold their mutation.
            let pending_insert = w.pending.values().filter_map(|op| w.ops.get(op)).any(|r| {
                matches!(&r.mutation, Some(Mutation::Insert { kind: k, scope: s, name: n, .. })
                    if *k == kind && *s == scope && *n == name)
            });
            if pending_insert
                || w.resources
                    .contains_key(&(kind, scope.clone(), name.clone()))
            {
                return Err(ApiError::already_exists(&w.rel(kind, &scope, &name)));
            }
            w.check(kind, &scope, &name, &value)?;
            let id = w.id();
            let link = w.link(kind, &scope, &name);
            Ok((
                scope.clone(),
                "insert",
                link,
                Some(id),
                Mutation::Insert {
                    kind,
                    scope,
                    name,
                    id,
                    value,
                },
            ))
        })
    }

    /// PATCH (merge) or PUT (`replace`).
    pub fn change(
        &mut self,
        kind: Kind,
        scope: &Scope,
        name: &str,
        body: &[u8],
        replace: bool,
        ctx: Mutating,
    ) -> Result<Value> {
        let scope = scope.clone();
        let name = name.to_string();
        self.mutate(ctx, move |w| {
            let body: Value = parse_body(body)?;
            if !body.is_object() {
                return Err(ApiError::invalid(
                    "Invalid JSON payload received. Expected an object.",
                ));
            }
            // Checked now, applied (and checked again) when the operation completes.
            w.changed(kind, &scope, &name, &body, replace)?;
            let target = w.stored(kind, &scope, &name)?;
            let id = target
                .get("id")
                .and_then(Value::as_str)
                .and_then(|s| s.parse().ok());
            let link = w.link(kind, &scope, &name);
            Ok((
                scope.clone(),
                if replace { "update" } else { "patch" },
                link,
                id,
                Mutation::Change {
                    kind,
                    scope,
                    name,
                    body,
                    replace,
                },
            ))
        })
    }

    /// The resource after a PATCH or PUT with `body`, checked.
    pub(super) fn changed(
        &mut self,
        kind: Kind,
        scope: &Scope,
        name: &str,
        body: &Value,
        replace: bool,
    ) -> Result<Value> {
        let current = self.stored(kind, scope, name)?.clone();
        if let Some(n) = body.get("name").and_then(Value::as_str)
            && n != name
        {
            return Err(ApiError::invalid_field(
                "resource.name",
                n,
                "The name of a resource cannot be changed.",
            ));
        }
        if let (Some(given), Some(have)) = (body.get("fingerprint"), current.get("fingerprint"))
            && given != have
        {
            return Err(ApiError::condition_not_met(format!(
                "Supplied fingerprint does not match current fingerprint of '{}'.",
                self.rel(kind, scope, name)
            )));
        }
        let mut next = if replace {
            body.clone()
        } else {
            let mut c = current.clone();
            merge_patch(&mut c, body);
            c
        };
        let next_obj = next
            .as_object_mut()
            .ok_or_else(|| ApiError::invalid("Invalid JSON payload received."))?;
        // Output-only and immutable fields; labels change through setLabels.
        for k in [
            "id",
            "selfLink",
            "creationTimestamp",
            "kind",
            "name",
            "region",
            "zone",
            "IPAddress",
            "labels",
            "labelFingerprint",
        ] {
            match current.get(k) {
                Some(v) => {
                    next_obj.insert(k.to_string(), v.clone());
                }
                None => {
                    next_obj.remove(k);
                }
            }
        }
        let next = kind.canonical(&next)?;
        self.check(kind, scope, name, &next)?;
        self.finish(kind, scope, name, next, None)
    }

    pub fn delete(
        &mut self,
        kind: Kind,
        scope: &Scope,
        name: &str,
        ctx: Mutating,
    ) -> Result<Value> {
        let scope = scope.clone();
        let name = name.to_string();
        self.mutate(ctx, move |w| {
            w.check_delete(kind, &scope, &name)?;
            let id = w
                .stored(kind, &scope, &name)?
                .get("id")
                .and_then(Value::as_str)
                .and_then(|s| s.parse().ok());
            let link = w.link(kind, &scope, &name);
            Ok((
                scope.clone(),
                "delete",
                link,
                id,
                Mutation::Delete { kind, scope, name },
            ))
        })
    }

    pub fn set_labels(
        &mut self,
        kind: Kind,
        scope: &Scope,
        name: &str,
        body: &[u8],
        ctx: Mutating,
    ) -> Result<Value> {
        let scope = scope.clone();
        let name = name.to_string();
        self.mutate(ctx, move |w| {
            let body: Value = parse_body(body)?;
            let current = w.stored(kind, &scope, &name)?;
            if body.get("labelFingerprint") != current.get("labelFingerprint") {
                return Err(ApiError::condition_not_met(format!(
                    "Labels fingerprint either invalid or resource labels have changed for '{}'.",
                    w.rel(kind, &scope, &name)
                )));
            }
            let labels = body.get("labels").cloned().unwrap_or_else(|| json!({}));
            if !labels
                .as_object()
                .is_some_and(|o| o.values().all(Value::is_string))
            {
                return Err(ApiError::invalid_field(
                    "labels",
                    &labels.to_string(),
                    "Labels must map strings to strings.",
                ));
            }
            let id = current
                .get("id")
                .and_then(Value::as_str)
                .and_then(|s| s.parse().ok());
            let link = w.link(kind, &scope, &name);
            Ok((
                scope.clone(),
                "setLabels",
                link,
                id,
                Mutation::SetLabels {
                    kind,
                    scope,
                    name,
                    labels,
                },
            ))
        })
    }

    /// What GCE checks on insert and update, for `v` in canonical form.
    pub(super) fn check(&self, kind: Kind, scope: &Scope, name: &str, v: &Value) -> Result<()> {
        match kind {
            Kind::Neg => self.check_neg(v),
            Kind::HealthCheck => check_health_check(v),
            Kind::BackendService => self.check_backend_service(scope, v),
            Kind::TargetTcpProxy => self.check_target_tcp_proxy(scope, v),
            Kind::ForwardingRule => self.check_forwarding_rule(scope, name, v),
            Kind::Address => self.check_address(name, v),
            Kind::Firewall => self.check_firewall(v),
        }
    }

    /// Output fields and defaults; `Some(id)` for a new resource (which
    /// also gets its addresses allocated).
    pub(super) fn finish(
        &mut self,
        kind: Kind,
        scope: &Scope,
        name: &str,
        mut v: Value,
        new_id: Option<u64>,
    ) -> Result<Value> {
        if let Some(id) = new_id {
            v["id"] = json!(id.to_string());
            v["creationTimestamp"] = json!(now_rfc3339());
            v["selfLink"] = json!(self.link(kind, scope, name));
            v["kind"] = json!(kind.resource_kind());
            v["name"] = json!(name);
            match scope {
                Scope::Zone(z) => v["zone"] = json!(self.zone_link(z)),
                Scope::Region(_) => v["region"] = json!(self.region_link()),
                Scope::Global => {}
            }
        }
        match kind {
            Kind::Neg => self.finish_neg(&mut v),
            Kind::HealthCheck => finish_health_check(&mut v)?,
            Kind::BackendService => self.finish_backend_service(&mut v),
            Kind::TargetTcpProxy => finish_target_tcp_proxy(&mut v),
            Kind::ForwardingRule => self.finish_forwarding_rule(scope, &mut v, new_id)?,
            Kind::Address => self.finish_address(&mut v, new_id)?,
            Kind::Firewall => self.finish_firewall(&mut v),
        }
        kind.canonical(&v)
    }
}

/// Sets `k` to `d` unless it has a (non-null) value.
pub(super) fn set_default(v: &mut Value, k: &str, d: Value) {
    if v.get(k).is_none_or(Value::is_null) {
        v[k] = d;
    }
}
