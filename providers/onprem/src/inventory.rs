//! [`Inventory`]: a [`NodeProvider`] answered from a JSON file the operator
//! writes, for machines no API describes (on-prem, bare metal). The file is
//! read on every call: it is small, and an edit takes effect at once
//! without watching it.
//!
//! ```json
//! {"nodes": [
//!   {"name": "node-1", "providerID": "onprem://node-1",
//!    "addresses": {"InternalIP": ["10.0.0.1"], "Hostname": "node-1"},
//!    "zone": "rack-1", "region": "dc-1", "instanceType": "r640",
//!    "state": "running"}
//! ]}
//! ```
//!
//! Per node: `name` (required, unique), `providerID` (default
//! `onprem://<name>`, unique), `addresses` (kind to one address or a list:
//! `InternalIP`, `ExternalIP`, `Hostname`, `InternalDNS`, `ExternalDNS`),
//! `zone`, `region`, `instanceType` (default empty), `state` (`running`,
//! the default, or `shutdown`). A Node is looked up by provider ID when it
//! has one, else by name, else by its internal IPs; a Node the file does
//! not list is not found (the controller deletes it). A file that cannot be
//! read or is invalid is an error naming the file and the field, never
//! "not found".

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use cnlb_provider_core::{
    Instance, InstanceMetadata, InstanceState, NodeAddress, NodeAddressKind, NodeProvider, NodeRef,
    ProviderError, Result,
};
use serde_json::{Map, Value};

/// Provider IDs of machines the file gives none: `onprem://<name>`.
pub const PROVIDER_ID_PREFIX: &str = "onprem://";

const NODE_KEYS: [&str; 7] = [
    "name",
    "providerID",
    "addresses",
    "zone",
    "region",
    "instanceType",
    "state",
];

const KINDS: [NodeAddressKind; 5] = [
    NodeAddressKind::InternalIP,
    NodeAddressKind::ExternalIP,
    NodeAddressKind::Hostname,
    NodeAddressKind::InternalDNS,
    NodeAddressKind::ExternalDNS,
];

/// One machine of the file, with its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    pub name: String,
    pub instance: Instance,
}

/// A field of the file that is wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// `nodes[2].addresses.InternalIP[0]`; empty for the whole file.
    pub field: String,
    pub reason: String,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

fn optional_string(node: &Map<String, Value>, key: &str, at: &str) -> Result<String, Invalid> {
    match node.get(key) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(invalid(
            format!("{at}.{key}"),
            format!("expected a string, got {other}"),
        )),
    }
}

fn addresses(value: Option<&Value>, at: &str) -> Result<Vec<NodeAddress>, Invalid> {
    let by_kind = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(m)) => m,
        Some(other) => {
            return Err(invalid(
                format!("{at}.addresses"),
                format!("expected an object of address kinds, got {other}"),
            ));
        }
    };
    let mut out = Vec::new();
    for (key, value) in by_kind {
        let field = format!("{at}.addresses.{key}");
        let kind = KINDS
            .into_iter()
            .find(|k| k.as_str() == key.as_str())
            .ok_or_else(|| {
                let known: Vec<&str> = KINDS.iter().map(|k| k.as_str()).collect();
                invalid(&field, format!("unknown address kind (one of {known:?})"))
            })?;
        let values: Vec<(String, &Value)> = match value {
            Value::Array(list) => list
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("{field}[{i}]"), v))
                .collect(),
            single => vec![(field.clone(), single)],
        };
        for (field, v) in values {
            let address = v
                .as_str()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| invalid(&field, format!("expected a non-empty string, got {v}")))?;
            let is_ip = matches!(
                kind,
                NodeAddressKind::InternalIP | NodeAddressKind::ExternalIP
            );
            if is_ip && address.parse::<IpAddr>().is_err() {
                return Err(invalid(&field, format!("{address:?} is not an IP address")));
            }
            out.push(NodeAddress {
                kind,
                address: address.to_string(),
            });
        }
    }
    // Kinds in a fixed order (InternalIP first), each kind's as written.
    out.sort_by_key(|a| a.kind);
    Ok(out)
}

