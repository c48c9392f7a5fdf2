//! The kernel side of the datapath, over rtnetlink: ENI links by MAC
//! address, their addresses and route tables, and the policy rules.
//! Every call is idempotent (replace, or "already there"/"already gone"
//! is success), so a restart can run them all again.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, LinkUnspec, RouteMessageBuilder};

use super::plan::{MAIN_TABLE, PolicyRule};
use crate::cidr::Cidr;

const EEXIST: i32 = 17;
const ENOENT: i32 = 2;
const ESRCH: i32 = 3;

#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct NetlinkError {
    what: String,
    source: rtnetlink::Error,
}

type Result<T> = std::result::Result<T, NetlinkError>;

fn context(what: impl FnOnce() -> String) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    move |source| NetlinkError {
        what: what(),
        source,
    }
}

/// The errno of a kernel refusal, if it is one.
fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => Some(-msg.raw_code()),
        _ => None,
    }
}

/// A link of the node, as found by its MAC address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
}

pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a netlink socket in the agent's network namespace (the node's:
    /// the agent runs with hostNetwork).
    pub fn connect() -> std::io::Result<Netlink> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    /// The link whose MAC address is `mac`, as EC2 and amazon-vpc-cni
    /// identify an ENI on the instance.
    pub async fn link_by_mac(&self, mac: &[u8; 6]) -> Result<Option<Link>> {
        let mut links = self.handle.link().get().execute();
        while let Some(link) = links
            .try_next()
            .await
            .map_err(context(|| "listing links".into()))?
        {
            if link_mac(&link).as_deref() == Some(&mac[..]) {
                return Ok(Some(Link {
                    index: link.header.index,
                    name: link_name(&link).unwrap_or_default(),
                }));
            }
        }
        Ok(None)
    }

    pub async fn set_up(&self, link: &Link, mtu: u32) -> Result<()> {
        let message = LinkUnspec::new_with_index(link.index).up().mtu(mtu).build();
        self.handle
            .link()
            .set(message)
            .execute()
            .await
            .map_err(context(|| {
                format!("setting {} up with MTU {mtu}", link.name)
            }))
    }

    /// `address`/32 on `link`: the ENI's own address, without the subnet
    /// route a longer prefix would add to the main table.
    pub async fn add_host_address(&self, link: &Link, address: Ipv4Addr) -> Result<()> {
        self.handle
            .address()
            .add(link.index, IpAddr::V4(address), 32)
            .replace()
            .execute()
            .await
            .map_err(context(|| format!("adding {address}/32 to {}", link.name)))
    }

    /// Table `table`: `gateway` reachable on `link`, and the default route
    /// through it.
    pub async fn set_table(&self, link: &Link, table: u32, gateway: Ipv4Addr) -> Result<()> {
        let to_gateway = RouteMessageBuilder::<Ipv4Addr>::new()
            .table_id(table)
            .destination_prefix(gateway, 32)
            .output_interface(link.index)
            .scope(RouteScope::Link)
            .build();
        let default = RouteMessageBuilder::<Ipv4Addr>::new()
            .table_id(table)
            .output_interface(link.index)
            .gateway(gateway)
            .build();
        for route in [to_gateway, default] {
            self.handle
                .route()
                .add(route)
                .replace()
                .execute()
                .await
                .map_err(context(|| {
                    format!("routing table {table} through {gateway} on {}", link.name)
                }))?;
        }
        Ok(())
    }

    /// Every IPv4 rule at the priorities in `priorities`.
    pub async fn rules(&self, priorities: &[u32]) -> Result<Vec<PolicyRule>> {
        let mut out = Vec::new();
        let mut rules = self.handle.rule().get(IpVersion::V4).execute();
        while let Some(message) = rules
            .try_next()
            .await
            .map_err(context(|| "listing rules".into()))?
        {
            if let Some(rule) = policy_rule(&message)
                && priorities.contains(&rule.priority)
            {
                out.push(rule);
            }
        }
        Ok(out)
    }

    /// Adds `rule`; one already there is success.
    pub async fn add_rule(&self, rule: &PolicyRule) -> Result<()> {
        let mut request = self
            .handle
            .rule()
            .add()
            .v4()
            .priority(rule.priority)
            .table_id(rule.table)
            .action(RuleAction::ToTable);
        if let Some((addr, len)) = rule.from.and_then(v4) {
            request = request.source_prefix(addr, len);
        }
        if let Some((addr, len)) = rule.to.and_then(v4) {
            request = request.destination_prefix(addr, len);
        }
        match request.execute().await {
            Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
            other => other.map_err(context(|| format!("adding rule {rule}"))),
        }
    }

    /// Deletes `rule`; one already gone is success.
    pub async fn delete_rule(&self, rule: &PolicyRule) -> Result<()> {
        let mut message = RuleMessage::default();
        message.header.family = rtnetlink::packet_route::AddressFamily::Inet;
        message.header.action = RuleAction::ToTable;
        message
            .attributes
            .push(RuleAttribute::Priority(rule.priority));
        message.attributes.push(RuleAttribute::Table(rule.table));
        if let Some((addr, len)) = rule.from.and_then(v4) {
            message.header.src_len = len;
            message.attributes.push(RuleAttribute::Source(addr.into()));
        }
        if let Some((addr, len)) = rule.to.and_then(v4) {
            message.header.dst_len = len;
            message
                .attributes
                .push(RuleAttribute::Destination(addr.into()));
        }
        match self.handle.rule().del(message).execute().await {
            Err(e) if matches!(errno(&e), Some(ENOENT | ESRCH)) => Ok(()),
            other => other.map_err(context(|| format!("deleting rule {rule}"))),
        }
    }
}

fn v4(cidr: Cidr) -> Option<(Ipv4Addr, u8)> {
    match cidr.addr() {
        IpAddr::V4(a) => Some((a, cidr.prefix_len())),
        IpAddr::V6(_) => None,
    }
}

fn link_mac(link: &LinkMessage) -> Option<Vec<u8>> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(mac) => Some(mac.clone()),
        _ => None,
    })
}

fn link_name(link: &LinkMessage) -> Option<String> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.clone()),
        _ => None,
    })
}

/// A kernel rule in our terms; `None` for what this agent never writes
/// (other actions, IPv6).
fn policy_rule(message: &RuleMessage) -> Option<PolicyRule> {
    if message.header.action != RuleAction::ToTable {
        return None;
    }
    let mut rule = PolicyRule {
        priority: 0,
        from: None,
        to: None,
        table: u32::from(message.header.table),
    };
    for attribute in &message.attributes {
        match attribute {
            RuleAttribute::Priority(p) => rule.priority = *p,
            RuleAttribute::Table(t) => rule.table = *t,
            RuleAttribute::Source(ip) => {
                rule.from = Cidr::new(*ip, message.header.src_len).ok();
            }
            RuleAttribute::Destination(ip) => {
                rule.to = Cidr::new(*ip, message.header.dst_len).ok();
            }
            _ => {}
        }
    }
    if rule.table == 0 {
        rule.table = MAIN_TABLE;
    }
    Some(rule)
}
