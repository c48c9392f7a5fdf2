//! The clouds' own request rate limits, as their documentation gives them,
//! for the proxy to enforce like the account it stands for: every client
//! of the proxy draws from the same buckets, so a second, noisy client can
//! be added. A call that finds its bucket empty gets the cloud's real
//! throttling answer and never reaches the emulator.
//!
//! - **EC2** (docs.aws.amazon.com/ec2/latest/devguide/ec2-api-throttling.html):
//!   a bucket per action, sized by its category: non-mutating 100 tokens
//!   refilling 20/s; the same describes without a filter or pagination
//!   (`DescribeInstances`, `DescribeNetworkInterfaces`,
//!   `DescribeSecurityGroups`, ...) 50, 10/s; mutating 50, 5/s (security
//!   group rule changes are "resource-intensive", also 50, 5/s);
//!   `CreateTags` 100, 10/s; the network interface actions 100, 5/s.
//! - **ELBv2** (docs.aws.amazon.com/elasticloadbalancing/latest/userguide/elb-api-throttling.html):
//!   a bucket per category: `Describe*` 40, 10/s; `RegisterTargets` and
//!   `DeregisterTargets` 20, 4/s; `CreateLoadBalancer` and `SetSubnets`
//!   10, 0.2/s; other mutating actions 20, 3/s.
//! - **GCE** (cloud.google.com/compute/api-quota): per-project quotas per
//!   minute, the whole quota back at each minute: 1,500 each for reads,
//!   lists, operation reads and writes (the last published defaults). The
//!   network endpoint attach/detach quota is its own; its default is not
//!   published, so it is taken as 1,500 too.

use std::collections::HashMap;
use std::time::Duration;

use super::Cloud;

/// How a bucket fills.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Refill {
    /// Tokens per second, continuously (AWS).
    PerSecond(f64),
    /// The whole bucket at the start of each minute (GCE's quotas).
    EachMinute,
}

/// One bucket: the most tokens it holds, and how it fills.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bucket {
    pub size: f64,
    pub refill: Refill,
}

impl Bucket {
    const fn per_second(size: f64, refill: f64) -> Bucket {
        Bucket {
            size,
            refill: Refill::PerSecond(refill),
        }
    }

    const fn per_minute(size: f64) -> Bucket {
        Bucket {
            size,
            refill: Refill::EachMinute,
        }
    }

    /// The least time `calls` calls take through it from full: what a
    /// client that knew the bucket could do at best. (Per minute, the
    /// minute boundaries are taken as the most favourable.)
    pub fn least_time(self, calls: f64) -> Duration {
        let beyond = (calls - self.size).max(0.0);
        match self.refill {
            Refill::PerSecond(rate) => {
                Duration::from_secs_f64(beyond / rate.max(f64::MIN_POSITIVE))
            }
            Refill::EachMinute => Duration::from_secs(60 * (beyond / self.size).ceil() as u64),
        }
    }
}

/// The documented limits of one account, scaled: `scale` 1 is the
/// documentation; 0.1 makes every bucket and refill ten times smaller
/// (tests that must reach the limits with few Services).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AccountLimits {
    pub scale: f64,
}

impl AccountLimits {
    pub fn documented() -> AccountLimits {
        AccountLimits { scale: 1.0 }
    }

    /// The bucket a call draws from: its name (calls with the same name
    /// share it) and its shape. `filtered`: an AWS describe with a filter
    /// or pagination.
    pub fn bucket(
        &self,
        cloud: Cloud,
        operation: &str,
        filtered: bool,
    ) -> Option<(String, Bucket)> {
        let (name, bucket) = match cloud {
            Cloud::Aws => aws(operation, filtered)?,
            Cloud::Gce => gce(operation),
        };
        let scaled = Bucket {
            size: (bucket.size * self.scale).max(1.0),
            refill: match bucket.refill {
                Refill::PerSecond(rate) => Refill::PerSecond(rate * self.scale),
                Refill::EachMinute => Refill::EachMinute,
            },
        };
        Some((name, scaled))
    }
}

/// EC2 describes that take the small bucket without a filter or pagination.
const UNFILTERED: [&str; 7] = [
    "DescribeInstances",
    "DescribeInstanceStatus",
    "DescribeNetworkInterfaces",
    "DescribeSecurityGroups",
    "DescribeSnapshots",
    "DescribeSpotInstanceRequests",
    "DescribeVolumes",
];

