//! The load balancer's shape: ensured from the Service's typed annotations
//! when the spec changed (and only then), deleted when the Service goes or
//! stops being cnlb's. A Service whose spec is invalid keeps the load
//! balancer it has, and its targets keep following its endpoints with the
//! last applied spec; only the shape waits for a valid spec.

use cnlb_provider_core::{
    LoadBalancerKey, LoadBalancerSpec, LoadBalancerStatus, ProviderError, ResourceIds,
};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::{
    APPLIED_ANNOTATION, Context, Error, FINALIZER, IDS_ANNOTATION, REGISTERED_ANNOTATION, gates,
    status, sync,
};
use crate::annotations::parse_service;
use crate::conditions::{LOAD_BALANCER_READY, Wanted};
use crate::events::Kind;

pub(super) async fn apply(svc: &Service, ctx: &Context) -> Result<Action, Error> {
    let written = ctx.written(svc);
    let applied = written.spec.or_else(|| applied_spec(svc));
    let ids = written.ids.unwrap_or_else(|| resource_ids(svc));
    let spec = match parse_service(svc, &ctx.settings.cluster) {
        Ok(mut spec) => {
            ctx.events.forget(svc, "InvalidAnnotation");
            spec.provider_settings = ctx.provider.settings();
            spec
        }
        Err(errors) => {
            for e in &errors {
                ctx.events
                    .send(
                        svc,
                        Kind::Warning,
                        "InvalidAnnotation",
                        &e.key,
                        &e.to_string(),
                    )
                    .await;
            }
            let message: Vec<String> = errors.iter().map(ToString::to_string).collect();
            let lb = Wanted::new(
                LOAD_BALANCER_READY,
                false,
                "InvalidAnnotation",
                message.join("; "),
            );
            // A user error: nothing is torn down, and the load balancer's
            // shape waits for the Service to change.
            return match applied {
                Some(applied) if !ids.is_empty() => {
                    sync::targets(ctx, svc, &applied, &ids, None, lb).await
                }
                _ => {
                    status::write(ctx, svc, None, &[lb]).await?;
                    Ok(Action::await_change())
                }
            };
        }
    };
    let has_ingress = status::ingress(ctx, svc)
        .as_array()
        .is_some_and(|i| !i.is_empty());
    let ready = Wanted::new(
        LOAD_BALANCER_READY,
        true,
        "Ensured",
        "the load balancer matches the Service",
    );
    if applied.as_ref() == Some(&spec) && has_ingress && !ids.is_empty() {
        return sync::targets(ctx, svc, &spec, &ids, None, ready).await;
    }
    ctx.events
        .send(
            svc,
            Kind::Normal,
            "EnsuringLoadBalancer",
            "",
            "Ensuring load balancer",
        )
        .await;
    let status = match ctx.provider.ensure_load_balancer(&spec, &ids).await {
        Ok(status) => status,
        Err(err) => {
            if let Some(reason) = condition_reason(&err) {
                let lb = Wanted::new(LOAD_BALANCER_READY, false, reason, err.to_string());
                status::write(ctx, svc, None, &[lb]).await?;
            }
            return Err(err.into());
        }
    };
    // Ensure may have replaced target groups (port or protocol change):
    // re-read what is registered instead of trusting the cache.
    ctx.forget_registered(&spec.key.uid);
    persist(ctx, svc, &status, &spec).await?;
    ctx.events
        .send(
            svc,
            Kind::Normal,
            "EnsuredLoadBalancer",
            "",
            "Ensured load balancer",
        )
        .await;
    // The next ensure of this Service is news again.
    ctx.events.forget(svc, "EnsuringLoadBalancer");
    ctx.events.forget(svc, "EnsuredLoadBalancer");
    sync::targets(ctx, svc, &spec, &status.ids, Some(&status.ingress), ready).await
}

