//! [`AwsNodes`]: the EC2 instances behind Nodes ([`NodeProvider`]), as
//! cloud-provider-aws describes them, looked up in batches.
//!
//! A Node is looked up by the instance ID in its provider ID
//! (`aws:///<az>/<id>`, or `aws:///<id>`), else by its name as the
//! instance's private DNS name, else by its internal IPs as the instance's
//! primary private IP: one DescribeInstances per [`FILTER_VALUES_MAX`]
//! values of each filter (`instance-id`, `private-dns-name`, then
//! `private-ip-address` for the Nodes no name found), every page of it.
//! Filters rather than `InstanceIds`, because an ID EC2 does not know fails
//! a whole `InstanceIds` request, while a filter just leaves it out.
//!
//! The pure parts (provider IDs, batching, an SDK instance as an
//! [`Instance`], matching answers to Nodes) are separate from the calls
//! and tested on their own. Calls go through the provider's wrapper
//! (`calls.rs`, the `read` bucket), so `cnlb_cloud_api_calls_total{
//! operation="DescribeInstances"}` counts them.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_ec2::types::{Filter, InstanceStateName};
use cnlb_provider_core::{
    Instance, InstanceMetadata, InstanceState, NodeAddress, NodeAddressKind, NodeProvider, NodeRef,
    ProviderError, Result,
};
use prometheus_client::registry::Registry;

use crate::Clients;
use crate::calls::{Calls, RateLimits};

/// Values one DescribeInstances filter takes at most.
pub const FILTER_VALUES_MAX: usize = 200;
/// DescribeInstances page size (the API's maximum).
const PAGE_SIZE: i32 = 1000;
const OPERATION: &str = "DescribeInstances";

/// The `spec.providerID` of an instance: `aws:///<az>/<instance-id>`.
pub fn provider_id(zone: &str, instance_id: &str) -> String {
    format!("aws:///{zone}/{instance_id}")
}

/// The instance ID in a provider ID, as cloud-provider-aws reads it:
/// `aws:///<az>/<id>` or `aws:///<id>` (also with a host part, which it
/// ignores), or a bare `i-...`; `None` for anything else.
pub fn instance_id_of(provider_id: &str) -> Option<&str> {
    let path = match provider_id.strip_prefix("aws://") {
        Some(rest) => rest.split_once('/').map(|(_, path)| path)?,
        None if !provider_id.contains(':') => provider_id,
        None => return None,
    };
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let id = match segments.as_slice() {
        [id] | [_, id] => *id,
        _ => return None,
    };
    (id.len() > 2 && id.starts_with("i-")).then_some(id)
}

/// `us-east-1` for `us-east-1a`: the zone without its letter. Only for
/// when the client has no region (it always has one in practice; Local
/// Zones such as `us-west-2-lax-1a` need the client's).
pub fn region_of_zone(zone: &str) -> &str {
    zone.strip_suffix(|c: char| c.is_ascii_lowercase())
        .unwrap_or(zone)
}

/// How a Node is looked up first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// By instance ID (from its provider ID).
    Id(String),
    /// By private DNS name (its name); by internal IP when that finds none.
    Name(String),
}

/// The first lookup of each Node. A provider ID that names no EC2
/// instance is a user error naming the Node: guessing another instance for
/// it could delete the Node.
pub fn lookups(nodes: &[NodeRef]) -> Result<Vec<Lookup>> {
    nodes
        .iter()
        .map(|node| match &node.provider_id {
            Some(id) => instance_id_of(id)
                .map(|i| Lookup::Id(i.to_string()))
                .ok_or_else(|| {
                    ProviderError::invalid(
                        format!("Node {} spec.providerID", node.name),
                        format!("{id:?} is not an AWS provider ID (aws:///<zone>/<instance-id>)"),
                    )
                }),
            None => Ok(Lookup::Name(node.name.clone())),
        })
        .collect()
}

/// The distinct values, sorted, in batches of at most
/// [`FILTER_VALUES_MAX`]: one DescribeInstances (with its pages) each.
pub fn batches<I: IntoIterator<Item = String>>(values: I) -> Vec<Vec<String>> {
    let distinct: BTreeSet<String> = values.into_iter().collect();
    let distinct: Vec<String> = distinct.into_iter().collect();
    distinct
        .chunks(FILTER_VALUES_MAX)
        .map(<[String]>::to_vec)
        .collect()
}

