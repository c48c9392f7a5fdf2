//! SNAT for Pod traffic that leaves the VPC, in an nf_tables table of its
//! own (`ip cnlb-vpc-ipam`), written over netlink in one transaction:
//!
//! ```text
//! table ip cnlb-vpc-ipam {
//!   chain snat { type nat hook postrouting priority srcnat;
//!     ip daddr <each VPC CIDR> return
//!     oif != <primary ENI> return
//!     ip saddr <primary address> return
//!     snat to <primary address>
//!   }
//! }
//! ```
//!
//! A Pod's packet to the VPC keeps its address (its `from` rule sends it
//! out of its own ENI); anything else leaves by the primary ENI as the
//! node, as amazon-vpc-cni does unless external SNAT is configured. The
//! whole table is replaced each time (add, delete, add in one batch), so
//! a restart never stacks rules and with `external` it is removed.

use std::ffi::CStr;
use std::net::{IpAddr, Ipv4Addr};

use nftnl::expr::{Immediate, Nat, NatType, Register};
use nftnl::{
    Batch, Chain, ChainType, FinalizedBatch, Hook, MsgType, Policy, ProtoFamily, Rule, Table,
    nft_expr,
};

use crate::cidr::Cidr;

const TABLE: &CStr = c"cnlb-vpc-ipam";
const CHAIN: &CStr = c"snat";
/// `srcnat`, as nft names it.
const SRCNAT_PRIORITY: i32 = 100;

/// What the table says: `None` removes it (external SNAT).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snat {
    pub vpc_cidrs: Vec<Cidr>,
    /// The primary ENI's link index.
    pub primary_link: u32,
    pub primary_address: Ipv4Addr,
}

/// Replaces the table with what `snat` says, or removes it.
pub fn apply(snat: Option<&Snat>) -> std::io::Result<()> {
    let table = Table::new(TABLE, ProtoFamily::Ipv4);
    let mut batch = Batch::new();
    // Adding first makes the delete valid when there is no table yet.
    batch.add(&table, MsgType::Add);
    batch.add(&table, MsgType::Del);
    if let Some(snat) = snat {
        batch.add(&table, MsgType::Add);
        let mut chain = Chain::new(CHAIN, &table);
        chain.set_hook(Hook::PostRouting, SRCNAT_PRIORITY);
        chain.set_type(ChainType::Nat);
        chain.set_policy(Policy::Accept);
        batch.add(&chain, MsgType::Add);
        for cidr in &snat.vpc_cidrs {
            let IpAddr::V4(network) = cidr.network().addr() else {
                continue;
            };
            let mask = Ipv4Addr::from(
                u32::MAX
                    .checked_shl(32 - u32::from(cidr.prefix_len()))
                    .unwrap_or(0),
            );
            let mut rule = Rule::new(&chain);
            rule.add_expr(&nft_expr!(payload ipv4 daddr));
            rule.add_expr(&nft_expr!(bitwise mask mask, xor 0u32));
            rule.add_expr(&nft_expr!(cmp == network));
            rule.add_expr(&nft_expr!(verdict return));
            batch.add(&rule, MsgType::Add);
        }
        let mut other_link = Rule::new(&chain);
        other_link.add_expr(&nft_expr!(meta oif));
        other_link.add_expr(&nft_expr!(cmp != snat.primary_link));
        other_link.add_expr(&nft_expr!(verdict return));
        batch.add(&other_link, MsgType::Add);
        let mut the_node = Rule::new(&chain);
        the_node.add_expr(&nft_expr!(payload ipv4 saddr));
        the_node.add_expr(&nft_expr!(cmp == snat.primary_address));
        the_node.add_expr(&nft_expr!(verdict return));
        batch.add(&the_node, MsgType::Add);
        let mut translate = Rule::new(&chain);
        translate.add_expr(&Immediate::new(snat.primary_address, Register::Reg1));
        translate.add_expr(&Nat {
            nat_type: NatType::SNat,
            family: ProtoFamily::Ipv4,
            ip_register: Register::Reg1,
            port_register: None,
        });
        batch.add(&translate, MsgType::Add);
    }
    send(&batch.finalize())
}

fn send(batch: &FinalizedBatch) -> std::io::Result<()> {
    let socket = mnl::Socket::new(mnl::Bus::Netfilter)?;
    let portid = socket.portid();
    socket.send_all(batch)?;
    let mut buffer = vec![0; nftnl::nft_nlmsg_maxsize() as usize];
    let mut expected = batch.sequence_numbers();
    while !expected.is_empty() {
        for message in socket.recv(&mut buffer[..])? {
            let message = message?;
            let Some(seq) = expected.next() else {
                return Err(std::io::Error::other("an answer nothing asked for"));
            };
            mnl::cb_run(message, seq, portid)?;
        }
    }
    Ok(())
}
