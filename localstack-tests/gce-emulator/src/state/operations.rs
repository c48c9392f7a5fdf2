//! Operations: every mutating call is checked at once, then becomes an
//! operation whose change is applied (and checked again) when it
//! completes; a repeated `requestId` returns the first call's operation.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use google_cloud_compute_v1::model as m;
use serde_json::{Value, json};

use super::negs::endpoint_key;
use super::{API, Kind, Mutating, Mutation, OpRec, Result, Scope, World};
use crate::error::ApiError;
use crate::util::{now_rfc3339, to_value, valid_request_id};

impl World {
    pub fn set_operation_delay(&mut self, d: Duration) {
        self.op_delay = d;
    }

    /// Completes every operation whose time has come, oldest first, and
    /// moves the ones half-way there to RUNNING.
    pub fn advance(&mut self, now: Instant) {
        while let Some((&(due, seq), _)) = self.pending.first_key_value() {
            if due > now {
                break;
            }
            let Some(key) = self.pending.remove(&(due, seq)) else {
                break;
            };
            let mutation = self.ops.get_mut(&key).and_then(|r| r.mutation.take());
            let result = match mutation {
                Some(mu) => self.apply(mu),
                None => Ok(()),
            };
            if let Some(rec) = self.ops.get_mut(&key) {
                let t = now_rfc3339();
                rec.op.status = Some(m::operation::Status::Done);
                rec.op.progress = Some(100);
                rec.op.start_time.get_or_insert_with(|| t.clone());
                rec.op.end_time = Some(t);
                if let Err(e) = result {
                    e.fill_operation(&mut rec.op);
                }
            }
        }
        for key in self.pending.values() {
            if let Some(rec) = self.ops.get_mut(key)
                && rec.op.status == Some(m::operation::Status::Pending)
                && now >= rec.created + (rec.due - rec.created) / 2
            {
                rec.op.status = Some(m::operation::Status::Running);
                rec.op.start_time = Some(now_rfc3339());
            }
        }
    }

    pub fn pending_operations(&self) -> usize {
        self.pending.len()
    }

    /// GET of an operation (`zones/z/operations/name`, ...).
    pub fn operation(&self, scope: &Scope, name: &str) -> Result<Value> {
        match self.ops.get(&(scope.clone(), name.to_string())) {
            Some(r) => to_value(&r.op),
            None => Err(ApiError::not_found(&format!(
                "{}/{}/operations/{name}",
                self.project_path(),
                scope.path()
            ))),
        }
    }

    pub fn operation_done(&self, scope: &Scope, name: &str) -> bool {
        self.ops
            .get(&(scope.clone(), name.to_string()))
            .is_none_or(|r| r.op.status == Some(m::operation::Status::Done))
    }

