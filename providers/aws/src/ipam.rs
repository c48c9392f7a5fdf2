//! The EC2 calls of vpc-ipam's AWS backend: the node's instance and its
//! instance type's limits, pod subnets, and the network interfaces (ENIs)
//! that hold Pod addresses as secondary private IPs or /28 prefixes.
//!
//! Every request goes through `calls.run("<API action>", ...)` (`calls.rs`):
//! rate limit, retries on throttling and 5xx, `cnlb_cloud_api_*` metrics.
//! Answers are turned into plain structs ([`Eni`], [`SubnetInfo`], ...) so
//! that the backend's decisions are pure functions over them. This module
//! decides nothing: which ENI, subnet or device index to use is the
//! backend's business.
//!
//! The IAM policy `deploy/aws/vpc-ipam-iam-policy.json` lists exactly the
//! actions called here (a test in `localstack-tests/tests/deploy.rs`
//! checks it).

use std::collections::BTreeMap;

use aws_sdk_ec2::types::{
    Filter, InstanceType, NetworkInterface, NetworkInterfaceAttachmentChanges, ResourceType,
    Subnet, Tag, TagSpecification,
};
use cnlb_provider_core::{ProviderError, Result};
use prometheus_client::registry::Registry;

use crate::Clients;
use crate::calls::{Calls, RateLimits};

/// DescribeNetworkInterfaces page size (the API's maximum).
const PAGE_SIZE: i32 = 1000;

/// The EC2 instance a node runs on, as far as Pod networking cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceInfo {
    pub id: String,
    pub instance_type: String,
    pub vpc_id: String,
    pub availability_zone: String,
    /// Security groups of the primary network interface (device index 0).
    pub primary_security_groups: Vec<String>,
}

/// How many ENIs an instance type takes (the primary one included) and how
/// many IPv4 addresses each ENI holds (its primary address included; with
/// prefix delegation each slot past the primary holds a /28 instead).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EniLimits {
    pub max_enis: u32,
    pub ipv4_per_eni: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetInfo {
    pub id: String,
    pub vpc_id: String,
    pub availability_zone: String,
    /// IPv4 CIDR, e.g. "100.64.0.0/19".
    pub cidr: String,
    pub available_ips: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EniAttachment {
    pub id: String,
    pub instance_id: String,
    pub device_index: i32,
    /// "attaching", "attached", "detaching" or "detached".
    pub status: String,
    pub delete_on_termination: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Eni {
    pub id: String,
    pub subnet_id: String,
    /// "available" (not attached), "in-use", "attaching", ...
    pub status: String,
    pub attachment: Option<EniAttachment>,
    pub primary_ip: Option<String>,
    /// Private IPv4 addresses other than the primary one.
    pub secondary_ips: Vec<String>,
    /// Delegated IPv4 prefixes ("100.64.3.16/28").
    pub prefixes: Vec<String>,
    pub tags: BTreeMap<String, String>,
    /// "02:1a:..": how the instance's OS tells its network links apart.
    pub mac: Option<String>,
}

/// What to add to an ENI: secondary addresses or /28 prefixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Secondary {
    Ips(u32),
    Prefixes(u32),
}

/// A network interface to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEni {
    pub subnet_id: String,
    pub security_groups: Vec<String>,
    pub description: String,
    /// Set in the create call itself, so the ENI is never untagged.
    pub tags: BTreeMap<String, String>,
    /// Addresses or prefixes it is created with (none when zero).
    pub secondary: Secondary,
    /// Idempotency token: a retried request with the same token returns
    /// the ENI the first one created instead of a second one.
    pub client_token: Option<String>,
}

/// What an AssignPrivateIpAddresses answer lists. AWS lists only what the
/// call added; the emulators list every address of the ENI.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AssignedAddresses {
    pub ips: Vec<String>,
    pub prefixes: Vec<String>,
}

/// EC2 through the provider's rate limits, retries and metrics.
pub struct Ec2Ipam {
    ec2: aws_sdk_ec2::Client,
    calls: Calls,
}

