//! The Pod addresses on the node's ENIs: what an ENI holds (its secondary
//! addresses and the 16 of each /28 prefix), what an assign call added,
//! what a release unassigns and where lost addresses are assigned again.
//! Pure, like the rest of the plan.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use cnlb_provider_aws::ipam::{AssignedAddresses, Eni, EniLimits, Secondary};

use super::room;
use crate::backend::Assigned;
use crate::cidr::Cidr;

/// Addresses in a delegated IPv4 prefix (a /28).
pub const PREFIX_ADDRESSES: usize = 16;

/// What an assign call gave none of although it was asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shortfall {
    /// Prefixes were asked: the endpoint or instance does not delegate them.
    Prefix,
    /// Addresses were asked: worth another try.
    Address,
}

/// Whether an assign call for `ask` that added `ips` and `prefixes` gave
/// nothing of what it was asked.
pub fn shortfall(ask: Secondary, ips: &[String], prefixes: &[String]) -> Option<Shortfall> {
    match ask {
        Secondary::Prefixes(_) if prefixes.is_empty() => Some(Shortfall::Prefix),
        Secondary::Ips(_) if ips.is_empty() => Some(Shortfall::Address),
        _ => None,
    }
}

/// A new ENI created with `ask` yet without a prefix: EC2 ignored the
/// prefixes asked. (An ENI created empty, as for reassignment, is fine.)
pub fn created_without_prefixes(ask: Secondary, eni: &Eni) -> bool {
    matches!(ask, Secondary::Prefixes(n) if n > 0) && eni.prefixes.is_empty()
}

/// What an assign call added to `before`: AWS answers with the new
/// addresses only, the emulators with all of them (the primary included).
pub fn new_addresses(before: &Eni, got: &AssignedAddresses) -> (Vec<String>, Vec<String>) {
    let ips = got
        .ips
        .iter()
        .filter(|ip| Some(*ip) != before.primary_ip.as_ref() && !before.secondary_ips.contains(ip))
        .cloned()
        .collect();
    let prefixes = got
        .prefixes
        .iter()
        .filter(|p| !before.prefixes.contains(p))
        .cloned()
        .collect();
    (ips, prefixes)
}

/// The 16 addresses of a delegated IPv4 /28 ("100.64.0.16/28").
pub fn expand_prefix(prefix: &str) -> Option<Vec<IpAddr>> {
    let cidr: Cidr = prefix.parse().ok()?;
    match cidr.network().addr() {
        IpAddr::V4(base) if cidr.prefix_len() == 28 => {
            let base = u32::from(base);
            Some(
                (0..16u32)
                    .map(|i| IpAddr::V4(Ipv4Addr::from(base + i)))
                    .collect(),
            )
        }
        _ => None,
    }
}

/// The Pod addresses `ips` and those of `prefixes`, held by ENI `eni_id`
/// in `subnet`; what does not parse is left out.
pub fn to_assigned(
    eni_id: &str,
    subnet: Cidr,
    ips: &[String],
    prefixes: &[String],
) -> Vec<Assigned> {
    let singles = ips.iter().filter_map(|ip| ip.parse().ok());
    let in_prefixes = prefixes.iter().filter_map(|p| expand_prefix(p)).flatten();
    singles
        .chain(in_prefixes)
        .map(|ip| Assigned {
            ip,
            subnet,
            holder: eni_id.to_string(),
        })
        .collect()
}

/// Every Pod address `enis` hold. `cidrs` maps each of their subnets to its
/// CIDR (the backend describes them all first).
pub fn pod_addresses(enis: &[&Eni], cidrs: &HashMap<String, Cidr>) -> Vec<Assigned> {
    enis.iter()
        .flat_map(|e| to_assigned(&e.id, cidrs[&e.subnet_id], &e.secondary_ips, &e.prefixes))
        .collect()
}

/// One ENI's share of a release.
#[derive(Debug, PartialEq, Eq)]
pub struct EniRelease {
    pub eni_id: String,
    pub attachment_id: Option<String>,
    pub ips: Vec<String>,
    pub prefixes: Vec<String>,
    /// Nothing is left on the ENI afterwards.
    pub empties: bool,
}

