//! AWS: Pod addresses are secondary private IPv4 addresses (or /28
//! prefixes, with `--aws-prefix-delegation`) of network interfaces (ENIs)
//! that this agent creates in pod subnets and attaches to the node's
//! instance. The pod subnets sit in a VPC secondary CIDR and are chosen per
//! availability zone by flag or by tag, as amazon-vpc-cni's custom
//! networking (ENIConfig) does; the instance's primary ENI is never used.
//!
//! Every ENI is tagged with its owner in the create call (cluster, node,
//! instance, creation time), so whatever a crash leaves is found again:
//! `start` attaches (or deletes) an ENI created for this instance but never
//! attached, and `collect_garbage` deletes detached ENIs of any node of the
//! cluster once they are older than a grace period (an instance terminated
//! before DeleteOnTermination was set leaves one behind).
//!
//! EC2 is called only through [`Ec2Ipam`] (rate limits, retries, metrics).
//! Changes to the node's ENIs hold one lock, so device indexes and the room
//! left on each ENI are computed from a view nobody else changes meanwhile.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use clap::Args;
use cnlb_provider_aws::ipam::{
    AssignedAddresses, Ec2Ipam, Eni, EniLimits, InstanceInfo, NewEni, Secondary, SubnetInfo,
};
use cnlb_provider_aws::{Clients, RateLimit, RateLimits};
use cnlb_provider_core::{ProviderError, TAG_CLUSTER};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use prometheus_client::registry::Registry;

use super::{
    Assigned, Backend, BackendError, BackendResult, NodeInterface, NodeNetwork, backend_error,
    kube_client, node_provider_id,
};
use crate::cidr::Cidr;

/// Name of the Node an ENI was created for.
pub const TAG_NODE: &str = "cnlb.dev/vpc-ipam-node";
/// ID of the instance an ENI was created for.
pub const TAG_INSTANCE: &str = "cnlb.dev/vpc-ipam-instance";
/// When an ENI was created (RFC 3339), for garbage collection.
pub const TAG_CREATED: &str = "cnlb.dev/vpc-ipam-created";

/// Addresses in a delegated IPv4 prefix (a /28).
const PREFIX_ADDRESSES: usize = 16;

/// Attaching or detaching an ENI takes AWS a few seconds: poll its state
/// from 200 ms, doubling up to 2 s, for at most a minute.
const POLL_FIRST: Duration = Duration::from_millis(200);
const POLL_MAX: Duration = Duration::from_secs(2);
const POLL_TIMEOUT: Duration = Duration::from_secs(60);

/// Flags of the AWS backend (`--backend aws`).
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "AWS backend (--backend aws)")]
pub struct AwsArgs {
    /// Pod subnet of an availability zone, as AZ=SUBNET_ID (repeatable), e.g.
    /// us-east-1a=subnet-0123abcd: the Pod ENIs of nodes in that zone go there.
    #[arg(long = "aws-pod-subnet", value_name = "AZ=SUBNET_ID", value_parser = parse_pod_subnet)]
    pub aws_pod_subnets: Vec<PodSubnet>,

    /// Find the pod subnets by tag instead: of the subnets of the instance's
    /// VPC tagged KEY=VALUE, the one in its zone with the most free addresses.
    #[arg(
        long,
        value_name = "KEY=VALUE",
        value_parser = parse_subnet_tag,
        conflicts_with = "aws_pod_subnets"
    )]
    pub aws_pod_subnet_tag: Option<SubnetTag>,

    /// Security group of the Pod ENIs (repeatable); default: the groups of
    /// the instance's primary ENI.
    #[arg(long = "aws-pod-security-group", value_name = "SG_ID", value_parser = parse_security_group)]
    pub aws_pod_security_groups: Vec<String>,

    /// Assign /28 prefixes (16 addresses each) instead of single secondary
    /// addresses (Nitro instances only).
    #[arg(long)]
    pub aws_prefix_delegation: bool,

    /// ENIs the instance takes, its primary ENI included (default: from
    /// DescribeInstanceTypes).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(2..))]
    pub aws_max_enis: Option<u32>,

    /// IPv4 addresses per ENI, its primary address included (default: from
    /// DescribeInstanceTypes).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(2..))]
    pub aws_ips_per_eni: Option<u32>,

    /// Age after which a detached Pod ENI of any node of the cluster is
    /// deleted ("300s", "5m", "1h").
    #[arg(long, default_value = "5m", value_name = "DURATION", value_parser = crate::agent_cli::parse_duration)]
    pub aws_eni_gc_grace: Duration,

    /// Route Pods on secondary ENIs through their own ENI (a route table per
    /// ENI, rules per Pod, SNAT) so that EC2's source/destination check lets
    /// their traffic pass; off only where something else does it.
    #[arg(
        long,
        action = clap::ArgAction::Set,
        default_value_t = true,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    pub aws_node_routing: bool,

    /// Pod traffic leaving the VPC keeps the Pod's address (a NAT gateway
    /// translates it) instead of the node's primary address.
    #[arg(long)]
    pub aws_external_snat: bool,

    /// MTU of the secondary ENIs' links.
    #[arg(long, default_value_t = 9001, value_name = "BYTES", value_parser = clap::value_parser!(u32).range(576..=9001))]
    pub aws_eni_mtu: u32,

    /// EC2 Describe* calls: tokens per second / burst.
    #[arg(long, default_value = "10/20", value_name = "RATE/BURST")]
    pub aws_read_rate: RateLimit,

    /// EC2 create, attach, assign, unassign and delete calls.
    #[arg(long, default_value = "2/5", value_name = "RATE/BURST")]
    pub aws_write_rate: RateLimit,
}

/// `--aws-pod-subnet us-east-1a=subnet-0123abcd`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSubnet {
    pub zone: String,
    pub subnet_id: String,
}

/// `--aws-pod-subnet-tag KEY=VALUE`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetTag {
    pub key: String,
    pub value: String,
}

impl AwsArgs {
    /// Checks that span flags; the message names them. Called by
    /// [`AwsBackend::new`], and usable by the agent's own validation.
    pub fn validate(&self) -> Result<(), String> {
        if self.aws_pod_subnets.is_empty() && self.aws_pod_subnet_tag.is_none() {
            return Err(
                "--backend aws needs pod subnets: --aws-pod-subnet AZ=SUBNET_ID \
                        (repeatable) or --aws-pod-subnet-tag KEY=VALUE"
                    .into(),
            );
        }
        let mut zones = BTreeSet::new();
        for s in &self.aws_pod_subnets {
            if !zones.insert(&s.zone) {
                return Err(format!(
                    "--aws-pod-subnet gives availability zone {} more than one subnet",
                    s.zone
                ));
            }
        }
        Ok(())
    }

    fn rate_limits(&self) -> RateLimits {
        RateLimits {
            read: self.aws_read_rate,
            write: self.aws_write_rate,
            ..RateLimits::default()
        }
    }
}

fn parse_pod_subnet(s: &str) -> Result<PodSubnet, String> {
    let bad = || format!("{s:?}: expected AZ=SUBNET_ID, like us-east-1a=subnet-0123abcd");
    let (zone, subnet_id) = s.split_once('=').ok_or_else(bad)?;
    let zone_ok = !zone.is_empty()
        && zone
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !zone_ok || !is_aws_id(subnet_id, "subnet-") {
        return Err(bad());
    }
    Ok(PodSubnet {
        zone: zone.to_string(),
        subnet_id: subnet_id.to_string(),
    })
}

fn parse_subnet_tag(s: &str) -> Result<SubnetTag, String> {
    match s.split_once('=') {
        Some((key, value)) if !key.is_empty() && !value.is_empty() => Ok(SubnetTag {
            key: key.to_string(),
            value: value.to_string(),
        }),
        _ => Err(format!(
            "{s:?}: expected KEY=VALUE, like cnlb.dev/pods=true"
        )),
    }
}

fn parse_security_group(s: &str) -> Result<String, String> {
    if is_aws_id(s, "sg-") {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?}: expected a security group ID, like sg-0123abcd"
        ))
    }
}

fn is_aws_id(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix)
        .is_some_and(|rest| !rest.is_empty() && rest.chars().all(|c| c.is_ascii_hexdigit()))
}

/// "300", "300s", "5m" or "1h": a whole number of one unit.
/// What `start` found out about the node.
struct NodeInfo {
    instance: InstanceInfo,
    limits: EniLimits,
    pod_subnets: PodSubnets,
    security_groups: Vec<String>,
}