fn machine(value: &Value, at: &str) -> Result<Machine, Invalid> {
    let node = value
        .as_object()
        .ok_or_else(|| invalid(at, format!("expected an object, got {value}")))?;
    if let Some(key) = node.keys().find(|k| !NODE_KEYS.contains(&k.as_str())) {
        return Err(invalid(
            format!("{at}.{key}"),
            format!("unknown field (known: {NODE_KEYS:?})"),
        ));
    }
    let name = optional_string(node, "name", at)?;
    if name.is_empty() {
        return Err(invalid(format!("{at}.name"), "required"));
    }
    let provider_id = match optional_string(node, "providerID", at)? {
        id if id.is_empty() => format!("{PROVIDER_ID_PREFIX}{name}"),
        id => id,
    };
    let state = match node.get("state") {
        None | Some(Value::Null) => InstanceState::Running,
        Some(Value::String(s)) if s == "running" => InstanceState::Running,
        Some(Value::String(s)) if s == "shutdown" => InstanceState::Shutdown,
        Some(other) => {
            return Err(invalid(
                format!("{at}.state"),
                format!("expected \"running\" or \"shutdown\", got {other}"),
            ));
        }
    };
    Ok(Machine {
        instance: Instance {
            metadata: InstanceMetadata {
                provider_id,
                instance_type: optional_string(node, "instanceType", at)?,
                addresses: addresses(node.get("addresses"), at)?,
                zone: optional_string(node, "zone", at)?,
                region: optional_string(node, "region", at)?,
            },
            state,
        },
        name,
    })
}

/// The machines of an inventory file's contents; names and provider IDs
/// are unique.
pub fn parse(text: &[u8]) -> Result<Vec<Machine>, Invalid> {
    let doc: Value =
        serde_json::from_slice(text).map_err(|e| invalid("", format!("not JSON: {e}")))?;
    let top = doc
        .as_object()
        .ok_or_else(|| invalid("", "expected an object {\"nodes\": [...]}"))?;
    if let Some(key) = top.keys().find(|k| *k != "nodes") {
        return Err(invalid(key.clone(), "unknown field (known: [\"nodes\"])"));
    }
    let nodes = match top.get("nodes") {
        Some(Value::Array(nodes)) => nodes,
        Some(other) => return Err(invalid("nodes", format!("expected a list, got {other}"))),
        None => return Err(invalid("nodes", "required")),
    };
    let mut names = BTreeSet::new();
    let mut ids = BTreeSet::new();
    let mut out = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let at = format!("nodes[{i}]");
        let m = machine(node, &at)?;
        if !names.insert(m.name.clone()) {
            return Err(invalid(format!("{at}.name"), format!("{:?} twice", m.name)));
        }
        if !ids.insert(m.instance.metadata.provider_id.clone()) {
            return Err(invalid(
                format!("{at}.providerID"),
                format!("{:?} twice", m.instance.metadata.provider_id),
            ));
        }
        out.push(m);
    }
    Ok(out)
}

/// The machine of `node`: by provider ID when it has one, else by name,
/// else by one of its internal IPs (several machines by IP is doubt).
pub fn find(machines: &[Machine], node: &NodeRef) -> Result<Option<Instance>, String> {
    if let Some(id) = &node.provider_id {
        let found = machines
            .iter()
            .find(|m| &m.instance.metadata.provider_id == id);
        return Ok(found.map(|m| m.instance.clone()));
    }
    if let Some(m) = machines.iter().find(|m| m.name == node.name) {
        return Ok(Some(m.instance.clone()));
    }
    let by_ip: BTreeMap<&str, &Machine> = machines
        .iter()
        .filter(|m| {
            m.instance.metadata.addresses.iter().any(|a| {
                a.kind == NodeAddressKind::InternalIP
                    && a.address
                        .parse::<IpAddr>()
                        .is_ok_and(|ip| node.internal_ips.contains(&ip))
            })
        })
        .map(|m| (m.name.as_str(), m))
        .collect();
    match by_ip.len() {
        0 => Ok(None),
        1 => Ok(by_ip.values().next().map(|m| m.instance.clone())),
        _ => Err(format!(
            "Node {} has internal IPs of several machines: {:?}",
            node.name,
            by_ip.keys().collect::<Vec<_>>()
        )),
    }
}

