//! Flags of the AWS backend (`--backend aws`), their checks and what the
//! backend derives from them. Parsing only: nothing here calls AWS.

use std::collections::BTreeSet;
use std::time::Duration;

use clap::Args;
use cnlb_cloud_calls::{RateLimit, RateLimits};

use super::plan::is_aws_id;
use cnlb_runtime::flags::duration;

/// Flags of the AWS backend (`--backend aws`).
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "AWS backend (--backend aws)")]
pub struct AwsArgs {
    /// Pod subnet of an availability zone, as AZ=SUBNET_ID (repeatable), e.g.
    /// us-east-1a=subnet-0123abcd: the Pod ENIs of nodes in that zone go there.
    #[arg(long = "aws-pod-subnet", value_name = "AZ=SUBNET_ID", value_parser = parse_pod_subnet)]
    pub aws_pod_subnets: Vec<PodSubnet>,

    /// Find the pod subnets by tag instead: of the subnets of the instance's
    /// VPC tagged KEY=VALUE, the one in its zone with the most free addresses.
    #[arg(
        long,
        value_name = "KEY=VALUE",
        value_parser = parse_subnet_tag,
        conflicts_with = "aws_pod_subnets"
    )]
    pub aws_pod_subnet_tag: Option<SubnetTag>,

    /// Security group of the Pod ENIs (repeatable); default: the groups of
    /// the instance's primary ENI.
    #[arg(long = "aws-pod-security-group", value_name = "SG_ID", value_parser = parse_security_group)]
    pub aws_pod_security_groups: Vec<String>,

    /// Assign /28 prefixes (16 addresses each) instead of single secondary
    /// addresses (Nitro instances only).
    #[arg(long)]
    pub aws_prefix_delegation: bool,

    /// ENIs the instance takes, its primary ENI included (default: from
    /// DescribeInstanceTypes).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(2..))]
    pub aws_max_enis: Option<u32>,

    /// IPv4 addresses per ENI, its primary address included (default: from
    /// DescribeInstanceTypes).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(2..))]
    pub aws_ips_per_eni: Option<u32>,

    /// Age after which a detached Pod ENI of any node of the cluster is
    /// deleted ("300s", "5m", "1h").
    #[arg(long, default_value = "5m", value_name = "DURATION", value_parser = duration)]
    pub aws_eni_gc_grace: Duration,

    /// Route Pods on secondary ENIs through their own ENI (a route table per
    /// ENI, rules per Pod, SNAT) so that EC2's source/destination check lets
    /// their traffic pass; off only where something else does it.
    #[arg(
        long,
        action = clap::ArgAction::Set,
        default_value_t = true,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    pub aws_node_routing: bool,

    /// Pod traffic leaving the VPC keeps the Pod's address (a NAT gateway
    /// translates it) instead of the node's primary address.
    #[arg(long)]
    pub aws_external_snat: bool,

    /// MTU of the secondary ENIs' links.
    #[arg(long, default_value_t = 9001, value_name = "BYTES", value_parser = clap::value_parser!(u32).range(576..=9001))]
    pub aws_eni_mtu: u32,

    /// EC2 Describe* calls: the most tokens per second / burst; the rate in
    /// use adapts below it when EC2 throttles.
    #[arg(long, default_value = "20/40", value_name = "RATE/BURST")]
    pub aws_read_rate: RateLimit,

    /// EC2 create, attach, assign, unassign and delete calls: the most
    /// tokens per second / burst.
    #[arg(long, default_value = "10/20", value_name = "RATE/BURST")]
    pub aws_write_rate: RateLimit,
}

/// `--aws-pod-subnet us-east-1a=subnet-0123abcd`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSubnet {
    pub zone: String,
    pub subnet_id: String,
}

/// `--aws-pod-subnet-tag KEY=VALUE`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetTag {
    pub key: String,
    pub value: String,
}

impl AwsArgs {
    /// Checks that span flags; the message names them. Called by
    /// [`super::AwsBackend::new`], and usable by the agent's own validation.
    pub fn validate(&self) -> Result<(), String> {
        if self.aws_pod_subnets.is_empty() && self.aws_pod_subnet_tag.is_none() {
            return Err(
                "--backend aws needs pod subnets: --aws-pod-subnet AZ=SUBNET_ID \
                        (repeatable) or --aws-pod-subnet-tag KEY=VALUE"
                    .into(),
            );
        }
        let mut zones = BTreeSet::new();
        for s in &self.aws_pod_subnets {
            if !zones.insert(&s.zone) {
                return Err(format!(
                    "--aws-pod-subnet gives availability zone {} more than one subnet",
                    s.zone
                ));
            }
        }
        Ok(())
    }