enum PodSubnets {
    /// `--aws-pod-subnet` of the instance's zone.
    Fixed(String),
    /// `--aws-pod-subnet-tag`: chosen again for each new ENI.
    Tagged(SubnetTag),
}

/// One ENI's share of a release.
#[derive(Debug, PartialEq, Eq)]
struct EniRelease {
    eni_id: String,
    attachment_id: Option<String>,
    ips: Vec<String>,
    prefixes: Vec<String>,
    /// Nothing is left on the ENI afterwards.
    empties: bool,
}

/// What `reassign` assigns at once: an address, or with prefix delegation
/// the /28 holding it (`key` is "100.64.0.5" or "100.64.0.0/28").
#[derive(Clone, Debug, PartialEq, Eq)]
struct Unit {
    key: String,
    subnet: Cidr,
    holder: String,
    ips: Vec<IpAddr>,
}

pub struct AwsBackend {
    cloud: Ec2Ipam,
    kube: kube::Client,
    cluster: String,
    node_name: String,
    args: AwsArgs,
    node: OnceLock<NodeInfo>,
    /// Subnet ID -> IPv4 CIDR; subnets do not change their CIDR.
    cidrs: Mutex<HashMap<String, Cidr>>,
    /// Held while the node's ENIs change.
    changes: tokio::sync::Mutex<()>,
}

impl AwsBackend {
    /// The backend of Node `node_name` in `cluster` (the value of its
    /// `cnlb.dev/cluster` tags). EC2 is configured from the standard AWS
    /// environment, Kubernetes from the in-cluster configuration or
    /// KUBECONFIG; the `cnlb_cloud_api_*` metrics go into `registry`.
    /// Nothing is called yet: [`Backend::start`] finds the instance.
    pub async fn new(
        args: &AwsArgs,
        cluster: &str,
        node_name: &str,
        registry: &mut Registry,
    ) -> BackendResult<AwsBackend> {
        args.validate().map_err(BackendError::Permanent)?;
        if cluster.is_empty() {
            return Err(BackendError::Permanent(
                "the AWS backend needs a cluster name for its ownership tags".into(),
            ));
        }
        let clients = Clients::from_env().await;
        let cloud = Ec2Ipam::new(&clients, &args.rate_limits(), registry);
        let kube = kube_client().await?;
        Ok(AwsBackend {
            cloud,
            kube,
            cluster: cluster.to_string(),
            node_name: node_name.to_string(),
            args: args.clone(),
            node: OnceLock::new(),
            cidrs: Mutex::new(HashMap::new()),
            changes: tokio::sync::Mutex::new(()),
        })
    }

    fn node(&self) -> BackendResult<&NodeInfo> {
        self.node
            .get()
            .ok_or_else(|| BackendError::Permanent("the AWS backend is used before start()".into()))
    }

    /// The instance ID in the Node's `spec.providerID`.
    async fn instance_id(&self) -> BackendResult<String> {
        let provider_id = node_provider_id(&self.kube, &self.node_name).await?;
        instance_id_from_provider_id(&provider_id)
            .map(str::to_string)
            .ok_or_else(|| {
                BackendError::Permanent(format!(
                    "Node {}: spec.providerID {provider_id:?} is not aws:///ZONE/INSTANCE_ID",
                    self.node_name
                ))
            })
    }

    /// `--aws-max-enis` / `--aws-ips-per-eni`, else the instance type's.
    async fn limits(&self, instance: &InstanceInfo) -> BackendResult<EniLimits> {
        let ty = &instance.instance_type;
        let limits = match (self.args.aws_max_enis, self.args.aws_ips_per_eni) {
            (Some(max_enis), Some(ipv4_per_eni)) => EniLimits {
                max_enis,
                ipv4_per_eni,
            },
            (max_enis, ipv4_per_eni) => match self.cloud.instance_type_limits(ty).await {
                Ok(Some(found)) => EniLimits {
                    max_enis: max_enis.unwrap_or(found.max_enis),
                    ipv4_per_eni: ipv4_per_eni.unwrap_or(found.ipv4_per_eni),
                },
                Ok(None) => {
                    return Err(BackendError::Permanent(format!(
                        "DescribeInstanceTypes gives no ENI limits for {ty}: \
                         set --aws-max-enis and --aws-ips-per-eni"
                    )));
                }
                Err(e) => {
                    return Err(match backend_error(e) {
                        BackendError::Permanent(e) => BackendError::Permanent(format!(
                            "cannot read the ENI limits of instance type {ty} ({e}): \
                             set --aws-max-enis and --aws-ips-per-eni"
                        )),
                        transient => transient,
                    });
                }
            },
        };
        if limits.max_enis < 2 || limits.ipv4_per_eni < 2 {
            return Err(BackendError::Permanent(format!(
                "instance type {ty} takes {} ENIs of {} addresses: no room for Pod ENIs",
                limits.max_enis, limits.ipv4_per_eni
            )));
        }
        Ok(limits)
    }

    /// Checks the configured pod subnet of the instance's zone, or that
    /// the tag finds one there.
    async fn pod_subnets(&self, instance: &InstanceInfo) -> BackendResult<PodSubnets> {
        let zone = &instance.availability_zone;
        if let Some(tag) = &self.args.aws_pod_subnet_tag {
            self.tagged_subnet(instance, tag).await?;
            return Ok(PodSubnets::Tagged(tag.clone()));
        }
        let Some(configured) = self.args.aws_pod_subnets.iter().find(|s| &s.zone == zone) else {
            return Err(BackendError::Permanent(format!(
                "no --aws-pod-subnet for availability zone {zone} (instance {})",
                instance.id
            )));
        };
        let flag = format!("--aws-pod-subnet {zone}={}", configured.subnet_id);
        let found = match self
            .cloud
            .subnets(std::slice::from_ref(&configured.subnet_id))
            .await
        {
            Ok(found) => found,
            Err(ProviderError::NotFound { .. }) => Vec::new(),
            Err(e) => return Err(backend_error(e)),
        };
        let subnet = found
            .iter()
            .find(|s| s.id == configured.subnet_id)
            .ok_or_else(|| BackendError::Permanent(format!("{flag}: no such subnet")))?;
        check_pod_subnet(subnet, instance)
            .map_err(|msg| BackendError::Permanent(format!("{flag}: {msg}")))?;
        self.cache_cidr(subnet)?;
        Ok(PodSubnets::Fixed(subnet.id.clone()))
    }

    /// The subnet tagged `tag` in the instance's zone with the most free
    /// addresses (every tagged subnet's CIDR is cached on the way).
    async fn tagged_subnet(
        &self,
        instance: &InstanceInfo,
        tag: &SubnetTag,
    ) -> BackendResult<SubnetInfo> {
        let subnets = self
            .cloud
            .subnets_tagged(&instance.vpc_id, &tag.key, &tag.value)
            .await
            .map_err(backend_error)?;
        for s in &subnets {
            self.cache_cidr(s)?;
        }
        choose_subnet(&subnets, &instance.availability_zone)
            .cloned()
            .ok_or_else(|| {
                BackendError::Permanent(format!(
                    "--aws-pod-subnet-tag {}={}: no subnet of VPC {} in zone {} has this tag",
                    tag.key, tag.value, instance.vpc_id, instance.availability_zone
                ))
            })
    }

    async fn subnet_for_new_eni(&self, node: &NodeInfo) -> BackendResult<String> {
        match &node.pod_subnets {
            PodSubnets::Fixed(id) => Ok(id.clone()),
            PodSubnets::Tagged(tag) => Ok(self.tagged_subnet(&node.instance, tag).await?.id),
        }
    }

    /// The pod subnet of this node whose CIDR is `cidr`, if any.
    async fn pod_subnet_with_cidr(
        &self,
        node: &NodeInfo,
        cidr: Cidr,
    ) -> BackendResult<Option<String>> {
        let candidates = match &node.pod_subnets {
            PodSubnets::Fixed(id) => vec![id.clone()],
            PodSubnets::Tagged(tag) => {
                let subnets = self
                    .cloud
                    .subnets_tagged(&node.instance.vpc_id, &tag.key, &tag.value)
                    .await
                    .map_err(backend_error)?;
                for s in &subnets {
                    self.cache_cidr(s)?;
                }
                subnets
                    .into_iter()
                    .filter(|s| s.availability_zone == node.instance.availability_zone)
                    .map(|s| s.id)
                    .collect()
            }
        };
        let cidrs = self.cidrs_of(candidates.iter().cloned().collect()).await?;
        Ok(candidates
            .into_iter()
            .find(|id| cidrs.get(id) == Some(&cidr)))
    }

