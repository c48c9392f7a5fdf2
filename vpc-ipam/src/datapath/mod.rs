//! The node's datapath for Pods whose addresses sit on secondary ENIs:
//! EC2 drops a packet that leaves an ENI with a source address that ENI
//! does not hold, so each ENI gets a route table and each Pod address the
//! rules that send its traffic through its own ENI (`plan.rs`), plus SNAT
//! for traffic leaving the VPC (`snat.rs`).
//!
//! The agent does this itself (it runs with hostNetwork and NET_ADMIN):
//! it already knows which ENI holds each address, and it is the one
//! process that sees every ADD, DEL and restart, so the rules follow the
//! allocations it commits, and a restart rebuilds them from its store.

use std::collections::{BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::backend::{Backend, NodeInterface, NodeNetwork, gateway};
use crate::cidr::Cidr;

mod netlink;
pub mod plan;
mod snat;

use netlink::{Link, Netlink};
use plan::{FROM_POD_PRIORITY, PolicyRule, TO_POD_PRIORITY, pod_rules, rule_changes, table_of};

/// How long a just-attached ENI may take to show up as a link.
const LINK_WAIT: Duration = Duration::from_secs(30);
const LINK_POLL: Duration = Duration::from_millis(200);

#[derive(Debug, Clone)]
pub struct DatapathConfig {
    /// MTU of the secondary ENIs' links (EC2: 9001 inside a VPC).
    pub mtu: u32,
    /// Something outside the node translates Pod addresses (a NAT gateway):
    /// Pods' traffic leaves by their own ENI whatever the destination.
    pub external_snat: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DatapathError(String);

type Result<T> = std::result::Result<T, DatapathError>;

fn failed(e: impl std::fmt::Display) -> DatapathError {
    DatapathError(e.to_string())
}

struct Known {
    network: NodeNetwork,
    /// ENIs whose link and table are set up since this process started.
    ready: HashSet<String>,
}

pub struct Datapath {
    netlink: Netlink,
    config: DatapathConfig,
    backend: Arc<dyn Backend>,
    known: Mutex<Known>,
}

impl Datapath {
    /// Sets up every ENI of the node, the SNAT table, and exactly the rules
    /// of `pods` (address and the ENI that holds it): rules of Pods deleted
    /// while the agent was down go, missing ones come.
    pub async fn start(
        config: DatapathConfig,
        backend: Arc<dyn Backend>,
        pods: &[(IpAddr, Option<String>)],
    ) -> Result<Datapath> {
        let network = backend
            .node_network()
            .await
            .map_err(failed)?
            .ok_or_else(|| {
                DatapathError(format!(
                    "the {} backend has no node network to route",
                    backend.name()
                ))
            })?;
        let datapath = Datapath {
            netlink: Netlink::connect().map_err(|e| failed(format!("netlink: {e}")))?,
            config,
            backend,
            known: Mutex::new(Known {
                network,
                ready: HashSet::new(),
            }),
        };
        let mut known = datapath.known.lock().await;
        let interfaces = known.network.interfaces.clone();
        for interface in &interfaces {
            datapath.set_up(&mut known, interface).await?;
        }
        datapath.set_snat(&known.network).await?;

        let mut desired = BTreeSet::new();
        for (ip, holder) in pods {
            let IpAddr::V4(ip) = ip else { continue };
            let table = holder
                .as_deref()
                .and_then(|h| table_of_holder(&known.network, h));
            desired.extend(datapath.rules_of(&known.network, *ip, table));
        }
        drop(known);
        let actual = datapath
            .netlink
            .rules(&[TO_POD_PRIORITY, FROM_POD_PRIORITY])
            .await
            .map_err(failed)?;
        let changes = rule_changes(&desired, &actual);
        for rule in &changes.delete {
            datapath.netlink.delete_rule(rule).await.map_err(failed)?;
        }
        for rule in &changes.add {
            datapath.netlink.add_rule(rule).await.map_err(failed)?;
        }
        info!(
            interfaces = interfaces.len(),
            pods = pods.len(),
            rules = desired.len(),
            added = changes.add.len(),
            deleted = changes.delete.len(),
            external_snat = datapath.config.external_snat,
            "node routing rebuilt"
        );
        Ok(datapath)
    }

    /// Routes the Pod address `ip`, held by the ENI `holder`, before its
    /// ADD answers.
    pub async fn add_pod(&self, ip: IpAddr, holder: &str) -> Result<()> {
        let IpAddr::V4(ip) = ip else { return Ok(()) };
        let rules = {
            let mut known = self.known.lock().await;
            let table = self.ready_table(&mut known, holder).await?;
            self.rules_of(&known.network, ip, table)
        };
        for rule in &rules {
            self.netlink.add_rule(rule).await.map_err(failed)?;
        }
        Ok(())
    }

    /// Removes every rule of the Pod address `ip`, whatever ENI it was on.
    pub async fn del_pod(&self, ip: IpAddr) -> Result<()> {
        let Ok(host) = Cidr::new(ip, 32) else {
            return Ok(());
        };
        let rules = self
            .netlink
            .rules(&[TO_POD_PRIORITY, FROM_POD_PRIORITY])
            .await
            .map_err(failed)?;
        for rule in rules
            .iter()
            .filter(|r| r.from == Some(host) || r.to == Some(host))
        {
            self.netlink.delete_rule(rule).await.map_err(failed)?;
        }
        Ok(())
    }

    fn rules_of(&self, network: &NodeNetwork, ip: Ipv4Addr, table: Option<u32>) -> Vec<PolicyRule> {
        pod_rules(ip, table, &network.network_cidrs, self.config.external_snat)
    }

    /// The table of `holder`'s ENI, set up first if it is new (attached
    /// since the last look); `None` for the primary ENI.
    async fn ready_table(&self, known: &mut Known, holder: &str) -> Result<Option<u32>> {
        if !known.network.interfaces.iter().any(|i| i.id == holder) {
            known.network = self
                .backend
                .node_network()
                .await
                .map_err(failed)?
                .unwrap_or_default();
        }
        let interface = known
            .network
            .interfaces
            .iter()
            .find(|i| i.id == holder)
            .cloned()
            .ok_or_else(|| DatapathError(format!("{holder} is not attached to this node")))?;
        if !known.ready.contains(holder) {
            self.set_up(known, &interface).await?;
        }
        Ok(table_of_holder(&known.network, holder))
    }

    /// A secondary ENI: link up with its MTU and address, its table; every
    /// ENI: loose reverse-path filtering, as Pod traffic arrives on one ENI
    /// and may be answered through another.
    async fn set_up(&self, known: &mut Known, interface: &NodeInterface) -> Result<()> {
        let link = self.wait_for_link(interface).await?;
        if interface.device_index > 0 {
            let gateway = match gateway(&interface.subnet) {
                Some(IpAddr::V4(g)) => g,
                _ => {
                    return Err(DatapathError(format!(
                        "{}: subnet {} has no IPv4 router",
                        interface.id, interface.subnet
                    )));
                }
            };
            self.netlink
                .set_up(&link, self.config.mtu)
                .await
                .map_err(failed)?;
            self.netlink
                .add_host_address(&link, interface.address)
                .await
                .map_err(failed)?;
            self.netlink
                .set_table(&link, table_of(interface.device_index), gateway)
                .await
                .map_err(failed)?;
        }
        set_sysctl(&link.name, "rp_filter", "2")?;
        info!(
            eni = %interface.id,
            link = %link.name,
            device_index = interface.device_index,
            table = table_of(interface.device_index),
            "ENI link set up"
        );
        known.ready.insert(interface.id.clone());
        Ok(())
    }

    async fn wait_for_link(&self, interface: &NodeInterface) -> Result<Link> {
        let deadline = tokio::time::Instant::now() + LINK_WAIT;
        loop {
            if let Some(link) = self
                .netlink
                .link_by_mac(&interface.mac)
                .await
                .map_err(failed)?
            {
                return Ok(link);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(DatapathError(format!(
                    "no network link has the MAC address {} of {} after {LINK_WAIT:?}",
                    mac_string(&interface.mac),
                    interface.id
                )));
            }
            tokio::time::sleep(LINK_POLL).await;
        }
    }

    async fn set_snat(&self, network: &NodeNetwork) -> Result<()> {
        let snat = if self.config.external_snat {
            None
        } else {
            let primary = network
                .interfaces
                .iter()
                .find(|i| i.device_index == 0)
                .ok_or_else(|| DatapathError("the node has no primary ENI".into()))?;
            let link = self.wait_for_link(primary).await?;
            Some(snat::Snat {
                vpc_cidrs: network.network_cidrs.clone(),
                primary_link: link.index,
                primary_address: primary.address,
            })
        };
        tokio::task::spawn_blocking(move || snat::apply(snat.as_ref()))
            .await
            .map_err(failed)?
            .map_err(|e| failed(format!("writing the SNAT table: {e}")))?;
        if self.config.external_snat {
            warn!("external SNAT: Pod traffic leaving the VPC keeps the Pod's address");
        }
        Ok(())
    }
}

fn table_of_holder(network: &NodeNetwork, holder: &str) -> Option<u32> {
    network
        .interfaces
        .iter()
        .find(|i| i.id == holder && i.device_index > 0)
        .map(|i| table_of(i.device_index))
}

fn set_sysctl(link: &str, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/net/ipv4/conf/{link}/{key}");
    std::fs::write(&path, value).map_err(|e| failed(format!("writing {path}: {e}")))
}

fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// "02:1a:2b:3c:4d:5e" as bytes.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_print() {
        let mac = parse_mac("02:00:00:A8:b4:26").unwrap();
        assert_eq!(mac, [2, 0, 0, 0xa8, 0xb4, 0x26]);
        assert_eq!(mac_string(&mac), "02:00:00:a8:b4:26");
        for bad in [
            "",
            "02:00:00:a8:b4",
            "02:00:00:a8:b4:26:00",
            "zz:00:00:a8:b4:26",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad:?}");
        }
    }
}
