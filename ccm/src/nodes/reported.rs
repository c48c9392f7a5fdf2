//! Nodes of a cloud that cannot be asked about them (an on-prem plugin
//! without the Node part of the protocol).

use cnlb_provider_core::{
    Instance, InstanceMetadata, InstanceState, NodeAddress, NodeAddressKind, NodeProvider, NodeRef,
};

/// Nodes of a cloud that cannot be asked about them (an on-prem plugin
/// without the Node part): each is initialized from the addresses it
/// reports, and no instance is ever known to be gone or stopped (the
/// lifecycle controller stays off for it).
pub struct ReportedAddresses;

#[async_trait::async_trait]
impl NodeProvider for ReportedAddresses {
    fn name(&self) -> &str {
        "reported-addresses"
    }

    async fn instances(&self, nodes: &[NodeRef]) -> cnlb_provider_core::Result<Vec<Option<Instance>>> {
        Ok(nodes
            .iter()
            .map(|n| {
                let mut addresses: Vec<NodeAddress> = n
                    .internal_ips
                    .iter()
                    .map(|ip| NodeAddress {
                        kind: NodeAddressKind::InternalIP,
                        address: ip.to_string(),
                    })
                    .collect();
                addresses.push(NodeAddress {
                    kind: NodeAddressKind::Hostname,
                    address: n.name.clone(),
                });
                Some(Instance {
                    metadata: InstanceMetadata {
                        provider_id: String::new(),
                        instance_type: String::new(),
                        addresses,
                        zone: String::new(),
                        region: String::new(),
                    },
                    state: InstanceState::Running,
                })
            })
            .collect())
    }
}