    fn cache_cidr(&self, subnet: &SubnetInfo) -> BackendResult<Cidr> {
        let cidr: Cidr = subnet.cidr.parse().map_err(|e| {
            BackendError::Permanent(format!(
                "subnet {} has CIDR {:?}: {e}",
                subnet.id, subnet.cidr
            ))
        })?;
        let mut cidrs = self.cidrs.lock().unwrap_or_else(|e| e.into_inner());
        cidrs.insert(subnet.id.clone(), cidr);
        Ok(cidr)
    }

    /// The CIDRs of `ids`, described once and cached.
    async fn cidrs_of(&self, ids: BTreeSet<String>) -> BackendResult<HashMap<String, Cidr>> {
        let missing: Vec<String> = {
            let cidrs = self.cidrs.lock().unwrap_or_else(|e| e.into_inner());
            ids.iter()
                .filter(|id| !cidrs.contains_key(*id))
                .cloned()
                .collect()
        };
        if !missing.is_empty() {
            for s in self.cloud.subnets(&missing).await.map_err(backend_error)? {
                self.cache_cidr(&s)?;
            }
        }
        let cidrs = self.cidrs.lock().unwrap_or_else(|e| e.into_inner());
        ids.into_iter()
            .map(|id| match cidrs.get(&id) {
                Some(c) => Ok((id, *c)),
                None => Err(BackendError::Transient(format!("subnet {id} not found"))),
            })
            .collect()
    }

    async fn cidr_of(&self, subnet_id: &str) -> BackendResult<Cidr> {
        let cidrs = self
            .cidrs_of(BTreeSet::from([subnet_id.to_string()]))
            .await?;
        cidrs
            .get(subnet_id)
            .copied()
            .ok_or_else(|| BackendError::Transient(format!("subnet {subnet_id} not found")))
    }

    /// Our ENIs attached to the instance, and every device index in use.
    async fn attached(&self, node: &NodeInfo) -> BackendResult<(Vec<Eni>, Vec<i32>)> {
        let instance = &node.instance.id;
        let all = self
            .cloud
            .network_interfaces_of(instance)
            .await
            .map_err(backend_error)?;
        let used = all
            .iter()
            .filter_map(|e| e.attachment.as_ref())
            .filter(|a| &a.instance_id == instance)
            .map(|a| a.device_index)
            .collect();
        let ours = all
            .into_iter()
            .filter(|e| is_ours(e, &self.cluster, instance))
            .collect();
        Ok((ours, used))
    }

    fn tags(&self, node: &NodeInfo) -> BTreeMap<String, String> {
        BTreeMap::from([
            (TAG_CLUSTER.to_string(), self.cluster.clone()),
            (TAG_NODE.to_string(), self.node_name.clone()),
            (TAG_INSTANCE.to_string(), node.instance.id.clone()),
            (TAG_CREATED.to_string(), Timestamp::now().to_string()),
        ])
    }

    /// Adds `ask` to `eni`; returns the addresses it gained.
    async fn assign_to(&self, eni: &Eni, ask: Secondary) -> BackendResult<Vec<Assigned>> {
        let got = self
            .cloud
            .assign(&eni.id, ask)
            .await
            .map_err(backend_error)?;
        let (ips, prefixes) = new_addresses(eni, &got);
        match ask {
            Secondary::Prefixes(_) if prefixes.is_empty() => {
                return Err(no_prefix_error(&eni.id));
            }
            Secondary::Ips(_) if ips.is_empty() => {
                return Err(BackendError::Transient(format!(
                    "AssignPrivateIpAddresses on {} answered no new address",
                    eni.id
                )));
            }
            _ => {}
        }
        let subnet = self.cidr_of(&eni.subnet_id).await?;
        tracing::info!(eni = %eni.id, ips = ?ips, prefixes = ?prefixes, "assigned Pod addresses");
        Ok(to_assigned(&eni.id, subnet, &ips, &prefixes))
    }

    /// Creates an ENI with `ask` in a pod subnet and attaches it at
    /// `device_index`.
    async fn create_and_attach(
        &self,
        node: &NodeInfo,
        subnet_id: String,
        ask: Secondary,
        device_index: i32,
        client_token: Option<String>,
    ) -> BackendResult<Eni> {
        let new = NewEni {
            subnet_id,
            security_groups: node.security_groups.clone(),
            description: format!("cnlb vpc-ipam: Pod addresses of node {}", self.node_name),
            tags: self.tags(node),
            secondary: ask,
            client_token,
        };
        let eni = self
            .cloud
            .create_network_interface(&new)
            .await
            .map_err(backend_error)?;
        tracing::info!(eni = %eni.id, subnet = %eni.subnet_id, device_index, "created a Pod ENI");
        if matches!(ask, Secondary::Prefixes(n) if n > 0) && eni.prefixes.is_empty() {
            // Never attached: nothing uses it.
            self.delete_quietly(&eni.id).await;
            return Err(no_prefix_error(&eni.id));
        }
        self.attach(node, &eni, device_index).await
    }

    /// Attaches `eni` (unless it already is, as when a create call was
    /// answered again for the same client token), waits until it is, and
    /// sets DeleteOnTermination. An ENI that cannot be attached is deleted.
    async fn attach(&self, node: &NodeInfo, eni: &Eni, device_index: i32) -> BackendResult<Eni> {
        let instance = &node.instance.id;
        let already = eni
            .attachment
            .as_ref()
            .is_some_and(|a| &a.instance_id == instance);
        if !already && let Err(e) = self.cloud.attach(&eni.id, instance, device_index).await {
            self.delete_quietly(&eni.id).await;
            return Err(backend_error(e));
        }
        let attached = self
            .wait_for(&eni.id, "attached", |e| {
                e.attachment
                    .as_ref()
                    .is_some_and(|a| &a.instance_id == instance && a.status == "attached")
            })
            .await?
            .ok_or_else(|| {
                BackendError::Transient(format!("{} disappeared while being attached", eni.id))
            })?;
        self.ensure_delete_on_termination(&attached).await;
        Ok(attached)
    }

    /// Not fatal when it fails: the ENI works, `start` tries again, and if
    /// the instance terminates first the detached ENI is garbage.
    async fn ensure_delete_on_termination(&self, eni: &Eni) {
        let Some(a) = &eni.attachment else { return };
        if a.delete_on_termination {
            return;
        }
        if let Err(e) = self.cloud.set_delete_on_termination(&eni.id, &a.id).await {
            tracing::warn!(eni = %eni.id, error = %e, "could not set DeleteOnTermination");
        }
    }

