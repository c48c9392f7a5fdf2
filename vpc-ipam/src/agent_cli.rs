//! Command line of `vpc-ipam-agent`. Checks that span several flags run
//! after clap, and fail the same way clap does (usage, exit status 2).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::NonEmptyStringValueParser;
use clap::error::ErrorKind;
use clap::{CommandFactory, Parser, ValueEnum};

use crate::DEFAULT_AGENT_SOCKET;
use crate::cidr::Cidr;
use cnlb_runtime::flags::duration;
use cnlb_runtime::telemetry::LogFormat;

/// AWS NLB target groups keep sending to a deregistered target for 300 s by
/// default; an address reused sooner could receive another Pod's traffic.
pub const NLB_DEFAULT_DEREGISTRATION_DELAY: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Parser)]
#[command(
    name = "vpc-ipam-agent",
    version,
    about = "Node agent that gives Pods IP addresses from VPC secondary ranges"
)]
pub struct AgentArgs {
    /// Name of the Kubernetes Node this agent runs on.
    #[arg(long, env = "NODE_NAME", value_parser = NonEmptyStringValueParser::new())]
    pub node_name: String,

    /// Where addresses come from.
    #[arg(long, value_enum)]
    pub backend: Backend,

    /// Name of this cluster; tags the cloud resources the agent creates.
    #[arg(long, env = "CNLB_CLUSTER_NAME", value_parser = NonEmptyStringValueParser::new())]
    pub cluster_name: String,

    /// Unix socket the CNI plugin connects to.
    #[arg(long, default_value = DEFAULT_AGENT_SOCKET, value_name = "PATH")]
    pub socket: PathBuf,

    /// Directory of the agent's crash-safe state.
    #[arg(long, default_value = "/var/lib/cnlb/vpc-ipam", value_name = "DIR")]
    pub state_dir: PathBuf,

    /// Address range for Pods, repeatable (IPv4 or IPv6 CIDR such as
    /// 10.1.0.0/24); with --backend static, this or
    /// --static-node-pod-cidrs.
    #[arg(
        long = "static-range",
        value_name = "CIDR",
        value_parser = parse_range,
        conflicts_with = "static_node_pod_cidrs"
    )]
    pub static_ranges: Vec<Cidr>,

    /// With --backend static: the ranges are the Node's spec.podCIDRs,
    /// which kube-controller-manager assigns with --allocate-node-cidrs.
    #[arg(long)]
    pub static_node_pod_cidrs: bool,

    /// Free addresses the pool tries to keep ready (default: one refill
    /// unit, as aws-vpc-cni keeps an ENI or a prefix warm; 4 on GCP; AWS: an ENI's
    /// secondary addresses, its addresses per ENI less one, 9 on an
    /// m5.large, 29 on an m5.4xlarge; 16, a /28 prefix, with
    /// --aws-prefix-delegation).
    #[arg(long, value_name = "N")]
    pub warm_target: Option<u32>,

    /// Free addresses below which the pool refills at once, without
    /// waiting 100 ms to batch a burst (default: 1, or 0 with
    /// --warm-target 0).
    #[arg(long, value_name = "N")]
    pub min_target: Option<u32>,

    /// Free addresses above which the pool gives addresses back (default:
    /// the warm target plus one refill unit; 16 on GCP).
    #[arg(long, value_name = "N")]
    pub max_target: Option<u32>,

    /// How long a released address stays unused ("300s", "5m", "1h30m");
    /// must cover the load balancers' deregistration delay (NLB default 300s).
    #[arg(long, default_value = "300s", value_parser = duration, value_name = "DURATION")]
    pub cooldown: Duration,

    /// How long an ADD waits for an address when the pool is empty, before
    /// it fails with "try again later" (kubelet's runtime requests time out
    /// after 2m by default).
    #[arg(long, default_value = "60s", value_parser = duration, value_name = "DURATION")]
    pub add_timeout: Duration,

    /// How often leaked cloud resources (detached ENIs) are looked for.
    #[arg(long, default_value = "10m", value_parser = duration, value_name = "DURATION")]
    pub gc_interval: Duration,

    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:9971", value_name = "ADDR")]
    pub metrics_addr: std::net::SocketAddr,

    #[command(flatten)]
    pub aws: crate::backend::aws::AwsArgs,

    #[command(flatten)]
    pub gcp: crate::backend::gcp::GcpArgs,

    /// Log output format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// ENIs and secondary IPs or /28 prefixes in pod subnets.
    Aws,
    /// The node's alias IP range from a subnet secondary range.
    Gcp,
    /// Fixed ranges given with --static-range (on-prem).
    Static,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Aws => "aws",
            Self::Gcp => "gcp",
            Self::Static => "static",
        })
    }
}

