//! Targets follow the endpoints: every listener's targets are brought to
//! the Service's EndpointSlices (from the store) as deltas against what is
//! registered; then, while it is worth knowing, the cloud is asked for
//! their health, which opens readiness gates and says in the status
//! whether traffic can flow.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cnlb_provider_core::{
    HealthCheck, LoadBalancerIngress, LoadBalancerSpec, ProviderError, ResourceIds, TargetSet,
    diff_targets, registered_targets,
};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use serde_json::json;
use sha2::{Digest, Sha256};
use tracing::info;

use super::{Context, Error, REGISTERED_ANNOTATION, gates, status};
use crate::conditions::{
    LOAD_BALANCER_READY, Wanted, health_unsettled, targets_health_final, targets_healthy,
};
use crate::targets::{SliceTargets, awaiting_gate, desired_targets, serving_behind_gate};

/// The Service's EndpointSlices, from the cache.
pub(super) fn slices(ctx: &Context, svc: &Service) -> Vec<Arc<SliceTargets>> {
    let namespace = svc.namespace().unwrap_or_default();
    ctx.stores.slices.of_service(&namespace, &svc.name_any())
}

/// Brings the targets of `spec`'s listeners to the endpoints, then writes
/// the status: `ingress` (the current one when `None`), the load balancer
/// condition `lb`, and the targets' health when it was read. A target
/// group that is not the Service's (its IDs are an annotation anyone who
/// may edit the Service can write) is said in the condition instead.
pub(super) async fn targets(
    ctx: &Context,
    svc: &Service,
    spec: &LoadBalancerSpec,
    ids: &ResourceIds,
    ingress: Option<&[LoadBalancerIngress]>,
    lb: Wanted,
) -> Result<Action, Error> {
    match follow(ctx, svc, spec, ids, ingress, lb).await {
        Err(Error::Provider(err)) if matches!(err, ProviderError::Conflict { .. }) => {
            let lb = Wanted::new(LOAD_BALANCER_READY, false, "Conflict", err.to_string());
            status::write(ctx, svc, None, &[lb]).await?;
            Err(err.into())
        }
        other => other,
    }
}

