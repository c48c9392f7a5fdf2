//! The traits a cloud (or on-prem plugin) implements, and the values they
//! exchange with the controller.
//!
//! Division of work: the controller decides *whether* to call (it diffs specs
//! and target sets and makes no call when nothing changed); a provider decides
//! *how* to reach the desired state and must be safe to call again at any
//! time, including after a crash half-way through a previous call.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::model::{Listener, LoadBalancerKey, LoadBalancerSpec, Target, TargetDelta, TargetSet};

/// Cloud resource IDs of one load balancer (e.g. `"load-balancer-arn"`,
/// `"target-group/http"`), keys chosen by the provider. The controller
/// persists them on the Service and passes them back on every call.
pub type ResourceIds = BTreeMap<String, String>;

/// How traffic to a load balancer IP reaches the cluster (Service
/// `status.loadBalancer.ingress[].ipMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum IpMode {
    /// Packets arrive with the load balancer IP as destination.
    #[serde(rename = "VIP")]
    Vip,
    /// The load balancer proxies or rewrites the destination, so kube-proxy
    /// must not short-circuit in-cluster traffic to the IP.
    Proxy,
}

impl IpMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vip => "VIP",
            Self::Proxy => "Proxy",
        }
    }
}

/// One entry of `status.loadBalancer.ingress`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadBalancerIngress {
    pub hostname: Option<String>,
    pub ip: Option<IpAddr>,
    /// Only meaningful with `ip`.
    pub ip_mode: Option<IpMode>,
}

/// Result of [`LoadBalancerProvider::ensure_load_balancer`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadBalancerStatus {
    /// Addresses clients use; may be empty while the cloud is still
    /// provisioning (the controller then retries later).
    pub ingress: Vec<LoadBalancerIngress>,
    /// The complete set of IDs to persist; replaces what was passed in.
    pub ids: ResourceIds,
    /// Annotations the controller writes on the Service for its users (GKE's
    /// `cloud.google.com/neg-status`, say); a key that was written before
    /// and is missing now is left as it is.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// Cloud view of one registered target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetHealthState {
    /// Passing health checks; the Pod's readiness gate can be set.
    Healthy,
    /// Failing health checks.
    Unhealthy,
    /// Registered, not yet checked enough times.
    Initial,
    /// Deregistered, still finishing existing connections. Not part of the
    /// registered set for diffing (see [`registered_targets`]).
    Draining,
    /// Health unknown (health checks off, zone not enabled, listener missing).
    Unavailable,
}

/// Health of one target of one listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetHealth {
    /// [`Listener::name`] the target is registered for; the same (ip, port)
    /// can sit behind several listeners.
    pub listener: String,
    pub ip: IpAddr,
    pub port: u16,
    pub state: TargetHealthState,
    /// Cloud reason code or message, for Events and logs.
    pub reason: Option<String>,
}

/// The registered targets of `listener` according to `health` (the output of
/// [`LoadBalancerProvider::target_health`]), to diff against after a restart.
/// Draining targets are left out: they are already deregistered, and counting
/// them would deregister them again on every reconcile.
pub fn registered_targets(health: &[TargetHealth], listener: &str) -> TargetSet {
    health
        .iter()
        .filter(|h| h.listener == listener && h.state != TargetHealthState::Draining)
        .map(|h| Target::new(h.ip, h.port))
        .collect()
}

/// A load balancer found by its ownership tags.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnedLoadBalancer {
    pub key: LoadBalancerKey,
    pub ids: ResourceIds,
}