/// The reason of the condition saying why the load balancer is not ready,
/// for provider errors said where the user looks: what this cloud cannot
/// build, and a resource cnlb would have to take from another owner (the
/// name it would give its own, or an ID in the Service's annotations), which
/// it never adopts, changes nor deletes.
pub(super) fn condition_reason(err: &ProviderError) -> Option<&'static str> {
    match err {
        ProviderError::InvalidSpec { .. } => Some("Unsupported"),
        ProviderError::Conflict { .. } => Some("Conflict"),
        _ => None,
    }
}

/// Opens the gates of the Service's Pods, then deletes its load balancer.
pub(super) async fn cleanup(svc: &Service, ctx: &Context) -> Result<(), Error> {
    gates::release(ctx, svc).await?;
    let key = LoadBalancerKey::new(
        &ctx.settings.cluster,
        svc.namespace().unwrap_or_default(),
        svc.name_any(),
        svc.uid().unwrap_or_default(),
    );
    ctx.events
        .send(
            svc,
            Kind::Normal,
            "DeletingLoadBalancer",
            "",
            "Deleting load balancer",
        )
        .await;
    let ids = ctx.written(svc).ids.unwrap_or_else(|| resource_ids(svc));
    ctx.provider.delete_load_balancer(&key, &ids).await?;
    ctx.deletions.notify_one();
    ctx.forget_registered(&key.uid);
    ctx.forget_written(svc);
    ctx.events
        .send(
            svc,
            Kind::Normal,
            "DeletedLoadBalancer",
            "",
            "Deleted load balancer",
        )
        .await;
    ctx.events.forget_all(svc);
    Ok(())
}

/// Forgets a Service that is no longer ours: its status first, while the
/// object surely exists, then the finalizer (which may let a pending
/// deletion finish) and cnlb's annotations.
pub(super) async fn release(svc: &Service, ctx: &Context) -> Result<(), Error> {
    status::clear(ctx, svc).await?;
    let api: Api<Service> =
        Api::namespaced(ctx.client.clone(), &svc.namespace().unwrap_or_default());
    let finalizers: Vec<&String> = svc
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .collect();
    let patch = json!({
        "metadata": {
            "finalizers": finalizers,
            "annotations": {
                IDS_ANNOTATION: null,
                APPLIED_ANNOTATION: null,
                REGISTERED_ANNOTATION: null,
            },
        },
    });
    api.patch(
        &svc.name_any(),
        &PatchParams::default(),
        &Patch::Merge(patch),
    )
    .await?;
    ctx.forget_written(svc);
    Ok(())
}

/// IDs first (so a crash after this point still finds the resources by
/// ID), with the spec they were built from.
async fn persist(
    ctx: &Context,
    svc: &Service,
    status: &LoadBalancerStatus,
    spec: &LoadBalancerSpec,
) -> Result<(), Error> {
    let api: Api<Service> =
        Api::namespaced(ctx.client.clone(), &svc.namespace().unwrap_or_default());
    let invalid = |e: serde_json::Error| Error::Invalid(e.to_string());
    let mut annotations = status.annotations.clone();
    annotations.insert(
        IDS_ANNOTATION.into(),
        serde_json::to_string(&status.ids).map_err(invalid)?,
    );
    annotations.insert(
        APPLIED_ANNOTATION.into(),
        serde_json::to_string(spec).map_err(invalid)?,
    );
    let updated = api
        .patch(
            &svc.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": annotations}})),
        )
        .await?;
    ctx.wrote(svc, &updated, |w| {
        w.spec = Some(spec.clone());
        w.ids = Some(status.ids.clone());
    });
    Ok(())
}

pub(super) fn resource_ids(svc: &Service) -> ResourceIds {
    svc.annotations()
        .get(IDS_ANNOTATION)
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default()
}

/// The spec the cloud was last brought to; `None` before the first ensure
/// (or for what an older cnlb wrote there: one ensure rewrites it).
fn applied_spec(svc: &Service) -> Option<LoadBalancerSpec> {
    svc.annotations()
        .get(APPLIED_ANNOTATION)
        .and_then(|v| serde_json::from_str(v).ok())
}
