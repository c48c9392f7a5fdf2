//! The Compute calls of vpc-ipam's GCP backend: the node's instance (its
//! first network interface, `nic0`, with its alias IP ranges), the
//! subnetwork it is in (with its secondary ranges), and adding an alias IP
//! range to `nic0` from a secondary range, GKE style (cloud-provider-gcp's
//! CloudAllocator then copies the range into `node.spec.podCIDRs`).
//!
//! Every request goes through [`Calls`] (`calls.rs`): rate limit, retries
//! on `rateLimitExceeded` and 5xx, `cnlb_cloud_api_*` metrics with
//! `provider="gcp"`; the update waits for its zone operation. Answers are
//! turned into plain structs ([`Nic`], [`SubnetInfo`], ...) so that the
//! backend's decisions are pure functions over them. This module decides
//! nothing: whether a range is reused, which one and what to do on a
//! conflict is the backend's business.
//!
//! The custom IAM role `deploy/gcp/vpc-ipam-role.yaml` lists exactly the
//! permissions these calls need (a test in
//! `localstack-tests/tests/deploy.rs` checks it against the method names
//! passed to `Calls` here).

use std::fmt;

use cnlb_provider_core::{ProviderError, Result};
use google_cloud_compute_v1::model::{AliasIpRange, Instance, NetworkInterface, Subnetwork};
use prometheus_client::registry::Registry;

use crate::RateLimits;
use crate::calls::{Calls, Compute, Connection};
pub use crate::instance::{InstanceRef, NIC0, region_of};

/// A subnetwork, from its URL
/// (`https://www.googleapis.com/compute/v1/projects/<p>/regions/<r>/subnetworks/<s>`,
/// or the same path without the host). With Shared VPC its project is the
/// host project, not the instance's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetworkRef {
    pub project: String,
    pub region: String,
    pub name: String,
}

impl SubnetworkRef {
    pub fn from_url(url: &str) -> Option<SubnetworkRef> {
        let segments: Vec<&str> = url.split('/').collect();
        let after = |key: &str| {
            segments
                .iter()
                .position(|s| *s == key)
                .and_then(|i| segments.get(i + 1))
                .filter(|s| !s.is_empty())
                .map(|s| s.to_string())
        };
        Some(SubnetworkRef {
            project: after("projects")?,
            region: after("regions")?,
            name: after("subnetworks")?,
        })
    }
}

impl fmt::Display for SubnetworkRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "projects/{}/regions/{}/subnetworks/{}",
            self.project, self.region, self.name
        )
    }
}

/// One alias IP range of a network interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AliasRange {
    /// "10.4.3.0/24"; in a request also just a netmask ("/24"), for GCE to
    /// pick a free block of that size.
    pub cidr: String,
    /// The subnetwork's secondary range it comes from; `None`: from the
    /// subnetwork's primary range.
    pub range_name: Option<String>,
}

/// An instance's network interface, as far as Pod addresses care.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nic {
    pub name: String,
    /// The interface's primary address.
    pub network_ip: Option<String>,
    pub subnetwork: Option<SubnetworkRef>,
    pub alias_ranges: Vec<AliasRange>,
    /// Opaque; an update must pass the one it read (optimistic locking:
    /// GCE answers 412 conditionNotMet when the interface changed since).
    pub fingerprint: Vec<u8>,
}

/// A secondary range of a subnetwork.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecondaryRange {
    pub name: String,
    pub cidr: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetInfo {
    pub name: String,
    /// The primary range.
    pub cidr: String,
    pub secondary_ranges: Vec<SecondaryRange>,
}

/// Compute through the provider's rate limits, retries and metrics.
pub struct GcpIpam {
    calls: Calls,
}

impl GcpIpam {
    /// Connects to Compute at `connection` for instances of `project` (the
    /// project the zone operations of updates are waited for in); registers
    /// the `cnlb_cloud_api_*` metrics in `registry`, which must not hold
    /// them yet.
    pub async fn connect(
        connection: &Connection,
        project: &str,
        limits: &RateLimits,
        registry: &mut Registry,
    ) -> Result<GcpIpam> {
        let compute = Compute::connect(connection).await?;
        Ok(GcpIpam {
            calls: Calls::new(compute, project, limits, registry),
        })
    }

    /// The instance's `nic0` (the first interface when none has that name).
    pub async fn nic0(&self, instance: &InstanceRef) -> Result<Nic> {
        let c = self.calls.compute();
        let found: Instance = self
            .calls
            .run("instances.get", || {
                c.instances
                    .get()
                    .set_project(&instance.project)
                    .set_zone(&instance.zone)
                    .set_instance(&instance.name)
                    .send()
            })
            .await?;
        let interfaces = &found.network_interfaces;
        interfaces
            .iter()
            .find(|n| n.name.as_deref() == Some(NIC0))
            .or_else(|| interfaces.first())
            .map(nic)
            .ok_or_else(|| {
                ProviderError::cloud(
                    "instances.get",
                    format!("instance {instance} has no network interface"),
                    false,
                )
            })
    }

    pub async fn subnetwork(&self, subnetwork: &SubnetworkRef) -> Result<SubnetInfo> {
        let c = self.calls.compute();
        let found: Subnetwork = self
            .calls
            .run("subnetworks.get", || {
                c.subnetworks
                    .get()
                    .set_project(&subnetwork.project)
                    .set_region(&subnetwork.region)
                    .set_subnetwork(&subnetwork.name)
                    .send()
            })
            .await?;
        Ok(subnet_info(&found))
    }