async fn follow(
    ctx: &Context,
    svc: &Service,
    spec: &LoadBalancerSpec,
    ids: &ResourceIds,
    ingress: Option<&[LoadBalancerIngress]>,
    lb: Wanted,
) -> Result<Action, Error> {
    let uid = spec.key.uid.clone();
    let slices = slices(ctx, svc);
    let pods = gates::endpoint_pods(ctx, &svc.namespace().unwrap_or_default(), &slices);
    let awaiting = awaiting_gate(pods.iter().map(|p| p.as_ref()));
    let serving = serving_behind_gate(pods.iter().map(|p| p.as_ref()));
    let desired = desired_targets(&spec.listeners, slices.iter().map(|s| s.as_ref()), &serving);

    // After a start, or after an ensure, the cloud says what is registered
    // (that read doubles as the first health poll), unless what the last
    // sync recorded is what the endpoints want now.
    let mut health = None;
    let remembered = ctx.registered(&uid);
    let fresh = remembered.is_none();
    let recorded = ctx
        .written(svc)
        .registered
        .or_else(|| svc.annotations().get(REGISTERED_ANNOTATION).cloned());
    let wanted = wanting_traffic(spec, &desired);
    let mut registered = match remembered {
        Some(r) => r,
        None if recorded == Some(digest(ids, &wanted)) => wanted,
        None => {
            let h = ctx.provider.target_health(&spec.key, ids).await?;
            let r = spec
                .listeners
                .iter()
                .map(|l| (l.name.clone(), registered_targets(&h, &l.name)))
                .collect();
            health = Some(h);
            r
        }
    };
    let mut changes = 0;
    for listener in &spec.listeners {
        let current = registered.entry(listener.name.clone()).or_default();
        let want = desired.get(&listener.name).cloned().unwrap_or_default();
        let delta = diff_targets(current, &want);
        if delta.is_empty() {
            continue;
        }
        changes += delta.len();
        ctx.provider
            .sync_targets(&spec.key, listener, &delta, ids)
            .await?;
        delta.apply_to(current);
    }
    ctx.remember_registered(&uid, registered.clone());
    if changes > 0 {
        info!(service = %spec.key.service(), changes, "targets synced");
    }
    let now = digest(ids, &wanting_traffic(spec, &registered));
    if recorded.as_ref() != Some(&now) {
        record(ctx, svc, now).await?;
    }

    // Health is worth a call after a change, while a gate waits, and while
    // the cloud has not decided on every target yet; never at rest. Just
    // after a change the cloud has no verdict on the new targets yet: the
    // first poll comes later, and this reconcile frees its slot.
    let mut wanted = vec![lb];
    if changes > 0 {
        status::write(ctx, svc, ingress, &wanted).await?;
        let verdict = earliest_verdict(&spec.health_check);
        return Ok(ctx.first_poll(&uid, verdict, !awaiting.is_empty()));
    }
    // After a start (a new leader) nobody knows whether the last leader's
    // polls had ended: health is read again unless the status already
    // says every target is healthy.
    let conditions = svc.status.as_ref().and_then(|s| s.conditions.as_deref());
    let unsure = fresh
        && !targets_health_final(conditions.unwrap_or_default(), &spec.listeners, &registered);
    if !awaiting.is_empty() || ctx.health_pending(&uid) || unsure {
        // A poll only to see targets settle takes a place in the lane; a
        // gate's poll does not (a rollout waits on it).
        let settling = health.is_none() && awaiting.is_empty();
        let place = if settling { ctx.enter_lane(svc) } else { None };
        if settling && place.is_none() {
            status::write(ctx, svc, ingress, &wanted).await?;
            return Ok(Action::await_change());
        }
        let h = match health {
            Some(h) => h,
            None => ctx.provider.target_health(&spec.key, ids).await?,
        };
        drop(place);
        gates::open(ctx, &pods, &awaiting, &desired, &h).await?;
        wanted.push(targets_healthy(&spec.listeners, &registered, &h));
        let unsettled = health_unsettled(&registered, &h);
        status::write(ctx, svc, ingress, &wanted).await?;
        return Ok(ctx.next_poll(&uid, !awaiting.is_empty(), unsettled));
    }
    status::write(ctx, svc, ingress, &wanted).await?;
    Ok(Action::await_change())
}

/// Per listener of `spec`, the targets that get traffic.
fn wanting_traffic(spec: &LoadBalancerSpec, targets: &Registered) -> Registered {
    spec.listeners
        .iter()
        .map(|l| {
            let set = targets.get(&l.name).map(TargetSet::wanted);
            (l.name.clone(), set.unwrap_or_default())
        })
        .collect()
}