    pub(super) fn rate_limits(&self) -> RateLimits {
        RateLimits {
            read: self.aws_read_rate,
            write: self.aws_write_rate,
            ..RateLimits::default()
        }
    }

    /// The `--aws-pod-subnet` of availability zone `zone`.
    pub(super) fn pod_subnet_in(&self, zone: &str) -> Option<&PodSubnet> {
        self.aws_pod_subnets.iter().find(|s| s.zone == zone)
    }

    /// The Pod ENIs' security groups: the flags', else those of the
    /// instance's primary ENI (`primary`).
    pub(super) fn pod_security_groups(&self, primary: &[String]) -> Vec<String> {
        if self.aws_pod_security_groups.is_empty() {
            primary.to_vec()
        } else {
            self.aws_pod_security_groups.clone()
        }
    }
}

fn parse_pod_subnet(s: &str) -> Result<PodSubnet, String> {
    let bad = || format!("{s:?}: expected AZ=SUBNET_ID, like us-east-1a=subnet-0123abcd");
    let (zone, subnet_id) = s.split_once('=').ok_or_else(bad)?;
    let zone_ok = !zone.is_empty()
        && zone
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !zone_ok || !is_aws_id(subnet_id, "subnet-") {
        return Err(bad());
    }
    Ok(PodSubnet {
        zone: zone.to_string(),
        subnet_id: subnet_id.to_string(),
    })
}

fn parse_subnet_tag(s: &str) -> Result<SubnetTag, String> {
    match s.split_once('=') {
        Some((key, value)) if !key.is_empty() && !value.is_empty() => Ok(SubnetTag {
            key: key.to_string(),
            value: value.to_string(),
        }),
        _ => Err(format!(
            "{s:?}: expected KEY=VALUE, like cnlb.dev/pods=true"
        )),
    }
}