/// An instance as DescribeInstances described it, reduced to what matching
/// Nodes needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Described {
    pub id: String,
    pub private_dns_name: Option<String>,
    pub private_ip: Option<IpAddr>,
    /// `None` when it is shutting down or terminated: gone for good.
    pub instance: Option<Instance>,
}

fn non_empty(s: Option<&str>) -> Option<&str> {
    s.filter(|s| !s.is_empty())
}

/// An SDK instance as a Node sees it; `region` is the client's.
///
/// Addresses as cloud-provider-aws sets them: InternalIP for the private
/// IPs of the primary network interface (device index 0), the primary one
/// first (vpc-ipam never puts Pod addresses there: it uses ENIs of its
/// own), ExternalIP for the public IP, InternalDNS and Hostname for the
/// private DNS name, ExternalDNS for the public one. Empty strings (EC2
/// answers `""` for "none") count as absent. A live instance without an
/// ID, zone, type or state is doubt, hence an error.
pub fn describe(i: &aws_sdk_ec2::types::Instance, region: Option<&str>) -> Result<Described> {
    let id = non_empty(i.instance_id())
        .ok_or_else(|| doubt("an instance without an ID".to_string()))?
        .to_string();
    let state = match i.state().and_then(|s| s.name()) {
        Some(InstanceStateName::Pending | InstanceStateName::Running) => {
            Some(InstanceState::Running)
        }
        Some(InstanceStateName::Stopping | InstanceStateName::Stopped) => {
            Some(InstanceState::Shutdown)
        }
        Some(InstanceStateName::ShuttingDown | InstanceStateName::Terminated) => None,
        Some(other) => return Err(doubt(format!("instance {id} is in state {other}"))),
        None => return Err(doubt(format!("instance {id} has no state"))),
    };
    let private_dns_name = non_empty(i.private_dns_name()).map(str::to_string);
    let private_ip = non_empty(i.private_ip_address()).and_then(|ip| ip.parse().ok());
    let Some(state) = state else {
        return Ok(Described {
            id,
            private_dns_name,
            private_ip,
            instance: None,
        });
    };
    let zone = non_empty(i.placement().and_then(|p| p.availability_zone()))
        .ok_or_else(|| doubt(format!("instance {id} has no availability zone")))?;
    let instance_type = i
        .instance_type()
        .map(|t| t.as_str())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| doubt(format!("instance {id} has no instance type")))?;
    let region = region.unwrap_or_else(|| region_of_zone(zone));
    Ok(Described {
        instance: Some(Instance {
            metadata: InstanceMetadata {
                provider_id: provider_id(zone, &id),
                instance_type: instance_type.to_string(),
                addresses: addresses(i),
                zone: zone.to_string(),
                region: region.to_string(),
            },
            state,
        }),
        id,
        private_dns_name,
        private_ip,
    })
}

fn addresses(i: &aws_sdk_ec2::types::Instance) -> Vec<NodeAddress> {
    let mut out = Vec::new();
    let mut push = |kind, address: &str| {
        let address = NodeAddress {
            kind,
            address: address.to_string(),
        };
        if !out.contains(&address) {
            out.push(address);
        }
    };
    if let Some(ip) = non_empty(i.private_ip_address()) {
        push(NodeAddressKind::InternalIP, ip);
    }
    let primary_eni = i
        .network_interfaces()
        .iter()
        .find(|n| n.attachment().and_then(|a| a.device_index()) == Some(0));
    if let Some(eni) = primary_eni {
        let mut ips: Vec<_> = eni.private_ip_addresses().iter().collect();
        // Primary first, the rest in EC2's order.
        ips.sort_by_key(|a| a.primary() != Some(true));
        for ip in ips.iter().filter_map(|a| non_empty(a.private_ip_address())) {
            push(NodeAddressKind::InternalIP, ip);
        }
    }
    if let Some(ip) = non_empty(i.public_ip_address()) {
        push(NodeAddressKind::ExternalIP, ip);
    }
    if let Some(name) = non_empty(i.private_dns_name()) {
        push(NodeAddressKind::InternalDNS, name);
        push(NodeAddressKind::Hostname, name);
    }
    if let Some(name) = non_empty(i.public_dns_name()) {
        push(NodeAddressKind::ExternalDNS, name);
    }
    out
}

