//! [`GcpNodes`]: the Compute instances behind Nodes ([`NodeProvider`]),
//! looked up with one `instances.list` per zone (every page of it), never
//! one `instances.get` per Node.
//!
//! The zones listed are those the Nodes' provider IDs
//! (`gce://<project>/<zone>/<instance>`) name, plus every zone of the
//! configured region when a Node has no provider ID yet; such a Node is
//! found by its name (the instance's name, as the kubelet on GCE names its
//! Node), else by its internal IPs (`nic0`'s `networkIP`).
//!
//! The pure parts (the zones to list, a Compute instance as an
//! [`Instance`], matching instances to Nodes) are separate from the calls
//! and tested on their own. Calls go through the provider's wrapper
//! (`calls.rs`, the `read` bucket). `deploy/gcp/ccm-role.yaml` grants the
//! permission of each method called here (`localstack-tests/tests/deploy.rs`
//! checks it).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;
use cnlb_provider_core::{
    Instance, InstanceMetadata, InstanceState, NodeAddress, NodeAddressKind, NodeProvider, NodeRef,
    ProviderError, Result,
};
use google_cloud_compute_v1::model::instance::Status;

use crate::calls::{Calls, last_segment};
use crate::instance::{InstanceRef, NIC0, region_of};

/// `instances.list` page size (the API's maximum).
const PAGE_SIZE: u32 = 500;
const OPERATION: &str = "instances.list";

/// A zone of a project: what one `instances.list` covers.
pub type ZoneRef = (String, String);

/// How a Node is looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// By its provider ID.
    Ref(InstanceRef),
    /// By name in the configured region's zones, else by internal IP.
    Name(String),
}

/// What [`plan`] decided: each Node's lookup and the zones to list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub lookups: Vec<Lookup>,
    pub zones: BTreeSet<ZoneRef>,
}

/// The lookups of `nodes` and the zones they need listed: the zones their
/// provider IDs name, and every zone of `region_zones` (in `project`, the
/// configured one) when a Node has none. A provider ID that is not GCE's
/// is a user error naming the Node: guessing another instance for it could
/// delete the Node.
pub fn plan(nodes: &[NodeRef], project: &str, region_zones: &[String]) -> Result<Plan> {
    let mut zones = BTreeSet::new();
    let mut by_name = false;
    let lookups = nodes
        .iter()
        .map(|node| match &node.provider_id {
            Some(id) => {
                let instance = InstanceRef::from_provider_id(id).ok_or_else(|| {
                    ProviderError::invalid(
                        format!("Node {} spec.providerID", node.name),
                        format!(
                            "{id:?} is not a GCE provider ID (gce://<project>/<zone>/<instance>)"
                        ),
                    )
                })?;
                zones.insert((instance.project.clone(), instance.zone.clone()));
                Ok(Lookup::Ref(instance))
            }
            None => {
                by_name = true;
                Ok(Lookup::Name(node.name.clone()))
            }
        })
        .collect::<Result<Vec<_>>>()?;
    if by_name {
        zones.extend(
            region_zones
                .iter()
                .map(|z| (project.to_string(), z.clone())),
        );
    }
    Ok(Plan { lookups, zones })
}

/// The instance name a Node name stands for: the name itself, or its first
/// label when the Node is named by the instance's internal DNS name
/// (`<instance>.<zone>.c.<project>.internal`); instance names have no dots.
pub fn instance_name_of(node_name: &str) -> &str {
    node_name.split('.').next().unwrap_or(node_name)
}

/// Whether an instance in `status` runs, is stopped (or on its way there
/// or back from it), or is something cnlb does not know, which is doubt.
/// GCE's TERMINATED means stopped, not deleted: a deleted instance is
/// simply not listed.
pub fn state_of(status: &Status) -> Option<InstanceState> {
    match status {
        Status::Provisioning
        | Status::Staging
        | Status::Running
        | Status::Repairing
        | Status::Pending => Some(InstanceState::Running),
        Status::Stopping
        | Status::Stopped
        | Status::Suspending
        | Status::Suspended
        | Status::Terminated
        | Status::PendingStop
        | Status::Deprovisioning => Some(InstanceState::Shutdown),
        _ => None,
    }
}

