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
//! This module does the calls and their order; what to do is decided in
//! [`plan`] (pure, tested with tables) and the flags are in [`flags`].
//! EC2 is called only through [`Ec2Ipam`] (rate limits, retries, metrics).
//! Changes to the node's ENIs hold one lock, so device indexes and the room
//! left on each ENI are computed from a view nobody else changes meanwhile.

mod flags;
mod plan;

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use cnlb_provider_aws::Clients;
use cnlb_provider_aws::ipam::{
    Ec2Ipam, Eni, EniLimits, InstanceInfo, NewEni, Secondary, SubnetInfo,
};
use cnlb_provider_core::{ProviderError, TAG_CLUSTER};
use k8s_openapi::jiff::Timestamp;
use prometheus_client::registry::Registry;

pub use self::flags::{AwsArgs, PodSubnet, SubnetTag};
use self::plan::addresses::{
    Shortfall, Unit, created_without_prefixes, eni_rooms, first_subnet_group, new_addresses,
    not_held, plan_reassign, plan_release, pod_addresses, shortfall, split_keys, to_assigned,
    units_of,
};
use self::plan::{
    attachment_to, check_limits, check_pod_subnet, choose_subnet, client_token, device_indexes_for,
    expired, flag_limits, free_device_index, holds_pod_addresses, instance_id_from_provider_id,
    is_routed, is_usable, merge_limits, network_cidrs, next_new_eni, node_interface, ours_and_used,
    owner_tags, refill_unit, room, subnet_ids_in_zone, to_ask,
};
use super::{
    Assigned, Backend, BackendError, BackendResult, NodeNetwork, backend_error, kube_client,
    node_provider_id,
};
use crate::cidr::Cidr;

/// Name of the Node an ENI was created for.
pub const TAG_NODE: &str = "cnlb.dev/vpc-ipam-node";
/// ID of the instance an ENI was created for.
pub const TAG_INSTANCE: &str = "cnlb.dev/vpc-ipam-instance";
/// When an ENI was created (RFC 3339), for garbage collection.
pub const TAG_CREATED: &str = "cnlb.dev/vpc-ipam-created";

