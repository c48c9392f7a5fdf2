//! The AWS backend's decisions about the node's ENIs, over plain data (the
//! provider's `Eni`, `SubnetInfo`, `InstanceInfo`, `EniLimits`): which ENIs
//! are ours, which pod subnet and device index a new ENI gets and when the
//! instance takes no more, what to ask of an ENI, when a detached ENI is
//! garbage. Pure: no calls, nothing async, so the rules are tested with
//! tables; the backend (`super`) makes the calls. [`addresses`] plans the
//! Pod addresses on those ENIs.

pub mod addresses;
#[cfg(test)]
mod fixtures;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use cnlb_provider_aws::ipam::{Eni, EniAttachment, EniLimits, InstanceInfo, Secondary, SubnetInfo};
use cnlb_provider_core::TAG_CLUSTER;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use self::addresses::PREFIX_ADDRESSES;
use super::{TAG_CREATED, TAG_INSTANCE, TAG_NODE};
use crate::backend::NodeInterface;
use crate::cidr::Cidr;

/// An AWS ID of one kind: `prefix` ("subnet-", "sg-", "i-"), then hex digits.
pub fn is_aws_id(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix)
        .is_some_and(|rest| !rest.is_empty() && rest.chars().all(|c| c.is_ascii_hexdigit()))
}

/// `aws:///us-east-1a/i-0123abcd` (also `aws://us-east-1a/i-...`) -> `i-0123abcd`.
pub fn instance_id_from_provider_id(provider_id: &str) -> Option<&str> {
    let id = provider_id.strip_prefix("aws://")?.rsplit('/').next()?;
    is_aws_id(id, "i-").then_some(id)
}

/// The tags a new ENI is created with, so that whatever a crash leaves is
/// found again ([`is_ours`]) and, once detached, aged ([`expired`]).
pub fn owner_tags(
    cluster: &str,
    node_name: &str,
    instance_id: &str,
    now: Timestamp,
) -> BTreeMap<String, String> {
    BTreeMap::from([
        (TAG_CLUSTER.to_string(), cluster.to_string()),
        (TAG_NODE.to_string(), node_name.to_string()),
        (TAG_INSTANCE.to_string(), instance_id.to_string()),
        (TAG_CREATED.to_string(), now.to_string()),
    ])
}

/// An ENI this cluster's agent created for this instance, attached to it
/// at an index other than the primary's.
pub fn is_ours(eni: &Eni, cluster: &str, instance_id: &str) -> bool {
    let tag = |k: &str| eni.tags.get(k).map(String::as_str);
    tag(TAG_CLUSTER) == Some(cluster)
        && tag(TAG_INSTANCE) == Some(instance_id)
        && tag(TAG_NODE).is_some()
        && eni
            .attachment
            .as_ref()
            .is_some_and(|a| a.instance_id == instance_id && a.device_index != 0)
}

/// Of the instance's ENIs (`all`), ours, and every device index in use,
/// ours or not: a new ENI must not take another's index.
pub fn ours_and_used(all: Vec<Eni>, cluster: &str, instance_id: &str) -> (Vec<Eni>, Vec<i32>) {
    let used = all
        .iter()
        .filter_map(|e| attachment_to(e, instance_id))
        .map(|a| a.device_index)
        .collect();
    let ours = all
        .into_iter()
        .filter(|e| is_ours(e, cluster, instance_id))
        .collect();
    (ours, used)
}

/// The ENIs the node's routing covers: the primary (the node's own
/// traffic, SNAT) and ours.
pub fn is_routed(eni: &Eni, cluster: &str, instance_id: &str) -> bool {
    attachment_to(eni, instance_id).is_some_and(|a| a.device_index == 0)
        || is_ours(eni, cluster, instance_id)
}

/// `eni`'s attachment to `instance_id`, in whatever state.
pub fn attachment_to<'a>(eni: &'a Eni, instance_id: &str) -> Option<&'a EniAttachment> {
    eni.attachment
        .as_ref()
        .filter(|a| a.instance_id == instance_id)
}

