//! The node's policy routing as data: which rules a Pod address needs and
//! what to change to get from the kernel's rules to those. Pure, so the
//! rules are tested with tables; `netlink.rs` applies them.
//!
//! The layout is amazon-vpc-cni's, so operators find what they know:
//! - ENI with device index N has route table N + 1: the subnet's router
//!   on that ENI's link, and the default route through it;
//! - `to <pod> lookup main` (priority 512) for every Pod: traffic to a Pod
//!   always takes its veth route, whatever the sender's ENI;
//! - `from <pod> lookup <ENI table>` (priority 1536) for a Pod on a
//!   secondary ENI: its replies leave through the ENI that holds its
//!   address, so EC2's source/destination check lets them pass. With SNAT
//!   on, only towards the VPC's CIDRs: the rest leaves through the primary
//!   ENI, translated to the node's primary address.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use crate::cidr::Cidr;

/// `to <pod> lookup main`.
pub const TO_POD_PRIORITY: u32 = 512;
/// `from <pod> lookup <ENI table>`.
pub const FROM_POD_PRIORITY: u32 = 1536;
pub const MAIN_TABLE: u32 = 254;

/// The route table of the ENI at `device_index` (amazon-vpc-cni's numbers).
pub fn table_of(device_index: u32) -> u32 {
    device_index + 1
}

/// One `ip rule`, as far as this agent writes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyRule {
    pub priority: u32,
    pub from: Option<Cidr>,
    pub to: Option<Cidr>,
    pub table: u32,
}

impl std::fmt::Display for PolicyRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:", self.priority)?;
        if let Some(from) = self.from {
            write!(f, " from {from}")?;
        }
        if let Some(to) = self.to {
            write!(f, " to {to}")?;
        }
        write!(f, " lookup {}", self.table)
    }
}

fn host(ip: Ipv4Addr) -> Option<Cidr> {
    Cidr::new(IpAddr::V4(ip), 32).ok()
}

/// The rules of the Pod address `ip`; `table` is its ENI's, `None` on the
/// primary ENI (whose traffic the main table routes right already).
pub fn pod_rules(
    ip: Ipv4Addr,
    table: Option<u32>,
    vpc_cidrs: &[Cidr],
    external_snat: bool,
) -> Vec<PolicyRule> {
    let mut rules = vec![PolicyRule {
        priority: TO_POD_PRIORITY,
        from: None,
        to: host(ip),
        table: MAIN_TABLE,
    }];
    let Some(table) = table else {
        return rules;
    };
    let from = host(ip);
    if external_snat {
        rules.push(PolicyRule {
            priority: FROM_POD_PRIORITY,
            from,
            to: None,
            table,
        });
    } else {
        rules.extend(vpc_cidrs.iter().map(|cidr| PolicyRule {
            priority: FROM_POD_PRIORITY,
            from,
            to: Some(*cidr),
            table,
        }));
    }
    rules
}

/// Whether a kernel rule is one this agent manages (it owns both
/// priorities, as amazon-vpc-cni does).
pub fn is_managed(rule: &PolicyRule) -> bool {
    rule.priority == TO_POD_PRIORITY || rule.priority == FROM_POD_PRIORITY
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct RuleChanges {
    pub add: Vec<PolicyRule>,
    pub delete: Vec<PolicyRule>,
}

/// From the managed rules the kernel has (`actual`, duplicates included)
/// to exactly `desired`: a rule left by a Pod deleted while the agent was
/// down goes, a missing one comes, a duplicate is removed.
pub fn rule_changes(desired: &BTreeSet<PolicyRule>, actual: &[PolicyRule]) -> RuleChanges {
    let mut seen: BTreeMap<PolicyRule, usize> = BTreeMap::new();
    for rule in actual.iter().filter(|r| is_managed(r)) {
        *seen.entry(*rule).or_default() += 1;
    }
    let mut changes = RuleChanges::default();
    for (rule, count) in &seen {
        let keep = usize::from(desired.contains(rule));
        changes
            .delete
            .extend(std::iter::repeat_n(*rule, count.saturating_sub(keep)));
    }
    changes.add = desired
        .iter()
        .filter(|r| !seen.contains_key(r))
        .copied()
        .collect();
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn rule(priority: u32, from: Option<&str>, to: Option<&str>, table: u32) -> PolicyRule {
        PolicyRule {
            priority,
            from: from.map(cidr),
            to: to.map(cidr),
            table,
        }
    }

    #[test]
    fn rules_per_pod() {
        let vpc = [cidr("10.0.0.0/16"), cidr("100.64.0.0/16")];
        let ip: Ipv4Addr = "100.64.0.9".parse().unwrap();
        let to_main = rule(512, None, Some("100.64.0.9/32"), 254);
        let cases = [
            ("primary ENI", None, false, vec![to_main]),
            (
                "secondary ENI, SNAT: one rule per VPC CIDR",
                Some(3),
                false,
                vec![
                    to_main,
                    rule(1536, Some("100.64.0.9/32"), Some("10.0.0.0/16"), 3),
                    rule(1536, Some("100.64.0.9/32"), Some("100.64.0.0/16"), 3),
                ],
            ),
            (
                "secondary ENI, external SNAT: everything by the ENI",
                Some(3),
                true,
                vec![to_main, rule(1536, Some("100.64.0.9/32"), None, 3)],
            ),
        ];
        for (name, table, external, want) in cases {
            assert_eq!(pod_rules(ip, table, &vpc, external), want, "{name}");
        }
        assert_eq!(table_of(1), 2);
        assert_eq!(
            rule(1536, Some("100.64.0.9/32"), Some("10.0.0.0/16"), 3).to_string(),
            "1536: from 100.64.0.9/32 to 10.0.0.0/16 lookup 3"
        );
    }

    #[test]
    fn changes_reach_exactly_the_desired_rules() {
        let a = rule(512, None, Some("100.64.0.9/32"), 254);
        let b = rule(1536, Some("100.64.0.9/32"), None, 2);
        let stale = rule(1536, Some("100.64.0.7/32"), None, 3);
        let foreign = rule(100, Some("100.64.0.7/32"), None, 3);
        let cases = [
            ("nothing yet", vec![], vec![a, b], vec![]),
            ("all there", vec![a, b], vec![], vec![]),
            ("stale and missing", vec![a, stale], vec![b], vec![stale]),
            ("a duplicate goes", vec![a, a, b], vec![], vec![a]),
            (
                "other priorities are not ours",
                vec![a, b, foreign],
                vec![],
                vec![],
            ),
        ];
        let desired = BTreeSet::from([a, b]);
        for (name, actual, add, delete) in cases {
            assert_eq!(
                rule_changes(&desired, &actual),
                RuleChanges { add, delete },
                "{name}"
            );
        }
    }
}