fn is_read(action: &str) -> bool {
    ["Describe", "List", "Search", "Get"]
        .iter()
        .any(|p| action.starts_with(p))
}

fn aws(operation: &str, filtered: bool) -> Option<(String, Bucket)> {
    let (service, action) = operation.split_once(':')?;
    match service {
        "ec2" => {
            let bucket = match action {
                a if UNFILTERED.contains(&a) && !filtered => Bucket::per_second(50.0, 10.0),
                a if is_read(a) => Bucket::per_second(100.0, 20.0),
                "CreateTags" => Bucket::per_second(100.0, 10.0),
                "CreateNetworkInterface"
                | "DeleteNetworkInterface"
                | "AssignPrivateIpAddresses"
                | "UnassignPrivateIpAddresses"
                | "ModifyNetworkInterfaceAttribute" => Bucket::per_second(100.0, 5.0),
                _ => Bucket::per_second(50.0, 5.0),
            };
            // Per action: a burst of one action does not slow another.
            let name = match UNFILTERED.contains(&action) && !filtered {
                true => format!("ec2:{action} (unfiltered)"),
                false => format!("ec2:{action}"),
            };
            Some((name, bucket))
        }
        "elbv2" => {
            let (category, bucket) = match action {
                a if a.starts_with("Describe") => ("describe", Bucket::per_second(40.0, 10.0)),
                "RegisterTargets" | "DeregisterTargets" => {
                    ("registration", Bucket::per_second(20.0, 4.0))
                }
                "CreateLoadBalancer" | "SetSubnets" => {
                    ("resource-intensive", Bucket::per_second(10.0, 0.2))
                }
                _ => ("mutating", Bucket::per_second(20.0, 3.0)),
            };
            Some((format!("elbv2:{category}"), bucket))
        }
        _ => None,
    }
}

fn gce(operation: &str) -> (String, Bucket) {
    let method = operation.rsplit('.').next().unwrap_or(operation);
    let quota = match method {
        "attachNetworkEndpoints" | "detachNetworkEndpoints" => "network endpoint writes",
        // Global, regional and zonal operations alike (`operations.wait`,
        // as `operation::gce` names them).
        _ if operation.starts_with("operations.") => "operation reads",
        "get" | "getHealth" => "reads",
        m if m.starts_with("list") || m.starts_with("aggregated") => "lists",
        _ => "writes",
    };
    (quota.to_string(), Bucket::per_minute(1500.0))
}

/// Each bucket by name: its shape, the tokens left and when it was last
/// filled.
#[derive(Default)]
pub(super) struct Buckets {
    left: HashMap<String, (Bucket, f64, Duration)>,
}