    /// Polls `id` until `done`; `None` when it no longer exists.
    async fn wait_for(
        &self,
        id: &str,
        what: &str,
        done: impl Fn(&Eni) -> bool,
    ) -> BackendResult<Option<Eni>> {
        let deadline = tokio::time::Instant::now() + POLL_TIMEOUT;
        let mut delay = POLL_FIRST;
        loop {
            match self
                .cloud
                .network_interface(id)
                .await
                .map_err(backend_error)?
            {
                None => return Ok(None),
                Some(eni) if done(&eni) => return Ok(Some(eni)),
                Some(_) => {}
            }
            if tokio::time::Instant::now() + delay > deadline {
                return Err(BackendError::Transient(format!(
                    "{id} is not {what} after {POLL_TIMEOUT:?}"
                )));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(POLL_MAX);
        }
    }

    async fn delete_quietly(&self, eni_id: &str) {
        match self.cloud.delete_network_interface(eni_id).await {
            Ok(()) => tracing::info!(eni = %eni_id, "deleted a Pod ENI"),
            Err(e) => tracing::warn!(
                eni = %eni_id, error = %e,
                "could not delete a Pod ENI; garbage collection will"
            ),
        }
    }

    /// Detaches an ENI left empty and deletes it once detached. Best
    /// effort: what is left is detached, hence garbage collected.
    async fn remove(&self, eni_id: &str, attachment_id: Option<&str>) {
        if let Some(attachment) = attachment_id
            && let Err(e) = self.cloud.detach(attachment).await
            && !matches!(e, ProviderError::NotFound { .. })
        {
            tracing::warn!(eni = %eni_id, error = %e, "could not detach an empty Pod ENI");
            return;
        }
        match self
            .wait_for(eni_id, "detached", |e| e.status == "available")
            .await
        {
            Ok(Some(_)) => self.delete_quietly(eni_id).await,
            Ok(None) => {}
            Err(e) => tracing::warn!(eni = %eni_id, error = %e, "an empty Pod ENI stays detached"),
        }
    }

    /// What a crash may have left half done: ENIs created for this
    /// instance but never attached are attached (or deleted when no device
    /// index is free), and attached ones get DeleteOnTermination.
    async fn finish_interrupted(&self, node: &NodeInfo) -> BackendResult<()> {
        let instance = node.instance.id.as_str();
        let leftovers = self
            .cloud
            .network_interfaces_tagged(
                &[(TAG_CLUSTER, &self.cluster), (TAG_INSTANCE, instance)],
                TAG_NODE,
                "available",
            )
            .await
            .map_err(backend_error)?;
        let (ours, mut used) = self.attached(node).await?;
        for eni in leftovers {
            match free_device_index(&used, node.limits.max_enis) {
                Some(index) => {
                    tracing::info!(eni = %eni.id, index, "attaching a Pod ENI an interrupted run left");
                    self.attach(node, &eni, index).await?;
                    used.push(index);
                }
                None => {
                    tracing::info!(eni = %eni.id, "deleting a Pod ENI an interrupted run left: no free device index");
                    self.cloud
                        .delete_network_interface(&eni.id)
                        .await
                        .map_err(backend_error)?;
                }
            }
        }
        for eni in &ours {
            self.ensure_delete_on_termination(eni).await;
        }
        Ok(())
    }

    /// Assigns `units` to `eni_id` in one call; if EC2 refuses, one by one
    /// to find those it refuses. Returns the refused ones.
    async fn assign_units(&self, eni_id: &str, units: &[Unit]) -> BackendResult<Vec<Unit>> {
        let call = |units: &[Unit]| {
            let (prefixes, ips): (Vec<String>, Vec<String>) = units
                .iter()
                .map(|u| u.key.clone())
                .partition(|k| k.contains('/'));
            async move { self.cloud.assign_exact(eni_id, &ips, &prefixes).await }
        };
        match call(units).await.map_err(backend_error) {
            Ok(()) => return Ok(Vec::new()),
            Err(BackendError::Transient(e)) => return Err(BackendError::Transient(e)),
            Err(BackendError::Permanent(e)) if units.len() == 1 => {
                tracing::warn!(eni = %eni_id, unit = %units[0].key, error = %e, "could not reassign");
                return Ok(units.to_vec());
            }
            Err(BackendError::Permanent(_)) => {}
        }
        let mut refused = Vec::new();
        for unit in units {
            match call(std::slice::from_ref(unit))
                .await
                .map_err(backend_error)
            {
                Ok(()) => {}
                Err(BackendError::Transient(e)) => return Err(BackendError::Transient(e)),
                Err(BackendError::Permanent(e)) => {
                    tracing::warn!(eni = %eni_id, unit = %unit.key, error = %e, "could not reassign");
                    refused.push(unit.clone());
                }
            }
        }
        Ok(refused)
    }
}

#[async_trait]
impl Backend for AwsBackend {
    fn name(&self) -> &'static str {
        "aws"
    }

    fn elastic(&self) -> bool {
        true
    }

    async fn start(&self) -> BackendResult<()> {
        if self.node.get().is_none() {
            let instance_id = self.instance_id().await?;
            let instance = self
                .cloud
                .instance(&instance_id)
                .await
                .map_err(backend_error)?;
            let limits = self.limits(&instance).await?;
            let pod_subnets = self.pod_subnets(&instance).await?;
            let security_groups = if self.args.aws_pod_security_groups.is_empty() {
                instance.primary_security_groups.clone()
            } else {
                self.args.aws_pod_security_groups.clone()
            };
            tracing::info!(
                node = %self.node_name,
                instance = %instance.id,
                instance_type = %instance.instance_type,
                zone = %instance.availability_zone,
                max_enis = limits.max_enis,
                ips_per_eni = limits.ipv4_per_eni,
                prefix_delegation = self.args.aws_prefix_delegation,
                "AWS backend found its instance"
            );
            // Only this call sets it; a concurrent start would find the same.
            let _ = self.node.set(NodeInfo {
                instance,
                limits,
                pod_subnets,
                security_groups,
            });
        }
        let node = self.node()?;
        let _changes = self.changes.lock().await;
        self.finish_interrupted(node).await
    }

    async fn assigned(&self) -> BackendResult<Vec<Assigned>> {
        let node = self.node()?;
        let (ours, _) = self.attached(node).await?;
        let usable: Vec<&Eni> = ours.iter().filter(|e| is_usable(e, true)).collect();
        let cidrs = self
            .cidrs_of(usable.iter().map(|e| e.subnet_id.clone()).collect())
            .await?;
        let mut out = Vec::new();
        for eni in usable {
            let subnet = cidrs[&eni.subnet_id];
            out.extend(to_assigned(
                &eni.id,
                subnet,
                &eni.secondary_ips,
                &eni.prefixes,
            ));
        }
        Ok(out)
    }

