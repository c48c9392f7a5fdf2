//! The only writer of a Service's status: `status.loadBalancer` and cnlb's
//! conditions, by server-side apply under cnlb's field manager, so other
//! writers' conditions stay, and only when something in them changed.

use cnlb_provider_core::LoadBalancerIngress;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

use super::{Context, Error, MANAGER};
use crate::conditions::{LOAD_BALANCER_READY, TARGETS_HEALTHY, Wanted, is_current, to_condition};

/// The conditions cnlb writes.
const OWNED: [&str; 2] = [LOAD_BALANCER_READY, TARGETS_HEALTHY];

/// The conditions: as cnlb last wrote them, else as the object says.
fn conditions(ctx: &Context, svc: &Service) -> Vec<Condition> {
    ctx.written(svc).conditions.unwrap_or_else(|| {
        svc.status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default()
    })
}

/// `status.loadBalancer.ingress`: as cnlb last wrote it, else as the
/// object says.
pub(super) fn ingress(ctx: &Context, svc: &Service) -> Value {
    ctx.written(svc).ingress.unwrap_or_else(|| {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.clone())
            .unwrap_or_default();
        serde_json::to_value(ingress).unwrap_or(Value::Array(Vec::new()))
    })
}

fn ingress_json(ingress: &[LoadBalancerIngress]) -> Value {
    ingress
        .iter()
        .map(|i| {
            let mut v = json!({});
            if let Some(h) = &i.hostname {
                v["hostname"] = json!(h);
            }
            if let Some(ip) = &i.ip {
                v["ip"] = json!(ip.to_string());
            }
            if let Some(mode) = i.ip_mode {
                v["ipMode"] = json!(mode.as_str());
            }
            v
        })
        .collect()
}

/// Brings the status to `wanted` conditions (cnlb's others are kept as they
/// are) and to `ingress` (the current one when `None`). No request when
/// the status already says all of it.
pub(super) async fn write(
    ctx: &Context,
    svc: &Service,
    ingress: Option<&[LoadBalancerIngress]>,
    wanted: &[Wanted],
) -> Result<(), Error> {
    let current = conditions(ctx, svc);
    let current_ingress = self::ingress(ctx, svc);
    let ingress = ingress
        .map(ingress_json)
        .unwrap_or_else(|| current_ingress.clone());
    if ingress == current_ingress && wanted.iter().all(|w| is_current(&current, w)) {
        return Ok(());
    }
    let now = Time(Timestamp::now());
    let ours: Vec<Condition> = OWNED
        .iter()
        .filter_map(|type_| match wanted.iter().find(|w| w.type_ == *type_) {
            Some(w) => Some(to_condition(&current, w, now.clone())),
            None => current.iter().find(|c| c.type_ == *type_).cloned(),
        })
        .collect();
    let updated = apply(
        ctx,
        svc,
        json!({"loadBalancer": {"ingress": ingress}, "conditions": ours}),
    )
    .await?;
    // Other writers' conditions are theirs: only ours are remembered, and
    // compared (is_current looks each of ours up by type).
    ctx.wrote(svc, &updated, |w| {
        w.ingress = Some(ingress);
        w.conditions = Some(ours);
    });
    Ok(())
}

/// Removes everything cnlb wrote in the status (for a Service it no longer
/// manages).
pub(super) async fn clear(ctx: &Context, svc: &Service) -> Result<(), Error> {
    apply(ctx, svc, json!({})).await.map(drop)
}

/// Applies `status`; the server's answer.
async fn apply(ctx: &Context, svc: &Service, status: Value) -> Result<Service, Error> {
    let api: Api<Service> =
        Api::namespaced(ctx.client.clone(), &svc.namespace().unwrap_or_default());
    let body = json!({"apiVersion": "v1", "kind": "Service", "status": status});
    Ok(api
        .patch_status(
            &svc.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(body),
        )
        .await?)
}