/// Attaching or detaching an ENI takes AWS a few seconds: poll its state
/// from 200 ms, doubling up to 2 s, for at most a minute.
const POLL_FIRST: Duration = Duration::from_millis(200);
const POLL_MAX: Duration = Duration::from_secs(2);
const POLL_TIMEOUT: Duration = Duration::from_secs(60);

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
        let (max_enis, ipv4_per_eni) = (self.args.aws_max_enis, self.args.aws_ips_per_eni);
        let limits = match flag_limits(max_enis, ipv4_per_eni) {
            Some(limits) => limits,
            None => match self.cloud.instance_type_limits(ty).await {
                Ok(Some(found)) => merge_limits(max_enis, ipv4_per_eni, found),
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
        check_limits(ty, limits).map_err(BackendError::Permanent)
    }

    /// Checks the configured pod subnet of the instance's zone, or that
    /// the tag finds one there.
    async fn pod_subnets(&self, instance: &InstanceInfo) -> BackendResult<PodSubnets> {
        let zone = &instance.availability_zone;
        if let Some(tag) = &self.args.aws_pod_subnet_tag {
            self.tagged_subnet(instance, tag).await?;
            return Ok(PodSubnets::Tagged(tag.clone()));
        }
        let Some(configured) = self.args.pod_subnet_in(zone) else {
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
        let subnets = self.subnets_tagged(instance, tag).await?;
        choose_subnet(&subnets, &instance.availability_zone)
            .cloned()
            .ok_or_else(|| {
                BackendError::Permanent(format!(
                    "--aws-pod-subnet-tag {}={}: no subnet of VPC {} in zone {} has this tag",
                    tag.key, tag.value, instance.vpc_id, instance.availability_zone
                ))
            })
    }

    /// The subnets of the instance's VPC tagged `tag`, their CIDRs cached.
    async fn subnets_tagged(
        &self,
        instance: &InstanceInfo,
        tag: &SubnetTag,
    ) -> BackendResult<Vec<SubnetInfo>> {
        let subnets = self
            .cloud
            .subnets_tagged(&instance.vpc_id, &tag.key, &tag.value)
            .await
            .map_err(backend_error)?;
        for s in &subnets {
            self.cache_cidr(s)?;
        }
        Ok(subnets)
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
            PodSubnets::Tagged(tag) => subnet_ids_in_zone(
                self.subnets_tagged(&node.instance, tag).await?,
                &node.instance.availability_zone,
            ),
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
        Ok(ours_and_used(all, &self.cluster, instance))
    }

    /// Adds `ask` to `eni`; returns the addresses it gained.
    async fn assign_to(&self, eni: &Eni, ask: Secondary) -> BackendResult<Vec<Assigned>> {
        let got = self
            .cloud
            .assign(&eni.id, ask)
            .await
            .map_err(backend_error)?;
        let (ips, prefixes) = new_addresses(eni, &got);
        match shortfall(ask, &ips, &prefixes) {
            Some(Shortfall::Prefix) => return Err(no_prefix_error(&eni.id)),
            Some(Shortfall::Address) => {
                return Err(BackendError::Transient(format!(
                    "AssignPrivateIpAddresses on {} answered no new address",
                    eni.id
                )));
            }
            None => {}
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
            tags: owner_tags(
                &self.cluster,
                &self.node_name,
                &node.instance.id,
                Timestamp::now(),
            ),
            secondary: ask,
            client_token,
        };
        let eni = self
            .cloud
            .create_network_interface(&new)
            .await
            .map_err(backend_error)?;
        tracing::info!(eni = %eni.id, subnet = %eni.subnet_id, device_index, "created a Pod ENI");
        if created_without_prefixes(ask, &eni) {
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
        let already = attachment_to(eni, instance).is_some();
        if !already && let Err(e) = self.cloud.attach(&eni.id, instance, device_index).await {
            self.delete_quietly(&eni.id).await;
            return Err(backend_error(e));
        }
        let attached = self
            .wait_for(&eni.id, "attached", |e| {
                attachment_to(e, instance).is_some_and(|a| a.status == "attached")
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
    /// index is free), and attached ones get DeleteOnTermination. An ENI
    /// without Pod addresses, attached or not, is removed instead: a
    /// release emptied it (or a reassignment made it) and was interrupted
    /// before it was deleted, so nothing would ever fill or free it.
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
        let (ours, used) = self.attached(node).await?;
        let (leftovers, empty): (Vec<Eni>, Vec<Eni>) =
            leftovers.into_iter().partition(holds_pod_addresses);
        for eni in empty {
            tracing::info!(eni = %eni.id, "deleting an empty Pod ENI an interrupted run left");
            self.cloud
                .delete_network_interface(&eni.id)
                .await
                .map_err(backend_error)?;
        }
        // Planned up front: an attach that fails ends the whole run.
        let indexes = device_indexes_for(leftovers.len(), &used, node.limits.max_enis);
        for (eni, index) in leftovers.into_iter().zip(indexes) {
            match index {
                Some(index) => {
                    tracing::info!(eni = %eni.id, index, "attaching a Pod ENI an interrupted run left");
                    self.attach(node, &eni, index).await?;
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
            if holds_pod_addresses(eni) {
                self.ensure_delete_on_termination(eni).await;
            } else {
                tracing::info!(eni = %eni.id, "removing an empty Pod ENI an interrupted run left attached");
                self.remove(&eni.id, eni.attachment.as_ref().map(|a| a.id.as_str()))
                    .await;
            }
        }
        Ok(())
    }

    /// Assigns `units` to `eni_id` in one call; if EC2 refuses, one by one
    /// to find those it refuses. Returns the refused ones.
    async fn assign_units(&self, eni_id: &str, units: &[Unit]) -> BackendResult<Vec<Unit>> {
        let call = |units: &[Unit]| {
            let (ips, prefixes) = split_keys(units);
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
            let security_groups = self
                .args
                .pod_security_groups(&instance.primary_security_groups);
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

    fn refill_unit(&self) -> Option<usize> {
        let node = self.node.get()?;
        Some(refill_unit(&node.limits, self.args.aws_prefix_delegation))
    }

    async fn assigned(&self) -> BackendResult<Vec<Assigned>> {
        let node = self.node()?;
        let (ours, _) = self.attached(node).await?;
        let usable: Vec<&Eni> = ours.iter().filter(|e| is_usable(e, true)).collect();
        let cidrs = self
            .cidrs_of(usable.iter().map(|e| e.subnet_id.clone()).collect())
            .await?;
        Ok(pod_addresses(&usable, &cidrs))
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
            let missing = count - added.len();
            let Some((index, ask)) = next_new_eni(&used, &node.limits, missing, prefixes) else {
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
        let missing = not_held(ips, &pod_addresses(&usable, &cidrs));
        let mut enis = eni_rooms(&usable, &cidrs, &node.limits);
        let (mut plan, mut left) = plan_reassign(&units_of(&missing, prefixes), &mut enis);
        // Addresses whose ENI is gone (or full) get a new ENI in their subnet.
        let mut failed: Vec<Unit> = Vec::new();
        while let Some((subnet, here, elsewhere)) = first_subnet_group(std::mem::take(&mut left)) {
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
        let enis: Vec<&Eni> = all
            .iter()
            .filter(|e| is_routed(e, &self.cluster, instance))
            .collect();
        let cidrs = self
            .cidrs_of(enis.iter().map(|e| e.subnet_id.clone()).collect())
            .await?;
        let interfaces = enis
            .iter()
            .filter_map(|e| {
                let found = node_interface(e, &cidrs);
                // The ENIs are attached and `cidrs` has their subnets: only
                // a missing MAC or address leaves one out.
                if found.is_none() {
                    tracing::warn!(eni = %e.id, mac = ?e.mac, address = ?e.primary_ip, "ENI without a MAC or IPv4 address: not routed");
                }
                found
            })
            .collect();
        let vpc_cidrs = self
            .cloud
            .vpc_cidrs(&node.instance.vpc_id)
            .await
            .map_err(backend_error)?;
        Ok(Some(NodeNetwork {
            interfaces,
            network_cidrs: network_cidrs(&vpc_cidrs),
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

#[cfg(test)]
mod tests {
    use super::*;

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
