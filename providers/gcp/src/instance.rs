//! The Compute instance behind a Node: its provider ID and zone. Shared by
//! the node provider and vpc-ipam's GCP backend.

use std::fmt;

/// The network interface whose alias ranges hold the Pods' addresses.
pub const NIC0: &str = "nic0";

/// A Compute instance, as a node's `spec.providerID`
/// (`gce://<project>/<zone>/<instance>`) names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceRef {
    pub project: String,
    pub zone: String,
    pub name: String,
}

impl InstanceRef {
    /// `gce://my-project/us-central1-a/gke-node-1`; `None` for anything
    /// else (another cloud's ID, a missing part, an extra segment).
    pub fn from_provider_id(provider_id: &str) -> Option<InstanceRef> {
        let rest = provider_id.strip_prefix("gce://")?;
        let mut parts = rest.split('/');
        let (project, zone, name) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || [project, zone, name].iter().any(|p| p.is_empty()) {
            return None;
        }
        Some(InstanceRef {
            project: project.to_string(),
            zone: zone.to_string(),
            name: name.to_string(),
        })
    }

    /// The zone's region: `us-central1` for `us-central1-a`.
    pub fn region(&self) -> &str {
        region_of(&self.zone)
    }
}

/// The provider ID form, `gce://<project>/<zone>/<instance>`.
impl fmt::Display for InstanceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gce://{}/{}/{}", self.project, self.zone, self.name)
    }
}

/// `us-central1` for the zone `us-central1-a` (a name without a `-` is its
/// own region).
pub fn region_of(zone: &str) -> &str {
    zone.rsplit_once('-').map_or(zone, |(region, _)| region)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_ids_name_project_zone_and_instance() {
        let i = InstanceRef::from_provider_id("gce://my-project/us-central1-a/gke-node-1").unwrap();
        assert_eq!(
            i,
            InstanceRef {
                project: "my-project".into(),
                zone: "us-central1-a".into(),
                name: "gke-node-1".into(),
            }
        );
        assert_eq!(i.region(), "us-central1");
        assert_eq!(i.to_string(), "gce://my-project/us-central1-a/gke-node-1");
        for bad in [
            "",
            "gce://",
            "gce://p/z",
            "gce://p//i",
            "gce:///z/i",
            "gce://p/z/i/extra",
            "aws:///us-east-1a/i-0123",
            "p/z/i",
        ] {
            assert_eq!(InstanceRef::from_provider_id(bad), None, "{bad:?}");
        }
    }
}
