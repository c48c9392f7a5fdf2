//! The NLB itself. Its scheme cannot change in place and is never
//! replaced behind the user's back (a new NLB is a new address); its
//! security groups are set in place. Subnets and IP address type are set
//! at creation only. Attributes and tags follow [`changed`](super::changed).

use std::collections::{BTreeMap, BTreeSet};

use cnlb_provider_core::{IpAddressType, LoadBalancerSpec, ProviderError, Result, Scheme};

/// Subnet tags through which load balancer subnets are discovered, as in
/// aws-load-balancer-controller and the in-tree AWS cloud provider.
pub const ELB_SUBNET_TAG: &str = "kubernetes.io/role/elb";
pub const INTERNAL_ELB_SUBNET_TAG: &str = "kubernetes.io/role/internal-elb";

/// A load balancer as DescribeLoadBalancers (or CreateLoadBalancer) shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActualLoadBalancer {
    pub arn: String,
    /// `internal` or `internet-facing`.
    pub scheme: Option<String>,
    pub security_groups: Vec<String>,
    pub dns_name: Option<String>,
}

/// What to do about the NLB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadBalancerAction {
    /// None exists: CreateLoadBalancer with its subnets, security groups
    /// (an NLB created without any can never get one) and tags.
    Create,
    /// It exists: its missing tags are added, and SetSecurityGroups sets
    /// `security_groups` when they are `Some`.
    Update {
        lb: ActualLoadBalancer,
        security_groups: Option<Vec<String>>,
    },
}

/// ELBv2 scheme of `scheme`.
pub fn scheme(scheme: Scheme) -> &'static str {
    match scheme {
        Scheme::Internal => "internal",
        Scheme::InternetFacing => "internet-facing",
    }
}

/// ELBv2 IP address type of `ip_address_type`.
pub fn ip_address_type(ip_address_type: IpAddressType) -> &'static str {
    match ip_address_type {
        IpAddressType::Ipv4 => "ipv4",
        IpAddressType::DualStack => "dualstack",
    }
}

/// The subnet tag that marks subnets for load balancers of `scheme`.
pub fn subnet_role(scheme: Scheme) -> &'static str {
    match scheme {
        Scheme::Internal => INTERNAL_ELB_SUBNET_TAG,
        Scheme::InternetFacing => ELB_SUBNET_TAG,
    }
}

/// One subnet per zone among tagged `(zone, subnet ID)` pairs: the lowest
/// ID, so the choice does not change with the order EC2 lists them in.
pub fn one_subnet_per_zone<'a>(
    subnets: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Vec<String> {
    let mut per_zone: BTreeMap<&str, &str> = BTreeMap::new();
    for (zone, id) in subnets {
        let entry = per_zone.entry(zone).or_insert(id);
        if id < *entry {
            *entry = id;
        }
    }
    per_zone.into_values().map(str::to_string).collect()
}

/// What to do with the NLB `actual` (found by persisted ARN, else by name)
/// for `spec`, whose NLB carries `security_groups`. A scheme change is a
/// user error.
pub fn plan(
    spec: &LoadBalancerSpec,
    security_groups: &[String],
    actual: Option<ActualLoadBalancer>,
) -> Result<LoadBalancerAction> {
    let Some(lb) = actual else {
        return Ok(LoadBalancerAction::Create);
    };
    if lb.scheme.as_deref() != Some(scheme(spec.scheme)) {
        return Err(ProviderError::invalid(
            "scheme",
            format!(
                "the load balancer exists as {}; the scheme cannot change in place (recreate the Service)",
                lb.scheme.as_deref().unwrap_or("unknown")
            ),
        ));
    }
    // The order AWS lists them in is no difference.
    let have: BTreeSet<&String> = lb.security_groups.iter().collect();
    let set = (have != security_groups.iter().collect()).then(|| security_groups.to_vec());
    Ok(LoadBalancerAction::Update {
        lb,
        security_groups: set,
    })
}

#[cfg(test)]
mod tests {
    use cnlb_provider_core::LoadBalancerKey;