fn doubt(message: String) -> ProviderError {
    ProviderError::cloud(OPERATION, message, false)
}

/// What the DescribeInstances answers said, indexed for matching Nodes.
#[derive(Debug, Default)]
pub struct Found {
    /// Every instance seen; `None`: gone.
    by_id: HashMap<String, Option<Instance>>,
    /// Live instances only: a terminated instance's name or IP may already
    /// be a new instance's.
    by_name: HashMap<String, BTreeSet<String>>,
    by_ip: HashMap<IpAddr, BTreeSet<String>>,
}

impl Found {
    pub fn add(&mut self, d: Described) {
        if d.instance.is_some() {
            if let Some(name) = &d.private_dns_name {
                self.by_name
                    .entry(name.clone())
                    .or_default()
                    .insert(d.id.clone());
            }
            if let Some(ip) = d.private_ip {
                self.by_ip.entry(ip).or_default().insert(d.id.clone());
            }
        }
        self.by_id.insert(d.id, d.instance);
    }

    /// The instance `id`: `None` when it is gone or EC2 did not list it
    /// (an instance-id filter leaves out what does not exist).
    pub fn by_id(&self, id: &str) -> Option<Instance> {
        self.by_id.get(id).cloned().flatten()
    }

    /// The live instance whose private DNS name is `name`.
    pub fn by_name(&self, name: &str) -> Result<Option<Instance>> {
        self.one(name, self.by_name.get(name).into_iter().flatten())
    }

    /// The live instance whose primary private IP is one of `ips`.
    pub fn by_ips(&self, node: &str, ips: &[IpAddr]) -> Result<Option<Instance>> {
        self.one(
            node,
            ips.iter().filter_map(|ip| self.by_ip.get(ip)).flatten(),
        )
    }

    /// The one instance of `ids`; more than one is doubt.
    fn one<'a>(
        &self,
        node: &str,
        ids: impl Iterator<Item = &'a String>,
    ) -> Result<Option<Instance>> {
        let ids: BTreeSet<&String> = ids.collect();
        match ids.len() {
            0 => Ok(None),
            1 => Ok(ids.first().and_then(|id| self.by_id(id))),
            _ => Err(doubt(format!(
                "several running instances match Node {node}: {ids:?}"
            ))),
        }
    }
}

/// The IPv4 internal IPs of `node`: what `private-ip-address` filters on.
fn ipv4s(node: &NodeRef) -> Vec<IpAddr> {
    node.internal_ips
        .iter()
        .filter(|ip| ip.is_ipv4())
        .copied()
        .collect()
}

/// EC2 instances behind Nodes, through the provider's rate limits, retries
/// and metrics.
pub struct AwsNodes {
    ec2: aws_sdk_ec2::Client,
    calls: Arc<Calls>,
    region: Option<String>,
}

impl AwsNodes {
    /// Calls EC2 through `clients` with the SDK's own retries off; registers
    /// the `cnlb_cloud_api_*` metrics in `registry`, which must not hold
    /// them yet. Next to an [`crate::AwsProvider`], use its
    /// [`nodes`](crate::AwsProvider::nodes) instead: one wrapper, one set
    /// of buckets and metrics.
    pub fn new(clients: &Clients, limits: &RateLimits, registry: &mut Registry) -> AwsNodes {
        AwsNodes::with_calls(clients, Arc::new(Calls::new(limits, registry)))
    }

    pub(crate) fn with_calls(clients: &Clients, calls: Arc<Calls>) -> AwsNodes {
        let ec2 = clients.without_sdk_retries().ec2;
        let region = ec2.config().region().map(|r| r.to_string());
        AwsNodes { ec2, calls, region }
    }