/// Attached (or, for reading, still attaching): not on its way out.
pub fn is_usable(eni: &Eni, attaching_too: bool) -> bool {
    eni.attachment
        .as_ref()
        .is_some_and(|a| a.status == "attached" || (attaching_too && a.status == "attaching"))
}

/// Whether an ENI holds Pod addresses (secondary addresses or prefixes).
pub fn holds_pod_addresses(eni: &Eni) -> bool {
    !eni.secondary_ips.is_empty() || !eni.prefixes.is_empty()
}

/// `op_id` made a CreateNetworkInterface client token (at most 64 ASCII
/// characters), one per ENI an operation creates.
pub fn client_token(op_id: &str, n: usize) -> String {
    let token = format!("{op_id}-{n}");
    if token.len() <= 64 && token.bytes().all(|b| b.is_ascii_graphic()) {
        return token;
    }
    // FNV-1a: stable across builds, unlike std's hasher.
    let hash = op_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{hash:016x}-{n}")
}

/// Whether an ENI created at `created` (its [`TAG_CREATED`]) is older than
/// `grace`; `None` when the tag is missing or unreadable.
pub fn expired(created: Option<&String>, now: Timestamp, grace: Duration) -> Option<bool> {
    let created: Timestamp = created?.parse().ok()?;
    let grace = SignedDuration::try_from(grace).ok()?;
    Some(now.duration_since(created) >= grace)
}

/// `--aws-pod-subnet`'s subnet must be where the instance is: an ENI
/// attaches only to an instance of its own zone.
pub fn check_pod_subnet(subnet: &SubnetInfo, instance: &InstanceInfo) -> Result<(), String> {
    if subnet.vpc_id != instance.vpc_id {
        return Err(format!(
            "the subnet is in VPC {}, instance {} in VPC {}",
            subnet.vpc_id, instance.id, instance.vpc_id
        ));
    }
    if subnet.availability_zone != instance.availability_zone {
        return Err(format!(
            "the subnet is in zone {}, instance {} in zone {}",
            subnet.availability_zone, instance.id, instance.availability_zone
        ));
    }
    Ok(())
}

/// Of the subnets in `zone`, the one with the most free addresses (ties:
/// the smallest ID, so every node picks the same).
pub fn choose_subnet<'a>(subnets: &'a [SubnetInfo], zone: &str) -> Option<&'a SubnetInfo> {
    subnets
        .iter()
        .filter(|s| s.availability_zone == zone)
        .min_by(|a, b| b.available_ips.cmp(&a.available_ips).then(a.id.cmp(&b.id)))
}

/// The IDs of the subnets in `zone`, in their order: the tagged pod subnets
/// an ENI of this node can be in.
pub fn subnet_ids_in_zone(subnets: Vec<SubnetInfo>, zone: &str) -> Vec<String> {
    subnets
        .into_iter()
        .filter(|s| s.availability_zone == zone)
        .map(|s| s.id)
        .collect()
}

/// `--aws-max-enis` and `--aws-ips-per-eni` when both are set: then
/// DescribeInstanceTypes need not be asked.
pub fn flag_limits(max_enis: Option<u32>, ipv4_per_eni: Option<u32>) -> Option<EniLimits> {
    Some(EniLimits {
        max_enis: max_enis?,
        ipv4_per_eni: ipv4_per_eni?,
    })
}

/// The instance type's limits, each overridden by its flag when set.
pub fn merge_limits(
    max_enis: Option<u32>,
    ipv4_per_eni: Option<u32>,
    of_type: EniLimits,
) -> EniLimits {
    EniLimits {
        max_enis: max_enis.unwrap_or(of_type.max_enis),
        ipv4_per_eni: ipv4_per_eni.unwrap_or(of_type.ipv4_per_eni),
    }
}

/// Limits leaving room for a Pod ENI (the primary takes one) with a
/// secondary address (its primary address takes one); the message names
/// the instance type `ty`.
pub fn check_limits(ty: &str, limits: EniLimits) -> Result<EniLimits, String> {
    if limits.max_enis < 2 || limits.ipv4_per_eni < 2 {
        return Err(format!(
            "instance type {ty} takes {} ENIs of {} addresses: no room for Pod ENIs",
            limits.max_enis, limits.ipv4_per_eni
        ));
    }
    Ok(limits)
}