/// A listed instance, reduced to what matching Nodes needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub project: String,
    pub zone: String,
    pub name: String,
    /// `nic0`'s `networkIP`.
    pub internal_ip: Option<IpAddr>,
    pub instance: Instance,
}

/// A Compute instance listed in `project`'s `zone` as a Node sees it:
/// InternalIP `nic0`'s `networkIP`, ExternalIP its access configs' `natIP`,
/// Hostname the instance name, InternalDNS its zonal DNS name
/// (`<name>.<zone>.c.<project>.internal`); the instance type is the last
/// segment of `machineType`. No name, machine type or known status is
/// doubt, hence an error.
pub fn listed(
    i: &google_cloud_compute_v1::model::Instance,
    project: &str,
    zone: &str,
) -> Result<Listed> {
    let name = i
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| doubt(format!("an instance in {zone} without a name")))?;
    let status = i
        .status
        .as_ref()
        .ok_or_else(|| doubt(format!("instance {name} in {zone} has no status")))?;
    let state =
        state_of(status).ok_or_else(|| doubt(format!("instance {name} in {zone} is {status}")))?;
    let instance_type = i
        .machine_type
        .as_deref()
        .map(last_segment)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| doubt(format!("instance {name} in {zone} has no machine type")))?;
    let nic0 = i
        .network_interfaces
        .iter()
        .find(|n| n.name.as_deref() == Some(NIC0))
        .or_else(|| i.network_interfaces.first());
    let internal_ip = nic0
        .and_then(|n| n.network_ip.as_deref())
        .filter(|ip| !ip.is_empty());
    let mut addresses = Vec::new();
    let mut push = |kind, address: &str| {
        addresses.push(NodeAddress {
            kind,
            address: address.to_string(),
        })
    };
    if let Some(ip) = internal_ip {
        push(NodeAddressKind::InternalIP, ip);
    }
    for config in nic0
        .map(|n| n.access_configs.as_slice())
        .unwrap_or_default()
    {
        if let Some(ip) = config.nat_ip.as_deref().filter(|ip| !ip.is_empty()) {
            push(NodeAddressKind::ExternalIP, ip);
        }
    }
    push(NodeAddressKind::Hostname, &name);
    push(
        NodeAddressKind::InternalDNS,
        &format!("{name}.{zone}.c.{project}.internal"),
    );
    let provider_id = InstanceRef {
        project: project.to_string(),
        zone: zone.to_string(),
        name: name.clone(),
    }
    .to_string();
    Ok(Listed {
        project: project.to_string(),
        zone: zone.to_string(),
        internal_ip: internal_ip.and_then(|ip| ip.parse().ok()),
        instance: Instance {
            metadata: InstanceMetadata {
                provider_id,
                instance_type: instance_type.to_string(),
                addresses,
                zone: zone.to_string(),
                region: region_of(zone).to_string(),
            },
            state,
        },
        name,
    })
}

fn doubt(message: String) -> ProviderError {
    ProviderError::cloud(OPERATION, message, false)
}

/// The instances of the listed zones, indexed for matching Nodes.
#[derive(Debug, Default)]
pub struct Found {
    /// By (project, zone, name).
    instances: BTreeMap<(String, String, String), Instance>,
    by_name: BTreeMap<String, BTreeSet<(String, String, String)>>,
    by_ip: BTreeMap<IpAddr, BTreeSet<(String, String, String)>>,
}

impl Found {
    pub fn add(&mut self, l: Listed) {
        let key = (l.project, l.zone, l.name);
        self.by_name
            .entry(key.2.clone())
            .or_default()
            .insert(key.clone());
        if let Some(ip) = l.internal_ip {
            self.by_ip.entry(ip).or_default().insert(key.clone());
        }
        self.instances.insert(key, l.instance);
    }

    /// The instance a provider ID names; `None`: its zone's list lacks it.
    pub fn by_ref(&self, r: &InstanceRef) -> Option<Instance> {
        self.instances
            .get(&(r.project.clone(), r.zone.clone(), r.name.clone()))
            .cloned()
    }