    /// The common path of every mutating call: a repeated `requestId`
    /// returns the first call's operation and changes nothing; otherwise
    /// `prepare` checks the call and names the change, which becomes an
    /// operation (failing with `fault` instead, if one was injected).
    pub(super) fn mutate(
        &mut self,
        ctx: Mutating,
        prepare: impl FnOnce(&mut World) -> Result<(Scope, &'static str, String, Option<u64>, Mutation)>,
    ) -> Result<Value> {
        let Mutating {
            now,
            request_id,
            fault,
        } = ctx;
        if let Some(rid) = request_id {
            if !valid_request_id(rid) {
                return Err(ApiError::invalid_field(
                    "requestId",
                    rid,
                    "The request ID must be a valid UUID with the exception that zero UUID is not supported.",
                ));
            }
            if let Some(key) = self.request_ids.get(rid).cloned() {
                return self.operation(&key.0, &key.1);
            }
        }
        let (scope, op_type, target, target_id, mutation) = prepare(self)?;
        let mutation = match fault {
            Some(e) => Mutation::Fail(e),
            None => mutation,
        };
        let id = self.id();
        let name = format!("operation-{}-{:x}", unix_millis(), id);
        let mut op = m::Operation::default();
        op.kind = Some("compute#operation".into());
        op.id = Some(id);
        op.name = Some(name.clone());
        op.operation_type = Some(op_type.to_string());
        op.target_link = Some(target);
        op.target_id = target_id;
        op.status = Some(m::operation::Status::Pending);
        op.progress = Some(0);
        op.insert_time = Some(now_rfc3339());
        op.user = Some(format!(
            "cnlb-test@{}.iam.gserviceaccount.com",
            self.cfg.project
        ));
        op.self_link = Some(format!(
            "{API}{}/{}/operations/{name}",
            self.project_path(),
            scope.path()
        ));
        match &scope {
            Scope::Zone(z) => op.zone = Some(self.zone_link(z)),
            Scope::Region(_) => op.region = Some(self.region_link()),
            Scope::Global => {}
        }
        let key = (scope.clone(), name.clone());
        let due = now + self.op_delay;
        self.ops.insert(
            key.clone(),
            OpRec {
                op,
                created: now,
                due,
                mutation: Some(mutation),
            },
        );
        self.pending.insert((due, id), key.clone());
        if let Some(rid) = request_id {
            self.request_ids.insert(rid.to_string(), key.clone());
        }
        // Done at once when there is no delay.
        self.advance(now);
        self.operation(&scope, &name)
    }

    fn apply(&mut self, mutation: Mutation) -> Result<()> {
        // What is probed may change.
        self.generation += 1;
        match mutation {
            Mutation::Fail(e) => Err(e),
            Mutation::Insert {
                kind,
                scope,
                name,
                id,
                value,
            } => {
                if self
                    .resources
                    .contains_key(&(kind, scope.clone(), name.clone()))
                {
                    return Err(ApiError::already_exists(&self.rel(kind, &scope, &name)));
                }
                self.check(kind, &scope, &name, &value)?;
                let v = self.finish(kind, &scope, &name, value, Some(id))?;
                if kind == Kind::Neg
                    && let Scope::Zone(z) = &scope
                {
                    self.endpoints
                        .insert((z.clone(), name.clone()), BTreeMap::new());
                }
                self.resources.insert((kind, scope, name), v);
                Ok(())
            }
            Mutation::Change {
                kind,
                scope,
                name,
                body,
                replace,
            } => {
                let next = self.changed(kind, &scope, &name, &body, replace)?;
                self.resources.insert((kind, scope, name), next);
                Ok(())
            }
            Mutation::Delete { kind, scope, name } => {
                self.check_delete(kind, &scope, &name)?;
                self.resources.remove(&(kind, scope.clone(), name.clone()));
                if let Scope::Zone(z) = &scope {
                    self.endpoints.remove(&(z.clone(), name));
                }
                Ok(())
            }
            Mutation::SetLabels {
                kind,
                scope,
                name,
                labels,
            } => {
                let fp = self.fingerprint();
                let key = (kind, scope.clone(), name.clone());
                let Some(v) = self.resources.get_mut(&key) else {
                    return Err(ApiError::not_found(&self.rel(kind, &scope, &name)));
                };
                v["labels"] = labels;
                v["labelFingerprint"] = json!(fp);
                Ok(())
            }
            Mutation::Endpoints {
                zone,
                neg,
                endpoints,
                attach,
            } => {
                let eps = self.check_endpoints(&zone, &neg, &endpoints)?;
                let set = self.endpoints.entry((zone, neg)).or_default();
                for ep in eps {
                    let key = endpoint_key(&ep);
                    if attach {
                        set.entry(key).or_insert(ep);
                    } else {
                        set.remove(&key);
                    }
                }
                Ok(())
            }
            Mutation::Nic {
                zone,
                instance,
                nic,
            } => self.apply_nic(&zone, &instance, &nic),
            Mutation::Power {
                zone,
                instance,
                start,
            } => {
                let link = self.instance_rel(&zone, &instance);
                let inst = self
                    .instances
                    .get_mut(&(zone, instance))
                    .ok_or_else(|| ApiError::not_found(&link))?;
                inst.status = Some(m::instance::Status::from(if start {
                    "RUNNING"
                } else {
                    "TERMINATED"
                }));
                Ok(())
            }
            Mutation::DeleteInstance { zone, instance } => self.delete_instance(&zone, &instance),
        }
    }
}

/// `operation-<unix millis>`-style names.
fn unix_millis() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}
