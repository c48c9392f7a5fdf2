//! What the node controllers do to a Node (pure): how a Node names its
//! instance, what initializing it writes, which addresses changed, and what
//! its instance's state means for it. As k8s.io/cloud-provider's
//! cloud-node and cloud-node-lifecycle controllers decide it.

use std::collections::BTreeMap;
use std::net::IpAddr;

use cnlb_provider_core::{Instance, InstanceState, NodeAddress, NodeRef};
use k8s_openapi::api::core::v1::{Node, Taint};

/// Kubelets started with `--cloud-provider=external` register with it;
/// nothing schedules there until a cloud controller manager removes it.
pub const UNINITIALIZED_TAINT: &str = "node.cloudprovider.kubernetes.io/uninitialized";
/// On a Node whose instance is stopped.
pub const SHUTDOWN_TAINT: &str = "node.cloudprovider.kubernetes.io/shutdown";
/// The address the kubelet was given (`--node-ip`) with an external cloud
/// provider, until the cloud controller manager sets the addresses.
pub const PROVIDED_NODE_IP: &str = "alpha.kubernetes.io/provided-node-ip";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
pub const INSTANCE_TYPE_LABEL: &str = "node.kubernetes.io/instance-type";

/// How `node` names its instance: its provider ID, its name, and the
/// addresses it reports (its InternalIPs, or the IP given to the kubelet).
pub fn node_ref(node: &Node) -> NodeRef {
    let mut ips: Vec<IpAddr> = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    let provided = node
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(PROVIDED_NODE_IP))
        .into_iter()
        .flat_map(|v| v.split(','))
        .filter_map(|ip| ip.trim().parse().ok());
    for ip in provided {
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    NodeRef {
        name: node.metadata.name.clone().unwrap_or_default(),
        provider_id: node
            .spec
            .as_ref()
            .and_then(|s| s.provider_id.clone())
            .filter(|p| !p.is_empty()),
        internal_ips: ips,
    }
}

fn taints(node: &Node) -> Vec<Taint> {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default()
}

pub fn has_taint(node: &Node, key: &str) -> bool {
    taints(node).iter().any(|t| t.key == key)
}

/// True when the Node's condition Ready is True.
pub fn is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// What initializing a Node writes.
#[derive(Debug, Clone, PartialEq)]
pub struct Initialization {
    /// `spec.providerID` to set (`None`: keep the Node's; a provider ID
    /// cannot change once set).
    pub provider_id: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub addresses: Vec<NodeAddress>,
    /// The Node's taints without [`UNINITIALIZED_TAINT`].
    pub taints: Vec<Taint>,
}

/// Initializing `node` with `instance`.
pub fn initialization(node: &Node, instance: &Instance) -> Initialization {
    let m = &instance.metadata;
    let current = node.spec.as_ref().and_then(|s| s.provider_id.as_deref());
    let provider_id = (current.is_none_or(str::is_empty) && !m.provider_id.is_empty())
        .then(|| m.provider_id.clone());
    let labels = [
        (ZONE_LABEL, &m.zone),
        (REGION_LABEL, &m.region),
        (INSTANCE_TYPE_LABEL, &m.instance_type),
    ]
    .into_iter()
    .filter(|(_, v)| !v.is_empty())
    .map(|(k, v)| (k.to_string(), v.clone()))
    .collect();
    Initialization {
        provider_id,
        labels,
        addresses: m.addresses.clone(),
        taints: taints(node)
            .into_iter()
            .filter(|t| t.key != UNINITIALIZED_TAINT)
            .collect(),
    }
}

/// The addresses to write when `instance`'s differ from the Node's.
pub fn changed_addresses(node: &Node, instance: &Instance) -> Option<Vec<NodeAddress>> {
    let current: Vec<(String, String)> = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .map(|a| (a.type_.clone(), a.address.clone()))
        .collect();
    let wanted: Vec<(String, String)> = instance
        .metadata
        .addresses
        .iter()
        .map(|a| (a.kind.as_str().to_string(), a.address.clone()))
        .collect();
    (current != wanted).then(|| instance.metadata.addresses.clone())
}