    /// The instance of a Node without provider ID: by name, else by one of
    /// its internal IPs. Several matches (same name in two zones) are doubt.
    pub fn by_node(&self, node: &NodeRef) -> Result<Option<Instance>> {
        let named = self.by_name.get(instance_name_of(&node.name));
        if let Some(found) = self.one(node, named.into_iter().flatten())? {
            return Ok(Some(found));
        }
        let by_ip = node
            .internal_ips
            .iter()
            .filter_map(|ip| self.by_ip.get(ip))
            .flatten();
        self.one(node, by_ip)
    }

    fn one<'a>(
        &self,
        node: &NodeRef,
        keys: impl Iterator<Item = &'a (String, String, String)>,
    ) -> Result<Option<Instance>> {
        let keys: BTreeSet<_> = keys.collect();
        match keys.len() {
            0 => Ok(None),
            1 => Ok(keys.first().and_then(|k| self.instances.get(*k)).cloned()),
            _ => Err(doubt(format!(
                "several instances match Node {}: {:?}",
                node.name,
                keys.iter()
                    .map(|(_, z, n)| format!("{z}/{n}"))
                    .collect::<Vec<_>>()
            ))),
        }
    }
}

/// Compute instances behind Nodes, through the provider's rate limits,
/// retries and metrics.
pub struct GcpNodes {
    calls: Arc<Calls>,
    region_zones: Vec<String>,
}

impl GcpNodes {
    /// Looks up Nodes through `calls` (whose project is where Nodes without
    /// provider ID are looked for), in `region_zones`, every zone of the
    /// configured region. Next to a [`crate::GcpProvider`], use its
    /// [`nodes`](crate::GcpProvider::nodes): it knows the zones and shares
    /// its wrapper.
    pub fn new(calls: Arc<Calls>, region_zones: Vec<String>) -> GcpNodes {
        GcpNodes {
            calls,
            region_zones,
        }
    }

    /// Every instance of `zone` in `project`, page by page.
    async fn list(&self, (project, zone): &ZoneRef, found: &mut Found) -> Result<()> {
        let c = self.calls.compute();
        let mut token: Option<String> = None;
        loop {
            let t = token.clone();
            let page = self
                .calls
                .run("instances.list", || {
                    c.instances
                        .list()
                        .set_project(project)
                        .set_zone(zone)
                        .set_max_results(PAGE_SIZE)
                        .set_or_clear_page_token(t.clone())
                        .send()
                })
                .await?;
            for i in &page.items {
                found.add(listed(i, project, zone)?);
            }
            match page.next_page_token {
                Some(next) if !next.is_empty() => token = Some(next),
                _ => return Ok(()),
            }
        }
    }
}

#[async_trait]
impl NodeProvider for GcpNodes {
    fn name(&self) -> &str {
        "gcp"
    }

