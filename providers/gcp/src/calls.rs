//! How cnlb calls the Compute API: one set of `google-cloud-compute-v1`
//! clients ([`Compute`]) and every request through [`Calls::run`]
//! (`cnlb-cloud-calls`: rate limits per group, retries on
//! `rateLimitExceeded` and 5xx, `cnlb_cloud_api_*` metrics with
//! `provider="gcp"`). The clients' own retries are off, so that is the only
//! retry layer. Mutating calls return an [`Operation`]; [`Calls::finish`]
//! waits for it with the operations' `wait` method (one request per two
//! minutes of waiting, each metered) rather than polling `get`.

use std::future::Future;

use cnlb_cloud_calls::{Group, RateLimits};
use cnlb_provider_core::{ProviderError, Result};
#[cfg(feature = "ipam")]
use google_cloud_compute_v1::client::Subnetworks;
#[cfg(feature = "load-balancer")]
use google_cloud_compute_v1::client::{
    Addresses, Firewalls, ForwardingRules, NetworkEndpointGroups, RegionBackendServices,
    RegionHealthChecks, RegionTargetTcpProxies, Regions,
};
use google_cloud_compute_v1::client::{
    GlobalOperations, Instances, RegionOperations, ZoneOperations,
};
use google_cloud_compute_v1::model::Operation;
use google_cloud_compute_v1::model::operation::Status;
use prometheus_client::registry::Registry;

use crate::error;

/// Which bucket a Compute method (`"<collection>.<method>"`) draws from.
/// Endpoint changes and operation waits have their own, as GCE has a
/// per-minute quota for each.
pub fn group_of(operation: &str) -> Group {
    let method = operation.rsplit('.').next().unwrap_or(operation);
    match method {
        "attachNetworkEndpoints" | "detachNetworkEndpoints" => Group::Targets,
        "wait" => Group::Operations,
        m if m.starts_with("get") || m.starts_with("list") => Group::Read,
        m if m.starts_with("aggregated") => Group::Read,
        _ => Group::Write,
    }
}

/// Where the Compute API is.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    /// `None`: `https://compute.googleapis.com` with Application Default
    /// Credentials (on GKE, Workload Identity). `Some(url)`: another
    /// endpoint, called without credentials (the test emulator).
    pub endpoint: Option<String>,
}

/// The Compute clients cnlb uses (those of the enabled features).
#[derive(Clone, Debug)]
pub struct Compute {
    #[cfg(feature = "load-balancer")]
    pub negs: NetworkEndpointGroups,
    #[cfg(feature = "load-balancer")]
    pub health_checks: RegionHealthChecks,
    #[cfg(feature = "load-balancer")]
    pub backend_services: RegionBackendServices,
    #[cfg(feature = "load-balancer")]
    pub proxies: RegionTargetTcpProxies,
    #[cfg(feature = "load-balancer")]
    pub forwarding_rules: ForwardingRules,
    #[cfg(feature = "load-balancer")]
    pub addresses: Addresses,
    #[cfg(feature = "load-balancer")]
    pub firewalls: Firewalls,
    pub instances: Instances,
    #[cfg(feature = "ipam")]
    pub subnetworks: Subnetworks,
    #[cfg(feature = "load-balancer")]
    pub regions: Regions,
    pub zone_operations: ZoneOperations,
    pub region_operations: RegionOperations,
    pub global_operations: GlobalOperations,
}

/// Builds one client with `connection`'s endpoint and credentials and the
/// client's own retries off.
macro_rules! client {
    ($client:ty, $connection:expr) => {{
        let mut builder =
            <$client>::builder().with_retry_policy(google_cloud_gax::retry_policy::NeverRetry);
        if let Some(endpoint) = &$connection.endpoint {
            builder = builder.with_endpoint(endpoint.clone()).with_credentials(
                google_cloud_auth::credentials::anonymous::Builder::new().build(),
            );
        }
        builder.build().await.map_err(|e| {
            ProviderError::cloud(
                concat!("building the ", stringify!($client), " client"),
                e.to_string(),
                false,
            )
        })?
    }};
}

impl Compute {
    pub async fn connect(connection: &Connection) -> Result<Compute> {
        Ok(Compute {
            #[cfg(feature = "load-balancer")]
            negs: client!(NetworkEndpointGroups, connection),
            #[cfg(feature = "load-balancer")]
            health_checks: client!(RegionHealthChecks, connection),
            #[cfg(feature = "load-balancer")]
            backend_services: client!(RegionBackendServices, connection),
            #[cfg(feature = "load-balancer")]
            proxies: client!(RegionTargetTcpProxies, connection),
            #[cfg(feature = "load-balancer")]
            forwarding_rules: client!(ForwardingRules, connection),
            #[cfg(feature = "load-balancer")]
            addresses: client!(Addresses, connection),
            #[cfg(feature = "load-balancer")]
            firewalls: client!(Firewalls, connection),
            instances: client!(Instances, connection),
            #[cfg(feature = "ipam")]
            subnetworks: client!(Subnetworks, connection),
            #[cfg(feature = "load-balancer")]
            regions: client!(Regions, connection),
            zone_operations: client!(ZoneOperations, connection),
            region_operations: client!(RegionOperations, connection),
            global_operations: client!(GlobalOperations, connection),
        })
    }
}