/// Load balancers whose targets are Pod IPs: the plugin API.
///
/// This trait is how cnlb drives a load balancer, whoever provides it:
/// - **In process**: implement it in a crate that depends on this one only
///   (as `providers/aws` does) and hand the controller a
///   `Arc<dyn LoadBalancerProvider>`.
/// - **Out of process**, in any language: serve the gRPC protocol in
///   `providers/onprem/proto/cnlb/provider/v1/provider.proto` on a unix
///   socket (or TCP). Its calls are this trait's, one for one
///   (`EnsureLoadBalancer`, `UpdateBackends` = [`sync_targets`](Self::sync_targets),
///   `WatchBackendHealth` = [`target_health`](Self::target_health) as a
///   stream, `DeleteLoadBalancer`, `ListLoadBalancers` =
///   [`list_owned`](Self::list_owned)), plus `GetInfo` and `Probe`; errors
///   are gRPC status codes that map onto [`ProviderError`](crate::ProviderError).
///   `cnlb-provider-onprem` has both sides: `GrpcProvider` implements this
///   trait by calling a plugin, `server::serve` serves any implementation as
///   a plugin, and `conformance::run` checks a plugin against the contract
///   below.
///
/// The contract:
/// - The controller decides *whether* to call: it diffs specs and target
///   sets and calls only when something changed, with target *deltas*,
///   never the whole set.
/// - The provider decides *how*. Every method is idempotent and safe to
///   retry after any error or crash, including one half-way through a
///   previous call.
/// - Nothing is found by name alone: a provider keys its resources by
///   [`LoadBalancerKey`] (UID included) and never adopts one of another
///   owner.
///
/// All methods are idempotent and safe to retry after any error or crash.
/// Errors are [`ProviderError`](crate::ProviderError)s; their
/// [`retry_policy`](crate::ProviderError::retry_policy) tells the controller
/// what to do next. `known` is always the last [`LoadBalancerStatus::ids`]
/// the controller persisted (possibly empty, possibly stale).
#[async_trait::async_trait]
pub trait LoadBalancerProvider: Send + Sync {
    /// Short provider name for logs, metrics and Events (`"aws"`, `"gcp"`, ...).
    fn name(&self) -> &str;

    /// This provider's configuration that shapes every load balancer it
    /// ensures (AWS: whether it manages the backend security group), as a
    /// short string; the controller ensures every load balancer again once
    /// when it changes. Empty by default.
    fn settings(&self) -> String {
        String::new()
    }

    /// Makes the cloud load balancer match `spec`: creates what is missing,
    /// updates what drifted (listeners, health check, attributes, tags,
    /// allowed source ranges) and removes parts the spec no longer has.
    /// Targets are not touched; newly created target groups start empty.
    ///
    /// Must never create a duplicate: resources are looked up by `known` IDs
    /// first, then by ownership tags (see [`owner_tags`](crate::owner_tags)),
    /// and are created with those tags in the create call itself where the
    /// cloud allows, so a crash at any point leaves something the next call
    /// finds. A stale ID in `known` is not an error: look up by tags instead.
    /// A resource with our name but another owner's tags is a
    /// [`Conflict`](crate::ProviderError::Conflict), never adopted.
    ///
    /// Errors: [`InvalidSpec`](crate::ProviderError::InvalidSpec) for what
    /// this provider cannot build (unsupported protocol, out-of-range health
    /// check, unknown attribute); nothing already working is torn down then.
    async fn ensure_load_balancer(
        &self,
        spec: &LoadBalancerSpec,
        known: &ResourceIds,
    ) -> Result<LoadBalancerStatus>;

    /// Applies `delta` to the targets of `listener`: deregistrations first,
    /// then registrations, each split into the batches the cloud API
    /// accepts. Only the delta is sent, never the whole set.
    ///
    /// Idempotent: registering a target that is already registered and
    /// deregistering one that is absent both succeed. An empty delta returns
    /// `Ok` (the caller should not call with one).
    ///
    /// Errors: [`NotFound`](crate::ProviderError::NotFound) if the listener's
    /// target group / backend does not exist (call `ensure_load_balancer`
    /// first); `InvalidSpec` for a target the cloud cannot route to (e.g. an
    /// IP outside the VPC).
    async fn sync_targets(
        &self,
        key: &LoadBalancerKey,
        listener: &Listener,
        delta: &TargetDelta,
        known: &ResourceIds,
    ) -> Result<()>;

    /// Health of every registered target of every listener, including
    /// draining ones. Read-only. An empty list if the load balancer has no
    /// targets; `NotFound` if the load balancer itself does not exist.
    async fn target_health(
        &self,
        key: &LoadBalancerKey,
        known: &ResourceIds,
    ) -> Result<Vec<TargetHealth>>;