/// The addresses one more unit of the cloud gives the node: a whole ENI's
/// secondary addresses (its primary is not for Pods), or with prefix
/// delegation one /28 prefix, the units aws-vpc-cni keeps warm by default
/// (WARM_ENI_TARGET=1, WARM_PREFIX_TARGET=1).
pub fn refill_unit(limits: &EniLimits, prefixes: bool) -> usize {
    if prefixes {
        return PREFIX_ADDRESSES;
    }
    usize::try_from(limits.ipv4_per_eni.saturating_sub(1)).unwrap_or(usize::MAX)
}

/// Free slots of an ENI: each secondary address or prefix takes one, and
/// the primary address one more.
pub fn room(eni: &Eni, limits: &EniLimits) -> u32 {
    let taken = eni.secondary_ips.len() + eni.prefixes.len() + 1;
    limits
        .ipv4_per_eni
        .saturating_sub(u32::try_from(taken).unwrap_or(u32::MAX))
}

/// What to ask of an ENI with `room` slots for `missing` addresses.
pub fn to_ask(missing: usize, room: u32, prefixes: bool) -> Option<Secondary> {
    let want = if prefixes {
        missing.div_ceil(PREFIX_ADDRESSES)
    } else {
        missing
    };
    let n = u32::try_from(want).unwrap_or(u32::MAX).min(room);
    match (n, prefixes) {
        (0, _) => None,
        (n, true) => Some(Secondary::Prefixes(n)),
        (n, false) => Some(Secondary::Ips(n)),
    }
}

/// The lowest device index not in use; 0 is the primary ENI's.
pub fn free_device_index(used: &[i32], max_enis: u32) -> Option<i32> {
    let max = i32::try_from(max_enis).unwrap_or(i32::MAX);
    (1..max).find(|i| !used.contains(i))
}

/// The next ENI to create for `missing` addresses once the ENIs there are
/// are full: its device index and what it is created with. `None` when
/// the instance takes no more ENIs (or nothing is missing).
pub fn next_new_eni(
    used: &[i32],
    limits: &EniLimits,
    missing: usize,
    prefixes: bool,
) -> Option<(i32, Secondary)> {
    let index = free_device_index(used, limits.max_enis)?;
    // A new ENI's primary address takes one of its slots.
    let ask = to_ask(missing, limits.ipv4_per_eni.saturating_sub(1), prefixes)?;
    Some((index, ask))
}

/// The device index each of `count` detached ENIs gets in turn, as each
/// attaches; `None` once no index is free (that ENI is deleted instead).
pub fn device_indexes_for(count: usize, used: &[i32], max_enis: u32) -> Vec<Option<i32>> {
    let mut used = used.to_vec();
    (0..count)
        .map(|_| {
            let index = free_device_index(&used, max_enis)?;
            used.push(index);
            Some(index)
        })
        .collect()
}

/// An attached ENI as the node's routing sees it; `None` when EC2 left out
/// what routing needs (MAC, address, device index) or `cidrs` lacks its
/// subnet.
pub fn node_interface(eni: &Eni, cidrs: &HashMap<String, Cidr>) -> Option<NodeInterface> {
    Some(NodeInterface {
        id: eni.id.clone(),
        mac: eni.mac.as_deref().and_then(crate::datapath::parse_mac)?,
        device_index: u32::try_from(eni.attachment.as_ref()?.device_index).ok()?,
        address: eni.primary_ip.as_deref()?.parse().ok()?,
        subnet: *cidrs.get(&eni.subnet_id)?,
    })
}