impl Buckets {
    /// Takes a token from `name` at `now` (since the proxy started); false
    /// when it is empty: the call is throttled.
    pub(super) fn take(&mut self, name: &str, bucket: Bucket, now: Duration) -> bool {
        let (_, tokens, since) =
            self.left
                .entry(name.to_string())
                .or_insert((bucket, bucket.size, now));
        *tokens = match bucket.refill {
            Refill::PerSecond(rate) => {
                (*tokens + rate * now.saturating_sub(*since).as_secs_f64()).min(bucket.size)
            }
            Refill::EachMinute if now.as_secs() / 60 != since.as_secs() / 60 => bucket.size,
            Refill::EachMinute => *tokens,
        };
        *since = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// The shape of bucket `name`, once a call drew from it.
    pub(super) fn shape(&self, name: &str) -> Option<Bucket> {
        self.left.get(name).map(|(bucket, _, _)| *bucket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(cloud: Cloud, op: &str, filtered: bool) -> (String, Bucket) {
        AccountLimits::documented()
            .bucket(cloud, op, filtered)
            .unwrap()
    }

    #[test]
    fn documented_buckets() {
        let per_second = |size, rate| Bucket::per_second(size, rate);
        for (cloud, op, filtered, name, expected) in [
            (
                Cloud::Aws,
                "ec2:DescribeInstances",
                false,
                "ec2:DescribeInstances (unfiltered)",
                per_second(50.0, 10.0),
            ),
            (
                Cloud::Aws,
                "ec2:DescribeInstances",
                true,
                "ec2:DescribeInstances",
                per_second(100.0, 20.0),
            ),
            (
                Cloud::Aws,
                "ec2:DescribeSubnets",
                false,
                "ec2:DescribeSubnets",
                per_second(100.0, 20.0),
            ),
            (
                Cloud::Aws,
                "ec2:CreateSecurityGroup",
                false,
                "ec2:CreateSecurityGroup",
                per_second(50.0, 5.0),
            ),
            (
                Cloud::Aws,
                "ec2:AuthorizeSecurityGroupIngress",
                false,
                "ec2:AuthorizeSecurityGroupIngress",
                per_second(50.0, 5.0),
            ),
            (
                Cloud::Aws,
                "ec2:CreateTags",
                false,
                "ec2:CreateTags",
                per_second(100.0, 10.0),
            ),
            (
                Cloud::Aws,
                "ec2:AssignPrivateIpAddresses",
                false,
                "ec2:AssignPrivateIpAddresses",
                per_second(100.0, 5.0),
            ),
            (
                Cloud::Aws,
                "elbv2:DescribeTargetHealth",
                false,
                "elbv2:describe",
                per_second(40.0, 10.0),
            ),
            (
                Cloud::Aws,
                "elbv2:RegisterTargets",
                false,
                "elbv2:registration",
                per_second(20.0, 4.0),
            ),
            (
                Cloud::Aws,
                "elbv2:CreateLoadBalancer",
                false,
                "elbv2:resource-intensive",
                per_second(10.0, 0.2),
            ),
            (
                Cloud::Aws,
                "elbv2:CreateTargetGroup",
                false,
                "elbv2:mutating",
                per_second(20.0, 3.0),
            ),
            (
                Cloud::Gce,
                "networkEndpointGroups.attachNetworkEndpoints",
                false,
                "network endpoint writes",
                Bucket::per_minute(1500.0),
            ),
            (
                Cloud::Gce,
                "operations.wait",
                false,
                "operation reads",
                Bucket::per_minute(1500.0),
            ),
            (
                Cloud::Gce,
                "backendServices.get",
                false,
                "reads",
                Bucket::per_minute(1500.0),
            ),
            (
                Cloud::Gce,
                "instances.list",
                false,
                "lists",
                Bucket::per_minute(1500.0),
            ),
            (
                Cloud::Gce,
                "forwardingRules.insert",
                false,
                "writes",
                Bucket::per_minute(1500.0),
            ),
        ] {
            assert_eq!(
                bucket(cloud, op, filtered),
                (name.to_string(), expected),
                "{op}"
            );
        }
        assert_eq!(
            AccountLimits::documented().bucket(Cloud::Aws, "sts:GetCallerIdentity", false),
            None
        );
        let (_, small) = AccountLimits { scale: 0.1 }
            .bucket(Cloud::Aws, "elbv2:CreateLoadBalancer", false)
            .unwrap();
        assert_eq!(small.size, 1.0, "at least one token");
        assert!(matches!(small.refill, Refill::PerSecond(r) if (r - 0.02).abs() < 1e-9));
    }

    #[test]
    fn buckets_drain_and_refill() {
        let mut buckets = Buckets::default();
        let b = Bucket::per_second(2.0, 1.0);
        let s = Duration::from_secs;
        assert!(buckets.take("a", b, s(0)));
        assert!(buckets.take("a", b, s(0)));
        assert!(!buckets.take("a", b, s(0)));
        assert!(buckets.take("other", b, s(0)), "buckets are separate");
        assert!(buckets.take("a", b, s(1)));
        assert!(!buckets.take("a", b, s(1)));
        assert!(buckets.take("a", b, s(100)));
        assert!(buckets.take("a", b, s(100)));
        assert!(!buckets.take("a", b, s(100)), "never more than its size");

        let m = Bucket::per_minute(2.0);
        assert!(buckets.take("m", m, s(10)));
        assert!(buckets.take("m", m, s(59)));
        assert!(!buckets.take("m", m, s(59)));
        assert!(
            buckets.take("m", m, s(60)),
            "the next minute brings it all back"
        );
        assert_eq!(buckets.shape("m"), Some(m));
        assert_eq!(buckets.shape("never"), None);
    }

    #[test]
    fn least_time_through_a_bucket() {
        let b = Bucket::per_second(10.0, 0.2);
        assert_eq!(b.least_time(5.0), Duration::ZERO);
        assert_eq!(b.least_time(20.0), Duration::from_secs(50));
        let m = Bucket::per_minute(1500.0);
        assert_eq!(m.least_time(1500.0), Duration::ZERO);
        assert_eq!(m.least_time(1501.0), Duration::from_secs(60));
        assert_eq!(m.least_time(4000.0), Duration::from_secs(120));
    }
}