/// Every Compute request of this process goes through one of these.
pub struct Calls {
    inner: cnlb_cloud_calls::Calls,
    compute: Compute,
    project: String,
}

impl Calls {
    pub fn new(
        compute: Compute,
        project: impl Into<String>,
        limits: &RateLimits,
        registry: &mut Registry,
    ) -> Calls {
        Calls {
            inner: cnlb_cloud_calls::Calls::new("gcp", group_of, limits, registry),
            compute,
            project: project.into(),
        }
    }

    pub fn compute(&self) -> &Compute {
        &self.compute
    }

    pub fn project(&self) -> &str {
        &self.project
    }

    /// Runs `call` (which builds and sends one request, e.g.
    /// `|| c.negs.get().set_project(p).set_zone(z).set_network_endpoint_group(n).send()`)
    /// as the Compute method `operation` (e.g. `"networkEndpointGroups.get"`).
    pub async fn run<T, F, Fut>(&self, operation: &'static str, call: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = google_cloud_gax::Result<T>>,
    {
        self.inner
            .run(operation, || async {
                call().await.map_err(|e| error::map(operation, &e))
            })
            .await
    }

    /// Sends a mutating request as [`run`](Self::run) does and waits for
    /// its operation to finish; the operation's own error, if any, is the
    /// result.
    pub async fn mutate<F, Fut>(&self, operation: &'static str, call: F) -> Result<Operation>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = google_cloud_gax::Result<Operation>>,
    {
        let op = self.run(operation, call).await?;
        self.finish(operation, op).await
    }

    /// Waits until `op` (zonal, regional or global, as its fields say) is
    /// done.
    pub async fn finish(&self, operation: &'static str, mut op: Operation) -> Result<Operation> {
        while op.status != Some(Status::Done) {
            let name = op.name.clone().unwrap_or_default();
            let c = &self.compute;
            let p = &self.project;
            op = if let Some(zone) = op.zone.as_deref().map(last_segment) {
                self.run("zoneOperations.wait", || {
                    c.zone_operations
                        .wait()
                        .set_project(p)
                        .set_zone(zone)
                        .set_operation(&name)
                        .send()
                })
                .await?
            } else if let Some(region) = op.region.as_deref().map(last_segment) {
                self.run("regionOperations.wait", || {
                    c.region_operations
                        .wait()
                        .set_project(p)
                        .set_region(region)
                        .set_operation(&name)
                        .send()
                })
                .await?
            } else {
                self.run("globalOperations.wait", || {
                    c.global_operations
                        .wait()
                        .set_project(p)
                        .set_operation(&name)
                        .send()
                })
                .await?
            };
        }
        match error::of_operation(operation, &op) {
            Some(err) => Err(err),
            None => Ok(op),
        }
    }
}

/// `us-central1-a` from `https://.../zones/us-central1-a` (and a bare name
/// as it is).
pub fn last_segment(url: &str) -> &str {
    url.rsplit('/').next().unwrap_or(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_map_to_groups() {
        for op in [
            "networkEndpointGroups.get",
            "networkEndpointGroups.list",
            "networkEndpointGroups.listNetworkEndpoints",
            "networkEndpointGroups.aggregatedList",
        ] {
            assert_eq!(group_of(op), Group::Read, "{op}");
        }
        for op in ["zoneOperations.wait", "globalOperations.wait"] {
            assert_eq!(group_of(op), Group::Operations, "{op}");
        }
        for op in [
            "networkEndpointGroups.attachNetworkEndpoints",
            "networkEndpointGroups.detachNetworkEndpoints",
        ] {
            assert_eq!(group_of(op), Group::Targets, "{op}");
        }
        for op in [
            "regionBackendServices.insert",
            "firewalls.patch",
            "instances.updateNetworkInterface",
        ] {
            assert_eq!(group_of(op), Group::Write, "{op}");
        }
    }

    #[test]
    fn last_segments() {
        assert_eq!(
            last_segment("https://www.googleapis.com/compute/v1/projects/p/zones/us-central1-a"),
            "us-central1-a"
        );
        assert_eq!(last_segment("us-central1-a"), "us-central1-a");
    }
}