/// The VPC's CIDRs as networks; what does not parse is left out.
pub fn network_cidrs(vpc_cidrs: &[String]) -> Vec<Cidr> {
    vpc_cidrs
        .iter()
        .filter_map(|c| c.parse::<Cidr>().ok())
        .map(|c| c.network())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::fixtures::{eni, instance, subnet};
    use super::*;

    #[test]
    fn aws_ids() {
        let cases = [
            ("subnet-0123abcd", "subnet-", true),
            ("subnet-0123ABCD", "subnet-", true),
            ("subnet-", "subnet-", false),
            ("subnet-xyz", "subnet-", false),
            ("sg-1", "subnet-", false),
            ("sg-1", "sg-", true),
            ("i-0a", "i-", true),
            (" i-0a", "i-", false),
        ];
        for (s, prefix, want) in cases {
            assert_eq!(is_aws_id(s, prefix), want, "{s:?} {prefix:?}");
        }
    }

    #[test]
    fn provider_ids() {
        assert_eq!(
            instance_id_from_provider_id("aws:///us-east-1a/i-0123abcd"),
            Some("i-0123abcd")
        );
        assert_eq!(
            instance_id_from_provider_id("aws://us-east-1a/i-0123abcd"),
            Some("i-0123abcd")
        );
        for bad in [
            "",
            "i-0123",
            "gce://p/z/i-1",
            "aws:///us-east-1a/",
            "aws:///us-east-1a/x-1",
        ] {
            assert_eq!(instance_id_from_provider_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn new_enis_carry_their_owner_and_birth() {
        let now: Timestamp = "2026-01-01T00:10:00Z".parse().unwrap();
        let tags = owner_tags("c", "node-1", "i-1", now);
        let want = [
            (TAG_CLUSTER, "c"),
            (TAG_NODE, "node-1"),
            (TAG_INSTANCE, "i-1"),
            (TAG_CREATED, "2026-01-01T00:10:00Z"),
        ];
        assert_eq!(tags.len(), want.len());
        for (key, value) in want {
            assert_eq!(tags.get(key).map(String::as_str), Some(value), "{key}");
        }
        // What the tags say is what ownership and garbage collection read.
        let mut e = eni("eni-1", 1, &[], &[]);
        e.tags = tags;
        assert!(is_ours(&e, "c", "i-1"));
        assert_eq!(
            expired(e.tags.get(TAG_CREATED), now, Duration::ZERO),
            Some(true)
        );
    }

    #[test]
    fn the_subnet_with_most_free_addresses_in_the_zone_is_chosen() {
        let subnets = [
            subnet("subnet-a", "us-east-1a", 100),
            subnet("subnet-b", "us-east-1b", 9000),
            subnet("subnet-d", "us-east-1a", 500),
            subnet("subnet-c", "us-east-1a", 500),
        ];
        assert_eq!(
            choose_subnet(&subnets, "us-east-1a").unwrap().id,
            "subnet-c"
        );
        assert_eq!(
            choose_subnet(&subnets, "us-east-1b").unwrap().id,
            "subnet-b"
        );
        assert!(choose_subnet(&subnets, "us-east-1c").is_none());
    }

    #[test]
    fn tagged_pod_subnets_are_those_of_the_zone() {
        let subnets = || {
            vec![
                subnet("subnet-a", "us-east-1a", 100),
                subnet("subnet-b", "us-east-1b", 9000),
                subnet("subnet-c", "us-east-1a", 500),
            ]
        };
        let cases: [(&str, &[&str]); 3] = [
            ("us-east-1a", &["subnet-a", "subnet-c"]),
            ("us-east-1b", &["subnet-b"]),
            ("us-east-1c", &[]),
        ];
        for (zone, want) in cases {
            assert_eq!(subnet_ids_in_zone(subnets(), zone), want, "{zone}");
        }
    }

    #[test]
    fn a_pod_subnet_must_be_in_the_instances_vpc_and_zone() {
        assert_eq!(
            check_pod_subnet(&subnet("subnet-a", "us-east-1a", 1), &instance()),
            Ok(())
        );
        let other_zone = check_pod_subnet(&subnet("subnet-b", "us-east-1b", 1), &instance());
        assert!(other_zone.unwrap_err().contains("zone us-east-1b"));
        let mut other_vpc = subnet("subnet-a", "us-east-1a", 1);
        other_vpc.vpc_id = "vpc-2".into();
        assert!(
            check_pod_subnet(&other_vpc, &instance())
                .unwrap_err()
                .contains("VPC vpc-2")
        );
    }

    fn limits(max_enis: u32, ipv4_per_eni: u32) -> EniLimits {
        EniLimits {
            max_enis,
            ipv4_per_eni,
        }
    }

    #[test]
    fn flags_override_the_instance_types_limits() {
        let of_type = limits(3, 10);
        let cases = [
            ("no flag: the type's", None, None, None, limits(3, 10)),
            ("--aws-max-enis only", Some(5), None, None, limits(5, 10)),
            ("--aws-ips-per-eni only", None, Some(4), None, limits(3, 4)),
            (
                "both: EC2 is not asked",
                Some(5),
                Some(4),
                Some(limits(5, 4)),
                limits(5, 4),
            ),
        ];
        for (name, max_enis, ips, from_flags, merged) in cases {
            assert_eq!(flag_limits(max_enis, ips), from_flags, "{name}");
            assert_eq!(merge_limits(max_enis, ips, of_type), merged, "{name}");
        }
    }

    #[test]
    fn a_refill_unit_is_an_enis_addresses_or_a_prefix() {
        let cases = [
            // m5.large, m5.4xlarge, the smallest ENI that holds a Pod.
            (limits(3, 10), false, 9),
            (limits(8, 30), false, 29),
            (limits(2, 2), false, 1),
            (limits(3, 10), true, 16),
            (limits(8, 30), true, 16),
        ];
        for (l, prefixes, want) in cases {
            assert_eq!(refill_unit(&l, prefixes), want, "{l:?} prefixes={prefixes}");
        }
    }

    #[test]
    fn limits_must_leave_room_for_a_pod_eni() {
        let cases = [
            (limits(2, 2), true),
            (limits(15, 50), true),
            (limits(1, 50), false),
            (limits(15, 1), false),
            (limits(0, 0), false),
        ];
        for (l, ok) in cases {
            let got = check_limits("t3.nano", l);
            assert_eq!(got.is_ok(), ok, "{l:?}");
            match got {
                Ok(checked) => assert_eq!(checked, l),
                Err(msg) => assert!(msg.contains("t3.nano"), "{msg}"),
            }
        }
    }

    #[test]
    fn only_our_secondary_enis_are_ours() {
        assert!(is_ours(&eni("eni-1", 1, &[], &[]), "c", "i-1"));
        assert!(!is_ours(&eni("eni-1", 1, &[], &[]), "other", "i-1"));
        assert!(!is_ours(&eni("eni-1", 1, &[], &[]), "c", "i-2"));
        // Even tagged as ours, the primary ENI is not for Pods.
        assert!(!is_ours(&eni("eni-1", 0, &[], &[]), "c", "i-1"));
        let mut untagged = eni("eni-1", 1, &[], &[]);
        untagged.tags.remove(TAG_NODE);
        assert!(!is_ours(&untagged, "c", "i-1"));
        let mut detached = eni("eni-1", 1, &[], &[]);
        detached.attachment = None;
        assert!(!is_ours(&detached, "c", "i-1"));
    }

    #[test]
    fn every_index_in_use_counts_but_only_our_enis_are_returned() {
        let mut primary = eni("eni-0", 0, &[], &[]);
        primary.tags.clear();
        let mut foreign = eni("eni-f", 2, &[], &[]);
        foreign.tags.clear();
        let mut elsewhere = eni("eni-x", 3, &[], &[]);
        if let Some(a) = elsewhere.attachment.as_mut() {
            a.instance_id = "i-2".into();
        }
        let all = vec![
            primary,
            eni("eni-1", 1, &[], &[]),
            foreign,
            elsewhere,
            eni("eni-4", 4, &[], &[]),
        ];
        let (ours, used) = ours_and_used(all, "c", "i-1");
        let ids: Vec<&str> = ours.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["eni-1", "eni-4"]);
        assert_eq!(used, [0, 1, 2, 4]);
    }

    #[test]
    fn routing_covers_the_primary_eni_and_ours() {
        let mut primary = eni("eni-0", 0, &[], &[]);
        primary.tags.clear();
        let mut foreign = eni("eni-f", 2, &[], &[]);
        foreign.tags.clear();
        let mut other_primary = eni("eni-x", 0, &[], &[]);
        if let Some(a) = other_primary.attachment.as_mut() {
            a.instance_id = "i-2".into();
        }
        let cases = [
            ("primary", primary, true),
            ("ours", eni("eni-1", 1, &[], &[]), true),
            ("another's secondary", foreign, false),
            ("another instance's primary", other_primary, false),
        ];
        for (name, e, want) in cases {
            assert_eq!(is_routed(&e, "c", "i-1"), want, "{name}");
        }
    }

    #[test]
    fn attachment_states() {
        let with_status = |status: &str| {
            let mut e = eni("eni-1", 1, &[], &[]);
            if let Some(a) = e.attachment.as_mut() {
                a.status = status.into();
            }
            e
        };
        // (status, usable to read, usable to change)
        let cases = [
            ("attached", true, true),
            ("attaching", true, false),
            ("detaching", false, false),
            ("detached", false, false),
        ];
        for (status, read, change) in cases {
            let e = with_status(status);
            assert_eq!(is_usable(&e, true), read, "{status}");
            assert_eq!(is_usable(&e, false), change, "{status}");
            assert!(attachment_to(&e, "i-1").is_some(), "{status}");
            assert!(attachment_to(&e, "i-2").is_none(), "{status}");
        }
        let mut detached = eni("eni-1", 1, &[], &[]);
        detached.attachment = None;
        assert!(!is_usable(&detached, true));
        assert!(attachment_to(&detached, "i-1").is_none());
    }

    #[test]
    fn an_eni_holds_pod_addresses_with_a_secondary_address_or_a_prefix() {
        let cases = [
            ("only its own address", eni("e", 1, &[], &[]), false),
            (
                "a secondary address",
                eni("e", 1, &["100.64.0.9"], &[]),
                true,
            ),
            ("a prefix", eni("e", 1, &[], &["100.64.1.16/28"]), true),
        ];
        for (name, e, want) in cases {
            assert_eq!(holds_pod_addresses(&e), want, "{name}");
        }
    }

    #[test]
    fn room_and_what_to_ask() {
        let limits = EniLimits {
            max_enis: 3,
            ipv4_per_eni: 10,
        };
        assert_eq!(room(&eni("e", 1, &[], &[]), &limits), 9);
        assert_eq!(room(&eni("e", 1, &["a", "b"], &["p"]), &limits), 6);
        let full: Vec<String> = (0..9).map(|i| format!("ip{i}")).collect();
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        assert_eq!(room(&eni("e", 1, &full, &[]), &limits), 0);

        assert_eq!(to_ask(10, 9, false), Some(Secondary::Ips(9)));
        assert_eq!(to_ask(3, 9, false), Some(Secondary::Ips(3)));
        assert_eq!(to_ask(3, 0, false), None);
        assert_eq!(to_ask(0, 9, false), None);
        assert_eq!(to_ask(10, 9, true), Some(Secondary::Prefixes(1)));
        assert_eq!(to_ask(17, 9, true), Some(Secondary::Prefixes(2)));
        assert_eq!(to_ask(1000, 9, true), Some(Secondary::Prefixes(9)));
    }

    #[test]
    fn device_indexes_skip_the_used_ones() {
        assert_eq!(free_device_index(&[0], 3), Some(1));
        assert_eq!(free_device_index(&[0, 1], 3), Some(2));
        assert_eq!(free_device_index(&[0, 2], 3), Some(1));
        assert_eq!(free_device_index(&[0, 1, 2], 3), None);
        assert_eq!(free_device_index(&[0], 1), None);
    }

    #[test]
    fn a_new_eni_while_the_instance_takes_one() {
        let l = limits(3, 10);
        let cases = [
            (
                "first Pod ENI",
                vec![0],
                4,
                false,
                Some((1, Secondary::Ips(4))),
            ),
            (
                "as many as fit beside its primary address",
                vec![0],
                50,
                false,
                Some((1, Secondary::Ips(9))),
            ),
            (
                "a gap is filled first",
                vec![0, 2],
                1,
                false,
                Some((1, Secondary::Ips(1))),
            ),
            (
                "prefixes, rounded up",
                vec![0, 1],
                17,
                true,
                Some((2, Secondary::Prefixes(2))),
            ),
            ("instance full", vec![0, 1, 2], 4, false, None),
            ("nothing missing", vec![0], 0, false, None),
        ];
        for (name, used, missing, prefixes, want) in cases {
            assert_eq!(next_new_eni(&used, &l, missing, prefixes), want, "{name}");
        }
    }

    #[test]
    fn leftover_enis_take_the_free_indexes_in_turn() {
        let cases = [
            ("room for all", 2, vec![0], 4, vec![Some(1), Some(2)]),
            (
                "around used ones",
                2,
                vec![0, 1, 3],
                5,
                vec![Some(2), Some(4)],
            ),
            (
                "the rest is deleted",
                3,
                vec![0],
                3,
                vec![Some(1), Some(2), None],
            ),
            ("none free", 1, vec![0, 1], 2, vec![None]),
            ("no leftovers", 0, vec![0], 3, vec![]),
        ];
        for (name, count, used, max_enis, want) in cases {
            assert_eq!(device_indexes_for(count, &used, max_enis), want, "{name}");
        }
    }

    #[test]
    fn interfaces_need_a_mac_an_address_and_a_known_subnet() {
        let subnet: Cidr = "100.64.0.0/19".parse().unwrap();
        let cidrs = HashMap::from([("subnet-a".to_string(), subnet)]);
        let routable = || {
            let mut e = eni("eni-1", 2, &[], &[]);
            e.mac = Some("02:00:00:00:00:01".into());
            e
        };
        assert_eq!(
            node_interface(&routable(), &cidrs),
            Some(NodeInterface {
                id: "eni-1".into(),
                mac: [2, 0, 0, 0, 0, 1],
                device_index: 2,
                address: "100.64.0.4".parse().unwrap(),
                subnet,
            })
        );
        type Spoil = fn(&mut Eni);
        let broken: [(&str, Spoil); 5] = [
            ("no MAC", |e| e.mac = None),
            ("bad MAC", |e| e.mac = Some("02:00".into())),
            ("no address", |e| e.primary_ip = None),
            ("detached", |e| e.attachment = None),
            ("unknown subnet", |e| e.subnet_id = "subnet-z".into()),
        ];
        for (name, spoil) in broken {
            let mut e = routable();
            spoil(&mut e);
            assert_eq!(node_interface(&e, &cidrs), None, "{name}");
        }
    }

    #[test]
    fn vpc_cidrs_become_networks() {
        let cidrs = [
            "10.0.0.0/16".to_string(),
            "100.64.0.1/16".to_string(),
            "junk".to_string(),
        ];
        let got: Vec<String> = network_cidrs(&cidrs)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got, ["10.0.0.0/16", "100.64.0.0/16"]);
    }

    #[test]
    fn client_tokens_fit_the_api() {
        assert_eq!(client_token("op-7", 0), "op-7-0");
        let long = "x".repeat(100);
        let token = client_token(&long, 1);
        assert!(token.len() <= 64 && token.ends_with("-1"), "{token}");
        assert_eq!(token, client_token(&long, 1));
        assert_ne!(client_token(&long, 1), client_token(&"y".repeat(100), 1));
    }

    #[test]
    fn garbage_age_comes_from_the_creation_tag() {
        let now: Timestamp = "2026-01-01T00:10:00Z".parse().unwrap();
        let grace = Duration::from_secs(300);
        let at = |s: &str| Some(s.to_string());
        assert_eq!(
            expired(at("2026-01-01T00:04:59Z").as_ref(), now, grace),
            Some(true)
        );
        assert_eq!(
            expired(at("2026-01-01T00:05:00Z").as_ref(), now, grace),
            Some(true)
        );
        assert_eq!(
            expired(at("2026-01-01T00:06:00Z").as_ref(), now, grace),
            Some(false)
        );
        assert_eq!(expired(at("yesterday").as_ref(), now, grace), None);
        assert_eq!(expired(None, now, grace), None);
        // What the tag holds round-trips.
        let tag = Timestamp::now().to_string();
        assert!(expired(Some(&tag), Timestamp::now(), Duration::ZERO).unwrap());
    }
}