/// Names the resource IDs and the addresses registered per listener (32
/// hex digits of their SHA-256): new IDs (a replaced target group) or other
/// addresses give another digest.
fn digest(ids: &ResourceIds, registered: &Registered) -> String {
    let mut h = Sha256::new();
    for (key, id) in ids {
        h.update(format!("{key}={id}\n"));
    }
    for (listener, set) in registered {
        h.update(format!("{listener}:"));
        for t in set.iter() {
            h.update(format!(" {}", t.addr()));
        }
        h.update("\n");
    }
    h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Records the digest of what is registered, for the next leader.
async fn record(ctx: &Context, svc: &Service, digest: String) -> Result<(), Error> {
    let api: Api<Service> =
        Api::namespaced(ctx.client.clone(), &svc.namespace().unwrap_or_default());
    let patch = json!({"metadata": {"annotations": {REGISTERED_ANNOTATION: digest}}});
    let updated = api
        .patch(
            &svc.name_any(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await?;
    ctx.wrote(svc, &updated, |w| w.registered = Some(digest));
    Ok(())
}

/// The earliest a health check can call a new target healthy: its healthy
/// threshold of probes, one each interval, the first at once.
fn earliest_verdict(hc: &HealthCheck) -> Duration {
    hc.interval * hc.healthy_threshold.saturating_sub(1)
}

/// Polls of one Service's health in a row: 1 s, 2 s, 4 s, ... 10 s, from
/// 1 s again whenever targets changed (a new Pod waits for its first health
/// report; during a rollout this is each step).
pub(super) fn poll_delay(polls: u32) -> Duration {
    let secs = 1u64 << polls.saturating_sub(1).min(4);
    Duration::from_secs(secs.min(10))
}

/// Registered targets per listener name, as cached per Service UID.
pub(super) type Registered = BTreeMap<String, TargetSet>;

#[cfg(test)]
mod tests {
    use super::*;
    use cnlb_provider_core::{Target, TargetState};

    fn set(addrs: &[(&str, TargetState)]) -> TargetSet {
        addrs
            .iter()
            .map(|(ip, state)| Target {
                state: *state,
                ..Target::new(ip.parse().unwrap(), 8080)
            })
            .collect()
    }

    #[test]
    fn the_digest_names_ids_and_registered_addresses() {
        let ready = TargetState::READY;
        let gone = TargetState::from_conditions(Some(false), Some(false), Some(true));
        let ids = ResourceIds::from([("tg/http".to_string(), "arn:1".to_string())]);
        let other_ids = ResourceIds::from([("tg/http".to_string(), "arn:2".to_string())]);
        let of = |ids: &ResourceIds, targets: &[(&str, TargetState)]| {
            digest(ids, &Registered::from([("http".to_string(), set(targets))]))
        };
        let base = of(&ids, &[("10.0.0.1", ready), ("10.0.0.2", ready)]);
        assert_eq!(base.len(), 32);
        assert_eq!(base, of(&ids, &[("10.0.0.2", ready), ("10.0.0.1", ready)]));
        for (why, other) in [
            (
                "a target group replaced",
                of(&other_ids, &[("10.0.0.1", ready), ("10.0.0.2", ready)]),
            ),
            ("a target gone", of(&ids, &[("10.0.0.1", ready)])),
            (
                "a target added",
                of(
                    &ids,
                    &[
                        ("10.0.0.1", ready),
                        ("10.0.0.2", ready),
                        ("10.0.0.3", ready),
                    ],
                ),
            ),
        ] {
            assert_ne!(base, other, "{why}");
        }
        // What the endpoints want, as registered: a terminating one is not.
        let spec = LoadBalancerSpec {
            listeners: vec![cnlb_provider_core::Listener {
                name: "http".into(),
                protocol: cnlb_provider_core::Protocol::Tcp,
                port: 80,
                target_port: 8080,
            }],
            ..Default::default()
        };
        let desired = Registered::from([(
            "http".to_string(),
            set(&[("10.0.0.1", ready), ("10.0.0.2", ready), ("10.0.0.3", gone)]),
        )]);
        assert_eq!(digest(&ids, &wanting_traffic(&spec, &desired)), base);
    }

    #[test]
    fn the_earliest_verdict_is_a_threshold_of_intervals() {
        for (interval, threshold, secs) in [(10, 3, 20), (5, 2, 5), (30, 1, 0), (10, 0, 0)] {
            let hc = HealthCheck {
                interval: Duration::from_secs(interval),
                healthy_threshold: threshold,
                ..HealthCheck::default()
            };
            assert_eq!(earliest_verdict(&hc), Duration::from_secs(secs));
        }
    }

    #[test]
    fn polls_back_off_to_ten_seconds() {
        let delays: Vec<u64> = (1..=7).map(|n| poll_delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 10, 10, 10]);
    }
}