    /// Deletes every cloud resource of `key`, found by `known` IDs and by
    /// ownership tags, in dependency order. Only resources carrying `key`'s
    /// ownership tags are deleted, never anything found by name alone.
    /// Returns `Ok` when everything is already gone; after a partial failure
    /// the next call picks up where this one stopped.
    async fn delete_load_balancer(&self, key: &LoadBalancerKey, known: &ResourceIds) -> Result<()>;

    /// Every load balancer whose ownership tags name `cluster`, with the key
    /// rebuilt from the tags (see
    /// [`key_from_owner_tags`](crate::key_from_owner_tags)) and the IDs found.
    /// Used for garbage collection: the controller deletes those whose key
    /// (UID included) matches no live Service. Read-only.
    async fn list_owned(&self, cluster: &str) -> Result<Vec<OwnedLoadBalancer>>;

    /// Removes what the load balancers of `cluster` share and none of them
    /// needs any more (AWS: the backend security group's rules, and the
    /// group once no load balancer is left), never what a call that started
    /// meanwhile asked for. Garbage collection calls it at start and after
    /// deletions. Default: nothing is shared.
    async fn prune_shared(&self, _cluster: &str) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::error::ProviderError;
    use crate::fake::Fake;
    use crate::model::{Protocol, diff_targets, owner_tags};

    #[tokio::test]
    async fn provider_is_object_safe_and_delta_driven() {
        let provider: Arc<dyn LoadBalancerProvider> = Arc::new(Fake::default());
        let key = LoadBalancerKey::new("c1", "default", "web", "uid-1");
        let listener = Listener {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 80,
            target_port: 8080,
        };
        let mut spec = LoadBalancerSpec::new(key.clone());
        spec.listeners.push(listener.clone());

        let status = provider
            .ensure_load_balancer(&spec, &ResourceIds::new())
            .await
            .unwrap();
        // Second call with the persisted IDs is a no-op.
        let again = provider
            .ensure_load_balancer(&spec, &status.ids)
            .await
            .unwrap();
        assert_eq!(again, status);

        let desired: TargetSet = (1..=3u8)
            .map(|i| Target::new(IpAddr::from([10, 0, 0, i]), 8080))
            .collect();
        let task = {
            let provider = Arc::clone(&provider);
            let (key, listener, ids) = (key.clone(), listener.clone(), status.ids.clone());
            tokio::spawn(async move {
                let health = provider.target_health(&key, &ids).await?;
                let delta = diff_targets(&registered_targets(&health, &listener.name), &desired);
                provider.sync_targets(&key, &listener, &delta, &ids).await?;
                let health = provider.target_health(&key, &ids).await?;
                Ok::<_, ProviderError>(diff_targets(
                    &registered_targets(&health, &listener.name),
                    &desired,
                ))
            })
        };
        assert!(task.await.unwrap().unwrap().is_empty());
        assert_eq!(
            provider
                .target_health(&key, &status.ids)
                .await
                .unwrap()
                .len(),
            3
        );

        let mut bad = spec.clone();
        bad.listeners.clear();
        let err = provider
            .ensure_load_balancer(&bad, &status.ids)
            .await
            .unwrap_err();
        assert_eq!(err.retry_policy(), crate::RetryPolicy::AwaitChange);
        assert!(owner_tags(&key).contains_key(crate::TAG_SERVICE_UID));
    }

    #[test]
    fn registered_targets_skip_draining_and_other_listeners() {
        let health = |listener: &str, last: u8, state| TargetHealth {
            listener: listener.into(),
            ip: IpAddr::from([10, 0, 0, last]),
            port: 8080,
            state,
            reason: None,
        };
        let all = [
            health("http", 1, TargetHealthState::Healthy),
            health("http", 2, TargetHealthState::Draining),
            health("http", 3, TargetHealthState::Initial),
            health("https", 4, TargetHealthState::Healthy),
        ];
        let set = registered_targets(&all, "http");
        let ips: Vec<IpAddr> = set.iter().map(|t| t.ip).collect();
        assert_eq!(
            ips,
            vec![IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 3])]
        );
    }

    #[test]
    fn ip_mode_serializes_with_kubernetes_spelling() {
        assert_eq!(serde_json::to_value(IpMode::Vip).unwrap(), "VIP");
    }
}