impl Ec2Ipam {
    /// Calls EC2 through `clients` with the SDK's own retries off (see
    /// [`Clients::without_sdk_retries`]); registers the `cnlb_cloud_api_*`
    /// metrics in `registry`, which must not hold them yet.
    pub fn new(clients: &Clients, limits: &RateLimits, registry: &mut Registry) -> Ec2Ipam {
        Ec2Ipam {
            ec2: clients.without_sdk_retries().ec2,
            calls: Calls::new(limits, registry),
        }
    }

    pub async fn instance(&self, id: &str) -> Result<InstanceInfo> {
        let out = self
            .calls
            .run("DescribeInstances", || {
                self.ec2.describe_instances().instance_ids(id).send()
            })
            .await?;
        let instance = out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find(|i| i.instance_id() == Some(id))
            .ok_or_else(|| ProviderError::NotFound {
                resource: format!("instance {id}"),
            })?;
        let primary_security_groups = instance
            .network_interfaces()
            .iter()
            .find(|n| n.attachment().and_then(|a| a.device_index()) == Some(0))
            .map(|n| n.groups())
            .unwrap_or(instance.security_groups())
            .iter()
            .filter_map(|g| g.group_id().map(str::to_string))
            .collect();
        let missing = |what: &str| {
            ProviderError::cloud(
                "DescribeInstances",
                format!("instance {id} has no {what}"),
                false,
            )
        };
        Ok(InstanceInfo {
            id: id.to_string(),
            instance_type: instance
                .instance_type()
                .map(|t| t.as_str().to_string())
                .ok_or_else(|| missing("instance type"))?,
            vpc_id: instance
                .vpc_id()
                .map(str::to_string)
                .ok_or_else(|| missing("VPC"))?,
            availability_zone: instance
                .placement()
                .and_then(|p| p.availability_zone())
                .map(str::to_string)
                .ok_or_else(|| missing("availability zone"))?,
            primary_security_groups,
        })
    }

    /// The ENI limits of `instance_type`; `None` when the answer has none.
    pub async fn instance_type_limits(&self, instance_type: &str) -> Result<Option<EniLimits>> {
        let out = self
            .calls
            .run("DescribeInstanceTypes", || {
                self.ec2
                    .describe_instance_types()
                    .instance_types(InstanceType::from(instance_type))
                    .send()
            })
            .await?;
        let limits = out
            .instance_types()
            .iter()
            .find(|t| t.instance_type().map(|t| t.as_str()) == Some(instance_type))
            .and_then(|t| t.network_info())
            .and_then(|n| {
                Some(EniLimits {
                    max_enis: u32::try_from(n.maximum_network_interfaces()?).ok()?,
                    ipv4_per_eni: u32::try_from(n.ipv4_addresses_per_interface()?).ok()?,
                })
            });
        Ok(limits)
    }

    pub async fn subnets(&self, ids: &[String]) -> Result<Vec<SubnetInfo>> {
        let out = self
            .calls
            .run("DescribeSubnets", || {
                self.ec2
                    .describe_subnets()
                    .set_subnet_ids(Some(ids.to_vec()))
                    .send()
            })
            .await?;
        Ok(out.subnets().iter().filter_map(subnet_info).collect())
    }

    /// Subnets of `vpc_id` tagged `key=value` (every AZ).
    pub async fn subnets_tagged(
        &self,
        vpc_id: &str,
        key: &str,
        value: &str,
    ) -> Result<Vec<SubnetInfo>> {
        let vpc = filter("vpc-id", vpc_id);
        let tagged = filter(&format!("tag:{key}"), value);
        let out = self
            .calls
            .run("DescribeSubnets", || {
                self.ec2
                    .describe_subnets()
                    .filters(vpc.clone())
                    .filters(tagged.clone())
                    .send()
            })
            .await?;
        Ok(out.subnets().iter().filter_map(subnet_info).collect())
    }

    /// The IPv4 CIDR blocks associated with `vpc_id` ("10.0.0.0/16", ...).
    pub async fn vpc_cidrs(&self, vpc_id: &str) -> Result<Vec<String>> {
        let out = self
            .calls
            .run("DescribeVpcs", || {
                self.ec2.describe_vpcs().vpc_ids(vpc_id).send()
            })
            .await?;
        Ok(out
            .vpcs()
            .iter()
            .flat_map(|v| v.cidr_block_association_set())
            .filter(|a| {
                a.cidr_block_state().and_then(|s| s.state())
                    == Some(&aws_sdk_ec2::types::VpcCidrBlockStateCode::Associated)
            })
            .filter_map(|a| a.cidr_block().map(str::to_string))
            .collect())
    }

