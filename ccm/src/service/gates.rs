//! Pod readiness gates (`cnlb.dev/load-balancer-ready`, GKE's
//! `cloud.google.com/load-balancer-neg-ready`): opened once the Pod's
//! targets are healthy in the cloud, and released when cnlb stops managing
//! the Service, so that no Pod waits forever for a load balancer that is
//! gone.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use cnlb_provider_core::{TargetHealth, TargetHealthState, TargetSet};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use serde_json::json;
use tracing::info;

use super::{Context, Error, sync};
use crate::targets::{SliceTargets, pending_gates};

/// The Pods behind the endpoints of a Service in `namespace`, as the Pod
/// store has them.
pub(super) fn endpoint_pods(
    ctx: &Context,
    namespace: &str,
    slices: &[Arc<SliceTargets>],
) -> Vec<Arc<Pod>> {
    let names: BTreeSet<Box<str>> = slices
        .iter()
        .flat_map(|s| s.endpoints.iter().filter_map(|ep| ep.pod.clone()))
        .collect();
    names
        .iter()
        .filter_map(|name| {
            ctx.stores
                .pods
                .get(&ObjectRef::<Pod>::new(name).within(namespace))
        })
        .collect()
}

/// Sets the pending gates of each Pod in `awaiting` whose targets are
/// healthy on every listener it is registered for. A Pod with no
/// registered target yet keeps waiting: it is never marked ready before it
/// can take traffic.
pub(super) async fn open(
    ctx: &Context,
    pods: &[Arc<Pod>],
    awaiting: &BTreeSet<IpAddr>,
    desired: &BTreeMap<String, TargetSet>,
    health: &[TargetHealth],
) -> Result<(), Error> {
    let healthy: BTreeSet<(&str, IpAddr, u16)> = health
        .iter()
        .filter(|h| h.state == TargetHealthState::Healthy)
        .map(|h| (h.listener.as_str(), h.ip, h.port))
        .collect();
    for pod in pods {
        let Some(ip) = pod_ip(pod).filter(|ip| awaiting.contains(ip)) else {
            continue;
        };
        let targets: Vec<(&str, u16)> = desired
            .iter()
            .flat_map(|(l, set)| {
                set.iter()
                    .filter(move |t| t.ip == ip)
                    .map(move |t| (l.as_str(), t.port))
            })
            .collect();
        let ready = !targets.is_empty()
            && targets
                .iter()
                .all(|(l, port)| healthy.contains(&(*l, ip, *port)));
        if ready {
            set_gates(
                ctx,
                pod,
                "TargetHealthy",
                "the load balancer reports this Pod's target healthy",
            )
            .await?;
        }
    }
    Ok(())
}

/// Opens every pending gate of the Service's Pods: cnlb no longer manages
/// a load balancer for it (deleted, type or class changed).
pub(super) async fn release(ctx: &Context, svc: &Service) -> Result<(), Error> {
    let namespace = svc.namespace().unwrap_or_default();
    let message = format!(
        "cnlb no longer manages a load balancer for Service {namespace}/{}",
        svc.name_any()
    );
    for pod in endpoint_pods(ctx, &namespace, &sync::slices(ctx, svc)) {
        if pod.metadata.deletion_timestamp.is_none() && !pending_gates(&pod).is_empty() {
            set_gates(ctx, &pod, "LoadBalancerRemoved", &message).await?;
        }
    }
    Ok(())
}

async fn set_gates(ctx: &Context, pod: &Pod, reason: &str, message: &str) -> Result<(), Error> {
    let gates = pending_gates(pod);
    if gates.is_empty() {
        return Ok(());
    }
    let conditions: Vec<serde_json::Value> = gates
        .iter()
        .map(|gate| {
            json!({
                "type": gate, "status": "True", "reason": reason, "message": message,
                "lastTransitionTime": Time(Timestamp::now()),
            })
        })
        .collect();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default());
    // Strategic merge: conditions merge by type, the kubelet's stay.
    match api
        .patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Strategic(json!({"status": {"conditions": conditions}})),
        )
        .await
    {
        Ok(_) => {}
        // Deleted meanwhile: nothing left to open.
        Err(kube::Error::Api(e)) if e.is_not_found() => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    info!(pod = %pod.name_any(), ?gates, reason, "readiness gates set");
    Ok(())
}

fn pod_ip(pod: &Pod) -> Option<IpAddr> {
    pod.status.as_ref()?.pod_ip.as_ref()?.parse().ok()
}
