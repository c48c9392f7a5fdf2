//! Where a node's Pod addresses come from. The agent owns allocation,
//! cooldowns and crash safety; a backend only tells what the cloud has
//! assigned to this node and changes that.

use std::net::{IpAddr, Ipv4Addr};

use async_trait::async_trait;
use cnlb_provider_core::ProviderError;
use k8s_openapi::api::core::v1::Node;

use crate::cidr::Cidr;

pub mod aws;
pub mod gcp;
pub mod static_ranges;

/// An address the cloud (or the static configuration) has given this node
/// for Pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assigned {
    pub ip: IpAddr,
    /// The subnet the address is in: its prefix goes into the CNI result,
    /// and its first host address is the Pods' gateway.
    pub subnet: Cidr,
    /// What holds it in the cloud (an ENI id, "static"), for logs and GC.
    pub holder: String,
}

/// A network interface of the node's instance (an ENI), as the node's
/// routing needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInterface {
    pub id: String,
    pub mac: [u8; 6],
    /// 0 is the primary interface.
    pub device_index: u32,
    /// The interface's own (primary) address.
    pub address: Ipv4Addr,
    /// Its subnet: the subnet's router is the interface's gateway.
    pub subnet: Cidr,
}

/// What the node's routing needs from the cloud: its interfaces and the
/// address ranges of its network (the VPC's CIDRs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeNetwork {
    pub interfaces: Vec<NodeInterface>,
    pub network_cidrs: Vec<Cidr>,
}

/// The first host address of `subnet`, which pools never hand out: the
/// Pods' gateway by default (see [`Backend::pod_gateway`]), and in AWS
/// subnets the VPC router's, one of the four addresses AWS reserves.
pub fn gateway(subnet: &Cidr) -> Option<IpAddr> {
    subnet.nth(1)
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Worth retrying: throttling, 5xx, timeouts, an ENI still attaching.
    #[error("{0}")]
    Transient(String),
    /// Needs a person: bad configuration, missing permission, no subnet.
    #[error("{0}")]
    Permanent(String),
}

impl BackendError {
    pub fn is_transient(&self) -> bool {
        matches!(self, BackendError::Transient(_))
    }
}

pub type BackendResult<T> = Result<T, BackendError>;

/// A cloud call's error for the agent: throttling, 5xx and conflicts (an
/// ENI still attaching, an instance changed meanwhile) pass; the rest needs
/// a person (permissions, configuration, quotas, a full subnet).
pub fn backend_error(e: ProviderError) -> BackendError {
    match e {
        ProviderError::Throttled { .. }
        | ProviderError::RetryAfter(_)
        | ProviderError::Conflict { .. }
        | ProviderError::Cloud {
            retryable: true, ..
        } => BackendError::Transient(e.to_string()),
        _ => BackendError::Permanent(e.to_string()),
    }
}

/// Node `node_name`. Transient while the API server cannot be reached;
/// permanent when the agent may not read Nodes.
pub async fn read_node(kube: &kube::Client, node_name: &str) -> BackendResult<Node> {
    let nodes: kube::Api<Node> = kube::Api::all(kube.clone());
    nodes.get(node_name).await.map_err(|e| {
        let msg = format!("reading Node {node_name}: {e}");
        match e {
            kube::Error::Api(s) if s.code == 401 || s.code == 403 => BackendError::Permanent(msg),
            _ => BackendError::Transient(msg),
        }
    })
}

/// The `spec.providerID` of Node `node_name`, which names the node's
/// instance. Transient while the Node has none yet (the cloud controller
/// manager sets it when it initialises the Node) or the API server cannot
/// be reached; permanent when the agent may not read Nodes.
pub async fn node_provider_id(kube: &kube::Client, node_name: &str) -> BackendResult<String> {
    let node = read_node(kube, node_name).await?;
    let provider_id = node.spec.and_then(|s| s.provider_id).unwrap_or_default();
    if provider_id.is_empty() {
        return Err(BackendError::Transient(format!(
            "Node {node_name} has no spec.providerID yet (the cloud controller manager sets it)"
        )));
    }
    Ok(provider_id)
}

/// A Kubernetes client from the in-cluster configuration or KUBECONFIG.
pub async fn kube_client() -> BackendResult<kube::Client> {
    kube::Client::try_default().await.map_err(|e| {
        BackendError::Permanent(format!(
            "no Kubernetes client (in-cluster configuration or KUBECONFIG): {e}"
        ))
    })
}

#[async_trait]
pub trait Backend: Send + Sync {
    /// Short name for logs and metrics ("aws", "static").
    fn name(&self) -> &'static str;

    /// Whether the pool can grow and shrink (cloud) or is fixed (static):
    /// a fixed pool never calls [`Backend::acquire`] or [`Backend::release`].
    fn elastic(&self) -> bool;

    /// Prepares the backend (finds the node's instance, subnets) and
    /// finishes what a crash interrupted (e.g. attaches or deletes an ENI
    /// created for this node but never attached). Called once, before
    /// anything else.
    async fn start(&self) -> BackendResult<()>;

    /// The addresses one more unit of the cloud gives the node (an ENI's
    /// secondary addresses, a /28 prefix), known once started: the pool's
    /// default warm target. `None` for a fixed pool.
    fn refill_unit(&self) -> Option<usize> {
        None
    }

    /// Every address assigned to this node for Pods, as the cloud has it
    /// now. The agent rebuilds its pool from this on start, before it serves.
    async fn assigned(&self) -> BackendResult<Vec<Assigned>>;

    // A fixed pool keeps the defaults of the rest: nothing to acquire,
    // release, reassign or collect.

    /// Asks for about `count` more addresses (a backend may round up, e.g.
    /// to a /28 prefix, or give fewer when an ENI is full). Returns the
    /// addresses added. `op_id` identifies the operation in the agent's
    /// store and is usable as an idempotency token.
    async fn acquire(&self, _count: usize, _op_id: &str) -> BackendResult<Vec<Assigned>> {
        Ok(Vec::new())
    }

    /// Gives addresses back to the cloud. They are free and out of
    /// cooldown. Addresses already gone count as released.
    async fn release(&self, _ips: &[IpAddr]) -> BackendResult<()> {
        Ok(())
    }

    /// Assigns these exact addresses again (allocations hold them but the
    /// cloud lost them, e.g. someone unassigned them by hand). Returns
    /// those it could not get back (by default: all of them).
    async fn reassign(&self, ips: &[Assigned]) -> BackendResult<Vec<IpAddr>> {
        Ok(ips.iter().map(|a| a.ip).collect())
    }

    /// The gateway of Pods with addresses in `subnet`. Debian's ptp plugin
    /// puts it on the host side of each Pod's veth and routes the Pod's
    /// traffic through it, so the node holds it: the subnet's first host
    /// by default.
    fn pod_gateway(&self, subnet: &Cidr) -> Option<IpAddr> {
        gateway(subnet)
    }

    /// The node's interfaces and network, for a backend whose addresses
    /// sit on several interfaces and need policy routing (AWS); `None`
    /// for the others.
    async fn node_network(&self) -> BackendResult<Option<NodeNetwork>> {
        Ok(None)
    }

    /// Deletes cloud resources this cluster's agents created and nobody
    /// uses (detached ENIs). Returns how many were deleted.
    async fn collect_garbage(&self) -> BackendResult<usize> {
        Ok(0)
    }
}