    /// Adds `range` to the alias ranges of `nic` of `instance`, keeping the
    /// ones it has, and waits until GCE has done it. `nic.fingerprint` must
    /// be the one read with those ranges: when the interface changed since,
    /// this fails with [`ProviderError::Conflict`] (412 conditionNotMet),
    /// and nothing changed. A retry of a request that did succeed fails the
    /// same way, so retries never add a second range.
    pub async fn add_alias_range(
        &self,
        instance: &InstanceRef,
        nic: &Nic,
        range: &AliasRange,
    ) -> Result<()> {
        let ranges = nic
            .alias_ranges
            .iter()
            .chain(std::iter::once(range))
            .map(|r| {
                AliasIpRange::new()
                    .set_ip_cidr_range(r.cidr.clone())
                    .set_or_clear_subnetwork_range_name(r.range_name.clone())
            });
        let body = NetworkInterface::new()
            .set_alias_ip_ranges(ranges)
            .set_fingerprint(nic.fingerprint.clone());
        let c = self.calls.compute();
        self.calls
            .mutate("instances.updateNetworkInterface", || {
                c.instances
                    .update_network_interface()
                    .set_project(&instance.project)
                    .set_zone(&instance.zone)
                    .set_instance(&instance.name)
                    .set_network_interface(&nic.name)
                    .set_body(body.clone())
                    .send()
            })
            .await?;
        Ok(())
    }
}

fn nic(n: &NetworkInterface) -> Nic {
    Nic {
        name: n.name.clone().unwrap_or_else(|| NIC0.to_string()),
        network_ip: n.network_ip.clone(),
        subnetwork: n.subnetwork.as_deref().and_then(SubnetworkRef::from_url),
        alias_ranges: n
            .alias_ip_ranges
            .iter()
            .filter_map(|r| {
                Some(AliasRange {
                    cidr: r.ip_cidr_range.clone()?,
                    range_name: r.subnetwork_range_name.clone().filter(|n| !n.is_empty()),
                })
            })
            .collect(),
        fingerprint: n
            .fingerprint
            .as_ref()
            .map(|f| f.to_vec())
            .unwrap_or_default(),
    }
}

fn subnet_info(s: &Subnetwork) -> SubnetInfo {
    SubnetInfo {
        name: s.name.clone().unwrap_or_default(),
        cidr: s.ip_cidr_range.clone().unwrap_or_default(),
        secondary_ranges: s
            .secondary_ip_ranges
            .iter()
            .filter_map(|r| {
                Some(SecondaryRange {
                    name: r.range_name.clone()?,
                    cidr: r.ip_cidr_range.clone()?,
                })
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnetwork_urls_name_project_region_and_subnetwork() {
        let full = "https://www.googleapis.com/compute/v1/projects/host-project/regions/europe-west1/subnetworks/nodes";
        let expected = SubnetworkRef {
            project: "host-project".into(),
            region: "europe-west1".into(),
            name: "nodes".into(),
        };
        assert_eq!(SubnetworkRef::from_url(full), Some(expected.clone()));
        assert_eq!(
            SubnetworkRef::from_url("projects/host-project/regions/europe-west1/subnetworks/nodes"),
            Some(expected.clone())
        );
        assert_eq!(
            expected.to_string(),
            "projects/host-project/regions/europe-west1/subnetworks/nodes"
        );
        for bad in [
            "",
            "regions/r/subnetworks/s",
            "projects/p/regions/r/subnetworks/",
        ] {
            assert_eq!(SubnetworkRef::from_url(bad), None, "{bad:?}");
        }
        assert_eq!(region_of("asia-east1-b"), "asia-east1");
        assert_eq!(region_of("local"), "local");
    }

    #[test]
    fn answers_become_plain_structs() {
        let n: NetworkInterface = serde_json::from_value(serde_json::json!({
            "name": "nic0",
            "networkIP": "10.0.0.7",
            "subnetwork": "https://www.googleapis.com/compute/v1/projects/p/regions/us-central1/subnetworks/nodes",
            "fingerprint": "YWJjZA==",
            "aliasIpRanges": [
                {"ipCidrRange": "10.4.3.0/24", "subnetworkRangeName": "pods"},
                {"ipCidrRange": "10.0.0.32/30"},
            ],
        }))
        .unwrap();
        let nic = nic(&n);
        assert_eq!(nic.name, "nic0");
        assert_eq!(nic.network_ip.as_deref(), Some("10.0.0.7"));
        assert_eq!(nic.subnetwork.unwrap().name, "nodes");
        assert_eq!(nic.fingerprint, b"abcd");
        assert_eq!(
            nic.alias_ranges,
            [
                AliasRange {
                    cidr: "10.4.3.0/24".into(),
                    range_name: Some("pods".into())
                },
                AliasRange {
                    cidr: "10.0.0.32/30".into(),
                    range_name: None
                },
            ]
        );
        let s: Subnetwork = serde_json::from_value(serde_json::json!({
            "name": "nodes", "ipCidrRange": "10.0.0.0/20",
            "secondaryIpRanges": [
                {"rangeName": "pods", "ipCidrRange": "10.4.0.0/14"},
                {"rangeName": "services", "ipCidrRange": "10.8.0.0/20"},
            ],
        }))
        .unwrap();
        let info = subnet_info(&s);
        assert_eq!(info.cidr, "10.0.0.0/20");
        assert_eq!(
            info.secondary_ranges[0],
            SecondaryRange {
                name: "pods".into(),
                cidr: "10.4.0.0/14".into()
            }
        );
        assert_eq!(info.secondary_ranges.len(), 2);
    }
}
