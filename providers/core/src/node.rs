//! Nodes as the cloud sees them: the instance behind each Node, what a
//! cloud controller manager initializes a Node with, and whether the
//! instance still runs. Looked up for many Nodes at once: the node
//! controllers make one call per batch of Nodes (EC2: up to 200 instances
//! per DescribeInstances; GCE: one instance list per zone), never one per
//! Node (kubernetes/kubernetes#75016, kubernetes/cloud-provider#14).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::error::Result;

/// How a Node names its instance.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeRef {
    /// Kubernetes Node name (an EC2 private DNS name, a GCE instance name).
    pub name: String,
    /// `spec.providerID`, once set (e.g. `aws:///eu-west-1a/i-0123`).
    pub provider_id: Option<String>,
    /// The addresses the kubelet reports (`--node-ip`), to find an
    /// instance by when neither the ID nor the name names one.
    pub internal_ips: Vec<IpAddr>,
}

impl NodeRef {
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            provider_id: None,
            internal_ips: Vec::new(),
        }
    }
}

/// Kind of a node address (`status.addresses[].type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum NodeAddressKind {
    InternalIP,
    ExternalIP,
    Hostname,
    InternalDNS,
    ExternalDNS,
}

impl NodeAddressKind {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InternalIP => "InternalIP",
            Self::ExternalIP => "ExternalIP",
            Self::Hostname => "Hostname",
            Self::InternalDNS => "InternalDNS",
            Self::ExternalDNS => "ExternalDNS",
        }
    }
}

/// One entry of `status.addresses`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeAddress {
    pub kind: NodeAddressKind,
    pub address: String,
}

/// What the node controller writes on a Node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceMetadata {
    /// Value for `spec.providerID`.
    pub provider_id: String,
    /// Value for the `node.kubernetes.io/instance-type` label.
    pub instance_type: String,
    /// In the order they should appear in `status.addresses`.
    pub addresses: Vec<NodeAddress>,
    /// Value for `topology.kubernetes.io/zone`.
    pub zone: String,
    /// Value for `topology.kubernetes.io/region`.
    pub region: String,
}

/// Whether an instance that exists runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum InstanceState {
    /// Running or starting.
    Running,
    /// Stopping or stopped (k8s.io/cloud-provider's InstanceShutdown): the
    /// Node gets the `node.cloudprovider.kubernetes.io/shutdown` taint.
    Shutdown,
}

/// An instance that exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub metadata: InstanceMetadata,
    pub state: InstanceState,
}

/// The cloud's instances behind Nodes, as k8s.io/cloud-provider's
/// `InstancesV2`, for many Nodes per call. Read-only.
#[async_trait::async_trait]
pub trait NodeProvider: Send + Sync {
    /// Short provider name for logs, metrics and Events.
    fn name(&self) -> &str;

    /// The instance of each of `nodes`, in the same order: by provider ID
    /// when set, else by name, else by internal IP. `None` only when the
    /// cloud says for certain there is none (deleted, or terminated: the
    /// controller then deletes the Node); any doubt is an error, never
    /// `None`. Providers batch the lookups (see the module documentation).
    async fn instances(&self, nodes: &[NodeRef]) -> Result<Vec<Option<Instance>>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_types_serialize_with_kubernetes_spelling() {
        let addr = NodeAddress {
            kind: NodeAddressKind::InternalIP,
            address: "10.0.0.1".into(),
        };
        let json = serde_json::to_value(&addr).unwrap();
        assert_eq!(json["kind"], "InternalIP");
        assert_eq!(NodeAddressKind::ExternalDNS.as_str(), "ExternalDNS");
    }
}