fn parse_security_group(s: &str) -> Result<String, String> {
    if is_aws_id(s, "sg-") {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?}: expected a security group ID, like sg-0123abcd"
        ))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        aws: AwsArgs,
    }

    fn parse(args: &[&str]) -> Result<AwsArgs, String> {
        let cli = Cli::try_parse_from(std::iter::once("agent").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.aws.validate()?;
        Ok(cli.aws)
    }

    #[test]
    fn flags_parse_with_defaults() {
        let args = parse(&[
            "--aws-pod-subnet",
            "us-east-1a=subnet-0a1b",
            "--aws-pod-subnet=us-east-1b=subnet-0c2d",
        ])
        .unwrap();
        assert_eq!(
            args.aws_pod_subnets,
            [
                PodSubnet {
                    zone: "us-east-1a".into(),
                    subnet_id: "subnet-0a1b".into()
                },
                PodSubnet {
                    zone: "us-east-1b".into(),
                    subnet_id: "subnet-0c2d".into()
                }
            ]
        );
        assert_eq!(args.aws_eni_gc_grace, Duration::from_secs(300));
        assert_eq!(args.aws_read_rate, RateLimit::new(20, 40));
        assert_eq!(args.aws_write_rate, RateLimit::new(10, 20));
        assert!(!args.aws_prefix_delegation);
        assert_eq!((args.aws_max_enis, args.aws_ips_per_eni), (None, None));
        assert!(args.aws_node_routing && !args.aws_external_snat);
        assert_eq!(args.aws_eni_mtu, 9001);

        let args = parse(&[
            "--aws-pod-subnet-tag=cnlb.dev/pods=true",
            "--aws-pod-security-group=sg-1",
            "--aws-pod-security-group=sg-2f",
            "--aws-prefix-delegation",
            "--aws-max-enis=3",
            "--aws-ips-per-eni=10",
            "--aws-eni-gc-grace=0s",
            "--aws-write-rate=4/8",
            "--aws-node-routing=false",
            "--aws-external-snat",
            "--aws-eni-mtu=1500",
        ])
        .unwrap();
        assert_eq!(
            args.aws_pod_subnet_tag,
            Some(SubnetTag {
                key: "cnlb.dev/pods".into(),
                value: "true".into()
            })
        );
        assert_eq!(args.aws_pod_security_groups, ["sg-1", "sg-2f"]);
        assert!(args.aws_prefix_delegation);
        assert_eq!(
            (args.aws_max_enis, args.aws_ips_per_eni),
            (Some(3), Some(10))
        );
        assert_eq!(args.aws_eni_gc_grace, Duration::ZERO);
        assert_eq!(args.aws_write_rate, RateLimit::new(4, 8));
        assert!(!args.aws_node_routing && args.aws_external_snat);
        assert_eq!(args.aws_eni_mtu, 1500);
    }

    #[test]
    fn bad_flags_are_named() {
        let cases: &[(&[&str], &str)] = &[
            (&[], "--aws-pod-subnet"),
            (&["--aws-pod-subnet=subnet-1"], "--aws-pod-subnet"),
            (&["--aws-pod-subnet=us-east-1a=sg-1"], "--aws-pod-subnet"),
            (&["--aws-pod-subnet=us-east-1a="], "--aws-pod-subnet"),
            (
                &[
                    "--aws-pod-subnet=us-east-1a=subnet-1",
                    "--aws-pod-subnet=us-east-1a=subnet-2",
                ],
                "--aws-pod-subnet gives availability zone us-east-1a",
            ),
            (
                &[
                    "--aws-pod-subnet=us-east-1a=subnet-1",
                    "--aws-pod-subnet-tag=a=b",
                ],
                "--aws-pod-subnet-tag",
            ),
            (&["--aws-pod-subnet-tag=novalue"], "--aws-pod-subnet-tag"),
            (&["--aws-pod-subnet-tag==x"], "--aws-pod-subnet-tag"),
            (
                &[
                    "--aws-pod-subnet-tag=a=b",
                    "--aws-pod-security-group=default",
                ],
                "--aws-pod-security-group",
            ),
            (
                &["--aws-pod-subnet-tag=a=b", "--aws-max-enis=1"],
                "--aws-max-enis",
            ),
            (
                &["--aws-pod-subnet-tag=a=b", "--aws-ips-per-eni=x"],
                "--aws-ips-per-eni",
            ),
            (
                &["--aws-pod-subnet-tag=a=b", "--aws-eni-gc-grace=5 min"],
                "--aws-eni-gc-grace",
            ),
            (
                &["--aws-pod-subnet-tag=a=b", "--aws-read-rate=0/5"],
                "--aws-read-rate",
            ),
            (
                &["--aws-pod-subnet-tag=a=b", "--aws-eni-mtu=9500"],
                "--aws-eni-mtu",
            ),
            (
                &["--aws-pod-subnet-tag=a=b", "--aws-node-routing=maybe"],
                "--aws-node-routing",
            ),
        ];
        for (args, needle) in cases {
            let err = parse(args).unwrap_err();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }

    #[test]
    fn the_pod_subnet_is_the_one_of_the_zone() {
        let args = parse(&[
            "--aws-pod-subnet=us-east-1a=subnet-0a",
            "--aws-pod-subnet=us-east-1b=subnet-0b",
        ])
        .unwrap();
        let cases = [
            ("us-east-1a", Some("subnet-0a")),
            ("us-east-1b", Some("subnet-0b")),
            ("us-east-1c", None),
            ("us-east-1", None),
        ];
        for (zone, want) in cases {
            let got = args.pod_subnet_in(zone).map(|s| s.subnet_id.as_str());
            assert_eq!(got, want, "{zone}");
        }
    }

    #[test]
    fn pod_security_groups_default_to_the_primary_enis() {
        let primary = ["sg-p1".to_string(), "sg-p2".to_string()];
        let cases: [(&[&str], &[&str]); 3] = [
            (&[], &["sg-p1", "sg-p2"]),
            (&["--aws-pod-security-group=sg-1"], &["sg-1"]),
            (
                &[
                    "--aws-pod-security-group=sg-2",
                    "--aws-pod-security-group=sg-1",
                ],
                &["sg-2", "sg-1"],
            ),
        ];
        for (flags, want) in cases {
            let mut argv = vec!["--aws-pod-subnet-tag=a=b"];
            argv.extend(flags);
            let args = parse(&argv).unwrap();
            assert_eq!(args.pod_security_groups(&primary), want, "{flags:?}");
        }
    }

    #[test]
    fn rate_flags_set_the_read_and_write_buckets() {
        let args = parse(&[
            "--aws-pod-subnet-tag=a=b",
            "--aws-read-rate=7/9",
            "--aws-write-rate=1/3",
        ])
        .unwrap();
        let limits = args.rate_limits();
        assert_eq!(limits.read, RateLimit::new(7, 9));
        assert_eq!(limits.write, RateLimit::new(1, 3));
        assert_eq!(limits.targets, RateLimits::default().targets);
    }
}