/// The machines of the file at `path`, read on every call.
#[derive(Debug, Clone)]
pub struct Inventory {
    path: PathBuf,
}

impl Inventory {
    pub fn new(path: impl Into<PathBuf>) -> Inventory {
        Inventory { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn error(&self, message: String) -> ProviderError {
        // Retryable: the operator fixes the file, the next try reads it.
        ProviderError::cloud(
            format!("reading the inventory {}", self.path.display()),
            message,
            true,
        )
    }

    /// The file's machines now.
    pub async fn machines(&self) -> Result<Vec<Machine>> {
        let text = tokio::fs::read(&self.path)
            .await
            .map_err(|e| self.error(e.to_string()))?;
        parse(&text).map_err(|e| {
            self.error(if e.field.is_empty() {
                e.reason
            } else {
                format!("{}: {}", e.field, e.reason)
            })
        })
    }
}

#[async_trait]
impl NodeProvider for Inventory {
    fn name(&self) -> &str {
        "inventory"
    }

    async fn instances(&self, nodes: &[NodeRef]) -> Result<Vec<Option<Instance>>> {
        let machines = self.machines().await?;
        nodes
            .iter()
            .map(|n| find(&machines, n).map_err(|e| self.error(e)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn addr(kind: NodeAddressKind, address: &str) -> NodeAddress {
        NodeAddress {
            kind,
            address: address.into(),
        }
    }

    fn file(v: Value) -> Vec<u8> {
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn a_file_becomes_machines_with_defaults() {
        let machines = parse(&file(json!({"nodes": [
            {"name": "n1", "providerID": "metal://rack-1/n1",
             "addresses": {"Hostname": "n1", "InternalIP": ["10.0.0.1", "fd00::1"], "ExternalDNS": "n1.example.com"},
             "zone": "rack-1", "region": "dc-1", "instanceType": "r640", "state": "shutdown"},
            {"name": "n2"},
        ]})))
        .unwrap();
        use NodeAddressKind::*;
        assert_eq!(
            machines[0],
            Machine {
                name: "n1".into(),
                instance: Instance {
                    metadata: InstanceMetadata {
                        provider_id: "metal://rack-1/n1".into(),
                        instance_type: "r640".into(),
                        addresses: vec![
                            addr(InternalIP, "10.0.0.1"),
                            addr(InternalIP, "fd00::1"),
                            addr(Hostname, "n1"),
                            addr(ExternalDNS, "n1.example.com"),
                        ],
                        zone: "rack-1".into(),
                        region: "dc-1".into(),
                    },
                    state: InstanceState::Shutdown,
                },
            }
        );
        let n2 = &machines[1].instance;
        assert_eq!(n2.metadata.provider_id, "onprem://n2");
        assert_eq!(n2.state, InstanceState::Running);
        assert!(n2.metadata.addresses.is_empty());
        assert_eq!(parse(&file(json!({"nodes": []}))).unwrap(), []);
    }

    #[test]
    fn bad_input_names_the_field() {
        let cases = [
            (json!([]), ""),
            (json!({}), "nodes"),
            (json!({"nodes": {}}), "nodes"),
            (json!({"nodes": [], "extra": 1}), "extra"),
            (json!({"nodes": [1]}), "nodes[0]"),
            (json!({"nodes": [{}]}), "nodes[0].name"),
            (json!({"nodes": [{"name": 7}]}), "nodes[0].name"),
            (
                json!({"nodes": [{"name": "a", "zon": "x"}]}),
                "nodes[0].zon",
            ),
            (
                json!({"nodes": [{"name": "a", "state": "up"}]}),
                "nodes[0].state",
            ),
            (
                json!({"nodes": [{"name": "a", "region": []}]}),
                "nodes[0].region",
            ),
            (
                json!({"nodes": [{"name": "a", "addresses": []}]}),
                "nodes[0].addresses",
            ),
            (
                json!({"nodes": [{"name": "a", "addresses": {"InternalIp": "10.0.0.1"}}]}),
                "nodes[0].addresses.InternalIp",
            ),
            (
                json!({"nodes": [{"name": "a", "addresses": {"InternalIP": ["10.0.0.1", "10.0.0.300"]}}]}),
                "nodes[0].addresses.InternalIP[1]",
            ),
            (
                json!({"nodes": [{"name": "a", "addresses": {"Hostname": ""}}]}),
                "nodes[0].addresses.Hostname",
            ),
            (
                json!({"nodes": [{"name": "a"}, {"name": "a"}]}),
                "nodes[1].name",
            ),
            (
                json!({"nodes": [{"name": "a"}, {"name": "b", "providerID": "onprem://a"}]}),
                "nodes[1].providerID",
            ),
        ];
        for (doc, field) in cases {
            let err = parse(&file(doc.clone())).unwrap_err();
            assert_eq!(err.field, field, "{doc}: {err:?}");
        }
        assert!(
            parse(b"{\"nodes\": [")
                .unwrap_err()
                .reason
                .starts_with("not JSON")
        );
    }

    #[test]
    fn nodes_are_found_by_provider_id_else_name_else_ip() {
        let machines = parse(&file(json!({"nodes": [
            {"name": "n1", "addresses": {"InternalIP": "10.0.0.1"}},
            {"name": "n2", "providerID": "metal://n2", "addresses": {"InternalIP": "10.0.0.2"}},
            {"name": "n3", "addresses": {"InternalIP": ["10.0.0.3", "10.0.0.2"]}},
        ]})))
        .unwrap();
        let node = |name: &str, id: Option<&str>, ips: &[&str]| NodeRef {
            name: name.into(),
            provider_id: id.map(str::to_string),
            internal_ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
        };
        let cases = [
            (node("n1", None, &[]), Some("onprem://n1")),
            (node("other", Some("metal://n2"), &[]), Some("metal://n2")),
            // A provider ID the file does not list: gone, whatever the name.
            (node("n1", Some("onprem://gone"), &["10.0.0.1"]), None),
            (node("renamed", None, &["10.0.0.1"]), Some("onprem://n1")),
            (node("renamed", None, &["10.0.0.3"]), Some("onprem://n3")),
            (node("absent", None, &["10.0.0.9"]), None),
        ];
        for (n, want) in cases {
            let got = find(&machines, &n).unwrap();
            assert_eq!(
                got.map(|i| i.metadata.provider_id),
                want.map(str::to_string),
                "{n:?}"
            );
        }
        assert!(find(&machines, &node("x", None, &["10.0.0.2"])).is_err());
    }

    #[tokio::test]
    async fn the_file_is_read_on_every_call() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inventory.json");
        let inventory = Inventory::new(&path);
        let nodes = [NodeRef::named("n1")];
        let err = inventory.instances(&nodes).await.unwrap_err();
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );

        std::fs::write(&path, file(json!({"nodes": [{"name": "n1"}]}))).unwrap();
        let found = inventory.instances(&nodes).await.unwrap();
        assert_eq!(found[0].as_ref().unwrap().state, InstanceState::Running);

        std::fs::write(
            &path,
            file(json!({"nodes": [{"name": "n1", "state": "off"}]})),
        )
        .unwrap();
        let err = inventory.instances(&nodes).await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("nodes[0].state") && text.contains(&path.display().to_string()),
            "{text}"
        );
        assert_eq!(err.retry_policy(), cnlb_provider_core::RetryPolicy::Backoff);

        std::fs::write(&path, file(json!({"nodes": []}))).unwrap();
        assert_eq!(inventory.instances(&nodes).await.unwrap(), [None]);
    }
}