impl AgentArgs {
    /// Parses the process arguments; exits with clap's message on error.
    pub fn parse_validated() -> Self {
        Self::try_parse_validated_from(std::env::args_os()).unwrap_or_else(|err| err.exit())
    }

    pub fn try_parse_validated_from<I, T>(argv: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let args = Self::try_parse_from(argv)?;
        args.validate()
            .map_err(|msg| Self::command().error(ErrorKind::ArgumentConflict, msg))?;
        Ok(args)
    }

    fn validate(&self) -> Result<(), String> {
        // Defaults follow the given flags; given ones must be ordered.
        let given = [self.min_target, self.warm_target, self.max_target];
        let ordered = given
            .iter()
            .flatten()
            .zip(given.iter().flatten().skip(1))
            .all(|(lower, upper)| lower <= upper);
        if !ordered {
            let show = |n: Option<u32>| n.map_or("default".to_string(), |n| n.to_string());
            return Err(format!(
                "the pool targets must satisfy --min-target <= --warm-target <= --max-target, \
                 got {} <= {} <= {}",
                show(self.min_target),
                show(self.warm_target),
                show(self.max_target)
            ));
        }
        if self.backend != Backend::Static && !self.static_ranges.is_empty() {
            return Err(format!(
                "--static-range is only used with --backend static, not --backend {}",
                self.backend
            ));
        }
        if self.backend != Backend::Static && self.static_node_pod_cidrs {
            return Err(format!(
                "--static-node-pod-cidrs is only used with --backend static, not --backend {}",
                self.backend
            ));
        }
        if self.backend == Backend::Static
            && self.static_ranges.is_empty()
            && !self.static_node_pod_cidrs
        {
            return Err(
                "--backend static needs --static-range (repeatable) or --static-node-pod-cidrs"
                    .into(),
            );
        }
        if self.backend == Backend::Aws {
            self.aws.validate()?;
        }
        for (i, a) in self.static_ranges.iter().enumerate() {
            for b in &self.static_ranges[i + 1..] {
                if overlaps(a, b) {
                    return Err(format!("--static-range {a} overlaps --static-range {b}"));
                }
            }
        }
        Ok(())
    }
}

/// A range must be a network address: "10.1.0.5/24" is most likely a typo.
fn parse_range(text: &str) -> Result<Cidr, String> {
    let cidr: Cidr = text.parse().map_err(|e| format!("{e}"))?;
    if !cidr.is_network() {
        return Err(format!(
            "host bits are set; did you mean {}?",
            cidr.network()
        ));
    }
    Ok(cidr)
}