    async fn acquire(&self, count: usize, op_id: &str) -> BackendResult<Vec<Assigned>> {
        let node = self.node()?;
        if count == 0 {
            return Ok(Vec::new());
        }
        let prefixes = self.args.aws_prefix_delegation;
        let _changes = self.changes.lock().await;
        let (ours, mut used) = self.attached(node).await?;
        let mut added: Vec<Assigned> = Vec::new();
        let mut failure = None;
        // Fill the ENIs there are, then add ENIs while the instance takes them.
        for eni in ours.iter().filter(|e| is_usable(e, false)) {
            let missing = count.saturating_sub(added.len());
            let Some(ask) = to_ask(missing, room(eni, &node.limits), prefixes) else {
                continue;
            };
            match self.assign_to(eni, ask).await {
                Ok(new) => added.extend(new),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let mut created = 0;
        while failure.is_none() && added.len() < count {
            let Some(index) = free_device_index(&used, node.limits.max_enis) else {
                break;
            };
            let missing = count - added.len();
            let Some(ask) = to_ask(missing, node.limits.ipv4_per_eni - 1, prefixes) else {
                break;
            };
            let created_eni = match self.subnet_for_new_eni(node).await {
                Ok(subnet) => {
                    let token = Some(client_token(op_id, created));
                    self.create_and_attach(node, subnet, ask, index, token)
                        .await
                }
                Err(e) => Err(e),
            };
            created += 1;
            match created_eni {
                Ok(eni) => {
                    used.push(index);
                    let subnet = self.cidr_of(&eni.subnet_id).await?;
                    added.extend(to_assigned(
                        &eni.id,
                        subnet,
                        &eni.secondary_ips,
                        &eni.prefixes,
                    ));
                }
                Err(e) => failure = Some(e),
            }
        }
        match failure {
            Some(e) if added.is_empty() => Err(e),
            Some(e) => {
                tracing::warn!(error = %e, added = added.len(), count, "acquired fewer addresses than asked");
                Ok(added)
            }
            None if added.is_empty() => Err(BackendError::Transient(format!(
                "instance {} ({}) is full: {} ENIs of {} addresses (--aws-max-enis, --aws-ips-per-eni)",
                node.instance.id,
                node.instance.instance_type,
                node.limits.max_enis,
                node.limits.ipv4_per_eni
            ))),
            None => Ok(added),
        }
    }

    async fn release(&self, ips: &[IpAddr]) -> BackendResult<()> {
        let node = self.node()?;
        if ips.is_empty() {
            return Ok(());
        }
        let _changes = self.changes.lock().await;
        let (ours, _) = self.attached(node).await?;
        let mut first_error = None;
        for r in plan_release(&ours, ips) {
            match self.cloud.unassign(&r.eni_id, &r.ips, &r.prefixes).await {
                Ok(()) => {
                    tracing::info!(eni = %r.eni_id, ips = ?r.ips, prefixes = ?r.prefixes, "released Pod addresses");
                    if r.empties {
                        self.remove(&r.eni_id, r.attachment_id.as_deref()).await;
                    }
                }
                // The ENI is gone, and its addresses with it.
                Err(ProviderError::NotFound { .. }) => {}
                Err(e) => {
                    tracing::warn!(eni = %r.eni_id, error = %e, "could not release Pod addresses");
                    first_error.get_or_insert(backend_error(e));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn reassign(&self, ips: &[Assigned]) -> BackendResult<Vec<IpAddr>> {
        let node = self.node()?;
        if ips.is_empty() {
            return Ok(Vec::new());
        }
        let prefixes = self.args.aws_prefix_delegation;
        let _changes = self.changes.lock().await;
        let (ours, mut used) = self.attached(node).await?;
        let usable: Vec<&Eni> = ours.iter().filter(|e| is_usable(e, false)).collect();
        let cidrs = self
            .cidrs_of(usable.iter().map(|e| e.subnet_id.clone()).collect())
            .await?;
        let held: BTreeSet<IpAddr> = usable
            .iter()
            .flat_map(|e| to_assigned(&e.id, cidrs[&e.subnet_id], &e.secondary_ips, &e.prefixes))
            .map(|a| a.ip)
            .collect();
        let missing: Vec<&Assigned> = ips.iter().filter(|a| !held.contains(&a.ip)).collect();
        let mut enis: Vec<(String, Cidr, u32)> = usable
            .iter()
            .map(|e| (e.id.clone(), cidrs[&e.subnet_id], room(e, &node.limits)))
            .collect();
        let (mut plan, mut left) = plan_reassign(&units_of(&missing, prefixes), &mut enis);
        // Addresses whose ENI is gone (or full) get a new ENI in their subnet.
        let mut failed: Vec<Unit> = Vec::new();
        while let Some(subnet) = left.first().map(|u| u.subnet) {
            let (here, elsewhere): (Vec<Unit>, Vec<Unit>) =
                left.into_iter().partition(|u| u.subnet == subnet);
            left = elsewhere;
            let target = match (
                self.pod_subnet_with_cidr(node, subnet).await?,
                free_device_index(&used, node.limits.max_enis),
            ) {
                (Some(subnet_id), Some(index)) => {
                    let eni = self
                        .create_and_attach(node, subnet_id, Secondary::Ips(0), index, None)
                        .await?;
                    used.push(index);
                    Some(eni)
                }
                _ => None,
            };
            let Some(eni) = target else {
                failed.extend(here);
                continue;
            };
            let mut new = vec![(eni.id.clone(), subnet, room(&eni, &node.limits))];
            let (more, still) = plan_reassign(&here, &mut new);
            for (id, units) in more {
                plan.entry(id).or_default().extend(units);
            }
            // More than one ENI holds: the next round makes another.
            left.extend(still);
        }
        for (eni_id, units) in &plan {
            failed.extend(self.assign_units(eni_id, units).await?);
            tracing::info!(eni = %eni_id, count = units.len(), "reassigned Pod addresses");
        }
        Ok(failed.iter().flat_map(|u| u.ips.iter().copied()).collect())
    }

    /// The subnet's fourth address, which AWS reserves "for future use" and
    /// never assigns: the node must not hold the VPC router's (the first
    /// host), which its ENI route tables go through, and ptp needs a
    /// gateway inside the Pod's prefix.
    fn pod_gateway(&self, subnet: &Cidr) -> Option<IpAddr> {
        subnet.nth(3)
    }

    async fn node_network(&self) -> BackendResult<Option<NodeNetwork>> {
        let node = self.node()?;
        let instance = &node.instance.id;
        let all = self
            .cloud
            .network_interfaces_of(instance)
            .await
            .map_err(backend_error)?;
        // The primary ENI (the node's own traffic, SNAT) and ours.
        let enis: Vec<&Eni> = all
            .iter()
            .filter(|e| {
                e.attachment
                    .as_ref()
                    .is_some_and(|a| &a.instance_id == instance && a.device_index == 0)
                    || is_ours(e, &self.cluster, instance)
            })
            .collect();
        let cidrs = self
            .cidrs_of(enis.iter().map(|e| e.subnet_id.clone()).collect())
            .await?;
        let interfaces = enis
            .iter()
            .filter_map(|e| node_interface(e, &cidrs))
            .collect();
        let network_cidrs = self
            .cloud
            .vpc_cidrs(&node.instance.vpc_id)
            .await
            .map_err(backend_error)?
            .iter()
            .filter_map(|c| c.parse::<Cidr>().ok())
            .map(|c| c.network())
            .collect();
        Ok(Some(NodeNetwork {
            interfaces,
            network_cidrs,
        }))
    }

    async fn collect_garbage(&self) -> BackendResult<usize> {
        let detached = self
            .cloud
            .network_interfaces_tagged(&[(TAG_CLUSTER, &self.cluster)], TAG_NODE, "available")
            .await
            .map_err(backend_error)?;
        let now = Timestamp::now();
        let mut deleted = 0;
        for eni in detached {
            match expired(eni.tags.get(TAG_CREATED), now, self.args.aws_eni_gc_grace) {
                Some(true) => {}
                Some(false) => continue,
                None => {
                    tracing::warn!(eni = %eni.id, "a Pod ENI without a valid {TAG_CREATED} tag is kept");
                    continue;
                }
            }
            match self.cloud.delete_network_interface(&eni.id).await {
                Ok(()) => {
                    tracing::info!(eni = %eni.id, node = ?eni.tags.get(TAG_NODE), "deleted a detached Pod ENI");
                    deleted += 1;
                }
                // Attached again meanwhile (by its node's start).
                Err(ProviderError::Conflict { .. }) => {}
                Err(e) => return Err(backend_error(e)),
            }
        }
        Ok(deleted)
    }
}

fn no_prefix_error(eni_id: &str) -> BackendError {
    BackendError::Permanent(format!(
        "EC2 assigned no /28 prefix to {eni_id}: this EC2 endpoint or instance does not \
         support prefix delegation; run without --aws-prefix-delegation"
    ))
}

/// `aws:///us-east-1a/i-0123abcd` (also `aws://us-east-1a/i-...`) -> `i-0123abcd`.
fn instance_id_from_provider_id(provider_id: &str) -> Option<&str> {
    let id = provider_id.strip_prefix("aws://")?.rsplit('/').next()?;
    is_aws_id(id, "i-").then_some(id)
}

/// `--aws-pod-subnet`'s subnet must be where the instance is: an ENI
/// attaches only to an instance of its own zone.
fn check_pod_subnet(subnet: &SubnetInfo, instance: &InstanceInfo) -> Result<(), String> {
    if subnet.vpc_id != instance.vpc_id {
        return Err(format!(
            "the subnet is in VPC {}, instance {} in VPC {}",
            subnet.vpc_id, instance.id, instance.vpc_id
        ));
    }
    if subnet.availability_zone != instance.availability_zone {
        return Err(format!(
            "the subnet is in zone {}, instance {} in zone {}",
            subnet.availability_zone, instance.id, instance.availability_zone
        ));
    }
    Ok(())
}

/// Of the subnets in `zone`, the one with the most free addresses (ties:
/// the smallest ID, so every node picks the same).
fn choose_subnet<'a>(subnets: &'a [SubnetInfo], zone: &str) -> Option<&'a SubnetInfo> {
    subnets
        .iter()
        .filter(|s| s.availability_zone == zone)
        .min_by(|a, b| b.available_ips.cmp(&a.available_ips).then(a.id.cmp(&b.id)))
}

/// An ENI this cluster's agent created for this instance, attached to it
/// at an index other than the primary's.
fn is_ours(eni: &Eni, cluster: &str, instance_id: &str) -> bool {
    let tag = |k: &str| eni.tags.get(k).map(String::as_str);
    tag(TAG_CLUSTER) == Some(cluster)
        && tag(TAG_INSTANCE) == Some(instance_id)
        && tag(TAG_NODE).is_some()
        && eni
            .attachment
            .as_ref()
            .is_some_and(|a| a.instance_id == instance_id && a.device_index != 0)
}

/// An attached ENI as the node's routing sees it; `None` when EC2 left out
/// what routing needs (MAC, address, device index).
fn node_interface(eni: &Eni, cidrs: &HashMap<String, Cidr>) -> Option<NodeInterface> {
    let mac = eni.mac.as_deref().and_then(crate::datapath::parse_mac);
    let address = eni.primary_ip.as_deref().and_then(|a| a.parse().ok());
    let (Some(mac), Some(address)) = (mac, address) else {
        tracing::warn!(eni = %eni.id, mac = ?eni.mac, address = ?eni.primary_ip, "ENI without a MAC or IPv4 address: not routed");
        return None;
    };
    Some(NodeInterface {
        id: eni.id.clone(),
        mac,
        device_index: u32::try_from(eni.attachment.as_ref()?.device_index).ok()?,
        address,
        subnet: *cidrs.get(&eni.subnet_id)?,
    })
}

/// Attached (or, for reading, still attaching): not on its way out.
fn is_usable(eni: &Eni, attaching_too: bool) -> bool {
    eni.attachment
        .as_ref()
        .is_some_and(|a| a.status == "attached" || (attaching_too && a.status == "attaching"))
}

/// Free slots of an ENI: each secondary address or prefix takes one, and
/// the primary address one more.
fn room(eni: &Eni, limits: &EniLimits) -> u32 {
    let taken = eni.secondary_ips.len() + eni.prefixes.len() + 1;
    limits
        .ipv4_per_eni
        .saturating_sub(u32::try_from(taken).unwrap_or(u32::MAX))
}

/// What to ask of an ENI with `room` slots for `missing` addresses.
fn to_ask(missing: usize, room: u32, prefixes: bool) -> Option<Secondary> {
    let want = if prefixes {
        missing.div_ceil(PREFIX_ADDRESSES)
    } else {
        missing
    };
    let n = u32::try_from(want).unwrap_or(u32::MAX).min(room);
    match (n, prefixes) {
        (0, _) => None,
        (n, true) => Some(Secondary::Prefixes(n)),
        (n, false) => Some(Secondary::Ips(n)),
    }
}

/// The lowest device index not in use; 0 is the primary ENI's.
fn free_device_index(used: &[i32], max_enis: u32) -> Option<i32> {
    let max = i32::try_from(max_enis).unwrap_or(i32::MAX);
    (1..max).find(|i| !used.contains(i))
}

/// What an assign call added to `before`: AWS answers with the new
/// addresses only, the emulators with all of them (the primary included).
fn new_addresses(before: &Eni, got: &AssignedAddresses) -> (Vec<String>, Vec<String>) {
    let ips = got
        .ips
        .iter()
        .filter(|ip| Some(*ip) != before.primary_ip.as_ref() && !before.secondary_ips.contains(ip))
        .cloned()
        .collect();
    let prefixes = got
        .prefixes
        .iter()
        .filter(|p| !before.prefixes.contains(p))
        .cloned()
        .collect();
    (ips, prefixes)
}

/// The 16 addresses of a delegated IPv4 /28 ("100.64.0.16/28").
fn expand_prefix(prefix: &str) -> Option<Vec<IpAddr>> {
    let cidr: Cidr = prefix.parse().ok()?;
    match cidr.network().addr() {
        IpAddr::V4(base) if cidr.prefix_len() == 28 => {
            let base = u32::from(base);
            Some(
                (0..16u32)
                    .map(|i| IpAddr::V4(Ipv4Addr::from(base + i)))
                    .collect(),
            )
        }
        _ => None,
    }
}

fn to_assigned(eni_id: &str, subnet: Cidr, ips: &[String], prefixes: &[String]) -> Vec<Assigned> {
    let singles = ips.iter().filter_map(|ip| ip.parse().ok());
    let in_prefixes = prefixes.iter().filter_map(|p| expand_prefix(p)).flatten();
    singles
        .chain(in_prefixes)
        .map(|ip| Assigned {
            ip,
            subnet,
            holder: eni_id.to_string(),
        })
        .collect()
}

/// Per ENI, the addresses to unassign, and the prefixes all 16 of whose
/// addresses are released (a prefix partly in use stays).
fn plan_release(enis: &[Eni], release: &[IpAddr]) -> Vec<EniRelease> {
    let release: BTreeSet<IpAddr> = release.iter().copied().collect();
    let mut plan = Vec::new();
    for eni in enis {
        let ips: Vec<String> = eni
            .secondary_ips
            .iter()
            .filter(|ip| ip.parse().is_ok_and(|ip| release.contains(&ip)))
            .cloned()
            .collect();
        let prefixes: Vec<String> = eni
            .prefixes
            .iter()
            .filter(|p| {
                expand_prefix(p).is_some_and(|all| all.iter().all(|ip| release.contains(ip)))
            })
            .cloned()
            .collect();
        if ips.is_empty() && prefixes.is_empty() {
            continue;
        }
        plan.push(EniRelease {
            eni_id: eni.id.clone(),
            attachment_id: eni.attachment.as_ref().map(|a| a.id.clone()),
            empties: ips.len() == eni.secondary_ips.len() && prefixes.len() == eni.prefixes.len(),
            ips,
            prefixes,
        });
    }
    plan
}

/// The addresses to reassign as units: themselves, or with prefix
/// delegation their /28s (once each).
fn units_of(missing: &[&Assigned], prefixes: bool) -> Vec<Unit> {
    let mut units: BTreeMap<String, Unit> = BTreeMap::new();
    for a in missing {
        let key = match (prefixes, a.ip) {
            (true, IpAddr::V4(ip)) => {
                let base = Ipv4Addr::from(u32::from(ip) & !0xf);
                format!("{base}/28")
            }
            _ => a.ip.to_string(),
        };
        let unit = units.entry(key.clone()).or_insert_with(|| Unit {
            key,
            subnet: a.subnet,
            holder: a.holder.clone(),
            ips: Vec::new(),
        });
        unit.ips.push(a.ip);
    }
    units.into_values().collect()
}

/// Places each unit on an ENI in its subnet with room, its former holder
/// first; `enis` is (id, subnet, room), its room used up as planned.
/// Returns the plan per ENI and the units no ENI could take.
fn plan_reassign(
    units: &[Unit],
    enis: &mut [(String, Cidr, u32)],
) -> (BTreeMap<String, Vec<Unit>>, Vec<Unit>) {
    let mut plan: BTreeMap<String, Vec<Unit>> = BTreeMap::new();
    let mut left = Vec::new();
    for unit in units {
        let fits = |e: &(String, Cidr, u32)| e.1 == unit.subnet && e.2 > 0;
        let pick = enis
            .iter()
            .position(|e| e.0 == unit.holder && fits(e))
            .or_else(|| enis.iter().position(fits));
        match pick {
            Some(i) => {
                enis[i].2 -= 1;
                plan.entry(enis[i].0.clone())
                    .or_default()
                    .push(unit.clone());
            }
            None => left.push(unit.clone()),
        }
    }
    (plan, left)
}

/// `op_id` made a CreateNetworkInterface client token (at most 64 ASCII
/// characters), one per ENI an operation creates.
fn client_token(op_id: &str, n: usize) -> String {
    let token = format!("{op_id}-{n}");
    if token.len() <= 64 && token.bytes().all(|b| b.is_ascii_graphic()) {
        return token;
    }
    // FNV-1a: stable across builds, unlike std's hasher.
    let hash = op_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{hash:016x}-{n}")
}

/// Whether an ENI created at `created` (its [`TAG_CREATED`]) is older than
/// `grace`; `None` when the tag is missing or unreadable.
fn expired(created: Option<&String>, now: Timestamp, grace: Duration) -> Option<bool> {
    let created: Timestamp = created?.parse().ok()?;
    let grace = SignedDuration::try_from(grace).ok()?;
    Some(now.duration_since(created) >= grace)
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use cnlb_provider_aws::ipam::EniAttachment;

    use super::*;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        aws: AwsArgs,
    }

    fn parse(args: &[&str]) -> Result<AwsArgs, String> {
        let cli = Cli::try_parse_from(std::iter::once("agent").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.aws.validate()?;
        Ok(cli.aws)
    }

    #[test]
    fn flags_parse_with_defaults() {
        let args = parse(&[
            "--aws-pod-subnet",
            "us-east-1a=subnet-0a1b",
            "--aws-pod-subnet=us-east-1b=subnet-0c2d",
        ])
        .unwrap();
        assert_eq!(
            args.aws_pod_subnets,
            [
                PodSubnet {
                    zone: "us-east-1a".into(),
                    subnet_id: "subnet-0a1b".into()
                },
                PodSubnet {
                    zone: "us-east-1b".into(),
                    subnet_id: "subnet-0c2d".into()
                }
            ]
        );
        assert_eq!(args.aws_eni_gc_grace, Duration::from_secs(300));
        assert_eq!(args.aws_read_rate, RateLimit::new(10, 20));
        assert_eq!(args.aws_write_rate, RateLimit::new(2, 5));
        assert!(!args.aws_prefix_delegation);
        assert_eq!((args.aws_max_enis, args.aws_ips_per_eni), (None, None));
        assert!(args.aws_node_routing && !args.aws_external_snat);
        assert_eq!(args.aws_eni_mtu, 9001);

        let args = parse(&[
            "--aws-pod-subnet-tag=cnlb.dev/pods=true",
            "--aws-pod-security-group=sg-1",
            "--aws-pod-security-group=sg-2f",
            "--aws-prefix-delegation",
            "--aws-max-enis=3",
            "--aws-ips-per-eni=10",
            "--aws-eni-gc-grace=0s",
            "--aws-write-rate=4/8",
            "--aws-node-routing=false",
            "--aws-external-snat",
            "--aws-eni-mtu=1500",
        ])
        .unwrap();
        assert_eq!(
            args.aws_pod_subnet_tag,
            Some(SubnetTag {
                key: "cnlb.dev/pods".into(),
                value: "true".into()
            })
        );
        assert_eq!(args.aws_pod_security_groups, ["sg-1", "sg-2f"]);
        assert!(args.aws_prefix_delegation);
        assert_eq!(
            (args.aws_max_enis, args.aws_ips_per_eni),
            (Some(3), Some(10))
        );
        assert_eq!(args.aws_eni_gc_grace, Duration::ZERO);
        assert_eq!(args.aws_write_rate, RateLimit::new(4, 8));
        assert!(!args.aws_node_routing && args.aws_external_snat);
        assert_eq!(args.aws_eni_mtu, 1500);
    }

    #[test]
    fn bad_flags_are_named() {
        let cases: &[(&[&str], &str)] = &[
            (&[], "--aws-pod-subnet"),
            (&["--aws-pod-subnet=subnet-1"], "--aws-pod-subnet"),
            (&["--aws-pod-subnet=us-east-1a=sg-1"], "--aws-pod-subnet"),
            (&["--aws-pod-subnet=us-east-1a="], "--aws-pod-subnet"),
            (
                &[
                    "--aws-pod-subnet=us-east-1a=subnet-1",
                    "--aws-pod-subnet=us-east-1a=subnet-2",
                ],
                "--aws-pod-subnet gives availability zone us-east-1a",
            ),
            (
                &[
                    "--aws-pod-subnet=us-east-1a=subnet-1",
                    "--aws-pod-subnet-tag=a=b",
                ],
                "--aws-pod-subnet-tag",
            ),
            (&["--aws-pod-subnet-tag=novalue"], "--aws-pod-subnet-tag"),
            (&["--aws-pod-subnet-tag==x"], "--aws-pod-subnet-tag"),
            (
                &[
                    "--aws-pod-subnet-tag=a=b",
                    "--aws-pod-security-group=default",
                ],
                "--aws-pod-security-group",
            ),
            (
                &["--aws-pod-subnet-tag=a=b", "--aws-max-enis=1"],
                "--aws-max-enis",
            ),
            (
                &["--aws-pod-subnet-tag=a=b", "--aws-ips-per-eni=x"],
                "--aws-ips-per-eni",
            ),
            (
                &["--aws-pod-subnet-tag=a=b", "--aws-eni-gc-grace=5 min"],
                "--aws-eni-gc-grace",
            ),
            (
                &["--aws-pod-subnet-tag=a=b", "--aws-read-rate=0/5"],
                "--aws-read-rate",
            ),
            (
                &["--aws-pod-subnet-tag=a=b", "--aws-eni-mtu=9500"],
                "--aws-eni-mtu",
            ),
            (
                &["--aws-pod-subnet-tag=a=b", "--aws-node-routing=maybe"],
                "--aws-node-routing",
            ),
        ];
        for (args, needle) in cases {
            let err = parse(args).unwrap_err();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }

    #[test]
    fn provider_ids() {
        assert_eq!(
            instance_id_from_provider_id("aws:///us-east-1a/i-0123abcd"),
            Some("i-0123abcd")
        );
        assert_eq!(
            instance_id_from_provider_id("aws://us-east-1a/i-0123abcd"),
            Some("i-0123abcd")
        );
        for bad in [
            "",
            "i-0123",
            "gce://p/z/i-1",
            "aws:///us-east-1a/",
            "aws:///us-east-1a/x-1",
        ] {
            assert_eq!(instance_id_from_provider_id(bad), None, "{bad:?}");
        }
    }

    fn subnet(id: &str, zone: &str, free: u32) -> SubnetInfo {
        SubnetInfo {
            id: id.into(),
            vpc_id: "vpc-1".into(),
            availability_zone: zone.into(),
            cidr: "100.64.0.0/19".into(),
            available_ips: free,
        }
    }

    fn instance() -> InstanceInfo {
        InstanceInfo {
            id: "i-1".into(),
            instance_type: "m5.large".into(),
            vpc_id: "vpc-1".into(),
            availability_zone: "us-east-1a".into(),
            primary_security_groups: vec!["sg-1".into()],
        }
    }

    #[test]
    fn the_subnet_with_most_free_addresses_in_the_zone_is_chosen() {
        let subnets = [
            subnet("subnet-a", "us-east-1a", 100),
            subnet("subnet-b", "us-east-1b", 9000),
            subnet("subnet-d", "us-east-1a", 500),
            subnet("subnet-c", "us-east-1a", 500),
        ];
        assert_eq!(
            choose_subnet(&subnets, "us-east-1a").unwrap().id,
            "subnet-c"
        );
        assert_eq!(
            choose_subnet(&subnets, "us-east-1b").unwrap().id,
            "subnet-b"
        );
        assert!(choose_subnet(&subnets, "us-east-1c").is_none());
    }

    #[test]
    fn a_pod_subnet_must_be_in_the_instances_vpc_and_zone() {
        assert_eq!(
            check_pod_subnet(&subnet("subnet-a", "us-east-1a", 1), &instance()),
            Ok(())
        );
        let other_zone = check_pod_subnet(&subnet("subnet-b", "us-east-1b", 1), &instance());
        assert!(other_zone.unwrap_err().contains("zone us-east-1b"));
        let mut other_vpc = subnet("subnet-a", "us-east-1a", 1);
        other_vpc.vpc_id = "vpc-2".into();
        assert!(
            check_pod_subnet(&other_vpc, &instance())
                .unwrap_err()
                .contains("VPC vpc-2")
        );
    }

    fn eni(id: &str, index: i32, ips: &[&str], prefixes: &[&str]) -> Eni {
        Eni {
            id: id.into(),
            subnet_id: "subnet-a".into(),
            status: "in-use".into(),
            attachment: Some(EniAttachment {
                id: format!("{id}-attach"),
                instance_id: "i-1".into(),
                device_index: index,
                status: "attached".into(),
                delete_on_termination: true,
            }),
            primary_ip: Some("100.64.0.4".into()),
            secondary_ips: ips.iter().map(|s| s.to_string()).collect(),
            prefixes: prefixes.iter().map(|s| s.to_string()).collect(),
            tags: BTreeMap::from([
                (TAG_CLUSTER.into(), "c".into()),
                (TAG_NODE.into(), "node-1".into()),
                (TAG_INSTANCE.into(), "i-1".into()),
            ]),
            mac: None,
        }
    }

    #[test]
    fn only_our_secondary_enis_are_ours() {
        assert!(is_ours(&eni("eni-1", 1, &[], &[]), "c", "i-1"));
        assert!(!is_ours(&eni("eni-1", 1, &[], &[]), "other", "i-1"));
        assert!(!is_ours(&eni("eni-1", 1, &[], &[]), "c", "i-2"));
        // Even tagged as ours, the primary ENI is not for Pods.
        assert!(!is_ours(&eni("eni-1", 0, &[], &[]), "c", "i-1"));
        let mut untagged = eni("eni-1", 1, &[], &[]);
        untagged.tags.remove(TAG_NODE);
        assert!(!is_ours(&untagged, "c", "i-1"));
        let mut detached = eni("eni-1", 1, &[], &[]);
        detached.attachment = None;
        assert!(!is_ours(&detached, "c", "i-1"));
    }

    #[test]
    fn room_and_what_to_ask() {
        let limits = EniLimits {
            max_enis: 3,
            ipv4_per_eni: 10,
        };
        assert_eq!(room(&eni("e", 1, &[], &[]), &limits), 9);
        assert_eq!(room(&eni("e", 1, &["a", "b"], &["p"]), &limits), 6);
        let full: Vec<String> = (0..9).map(|i| format!("ip{i}")).collect();
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        assert_eq!(room(&eni("e", 1, &full, &[]), &limits), 0);

        assert_eq!(to_ask(10, 9, false), Some(Secondary::Ips(9)));
        assert_eq!(to_ask(3, 9, false), Some(Secondary::Ips(3)));
        assert_eq!(to_ask(3, 0, false), None);
        assert_eq!(to_ask(0, 9, false), None);
        assert_eq!(to_ask(10, 9, true), Some(Secondary::Prefixes(1)));
        assert_eq!(to_ask(17, 9, true), Some(Secondary::Prefixes(2)));
        assert_eq!(to_ask(1000, 9, true), Some(Secondary::Prefixes(9)));
    }

    #[test]
    fn device_indexes_skip_the_used_ones() {
        assert_eq!(free_device_index(&[0], 3), Some(1));
        assert_eq!(free_device_index(&[0, 1], 3), Some(2));
        assert_eq!(free_device_index(&[0, 2], 3), Some(1));
        assert_eq!(free_device_index(&[0, 1, 2], 3), None);
        assert_eq!(free_device_index(&[0], 1), None);
    }

    #[test]
    fn new_addresses_leave_out_what_the_eni_had() {
        let before = eni("e", 1, &["100.64.0.9"], &["100.64.1.0/28"]);
        // An emulator answers with every address, the primary included.
        let got = AssignedAddresses {
            ips: vec![
                "100.64.0.4".into(),
                "100.64.0.9".into(),
                "100.64.0.12".into(),
            ],
            prefixes: vec!["100.64.1.0/28".into(), "100.64.1.16/28".into()],
        };
        assert_eq!(
            new_addresses(&before, &got),
            (
                vec!["100.64.0.12".to_string()],
                vec!["100.64.1.16/28".to_string()]
            )
        );
    }

    #[test]
    fn prefixes_expand_to_16_addresses() {
        let all = expand_prefix("100.64.1.16/28").unwrap();
        assert_eq!(all.len(), 16);
        assert_eq!(all[0].to_string(), "100.64.1.16");
        assert_eq!(all[15].to_string(), "100.64.1.31");
        assert_eq!(expand_prefix("100.64.1.0/24"), None);
        assert_eq!(expand_prefix("fd00::/80"), None);
        assert_eq!(expand_prefix("junk"), None);

        let subnet: Cidr = "100.64.0.0/19".parse().unwrap();
        let assigned = to_assigned(
            "eni-1",
            subnet,
            &["100.64.0.9".into()],
            &["100.64.1.16/28".into()],
        );
        assert_eq!(assigned.len(), 17);
        assert!(
            assigned
                .iter()
                .all(|a| a.subnet == subnet && a.holder == "eni-1")
        );
        assert_eq!(assigned[0].ip.to_string(), "100.64.0.9");
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn releases_are_grouped_per_eni_and_prefixes_go_only_whole() {
        let enis = [
            eni("eni-1", 1, &["100.64.0.9", "100.64.0.10"], &[]),
            eni(
                "eni-2",
                2,
                &["100.64.0.11"],
                &["100.64.1.16/28", "100.64.1.32/28"],
            ),
        ];
        let whole: Vec<String> = (16..32).map(|i| format!("100.64.1.{i}")).collect();
        let mut release: Vec<&str> = whole.iter().map(String::as_str).collect();
        // One address of the second prefix only; one unknown address.
        release.extend(["100.64.0.9", "100.64.0.11", "100.64.1.33", "10.0.0.1"]);
        let plan = plan_release(&enis, &ips(&release));
        assert_eq!(
            plan,
            [
                EniRelease {
                    eni_id: "eni-1".into(),
                    attachment_id: Some("eni-1-attach".into()),
                    ips: vec!["100.64.0.9".into()],
                    prefixes: vec![],
                    empties: false,
                },
                EniRelease {
                    eni_id: "eni-2".into(),
                    attachment_id: Some("eni-2-attach".into()),
                    ips: vec!["100.64.0.11".into()],
                    prefixes: vec!["100.64.1.16/28".into()],
                    empties: false,
                },
            ]
        );
        let plan = plan_release(&enis, &ips(&["100.64.0.9", "100.64.0.10"]));
        assert_eq!(plan.len(), 1);
        assert!(plan[0].empties);
        assert!(plan_release(&enis, &ips(&["10.0.0.1"])).is_empty());
    }

    fn assigned(ip: &str, holder: &str) -> Assigned {
        Assigned {
            ip: ip.parse().unwrap(),
            subnet: "100.64.0.0/19".parse().unwrap(),
            holder: holder.into(),
        }
    }

    #[test]
    fn reassignment_prefers_the_former_holder_then_any_eni_of_the_subnet() {
        let subnet: Cidr = "100.64.0.0/19".parse().unwrap();
        let other: Cidr = "100.64.32.0/19".parse().unwrap();
        let lost = [
            assigned("100.64.0.9", "eni-2"),
            assigned("100.64.0.10", "eni-2"),
            assigned("100.64.0.11", "eni-gone"),
            assigned("100.64.0.12", "eni-gone"),
        ];
        let lost: Vec<&Assigned> = lost.iter().collect();
        let units = units_of(&lost, false);
        assert_eq!(units.len(), 4);
        let mut enis = vec![
            ("eni-1".to_string(), subnet, 2),
            ("eni-2".to_string(), subnet, 1),
            ("eni-3".to_string(), other, 9),
        ];
        let (plan, left) = plan_reassign(&units, &mut enis);
        let keys = |us: &[Unit]| us.iter().map(|u| u.key.clone()).collect::<Vec<_>>();
        assert_eq!(keys(&plan["eni-2"]), ["100.64.0.10"]);
        assert_eq!(keys(&plan["eni-1"]), ["100.64.0.11", "100.64.0.12"]);
        assert_eq!(keys(&left), ["100.64.0.9"]);
        assert!(!plan.contains_key("eni-3"));
        assert!(enis.iter().take(2).all(|e| e.2 == 0));
    }

    #[test]
    fn with_prefixes_reassignment_units_are_the_28s() {
        let lost = [
            assigned("100.64.1.17", "eni-1"),
            assigned("100.64.1.30", "eni-1"),
            assigned("100.64.1.33", "eni-1"),
        ];
        let lost: Vec<&Assigned> = lost.iter().collect();
        let units = units_of(&lost, true);
        let keys: Vec<&str> = units.iter().map(|u| u.key.as_str()).collect();
        assert_eq!(keys, ["100.64.1.16/28", "100.64.1.32/28"]);
        assert_eq!(units[0].ips, ips(&["100.64.1.17", "100.64.1.30"]));
    }

    #[test]
    fn client_tokens_fit_the_api() {
        assert_eq!(client_token("op-7", 0), "op-7-0");
        let long = "x".repeat(100);
        let token = client_token(&long, 1);
        assert!(token.len() <= 64 && token.ends_with("-1"), "{token}");
        assert_eq!(token, client_token(&long, 1));
        assert_ne!(client_token(&long, 1), client_token(&"y".repeat(100), 1));
    }

    #[test]
    fn garbage_age_comes_from_the_creation_tag() {
        let now: Timestamp = "2026-01-01T00:10:00Z".parse().unwrap();
        let grace = Duration::from_secs(300);
        let at = |s: &str| Some(s.to_string());
        assert_eq!(
            expired(at("2026-01-01T00:04:59Z").as_ref(), now, grace),
            Some(true)
        );
        assert_eq!(
            expired(at("2026-01-01T00:05:00Z").as_ref(), now, grace),
            Some(true)
        );
        assert_eq!(
            expired(at("2026-01-01T00:06:00Z").as_ref(), now, grace),
            Some(false)
        );
        assert_eq!(expired(at("yesterday").as_ref(), now, grace), None);
        assert_eq!(expired(None, now, grace), None);
        // What the tag holds round-trips.
        let tag = Timestamp::now().to_string();
        assert!(expired(Some(&tag), Timestamp::now(), Duration::ZERO).unwrap());
    }

    #[test]
    fn errors_split_into_transient_and_permanent() {
        let transient = [
            ProviderError::Throttled {
                operation: "AssignPrivateIpAddresses".into(),
            },
            ProviderError::cloud("AttachNetworkInterface", "500", true),
            ProviderError::Conflict {
                resource: "eni-1".into(),
                reason: "in use".into(),
            },
        ];
        for e in transient {
            assert!(matches!(backend_error(e), BackendError::Transient(_)));
        }
        let permanent = [
            ProviderError::cloud("CreateNetworkInterface", "UnauthorizedOperation", false),
            ProviderError::QuotaExceeded {
                resource: "AttachmentLimitExceeded".into(),
            },
            ProviderError::NotFound {
                resource: "subnet-1".into(),
            },
        ];
        for e in permanent {
            assert!(matches!(backend_error(e), BackendError::Permanent(_)));
        }
    }
}