    async fn instances(&self, nodes: &[NodeRef]) -> Result<Vec<Option<Instance>>> {
        let plan = plan(nodes, self.calls.project(), &self.region_zones)?;
        let mut found = Found::default();
        for zone in &plan.zones {
            self.list(zone, &mut found).await?;
        }
        nodes
            .iter()
            .zip(&plan.lookups)
            .map(|(node, lookup)| match lookup {
                Lookup::Ref(r) => Ok(found.by_ref(r)),
                Lookup::Name(_) => found.by_node(node),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use google_cloud_compute_v1::model::Instance as GceInstance;
    use serde_json::json;

    use super::*;

    fn node(name: &str, provider_id: Option<&str>, ips: &[&str]) -> NodeRef {
        NodeRef {
            name: name.into(),
            provider_id: provider_id.map(str::to_string),
            internal_ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
        }
    }

    fn zones(z: &[(&str, &str)]) -> BTreeSet<ZoneRef> {
        z.iter()
            .map(|(p, z)| (p.to_string(), z.to_string()))
            .collect()
    }

    #[test]
    fn zones_listed_are_those_of_provider_ids_and_the_region_for_the_rest() {
        let region = ["us-central1-a".to_string(), "us-central1-b".into()];
        let a = node("a", Some("gce://p/us-central1-a/a"), &[]);
        let a2 = node("a2", Some("gce://p/us-central1-a/a2"), &[]);
        let other = node("o", Some("gce://host/europe-west1-b/o"), &[]);
        let named = node("n", None, &["10.0.0.9"]);
        let cases = [
            (vec![], zones(&[])),
            (
                vec![a.clone(), a2.clone()],
                zones(&[("p", "us-central1-a")]),
            ),
            (
                vec![a.clone(), other.clone()],
                zones(&[("host", "europe-west1-b"), ("p", "us-central1-a")]),
            ),
            (
                vec![named.clone(), a.clone()],
                zones(&[("p", "us-central1-a"), ("p", "us-central1-b")]),
            ),
            (
                vec![named.clone(), other.clone()],
                zones(&[
                    ("host", "europe-west1-b"),
                    ("p", "us-central1-a"),
                    ("p", "us-central1-b"),
                ]),
            ),
        ];
        for (nodes, want) in cases {
            let got = plan(&nodes, "p", &region).unwrap();
            assert_eq!(got.zones, want, "{nodes:?}");
            assert_eq!(got.lookups.len(), nodes.len());
        }
        let got = plan(&[named, a], "p", &region).unwrap();
        assert_eq!(got.lookups[0], Lookup::Name("n".into()));
        assert!(matches!(&got.lookups[1], Lookup::Ref(r) if r.name == "a"));

        let foreign = node("x", Some("aws:///us-east-1a/i-1"), &[]);
        let err = plan(&[foreign], "p", &region).unwrap_err();
        assert!(
            matches!(&err, ProviderError::InvalidSpec { field, .. } if field == "Node x spec.providerID"),
            "{err:?}"
        );
    }

    #[test]
    fn statuses_map_to_running_or_shutdown() {
        let cases = [
            ("PROVISIONING", Some(InstanceState::Running)),
            ("STAGING", Some(InstanceState::Running)),
            ("RUNNING", Some(InstanceState::Running)),
            ("REPAIRING", Some(InstanceState::Running)),
            ("PENDING", Some(InstanceState::Running)),
            ("STOPPING", Some(InstanceState::Shutdown)),
            ("STOPPED", Some(InstanceState::Shutdown)),
            ("SUSPENDING", Some(InstanceState::Shutdown)),
            ("SUSPENDED", Some(InstanceState::Shutdown)),
            ("TERMINATED", Some(InstanceState::Shutdown)),
            ("PENDING_STOP", Some(InstanceState::Shutdown)),
            ("DEPROVISIONING", Some(InstanceState::Shutdown)),
            ("HIBERNATING", None),
        ];
        for (status, want) in cases {
            assert_eq!(state_of(&Status::from(status)), want, "{status}");
        }
    }

    fn gce(v: serde_json::Value) -> GceInstance {
        serde_json::from_value(v).unwrap()
    }

    fn addr(kind: NodeAddressKind, address: &str) -> NodeAddress {
        NodeAddress {
            kind,
            address: address.into(),
        }
    }

    #[test]
    fn instances_map_to_what_nodes_get() {
        use NodeAddressKind::*;
        let public = gce(json!({
            "name": "node-1",
            "zone": "https://www.googleapis.com/compute/v1/projects/p/zones/us-central1-b",
            "machineType": "https://www.googleapis.com/compute/v1/projects/p/zones/us-central1-b/machineTypes/e2-standard-4",
            "status": "RUNNING",
            "networkInterfaces": [{
                "name": "nic0",
                "networkIP": "10.0.0.7",
                "accessConfigs": [{"name": "External NAT", "natIP": "34.1.2.3"}],
            }],
        }));
        let l = listed(&public, "p", "us-central1-b").unwrap();
        assert_eq!(
            (l.project.as_str(), l.zone.as_str(), l.name.as_str()),
            ("p", "us-central1-b", "node-1")
        );
        assert_eq!(l.internal_ip, Some("10.0.0.7".parse().unwrap()));
        let m = &l.instance.metadata;
        assert_eq!(m.provider_id, "gce://p/us-central1-b/node-1");
        assert_eq!(m.instance_type, "e2-standard-4");
        assert_eq!(
            (m.zone.as_str(), m.region.as_str()),
            ("us-central1-b", "us-central1")
        );
        assert_eq!(
            m.addresses,
            [
                addr(InternalIP, "10.0.0.7"),
                addr(ExternalIP, "34.1.2.3"),
                addr(Hostname, "node-1"),
                addr(InternalDNS, "node-1.us-central1-b.c.p.internal"),
            ]
        );
        assert_eq!(l.instance.state, InstanceState::Running);

        // Stopped (TERMINATED), private: no ExternalIP.
        let stopped = gce(json!({
            "name": "node-2", "machineType": "zones/us-central1-b/machineTypes/n2-standard-2",
            "status": "TERMINATED",
            "networkInterfaces": [{"name": "nic0", "networkIP": "10.0.0.8", "accessConfigs": [{"name": "x"}]}],
        }));
        let l = listed(&stopped, "p", "us-central1-b").unwrap();
        assert_eq!(l.instance.state, InstanceState::Shutdown);
        assert_eq!(l.instance.metadata.instance_type, "n2-standard-2");
        assert_eq!(
            l.instance
                .metadata
                .addresses
                .iter()
                .map(|a| a.kind)
                .collect::<Vec<_>>(),
            [InternalIP, Hostname, InternalDNS]
        );

        for broken in [
            json!({"machineType": "e2-small", "status": "RUNNING"}),
            json!({"name": "n", "status": "RUNNING"}),
            json!({"name": "n", "machineType": "e2-small"}),
            json!({"name": "n", "machineType": "e2-small", "status": "HIBERNATING"}),
        ] {
            assert!(
                listed(&gce(broken.clone()), "p", "z-a").is_err(),
                "{broken}"
            );
        }
    }

    fn add(found: &mut Found, zone: &str, name: &str, ip: &str) {
        let i = gce(json!({
            "name": name, "machineType": "e2-small", "status": "RUNNING",
            "networkInterfaces": [{"name": "nic0", "networkIP": ip}],
        }));
        found.add(listed(&i, "p", zone).unwrap());
    }

    #[test]
    fn listed_instances_match_nodes_by_id_name_and_ip() {
        let mut found = Found::default();
        add(&mut found, "us-central1-a", "node-1", "10.0.0.1");
        add(&mut found, "us-central1-b", "node-2", "10.0.0.2");
        add(&mut found, "us-central1-a", "twin", "10.0.0.3");
        add(&mut found, "us-central1-b", "twin", "10.0.0.4");
        let id = |i: Option<Instance>| i.map(|i| i.metadata.provider_id);
        let r = |s: &str| InstanceRef::from_provider_id(s).unwrap();

        assert_eq!(
            id(found.by_ref(&r("gce://p/us-central1-a/node-1"))),
            Some("gce://p/us-central1-a/node-1".into())
        );
        assert_eq!(
            found.by_ref(&r("gce://p/us-central1-b/node-1")),
            None,
            "other zone"
        );
        assert_eq!(
            found.by_ref(&r("gce://q/us-central1-a/node-1")),
            None,
            "other project"
        );

        let cases = [
            (
                node("node-2", None, &[]),
                Some("gce://p/us-central1-b/node-2"),
            ),
            (
                node("node-2.us-central1-b.c.p.internal", None, &[]),
                Some("gce://p/us-central1-b/node-2"),
            ),
            (
                node("renamed", None, &["10.0.0.1"]),
                Some("gce://p/us-central1-a/node-1"),
            ),
            (
                node("node-1", None, &["10.0.0.2"]),
                Some("gce://p/us-central1-a/node-1"),
            ),
            (node("gone", None, &["10.0.0.9"]), None),
            (node("gone", None, &[]), None),
        ];
        for (n, want) in cases {
            assert_eq!(
                id(found.by_node(&n).unwrap()),
                want.map(str::to_string),
                "{n:?}"
            );
        }
        assert!(found.by_node(&node("twin", None, &[])).is_err());
        assert!(
            found
                .by_node(&node("x", None, &["10.0.0.1", "10.0.0.2"]))
                .is_err()
        );
    }
}