fn overlaps(a: &Cidr, b: &Cidr) -> bool {
    let shorter = a.prefix_len().min(b.prefix_len());
    let truncate = |c: &Cidr| Cidr::new(c.addr(), shorter).map(|c| c.network());
    a.addr().is_ipv4() == b.addr().is_ipv4() && truncate(a).ok() == truncate(b).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<AgentArgs, clap::Error> {
        let base = [
            "vpc-ipam-agent",
            "--node-name",
            "node-1",
            "--cluster-name",
            "c1",
        ];
        AgentArgs::try_parse_validated_from(base.iter().chain(extra))
    }

    #[test]
    fn command_is_consistent() {
        AgentArgs::command().debug_assert();
    }

    #[test]
    fn defaults() {
        let args = parse(&["--backend", "aws", "--aws-pod-subnet-tag", "k=v"]).unwrap();
        assert_eq!(args.node_name, "node-1");
        assert_eq!(args.backend, Backend::Aws);
        assert_eq!(args.socket, PathBuf::from("/run/cnlb/vpc-ipam.sock"));
        assert_eq!(args.state_dir, PathBuf::from("/var/lib/cnlb/vpc-ipam"));
        assert!(args.static_ranges.is_empty());
        // The backend's refill unit decides them (pool::TargetFlags).
        assert_eq!(
            (args.min_target, args.warm_target, args.max_target),
            (None, None, None)
        );
        assert_eq!(args.cooldown, NLB_DEFAULT_DEREGISTRATION_DELAY);
        assert_eq!(args.log_format, LogFormat::Text);
    }

    #[test]
    fn static_backend_takes_repeated_ranges() {
        let args = parse(&[
            "--backend",
            "static",
            "--static-range",
            "10.1.0.0/24",
            "--static-range",
            "fd00:10::/64",
        ])
        .unwrap();
        let ranges: Vec<String> = args.static_ranges.iter().map(ToString::to_string).collect();
        assert_eq!(ranges, ["10.1.0.0/24", "fd00:10::/64"]);
    }

    fn rejected(extra: &[&str], needle: &str) {
        let err = parse(extra).unwrap_err();
        assert!(err.to_string().contains(needle), "{extra:?}: {err}");
    }

    #[test]
    fn static_backend_requires_a_range() {
        rejected(&["--backend", "static"], "--static-range");
        rejected(&["--backend", "static"], "--static-node-pod-cidrs");
        let args = parse(&["--backend", "static", "--static-node-pod-cidrs"]).unwrap();
        assert!(args.static_node_pod_cidrs && args.static_ranges.is_empty());
        rejected(
            &[
                "--backend",
                "static",
                "--static-node-pod-cidrs",
                "--static-range",
                "10.1.0.0/24",
            ],
            "--static-range",
        );
        rejected(
            &["--backend", "gcp", "--static-node-pod-cidrs"],
            "--backend static",
        );
    }

    #[test]
    fn bad_ranges_name_the_flag() {
        for range in ["10.1.0.0", "10.1.0.0/33", "banana/8", "10.1.0.5/24"] {
            rejected(
                &["--backend", "static", "--static-range", range],
                "--static-range",
            );
        }
        rejected(
            &["--backend", "static", "--static-range", "10.1.0.5/24"],
            "10.1.0.0/24",
        );
    }

    #[test]
    fn ranges_must_not_overlap_or_stray() {
        rejected(
            &[
                "--backend",
                "static",
                "--static-range",
                "10.0.0.0/16",
                "--static-range",
                "10.0.3.0/24",
            ],
            "overlaps",
        );
        rejected(
            &["--backend", "aws", "--static-range", "10.0.0.0/16"],
            "--backend static",
        );
        parse(&[
            "--backend",
            "static",
            "--static-range",
            "10.0.0.0/24",
            "--static-range",
            "10.0.1.0/24",
        ])
        .unwrap();
    }

    #[test]
    fn targets_must_be_ordered() {
        let given = |min: Option<&'static str>, warm: Option<&'static str>, max| {
            let mut argv = vec!["--backend", "gcp"];
            for (flag, value) in [
                ("--min-target", min),
                ("--warm-target", warm),
                ("--max-target", max),
            ] {
                if let Some(value) = value {
                    argv.extend([flag, value]);
                }
            }
            parse(&argv)
        };
        for (min, warm, max) in [
            (Some("5"), Some("4"), Some("16")),
            (Some("1"), Some("20"), Some("16")),
            (Some("3"), Some("2"), Some("1")),
            (Some("5"), None, Some("4")),
            (None, Some("9"), Some("8")),
        ] {
            let err = given(min, warm, max).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ArgumentConflict);
            assert!(
                err.to_string()
                    .contains("--min-target <= --warm-target <= --max-target"),
                "{err}"
            );
        }
        parse(&[
            "--backend",
            "gcp",
            "--min-target",
            "2",
            "--warm-target",
            "2",
            "--max-target",
            "2",
        ])
        .unwrap();
        // One flag alone: the others' defaults are fitted around it.
        given(None, Some("80"), None).unwrap();
        given(None, None, Some("2")).unwrap();
    }

    #[test]
    fn bad_values_name_their_flag() {
        for (flag, value) in [
            ("--backend", "azure"),
            ("--warm-target", "-1"),
            ("--max-target", "many"),
            ("--cooldown", "5 minutes"),
            ("--log-format", "xml"),
        ] {
            let mut argv = vec!["--backend", "aws"];
            if flag == "--backend" {
                argv.clear();
            }
            let value_arg = format!("{flag}={value}");
            argv.push(&value_arg);
            rejected(&argv, flag);
        }
    }

    #[test]
    fn node_name_must_not_be_empty() {
        let err = AgentArgs::try_parse_validated_from([
            "vpc-ipam-agent",
            "--backend",
            "aws",
            "--node-name=",
        ])
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidValue);
        assert!(err.to_string().contains("--node-name"), "{err}");
    }
}