    /// Every instance matching `name` = any of `values`, batched and paged.
    async fn describe(&self, name: &str, values: Vec<String>, found: &mut Found) -> Result<()> {
        for batch in batches(values) {
            let filter = Filter::builder().name(name).set_values(Some(batch)).build();
            let mut token: Option<String> = None;
            loop {
                let request = self
                    .ec2
                    .describe_instances()
                    .filters(filter.clone())
                    .max_results(PAGE_SIZE)
                    .set_next_token(token.clone());
                let out = self.calls.run(OPERATION, || request.clone().send()).await?;
                for i in out.reservations().iter().flat_map(|r| r.instances()) {
                    found.add(describe(i, self.region.as_deref())?);
                }
                match out.next_token() {
                    Some(next) if !next.is_empty() => token = Some(next.to_string()),
                    _ => break,
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl NodeProvider for AwsNodes {
    fn name(&self) -> &str {
        "aws"
    }

    async fn instances(&self, nodes: &[NodeRef]) -> Result<Vec<Option<Instance>>> {
        let lookups = lookups(nodes)?;
        let mut found = Found::default();
        let ids = lookups.iter().filter_map(|l| match l {
            Lookup::Id(id) => Some(id.clone()),
            Lookup::Name(_) => None,
        });
        self.describe("instance-id", ids.collect(), &mut found)
            .await?;
        let names = lookups.iter().filter_map(|l| match l {
            Lookup::Name(name) => Some(name.clone()),
            Lookup::Id(_) => None,
        });
        self.describe("private-dns-name", names.collect(), &mut found)
            .await?;

        let mut out = Vec::with_capacity(nodes.len());
        let mut by_ip = Vec::new();
        for (i, (node, lookup)) in nodes.iter().zip(&lookups).enumerate() {
            out.push(match lookup {
                Lookup::Id(id) => found.by_id(id),
                Lookup::Name(name) => {
                    let instance = found.by_name(name)?;
                    if instance.is_none() && !ipv4s(node).is_empty() {
                        by_ip.push(i);
                    }
                    instance
                }
            });
        }
        if by_ip.is_empty() {
            return Ok(out);
        }
        let ips = by_ip
            .iter()
            .flat_map(|&i| nodes.get(i).map(ipv4s).unwrap_or_default())
            .map(|ip| ip.to_string());
        let mut found = Found::default();
        self.describe("private-ip-address", ips.collect(), &mut found)
            .await?;
        for i in by_ip {
            if let (Some(node), Some(slot)) = (nodes.get(i), out.get_mut(i)) {
                *slot = found.by_ips(&node.name, &ipv4s(node))?;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use aws_sdk_ec2::types::{
        InstanceNetworkInterface, InstanceNetworkInterfaceAttachment, InstancePrivateIpAddress,
        InstanceType, Placement,
    };

    use super::*;

    #[test]
    fn provider_ids_name_the_instance() {
        let cases = [
            (
                "aws:///us-east-1a/i-0123456789abcdef0",
                Some("i-0123456789abcdef0"),
            ),
            ("aws:///i-0123", Some("i-0123")),
            ("aws://us-east-1a/us-east-1a/i-0123", Some("i-0123")),
            ("aws:////i-0123", Some("i-0123")),
            ("i-0123", Some("i-0123")),
            ("aws:///us-east-1a/", None),
            ("aws:///us-east-1a/vol-1", None),
            ("aws:///a/b/i-0123", None),
            ("aws:///i-", None),
            ("gce://p/us-central1-a/n", None),
            ("onprem://n", None),
            ("", None),
        ];
        for (id, want) in cases {
            assert_eq!(instance_id_of(id), want, "{id:?}");
        }
        assert_eq!(
            provider_id("eu-west-1b", "i-0abc"),
            "aws:///eu-west-1b/i-0abc"
        );
        assert_eq!(
            instance_id_of(&provider_id("eu-west-1b", "i-0abc")),
            Some("i-0abc")
        );
        for (zone, region) in [
            ("us-east-1a", "us-east-1"),
            ("eu-west-1c", "eu-west-1"),
            ("us-east-1", "us-east-1"),
        ] {
            assert_eq!(region_of_zone(zone), region, "{zone}");
        }
    }

    #[test]
    fn nodes_are_looked_up_by_id_else_by_name() {
        let mut with_id = NodeRef::named("a");
        with_id.provider_id = Some("aws:///us-east-1a/i-1".into());
        let by_name = NodeRef::named("ip-10-0-0-1.ec2.internal");
        assert_eq!(
            lookups(&[with_id, by_name]).unwrap(),
            [
                Lookup::Id("i-1".into()),
                Lookup::Name("ip-10-0-0-1.ec2.internal".into())
            ]
        );
        let mut foreign = NodeRef::named("b");
        foreign.provider_id = Some("gce://p/z/b".into());
        let err = lookups(&[foreign]).unwrap_err();
        assert!(
            matches!(&err, ProviderError::InvalidSpec { field, .. } if field == "Node b spec.providerID"),
            "{err:?}"
        );
    }

    #[test]
    fn values_go_in_batches_of_200() {
        let n = |count: usize| (0..count).map(|i| format!("i-{i:05}"));
        for (count, want) in [
            (0, vec![]),
            (1, vec![1]),
            (200, vec![200]),
            (201, vec![200, 1]),
            (250, vec![200, 50]),
            (600, vec![200, 200, 200]),
        ] {
            let sizes: Vec<usize> = batches(n(count)).iter().map(Vec::len).collect();
            assert_eq!(sizes, want, "{count}");
        }
        // Duplicates are asked once.
        let twice = batches(["i-1".to_string(), "i-1".into(), "i-2".into()]);
        assert_eq!(twice, [vec!["i-1".to_string(), "i-2".into()]]);
    }

    fn ip(address: &str, primary: bool) -> InstancePrivateIpAddress {
        InstancePrivateIpAddress::builder()
            .private_ip_address(address)
            .primary(primary)
            .build()
    }

    fn eni(device_index: i32, ips: Vec<InstancePrivateIpAddress>) -> InstanceNetworkInterface {
        InstanceNetworkInterface::builder()
            .attachment(
                InstanceNetworkInterfaceAttachment::builder()
                    .device_index(device_index)
                    .build(),
            )
            .set_private_ip_addresses(Some(ips))
            .build()
    }

    fn ec2_instance(state: InstanceStateName) -> aws_sdk_ec2::types::builders::InstanceBuilder {
        aws_sdk_ec2::types::Instance::builder()
            .instance_id("i-0abc")
            .state(
                aws_sdk_ec2::types::InstanceState::builder()
                    .name(state)
                    .build(),
            )
            .instance_type(InstanceType::M5Large)
            .placement(Placement::builder().availability_zone("us-east-1b").build())
            .private_ip_address("10.0.1.5")
            .private_dns_name("ip-10-0-1-5.ec2.internal")
            .public_dns_name("")
    }

    fn addr(kind: NodeAddressKind, address: &str) -> NodeAddress {
        NodeAddress {
            kind,
            address: address.into(),
        }
    }

    #[test]
    fn states_map_to_running_shutdown_or_gone() {
        use InstanceStateName as S;
        let cases = [
            (S::Pending, Some(InstanceState::Running)),
            (S::Running, Some(InstanceState::Running)),
            (S::Stopping, Some(InstanceState::Shutdown)),
            (S::Stopped, Some(InstanceState::Shutdown)),
            (S::ShuttingDown, None),
            (S::Terminated, None),
        ];
        for (state, want) in cases {
            let d = describe(&ec2_instance(state.clone()).build(), Some("us-east-1")).unwrap();
            assert_eq!(d.instance.map(|i| i.state), want, "{state}");
            assert_eq!(d.id, "i-0abc");
        }
        let unknown = ec2_instance(S::from("hibernating")).build();
        assert!(describe(&unknown, None).is_err());
        let stateless = ec2_instance(S::Running).set_state(None).build();
        assert!(describe(&stateless, None).is_err());
    }

    #[test]
    fn instances_map_as_cloud_provider_aws_describes_them() {
        use NodeAddressKind::*;
        // A public instance with a secondary IP on its primary ENI and a
        // Pod ENI (device index 1) whose addresses are not the Node's.
        let public = ec2_instance(InstanceStateName::Running)
            .public_ip_address("203.0.113.7")
            .public_dns_name("ec2-203-0-113-7.compute-1.amazonaws.com")
            .network_interfaces(eni(1, vec![ip("100.64.0.9", true)]))
            .network_interfaces(eni(0, vec![ip("10.0.1.6", false), ip("10.0.1.5", true)]))
            .build();
        let d = describe(&public, Some("us-east-1")).unwrap();
        assert_eq!(
            d.private_dns_name.as_deref(),
            Some("ip-10-0-1-5.ec2.internal")
        );
        assert_eq!(d.private_ip, Some("10.0.1.5".parse().unwrap()));
        let i = d.instance.unwrap();
        assert_eq!(i.metadata.provider_id, "aws:///us-east-1b/i-0abc");
        assert_eq!(i.metadata.instance_type, "m5.large");
        assert_eq!(i.metadata.zone, "us-east-1b");
        assert_eq!(i.metadata.region, "us-east-1");
        assert_eq!(
            i.metadata.addresses,
            [
                addr(InternalIP, "10.0.1.5"),
                addr(InternalIP, "10.0.1.6"),
                addr(ExternalIP, "203.0.113.7"),
                addr(InternalDNS, "ip-10-0-1-5.ec2.internal"),
                addr(Hostname, "ip-10-0-1-5.ec2.internal"),
                addr(ExternalDNS, "ec2-203-0-113-7.compute-1.amazonaws.com"),
            ]
        );

        // Private, no ENI list; the region from the zone without a client region.
        let private = ec2_instance(InstanceStateName::Stopped).build();
        let i = describe(&private, None).unwrap().instance.unwrap();
        assert_eq!(i.state, InstanceState::Shutdown);
        assert_eq!(i.metadata.region, "us-east-1");
        assert_eq!(
            i.metadata.addresses,
            [
                addr(InternalIP, "10.0.1.5"),
                addr(InternalDNS, "ip-10-0-1-5.ec2.internal"),
                addr(Hostname, "ip-10-0-1-5.ec2.internal"),
            ]
        );

        // A live instance missing what the Node needs is doubt; a gone one
        // needs nothing.
        for broken in [
            ec2_instance(InstanceStateName::Running).set_placement(None),
            ec2_instance(InstanceStateName::Running).set_instance_type(None),
            ec2_instance(InstanceStateName::Running).set_instance_id(None),
        ] {
            assert!(describe(&broken.build(), None).is_err());
        }
        let gone = ec2_instance(InstanceStateName::Terminated)
            .set_placement(None)
            .private_dns_name("")
            .build();
        let d = describe(&gone, None).unwrap();
        assert_eq!((d.instance, d.private_dns_name), (None, None));
    }

    fn described(id: &str, name: &str, ip: &str, state: Option<InstanceState>) -> Described {
        Described {
            id: id.into(),
            private_dns_name: Some(name.into()),
            private_ip: ip.parse().ok(),
            instance: state.map(|state| Instance {
                metadata: InstanceMetadata {
                    provider_id: provider_id("us-east-1a", id),
                    instance_type: "m5.large".into(),
                    addresses: Vec::new(),
                    zone: "us-east-1a".into(),
                    region: "us-east-1".into(),
                },
                state,
            }),
        }
    }

    #[test]
    fn answers_match_nodes_by_id_name_and_ip() {
        let mut found = Found::default();
        let running = Some(InstanceState::Running);
        found.add(described(
            "i-1",
            "ip-10-0-0-1.ec2.internal",
            "10.0.0.1",
            running,
        ));
        found.add(described(
            "i-2",
            "ip-10-0-0-2.ec2.internal",
            "10.0.0.2",
            None,
        ));
        // i-3 took the terminated i-2's address (and so its DNS name).
        found.add(described(
            "i-3",
            "ip-10-0-0-2.ec2.internal",
            "10.0.0.2",
            running,
        ));
        // Two live instances with the private IP 10.0.0.4 (two VPCs with
        // the same CIDR): doubt.
        found.add(described(
            "i-4",
            "ip-10-0-0-4.ec2.internal",
            "10.0.0.4",
            running,
        ));
        found.add(described(
            "i-5",
            "other",
            "10.0.0.4",
            Some(InstanceState::Shutdown),
        ));

        let id = |i: Option<Instance>| i.map(|i| i.metadata.provider_id);
        assert_eq!(
            id(found.by_id("i-1")),
            Some(provider_id("us-east-1a", "i-1"))
        );
        assert_eq!(found.by_id("i-2"), None, "terminated");
        assert_eq!(found.by_id("i-9"), None, "not listed");
        assert_eq!(
            id(found.by_name("ip-10-0-0-2.ec2.internal").unwrap()),
            Some(provider_id("us-east-1a", "i-3"))
        );
        assert_eq!(found.by_name("ip-10-0-0-9.ec2.internal").unwrap(), None);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            id(found
                .by_ips("n", &[ip("10.0.0.9"), ip("10.0.0.1")])
                .unwrap()),
            Some(provider_id("us-east-1a", "i-1"))
        );
        assert_eq!(found.by_ips("n", &[ip("10.0.0.9")]).unwrap(), None);
        assert!(found.by_ips("n", &[ip("10.0.0.4")]).is_err());
        assert!(
            found
                .by_ips("n", &[ip("10.0.0.1"), ip("10.0.0.2")])
                .is_err()
        );
    }
}