/// Per ENI, the addresses to unassign, and the prefixes all 16 of whose
/// addresses are released (a prefix partly in use stays).
pub fn plan_release(enis: &[Eni], release: &[IpAddr]) -> Vec<EniRelease> {
    let release: BTreeSet<IpAddr> = release.iter().copied().collect();
    let mut plan = Vec::new();
    for eni in enis {
        let ips: Vec<String> = eni
            .secondary_ips
            .iter()
            .filter(|ip| ip.parse().is_ok_and(|ip| release.contains(&ip)))
            .cloned()
            .collect();
        let prefixes: Vec<String> = eni
            .prefixes
            .iter()
            .filter(|p| {
                expand_prefix(p).is_some_and(|all| all.iter().all(|ip| release.contains(ip)))
            })
            .cloned()
            .collect();
        if ips.is_empty() && prefixes.is_empty() {
            continue;
        }
        plan.push(EniRelease {
            eni_id: eni.id.clone(),
            attachment_id: eni.attachment.as_ref().map(|a| a.id.clone()),
            empties: ips.len() == eni.secondary_ips.len() && prefixes.len() == eni.prefixes.len(),
            ips,
            prefixes,
        });
    }
    plan
}

/// What `reassign` assigns at once: an address, or with prefix delegation
/// the /28 holding it (`key` is "100.64.0.5" or "100.64.0.0/28").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unit {
    pub key: String,
    pub subnet: Cidr,
    pub holder: String,
    pub ips: Vec<IpAddr>,
}

/// The addresses of `wanted` that `held` lacks: those to reassign.
pub fn not_held<'a>(wanted: &'a [Assigned], held: &[Assigned]) -> Vec<&'a Assigned> {
    let held: BTreeSet<IpAddr> = held.iter().map(|a| a.ip).collect();
    wanted.iter().filter(|a| !held.contains(&a.ip)).collect()
}

/// The addresses to reassign as units: themselves, or with prefix
/// delegation their /28s (once each).
pub fn units_of(missing: &[&Assigned], prefixes: bool) -> Vec<Unit> {
    let mut units: BTreeMap<String, Unit> = BTreeMap::new();
    for a in missing {
        let key = match (prefixes, a.ip) {
            (true, IpAddr::V4(ip)) => {
                let base = Ipv4Addr::from(u32::from(ip) & !0xf);
                format!("{base}/28")
            }
            _ => a.ip.to_string(),
        };
        let unit = units.entry(key.clone()).or_insert_with(|| Unit {
            key,
            subnet: a.subnet,
            holder: a.holder.clone(),
            ips: Vec::new(),
        });
        unit.ips.push(a.ip);
    }
    units.into_values().collect()
}

/// `enis` as [`plan_reassign`] takes them: (id, subnet, room). `cidrs` maps
/// each of their subnets to its CIDR.
pub fn eni_rooms(
    enis: &[&Eni],
    cidrs: &HashMap<String, Cidr>,
    limits: &EniLimits,
) -> Vec<(String, Cidr, u32)> {
    enis.iter()
        .map(|e| (e.id.clone(), cidrs[&e.subnet_id], room(e, limits)))
        .collect()
}

/// Places each unit on an ENI in its subnet with room, its former holder
/// first; `enis` is (id, subnet, room), its room used up as planned.
/// Returns the plan per ENI and the units no ENI could take.
pub fn plan_reassign(
    units: &[Unit],
    enis: &mut [(String, Cidr, u32)],
) -> (BTreeMap<String, Vec<Unit>>, Vec<Unit>) {
    let mut plan: BTreeMap<String, Vec<Unit>> = BTreeMap::new();
    let mut left = Vec::new();
    for unit in units {
        let fits = |e: &(String, Cidr, u32)| e.1 == unit.subnet && e.2 > 0;
        let pick = enis
            .iter()
            .position(|e| e.0 == unit.holder && fits(e))
            .or_else(|| enis.iter().position(fits));
        match pick {
            Some(i) => {
                enis[i].2 -= 1;
                plan.entry(enis[i].0.clone())
                    .or_default()
                    .push(unit.clone());
            }
            None => left.push(unit.clone()),
        }
    }
    (plan, left)
}