    use super::*;

    fn spec(scheme: Scheme) -> LoadBalancerSpec {
        let mut spec = LoadBalancerSpec::new(LoadBalancerKey::new("c", "default", "web", "uid-1"));
        spec.scheme = scheme;
        spec
    }

    fn lb(scheme: Option<&str>, groups: &[&str]) -> ActualLoadBalancer {
        ActualLoadBalancer {
            arn: "arn:lb".into(),
            scheme: scheme.map(str::to_string),
            security_groups: groups.iter().map(|g| g.to_string()).collect(),
            dns_name: Some("lb.example".into()),
        }
    }

    fn groups(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|g| g.to_string()).collect()
    }

    #[test]
    fn existing_load_balancers_are_updated_in_place() {
        let want = groups(&["sg-front", "sg-back"]);
        let cases = [
            ("missing", Scheme::Internal, None, None),
            (
                "in sync",
                Scheme::Internal,
                Some(lb(Some("internal"), &["sg-front", "sg-back"])),
                Some(None),
            ),
            (
                "in sync in another order",
                Scheme::Internal,
                Some(lb(Some("internal"), &["sg-back", "sg-front"])),
                Some(None),
            ),
            (
                "backend group missing",
                Scheme::Internal,
                Some(lb(Some("internal"), &["sg-front"])),
                Some(Some(want.clone())),
            ),
            (
                "a group too many",
                Scheme::InternetFacing,
                Some(lb(
                    Some("internet-facing"),
                    &["sg-front", "sg-back", "sg-old"],
                )),
                Some(Some(want.clone())),
            ),
        ];
        for (name, scheme, actual, want_update) in cases {
            let planned = plan(&spec(scheme), &want, actual.clone()).unwrap();
            let expected = match (actual, want_update) {
                (Some(lb), Some(security_groups)) => LoadBalancerAction::Update {
                    lb,
                    security_groups,
                },
                _ => LoadBalancerAction::Create,
            };
            assert_eq!(planned, expected, "{name}");
        }
    }

    #[test]
    fn a_scheme_change_is_refused_not_replaced() {
        let cases = [
            (
                "to internet-facing",
                Scheme::InternetFacing,
                Some("internal"),
            ),
            ("to internal", Scheme::Internal, Some("internet-facing")),
            ("unknown", Scheme::Internal, None),
        ];
        for (name, scheme, have) in cases {
            let err = plan(&spec(scheme), &[], Some(lb(have, &[]))).unwrap_err();
            assert!(err.is_user_error(), "{name}");
            let shown = have.unwrap_or("unknown");
            assert!(
                err.to_string()
                    .contains(&format!("exists as {shown}; the scheme cannot change")),
                "{name}: {err}"
            );
        }
    }

    #[test]
    fn creation_settings() {
        assert_eq!(scheme(Scheme::Internal), "internal");
        assert_eq!(scheme(Scheme::InternetFacing), "internet-facing");
        assert_eq!(ip_address_type(IpAddressType::Ipv4), "ipv4");
        assert_eq!(ip_address_type(IpAddressType::DualStack), "dualstack");
        assert_eq!(subnet_role(Scheme::Internal), INTERNAL_ELB_SUBNET_TAG);
        assert_eq!(subnet_role(Scheme::InternetFacing), ELB_SUBNET_TAG);
    }

    #[test]
    fn one_subnet_per_zone_the_lowest_id() {
        let cases = [
            ("none", vec![], vec![]),
            (
                "one per zone",
                vec![("a", "subnet-2"), ("b", "subnet-1")],
                vec!["subnet-2", "subnet-1"],
            ),
            (
                "lowest wins, whatever the order",
                vec![("a", "subnet-3"), ("a", "subnet-1"), ("a", "subnet-2")],
                vec!["subnet-1"],
            ),
        ];
        for (name, subnets, want) in cases {
            assert_eq!(one_subnet_per_zone(subnets), groups(&want), "{name}");
        }
    }
}