/// What the lifecycle controller does to a Node.
#[derive(Debug, Clone, PartialEq)]
pub enum Lifecycle {
    Keep,
    /// Its instance is gone: the Node goes too.
    Delete,
    /// Its instance is stopped: taint it (its taints with [`SHUTDOWN_TAINT`]).
    Taint(Vec<Taint>),
    /// Its instance runs again: its taints without [`SHUTDOWN_TAINT`].
    Untaint(Vec<Taint>),
}

/// The Nodes the lifecycle controller asks the cloud about: NotReady ones,
/// and ones still tainted shut down. Ready, untainted Nodes cost nothing.
pub fn needs_lifecycle_check(node: &Node) -> bool {
    !has_taint(node, UNINITIALIZED_TAINT) && (!is_ready(node) || has_taint(node, SHUTDOWN_TAINT))
}

/// The decision for `node` given what the cloud says of its instance.
pub fn lifecycle(node: &Node, instance: Option<&Instance>) -> Lifecycle {
    let tainted = has_taint(node, SHUTDOWN_TAINT);
    match instance {
        None if !is_ready(node) => Lifecycle::Delete,
        None => Lifecycle::Keep,
        Some(i) if i.state == InstanceState::Shutdown && !is_ready(node) && !tainted => {
            let mut t = taints(node);
            t.push(Taint {
                key: SHUTDOWN_TAINT.into(),
                effect: "NoSchedule".into(),
                ..Taint::default()
            });
            Lifecycle::Taint(t)
        }
        Some(i) if i.state == InstanceState::Running && tainted => Lifecycle::Untaint(
            taints(node)
                .into_iter()
                .filter(|t| t.key != SHUTDOWN_TAINT)
                .collect(),
        ),
        Some(_) => Lifecycle::Keep,
    }
}

#[cfg(test)]
mod tests {
    use cnlb_provider_core::{InstanceMetadata, NodeAddressKind};
    use serde_json::json;

    use super::*;

    fn node(v: serde_json::Value) -> Node {
        serde_json::from_value(v).unwrap()
    }

    fn instance(state: InstanceState) -> Instance {
        Instance {
            metadata: InstanceMetadata {
                provider_id: "aws:///us-east-1a/i-1".into(),
                instance_type: "m5.large".into(),
                addresses: vec![
                    NodeAddress {
                        kind: NodeAddressKind::InternalIP,
                        address: "10.0.1.5".into(),
                    },
                    NodeAddress {
                        kind: NodeAddressKind::Hostname,
                        address: "ip-10-0-1-5.ec2.internal".into(),
                    },
                ],
                zone: "us-east-1a".into(),
                region: "us-east-1".into(),
            },
            state,
        }
    }

    fn ready(status: &str) -> serde_json::Value {
        json!([{"type": "Ready", "status": status}])
    }

    #[test]
    fn a_node_names_its_instance_by_id_name_and_addresses() {
        let n = node(json!({
            "metadata": {"name": "node-1", "annotations": {PROVIDED_NODE_IP: "10.0.1.5"}},
            "spec": {"providerID": ""},
            "status": {"addresses": [
                {"type": "Hostname", "address": "node-1"},
                {"type": "InternalIP", "address": "10.0.1.6"},
            ]},
        }));
        let r = node_ref(&n);
        assert_eq!(r.name, "node-1");
        assert_eq!(r.provider_id, None, "an empty provider ID is none");
        let ips: Vec<String> = r.internal_ips.iter().map(ToString::to_string).collect();
        assert_eq!(ips, ["10.0.1.6", "10.0.1.5"]);
    }