/// The subnet of the first unit left over, its units and the others: a new
/// ENI takes the units of one subnet at a time.
pub fn first_subnet_group(units: Vec<Unit>) -> Option<(Cidr, Vec<Unit>, Vec<Unit>)> {
    let subnet = units.first()?.subnet;
    let (here, elsewhere) = units.into_iter().partition(|u| u.subnet == subnet);
    Some((subnet, here, elsewhere))
}

/// The units' keys as one AssignPrivateIpAddresses call takes them: the
/// addresses, and the prefixes.
pub fn split_keys(units: &[Unit]) -> (Vec<String>, Vec<String>) {
    let (prefixes, ips) = units
        .iter()
        .map(|u| u.key.clone())
        .partition(|k| k.contains('/'));
    (ips, prefixes)
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{assigned, eni, ips};
    use super::*;

    #[test]
    fn an_assign_that_gave_nothing_asked_falls_short() {
        let some: &[String] = &["100.64.0.9".to_string()];
        let prefix: &[String] = &["100.64.1.16/28".to_string()];
        let none: &[String] = &[];
        let cases = [
            (Secondary::Ips(2), some, none, None),
            (Secondary::Ips(2), none, none, Some(Shortfall::Address)),
            (Secondary::Ips(2), none, prefix, Some(Shortfall::Address)),
            (Secondary::Prefixes(1), none, prefix, None),
            (Secondary::Prefixes(1), none, none, Some(Shortfall::Prefix)),
            (Secondary::Prefixes(1), some, none, Some(Shortfall::Prefix)),
        ];
        for (ask, ips, prefixes, want) in cases {
            assert_eq!(
                shortfall(ask, ips, prefixes),
                want,
                "{ask:?} {ips:?} {prefixes:?}"
            );
        }
    }

    #[test]
    fn a_new_eni_without_the_prefixes_asked_is_refused() {
        let bare = eni("e", 1, &[], &[]);
        let with_prefix = eni("e", 1, &[], &["100.64.1.16/28"]);
        let cases = [
            (Secondary::Prefixes(1), &bare, true),
            (Secondary::Prefixes(1), &with_prefix, false),
            // Created empty for reassignment: nothing was asked.
            (Secondary::Prefixes(0), &bare, false),
            (Secondary::Ips(0), &bare, false),
            (Secondary::Ips(3), &bare, false),
        ];
        for (ask, e, want) in cases {
            assert_eq!(
                created_without_prefixes(ask, e),
                want,
                "{ask:?} {:?}",
                e.prefixes
            );
        }
    }

    #[test]
    fn new_addresses_leave_out_what_the_eni_had() {
        let before = eni("e", 1, &["100.64.0.9"], &["100.64.1.0/28"]);
        // An emulator answers with every address, the primary included.
        let got = AssignedAddresses {
            ips: vec![
                "100.64.0.4".into(),
                "100.64.0.9".into(),
                "100.64.0.12".into(),
            ],
            prefixes: vec!["100.64.1.0/28".into(), "100.64.1.16/28".into()],
        };
        assert_eq!(
            new_addresses(&before, &got),
            (
                vec!["100.64.0.12".to_string()],
                vec!["100.64.1.16/28".to_string()]
            )
        );
    }

    #[test]
    fn prefixes_expand_to_16_addresses() {
        let all = expand_prefix("100.64.1.16/28").unwrap();
        assert_eq!(all.len(), 16);
        assert_eq!(all[0].to_string(), "100.64.1.16");
        assert_eq!(all[15].to_string(), "100.64.1.31");
        assert_eq!(expand_prefix("100.64.1.0/24"), None);
        assert_eq!(expand_prefix("fd00::/80"), None);
        assert_eq!(expand_prefix("junk"), None);

        let subnet: Cidr = "100.64.0.0/19".parse().unwrap();
        let assigned = to_assigned(
            "eni-1",
            subnet,
            &["100.64.0.9".into()],
            &["100.64.1.16/28".into()],
        );
        assert_eq!(assigned.len(), 17);
        assert!(
            assigned
                .iter()
                .all(|a| a.subnet == subnet && a.holder == "eni-1")
        );
        assert_eq!(assigned[0].ip.to_string(), "100.64.0.9");
    }

    #[test]
    fn pod_addresses_are_per_eni_and_lost_ones_are_the_rest() {
        let subnet: Cidr = "100.64.0.0/19".parse().unwrap();
        let mut other = eni("eni-2", 2, &["100.64.32.7"], &[]);
        other.subnet_id = "subnet-b".into();
        let enis = [
            eni("eni-1", 1, &["100.64.0.9", "bad"], &["100.64.1.16/28"]),
            other,
        ];
        let enis: Vec<&Eni> = enis.iter().collect();
        let cidrs = HashMap::from([
            ("subnet-a".to_string(), subnet),
            ("subnet-b".to_string(), "100.64.32.0/19".parse().unwrap()),
        ]);
        let held = pod_addresses(&enis, &cidrs);
        assert_eq!(held.len(), 1 + 16 + 1);
        assert_eq!(held[0], assigned("100.64.0.9", "eni-1"));
        assert_eq!(held[17].holder, "eni-2");
        assert_eq!(held[17].subnet.to_string(), "100.64.32.0/19");

        let wanted = [
            assigned("100.64.0.9", "eni-1"),
            assigned("100.64.0.10", "eni-1"),
            // Held by another ENI now: not lost.
            assigned("100.64.1.20", "eni-9"),
            assigned("100.64.1.40", "eni-1"),
        ];
        let lost: Vec<String> = not_held(&wanted, &held)
            .iter()
            .map(|a| a.ip.to_string())
            .collect();
        assert_eq!(lost, ["100.64.0.10", "100.64.1.40"]);
        assert!(not_held(&wanted[..1], &held).is_empty());

        let limits = EniLimits {
            max_enis: 3,
            ipv4_per_eni: 10,
        };
        let rooms = eni_rooms(&enis, &cidrs, &limits);
        assert_eq!(
            rooms,
            [
                ("eni-1".to_string(), subnet, 6),
                ("eni-2".to_string(), "100.64.32.0/19".parse().unwrap(), 8),
            ]
        );
    }

    #[test]
    fn releases_are_grouped_per_eni_and_prefixes_go_only_whole() {
        let enis = [
            eni("eni-1", 1, &["100.64.0.9", "100.64.0.10"], &[]),
            eni(
                "eni-2",
                2,
                &["100.64.0.11"],
                &["100.64.1.16/28", "100.64.1.32/28"],
            ),
        ];
        let whole: Vec<String> = (16..32).map(|i| format!("100.64.1.{i}")).collect();
        let mut release: Vec<&str> = whole.iter().map(String::as_str).collect();
        // One address of the second prefix only; one unknown address.
        release.extend(["100.64.0.9", "100.64.0.11", "100.64.1.33", "10.0.0.1"]);
        let plan = plan_release(&enis, &ips(&release));
        assert_eq!(
            plan,
            [
                EniRelease {
                    eni_id: "eni-1".into(),
                    attachment_id: Some("eni-1-attach".into()),
                    ips: vec!["100.64.0.9".into()],
                    prefixes: vec![],
                    empties: false,
                },
                EniRelease {
                    eni_id: "eni-2".into(),
                    attachment_id: Some("eni-2-attach".into()),
                    ips: vec!["100.64.0.11".into()],
                    prefixes: vec!["100.64.1.16/28".into()],
                    empties: false,
                },
            ]
        );
        let plan = plan_release(&enis, &ips(&["100.64.0.9", "100.64.0.10"]));
        assert_eq!(plan.len(), 1);
        assert!(plan[0].empties);
        assert!(plan_release(&enis, &ips(&["10.0.0.1"])).is_empty());
    }

    #[test]
    fn reassignment_prefers_the_former_holder_then_any_eni_of_the_subnet() {
        let subnet: Cidr = "100.64.0.0/19".parse().unwrap();
        let other: Cidr = "100.64.32.0/19".parse().unwrap();
        let lost = [
            assigned("100.64.0.9", "eni-2"),
            assigned("100.64.0.10", "eni-2"),
            assigned("100.64.0.11", "eni-gone"),
            assigned("100.64.0.12", "eni-gone"),
        ];
        let lost: Vec<&Assigned> = lost.iter().collect();
        let units = units_of(&lost, false);
        assert_eq!(units.len(), 4);
        let mut enis = vec![
            ("eni-1".to_string(), subnet, 2),
            ("eni-2".to_string(), subnet, 1),
            ("eni-3".to_string(), other, 9),
        ];
        let (plan, left) = plan_reassign(&units, &mut enis);
        let keys = |us: &[Unit]| us.iter().map(|u| u.key.clone()).collect::<Vec<_>>();
        assert_eq!(keys(&plan["eni-2"]), ["100.64.0.10"]);
        assert_eq!(keys(&plan["eni-1"]), ["100.64.0.11", "100.64.0.12"]);
        assert_eq!(keys(&left), ["100.64.0.9"]);
        assert!(!plan.contains_key("eni-3"));
        assert!(enis.iter().take(2).all(|e| e.2 == 0));
    }

    #[test]
    fn with_prefixes_reassignment_units_are_the_28s() {
        let lost = [
            assigned("100.64.1.17", "eni-1"),
            assigned("100.64.1.30", "eni-1"),
            assigned("100.64.1.33", "eni-1"),
        ];
        let lost: Vec<&Assigned> = lost.iter().collect();
        let units = units_of(&lost, true);
        let keys: Vec<&str> = units.iter().map(|u| u.key.as_str()).collect();
        assert_eq!(keys, ["100.64.1.16/28", "100.64.1.32/28"]);
        assert_eq!(units[0].ips, ips(&["100.64.1.17", "100.64.1.30"]));
    }

    fn unit(key: &str, subnet: &str) -> Unit {
        Unit {
            key: key.into(),
            subnet: subnet.parse().unwrap(),
            holder: "eni-1".into(),
            ips: Vec::new(),
        }
    }

    #[test]
    fn units_left_over_go_one_subnet_at_a_time() {
        let a = "100.64.0.0/19";
        let b = "100.64.32.0/19";
        let keys = |us: &[Unit]| us.iter().map(|u| u.key.clone()).collect::<Vec<_>>();
        let cases = [
            ("nothing left", vec![], None),
            (
                "one subnet",
                vec![unit("100.64.0.9", a), unit("100.64.0.10", a)],
                Some((a, vec!["100.64.0.9", "100.64.0.10"], vec![])),
            ),
            (
                "the first unit's subnet first, order kept",
                vec![
                    unit("100.64.32.5", b),
                    unit("100.64.0.9", a),
                    unit("100.64.32.6", b),
                ],
                Some((b, vec!["100.64.32.5", "100.64.32.6"], vec!["100.64.0.9"])),
            ),
        ];
        for (name, units, want) in cases {
            let got = first_subnet_group(units)
                .map(|(subnet, here, rest)| (subnet.to_string(), keys(&here), keys(&rest)));
            let want = want.map(|(subnet, here, rest)| {
                (
                    subnet.to_string(),
                    here.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
                    rest.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
                )
            });
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn keys_split_into_addresses_and_prefixes() {
        let s = "100.64.0.0/19";
        let cases: [(Vec<Unit>, &[&str], &[&str]); 3] = [
            (vec![], &[], &[]),
            (
                vec![unit("100.64.0.9", s), unit("100.64.0.10", s)],
                &["100.64.0.9", "100.64.0.10"],
                &[],
            ),
            (
                vec![
                    unit("100.64.1.16/28", s),
                    unit("100.64.0.9", s),
                    unit("100.64.1.32/28", s),
                ],
                &["100.64.0.9"],
                &["100.64.1.16/28", "100.64.1.32/28"],
            ),
        ];
        for (units, want_ips, want_prefixes) in cases {
            let (got_ips, got_prefixes) = split_keys(&units);
            assert_eq!(got_ips, want_ips);
            assert_eq!(got_prefixes, want_prefixes);
        }
    }
}
