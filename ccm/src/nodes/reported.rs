//! On-prem Nodes: the plugin's Node part when it has one, else the
//! addresses the Nodes report.

use std::sync::Arc;

use cnlb_provider_core::{
    Instance, InstanceMetadata, InstanceState, NodeAddress, NodeAddressKind, NodeProvider, NodeRef,
};
use cnlb_provider_onprem::GrpcProvider;
use tokio::sync::OnceCell;

/// An on-prem plugin's Nodes: asked of the plugin when it advertises the
/// Node part (learned the first time it answers), else
/// [`ReportedAddresses`].
pub struct PluginNodes {
    plugin: Arc<GrpcProvider>,
    has_nodes: OnceCell<bool>,
}

impl PluginNodes {
    pub fn new(plugin: Arc<GrpcProvider>) -> Self {
        Self {
            plugin,
            has_nodes: OnceCell::new(),
        }
    }
}

#[async_trait::async_trait]
impl NodeProvider for PluginNodes {
    fn name(&self) -> &str {
        NodeProvider::name(self.plugin.as_ref())
    }

    async fn instances(
        &self,
        nodes: &[NodeRef],
    ) -> cnlb_provider_core::Result<Vec<Option<Instance>>> {
        let has_nodes = self
            .has_nodes
            .get_or_try_init(|| self.plugin.supports_nodes())
            .await?;
        if *has_nodes {
            self.plugin.instances(nodes).await
        } else {
            ReportedAddresses.instances(nodes).await
        }
    }
}

/// Nodes of a cloud that cannot be asked about them (an on-prem plugin
/// without the Node part): each is initialized from the addresses it
/// reports, and no instance is ever known to be gone or stopped (so the
/// lifecycle controller never acts on them).
pub struct ReportedAddresses;

#[async_trait::async_trait]
impl NodeProvider for ReportedAddresses {
    fn name(&self) -> &str {
        "reported-addresses"
    }

    async fn instances(
        &self,
        nodes: &[NodeRef],
    ) -> cnlb_provider_core::Result<Vec<Option<Instance>>> {
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