    #[test]
    fn initialization_sets_id_labels_addresses_and_removes_the_taint() {
        let n = node(json!({
            "metadata": {"name": "node-1"},
            "spec": {"taints": [
                {"key": UNINITIALIZED_TAINT, "value": "true", "effect": "NoSchedule"},
                {"key": "dedicated", "value": "db", "effect": "NoSchedule"},
            ]},
        }));
        let init = initialization(&n, &instance(InstanceState::Running));
        assert_eq!(init.provider_id.as_deref(), Some("aws:///us-east-1a/i-1"));
        assert_eq!(init.labels[ZONE_LABEL], "us-east-1a");
        assert_eq!(init.labels[REGION_LABEL], "us-east-1");
        assert_eq!(init.labels[INSTANCE_TYPE_LABEL], "m5.large");
        assert_eq!(init.addresses.len(), 2);
        let keys: Vec<&str> = init.taints.iter().map(|t| t.key.as_str()).collect();
        assert_eq!(keys, ["dedicated"]);

        let kept = node(
            json!({"metadata": {"name": "n"}, "spec": {"providerID": "aws:///us-east-1a/i-1"}}),
        );
        assert_eq!(
            initialization(&kept, &instance(InstanceState::Running)).provider_id,
            None
        );
    }

    #[test]
    fn addresses_change_only_when_they_differ() {
        let i = instance(InstanceState::Running);
        let same = node(json!({"metadata": {"name": "n"}, "status": {"addresses": [
            {"type": "InternalIP", "address": "10.0.1.5"},
            {"type": "Hostname", "address": "ip-10-0-1-5.ec2.internal"},
        ]}}));
        assert_eq!(changed_addresses(&same, &i), None);
        let moved = node(json!({"metadata": {"name": "n"}, "status": {"addresses": [
            {"type": "InternalIP", "address": "10.0.1.9"},
        ]}}));
        assert_eq!(changed_addresses(&moved, &i).map(|a| a.len()), Some(2));
    }

    #[test]
    fn lifecycle_decisions() {
        use InstanceState::*;
        let shutdown = json!([{"key": SHUTDOWN_TAINT, "effect": "NoSchedule"}]);
        let cases = [
            (ready("False"), json!([]), None, "delete"),
            (ready("True"), json!([]), None, "keep"),
            (ready("False"), json!([]), Some(Shutdown), "taint"),
            (ready("False"), shutdown.clone(), Some(Shutdown), "keep"),
            (ready("True"), shutdown.clone(), Some(Running), "untaint"),
            (ready("False"), shutdown.clone(), Some(Running), "untaint"),
            (ready("False"), json!([]), Some(Running), "keep"),
        ];
        for (conditions, taints, state, want) in cases {
            let n = node(json!({
                "metadata": {"name": "n"},
                "spec": {"taints": taints},
                "status": {"conditions": conditions},
            }));
            let got = match lifecycle(&n, state.map(instance).as_ref()) {
                Lifecycle::Keep => "keep",
                Lifecycle::Delete => "delete",
                Lifecycle::Taint(t) => {
                    assert!(t.iter().any(|t| t.key == SHUTDOWN_TAINT));
                    "taint"
                }
                Lifecycle::Untaint(t) => {
                    assert!(t.iter().all(|t| t.key != SHUTDOWN_TAINT));
                    "untaint"
                }
            };
            assert_eq!(got, want, "{conditions} {taints} {state:?}");
        }
    }

    #[test]
    fn only_not_ready_or_shut_down_nodes_are_checked() {
        let check = |v| needs_lifecycle_check(&node(v));
        assert!(!check(
            json!({"metadata": {"name": "n"}, "status": {"conditions": ready("True")}})
        ));
        assert!(check(
            json!({"metadata": {"name": "n"}, "status": {"conditions": ready("False")}})
        ));
        assert!(check(json!({
            "metadata": {"name": "n"},
            "spec": {"taints": [{"key": SHUTDOWN_TAINT, "effect": "NoSchedule"}]},
            "status": {"conditions": ready("True")},
        })));
        assert!(
            !check(json!({
                "metadata": {"name": "n"},
                "spec": {"taints": [{"key": UNINITIALIZED_TAINT, "effect": "NoSchedule"}]},
            })),
            "initialization's, not the lifecycle's"
        );
    }
}