    /// Every ENI attached to `instance_id`, whoever created it.
    pub async fn network_interfaces_of(&self, instance_id: &str) -> Result<Vec<Eni>> {
        self.network_interfaces(vec![filter("attachment.instance-id", instance_id)])
            .await
    }

    /// ENIs in `status` ("available") carrying every tag of `tags` and the
    /// key `tag_key` (with any value).
    pub async fn network_interfaces_tagged(
        &self,
        tags: &[(&str, &str)],
        tag_key: &str,
        status: &str,
    ) -> Result<Vec<Eni>> {
        let mut filters: Vec<Filter> = tags
            .iter()
            .map(|(k, v)| filter(&format!("tag:{k}"), v))
            .collect();
        filters.push(filter("tag-key", tag_key));
        filters.push(filter("status", status));
        self.network_interfaces(filters).await
    }

    /// The ENI `id`, or `None` when it does not exist (any more).
    pub async fn network_interface(&self, id: &str) -> Result<Option<Eni>> {
        let found = self
            .calls
            .run("DescribeNetworkInterfaces", || {
                self.ec2
                    .describe_network_interfaces()
                    .network_interface_ids(id)
                    .send()
            })
            .await;
        match found {
            Ok(out) => Ok(out
                .network_interfaces()
                .iter()
                .filter_map(eni)
                .find(|e| e.id == id)),
            Err(ProviderError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn network_interfaces(&self, filters: Vec<Filter>) -> Result<Vec<Eni>> {
        let mut enis = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let request = self
                .ec2
                .describe_network_interfaces()
                .set_filters(Some(filters.clone()))
                .max_results(PAGE_SIZE)
                .set_next_token(token.clone());
            let out = self
                .calls
                .run("DescribeNetworkInterfaces", || request.clone().send())
                .await?;
            enis.extend(out.network_interfaces().iter().filter_map(eni));
            match out.next_token() {
                Some(next) if !next.is_empty() => token = Some(next.to_string()),
                _ => return Ok(enis),
            }
        }
    }

    pub async fn create_network_interface(&self, new: &NewEni) -> Result<Eni> {
        let tags = TagSpecification::builder()
            .resource_type(ResourceType::NetworkInterface)
            .set_tags(Some(
                new.tags
                    .iter()
                    .map(|(k, v)| Tag::builder().key(k).value(v).build())
                    .collect(),
            ))
            .build();
        let mut create = self
            .ec2
            .create_network_interface()
            .subnet_id(&new.subnet_id)
            .description(&new.description)
            // None: the VPC's default group (an empty list is not "none").
            .set_groups((!new.security_groups.is_empty()).then(|| new.security_groups.clone()))
            .tag_specifications(tags)
            .set_client_token(new.client_token.clone());
        create = match new.secondary {
            Secondary::Ips(0) | Secondary::Prefixes(0) => create,
            Secondary::Ips(n) => create.secondary_private_ip_address_count(count(n)),
            Secondary::Prefixes(n) => create.ipv4_prefix_count(count(n)),
        };
        let out = self
            .calls
            .run("CreateNetworkInterface", || create.clone().send())
            .await?;
        out.network_interface().and_then(eni).ok_or_else(|| {
            ProviderError::cloud(
                "CreateNetworkInterface",
                "the answer holds no network interface",
                true,
            )
        })
    }

    /// Attaches `eni_id` at `device_index`; returns the attachment ID.
    pub async fn attach(
        &self,
        eni_id: &str,
        instance_id: &str,
        device_index: i32,
    ) -> Result<String> {
        let out = self
            .calls
            .run("AttachNetworkInterface", || {
                self.ec2
                    .attach_network_interface()
                    .network_interface_id(eni_id)
                    .instance_id(instance_id)
                    .device_index(device_index)
                    .send()
            })
            .await?;
        out.attachment_id().map(str::to_string).ok_or_else(|| {
            ProviderError::cloud(
                "AttachNetworkInterface",
                format!("no attachment ID for {eni_id}"),
                false,
            )
        })
    }

    /// The ENI goes away with its instance.
    pub async fn set_delete_on_termination(&self, eni_id: &str, attachment_id: &str) -> Result<()> {
        let change = NetworkInterfaceAttachmentChanges::builder()
            .attachment_id(attachment_id)
            .delete_on_termination(true)
            .build();
        self.calls
            .run("ModifyNetworkInterfaceAttribute", || {
                self.ec2
                    .modify_network_interface_attribute()
                    .network_interface_id(eni_id)
                    .attachment(change.clone())
                    .send()
            })
            .await?;
        Ok(())
    }

    pub async fn detach(&self, attachment_id: &str) -> Result<()> {
        self.calls
            .run("DetachNetworkInterface", || {
                self.ec2
                    .detach_network_interface()
                    .attachment_id(attachment_id)
                    .send()
            })
            .await?;
        Ok(())
    }

    /// Deletes `eni_id`; an ENI already gone counts as deleted. One still
    /// attached or detaching fails with [`ProviderError::Conflict`].
    pub async fn delete_network_interface(&self, eni_id: &str) -> Result<()> {
        let deleted = self
            .calls
            .run("DeleteNetworkInterface", || {
                self.ec2
                    .delete_network_interface()
                    .network_interface_id(eni_id)
                    .send()
            })
            .await;
        match deleted {
            Ok(_) | Err(ProviderError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Adds `n` addresses or prefixes, chosen by EC2, to `eni_id`.
    pub async fn assign(&self, eni_id: &str, secondary: Secondary) -> Result<AssignedAddresses> {
        let request = self
            .ec2
            .assign_private_ip_addresses()
            .network_interface_id(eni_id);
        let request = match secondary {
            Secondary::Ips(n) => request.secondary_private_ip_address_count(count(n)),
            Secondary::Prefixes(n) => request.ipv4_prefix_count(count(n)),
        };
        let out = self
            .calls
            .run("AssignPrivateIpAddresses", || request.clone().send())
            .await?;
        Ok(AssignedAddresses {
            ips: out
                .assigned_private_ip_addresses()
                .iter()
                .filter_map(|a| a.private_ip_address().map(str::to_string))
                .collect(),
            prefixes: out
                .assigned_ipv4_prefixes()
                .iter()
                .filter_map(|p| p.ipv4_prefix().map(str::to_string))
                .collect(),
        })
    }

    /// Assigns exactly these addresses and prefixes to `eni_id`, never
    /// taking them from another interface (no reassignment): one of them in
    /// use fails the whole call.
    pub async fn assign_exact(
        &self,
        eni_id: &str,
        ips: &[String],
        prefixes: &[String],
    ) -> Result<()> {
        let request = self
            .ec2
            .assign_private_ip_addresses()
            .network_interface_id(eni_id)
            .set_private_ip_addresses((!ips.is_empty()).then(|| ips.to_vec()))
            .set_ipv4_prefixes((!prefixes.is_empty()).then(|| prefixes.to_vec()))
            .allow_reassignment(false);
        self.calls
            .run("AssignPrivateIpAddresses", || request.clone().send())
            .await?;
        Ok(())
    }

    /// Removes secondary addresses and prefixes from `eni_id` (one call each).
    pub async fn unassign(&self, eni_id: &str, ips: &[String], prefixes: &[String]) -> Result<()> {
        if !ips.is_empty() {
            self.calls
                .run("UnassignPrivateIpAddresses", || {
                    self.ec2
                        .unassign_private_ip_addresses()
                        .network_interface_id(eni_id)
                        .set_private_ip_addresses(Some(ips.to_vec()))
                        .send()
                })
                .await?;
        }
        if !prefixes.is_empty() {
            self.calls
                .run("UnassignPrivateIpAddresses", || {
                    self.ec2
                        .unassign_private_ip_addresses()
                        .network_interface_id(eni_id)
                        .set_ipv4_prefixes(Some(prefixes.to_vec()))
                        .send()
                })
                .await?;
        }
        Ok(())
    }
}

fn filter(name: &str, value: &str) -> Filter {
    Filter::builder().name(name).values(value).build()
}

/// Counts are small (limits per ENI are below 100); i32 is the API's type.
fn count(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn subnet_info(s: &Subnet) -> Option<SubnetInfo> {
    Some(SubnetInfo {
        id: s.subnet_id()?.to_string(),
        vpc_id: s.vpc_id().unwrap_or_default().to_string(),
        availability_zone: s.availability_zone().unwrap_or_default().to_string(),
        cidr: s.cidr_block()?.to_string(),
        available_ips: s
            .available_ip_address_count()
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0),
    })
}

fn eni(n: &NetworkInterface) -> Option<Eni> {
    let attachment = n.attachment().and_then(|a| {
        Some(EniAttachment {
            id: a.attachment_id()?.to_string(),
            instance_id: a.instance_id().unwrap_or_default().to_string(),
            device_index: a.device_index()?,
            status: a
                .status()
                .map(|s| s.as_str().to_string())
                .unwrap_or_default(),
            delete_on_termination: a.delete_on_termination().unwrap_or(false),
        })
    });
    let primary_ip = n.private_ip_address().map(str::to_string);
    Some(Eni {
        mac: n.mac_address().map(str::to_ascii_lowercase),
        id: n.network_interface_id()?.to_string(),
        subnet_id: n.subnet_id().unwrap_or_default().to_string(),
        status: n
            .status()
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
        attachment,
        secondary_ips: n
            .private_ip_addresses()
            .iter()
            .filter(|a| a.primary() != Some(true))
            .filter_map(|a| a.private_ip_address().map(str::to_string))
            .filter(|ip| Some(ip) != primary_ip.as_ref())
            .collect(),
        primary_ip,
        prefixes: n
            .ipv4_prefixes()
            .iter()
            .filter_map(|p| p.ipv4_prefix().map(str::to_string))
            .collect(),
        tags: n
            .tag_set()
            .iter()
            .filter_map(|t| {
                Some((
                    t.key()?.to_string(),
                    t.value().unwrap_or_default().to_string(),
                ))
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use aws_sdk_ec2::types::{
        AttachmentStatus, Ipv4PrefixSpecification, NetworkInterfaceAttachment,
        NetworkInterfacePrivateIpAddress, NetworkInterfaceStatus,
    };

    use super::*;

    fn address(ip: &str, primary: Option<bool>) -> NetworkInterfacePrivateIpAddress {
        NetworkInterfacePrivateIpAddress::builder()
            .private_ip_address(ip)
            .set_primary(primary)
            .build()
    }

    #[test]
    fn an_eni_answer_becomes_a_plain_eni() {
        let answer = NetworkInterface::builder()
            .network_interface_id("eni-1")
            .subnet_id("subnet-1")
            .status(NetworkInterfaceStatus::InUse)
            .private_ip_address("100.64.0.4")
            .private_ip_addresses(address("100.64.0.4", Some(true)))
            .private_ip_addresses(address("100.64.0.9", Some(false)))
            // An emulator may leave out `primary`: the primary address is
            // still recognised by `PrivateIpAddress`.
            .private_ip_addresses(address("100.64.0.4", None))
            .private_ip_addresses(address("100.64.0.10", None))
            .ipv4_prefixes(
                Ipv4PrefixSpecification::builder()
                    .ipv4_prefix("100.64.1.16/28")
                    .build(),
            )
            .attachment(
                NetworkInterfaceAttachment::builder()
                    .attachment_id("eni-attach-1")
                    .instance_id("i-1")
                    .device_index(1)
                    .status(AttachmentStatus::Attached)
                    .build(),
            )
            .tag_set(Tag::builder().key("cnlb.dev/cluster").value("c").build())
            .build();
        let e = eni(&answer).unwrap();
        assert_eq!(e.id, "eni-1");
        assert_eq!(e.status, "in-use");
        assert_eq!(e.primary_ip.as_deref(), Some("100.64.0.4"));
        assert_eq!(e.secondary_ips, ["100.64.0.9", "100.64.0.10"]);
        assert_eq!(e.prefixes, ["100.64.1.16/28"]);
        let a = e.attachment.unwrap();
        assert_eq!((a.instance_id.as_str(), a.device_index), ("i-1", 1));
        assert_eq!(a.status, "attached");
        assert!(!a.delete_on_termination);
        assert_eq!(
            e.tags.get("cnlb.dev/cluster").map(String::as_str),
            Some("c")
        );
    }
}
