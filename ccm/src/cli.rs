//! Command-line interface. Every value is validated here, so a bad flag stops
//! the process with a message naming the flag before anything else starts.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{ArgAction, Parser, ValueEnum};
use cnlb_cloud_calls::adaptive::Window;
use cnlb_cloud_calls::{RateLimit, RateLimits};
use cnlb_provider_onprem::{ClientTls, PemFile, PluginEndpoint};
use cnlb_runtime::flags::positive_duration;
pub use cnlb_runtime::telemetry::LogFormat;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "cnlb-ccm",
    version,
    about = "Turns type=LoadBalancer Services into load balancers that target Pod IPs"
)]
pub struct Args {
    /// Name of this cluster; tags every cloud resource the controller owns.
    #[arg(long, env = "CNLB_CLUSTER_NAME", value_parser = parse_cluster_name)]
    pub cluster_name: String,

    /// Cloud (or on-prem) provider that implements the load balancers.
    #[arg(long, value_enum)]
    pub provider: Provider,

    /// spec.loadBalancerClass of the Services this controller manages.
    #[arg(long, default_value = "cnlb.dev/nlb", value_parser = parse_load_balancer_class)]
    pub load_balancer_class: String,

    /// Also manage type=LoadBalancer Services that set no loadBalancerClass.
    #[arg(long)]
    pub manage_unclassed: bool,

    /// Also manage class-less Services that carry aws-load-balancer-controller's
    /// NLB IP-mode opt-in (aws-load-balancer-type: external + nlb-target-type:
    /// ip), so they move over unchanged. Do not run both controllers on them.
    #[arg(long)]
    pub manage_lbc_annotated: bool,

    /// Path to a kubeconfig file; without it, KUBECONFIG or the in-cluster
    /// service account is used.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,

    /// Run the controllers only while holding a coordination.k8s.io Lease
    /// (use --leader-elect=false to disable).
    #[arg(
        long,
        action = ArgAction::Set,
        default_value_t = true,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    pub leader_elect: bool,

    /// Name of the leader-election Lease.
    #[arg(long, default_value = "cnlb-ccm", value_parser = parse_dns_subdomain)]
    pub leader_elect_lease_name: String,

    /// Namespace of the leader-election Lease.
    #[arg(long, default_value = "kube-system", value_parser = parse_dns_label)]
    pub leader_elect_namespace: String,

    /// Address of the HTTP server for /metrics, /healthz and /readyz;
    /// "0" disables the server (probes included).
    #[arg(long, default_value = "0.0.0.0:10258", value_name = "ADDR")]
    pub metrics_bind_address: BindAddress,

    /// Log output format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// VPC of the cluster's Pods and load balancers (--provider=aws).
    #[arg(
        long,
        env = "AWS_VPC_ID",
        value_name = "VPC_ID",
        required_if_eq("provider", "aws"),
        value_parser = parse_vpc_id
    )]
    pub aws_vpc_id: Option<String>,

    /// The on-prem provider plugin's gRPC endpoint (--provider=onprem):
    /// unix:///path.sock or tcp://ip:port (see --onprem-plugin-tls-ca).
    #[arg(long, value_name = "ENDPOINT", required_if_eq("provider", "onprem"))]
    pub onprem_plugin: Option<PluginEndpoint>,

    /// CA certificate(s) (PEM) the plugin's certificate must chain to:
    /// mutual TLS to a tcp:// --onprem-plugin, with
    /// --onprem-plugin-tls-cert and --onprem-plugin-tls-key. Files are read
    /// at start: restart to rotate them.
    #[arg(
        long,
        value_name = "PATH",
        requires = "onprem_plugin",
        requires = "onprem_plugin_tls_cert",
        requires = "onprem_plugin_tls_key"
    )]
    pub onprem_plugin_tls_ca: Option<PathBuf>,

    /// The client certificate (PEM) cnlb-ccm presents to the plugin; the
    /// plugin's --tls-client-ca must have issued it.
    #[arg(long, value_name = "PATH", requires = "onprem_plugin_tls_ca")]
    pub onprem_plugin_tls_cert: Option<PathBuf>,

    /// The private key of --onprem-plugin-tls-cert (PEM, unencrypted).
    #[arg(long, value_name = "PATH", requires = "onprem_plugin_tls_ca")]
    pub onprem_plugin_tls_key: Option<PathBuf>,

    /// The name the plugin's certificate must carry as a subject
    /// alternative name (DNS). Default: the IP address of --onprem-plugin,
    /// which must then be an IP SAN of the plugin's certificate.
    #[arg(
        long,
        value_name = "NAME",
        requires = "onprem_plugin_tls_ca",
        value_parser = parse_tls_server_name
    )]
    pub onprem_plugin_tls_server_name: Option<String>,

    /// AWS Describe* calls: the most tokens per second / burst; the rate
    /// in use adapts below it when AWS throttles (--provider=aws).
    #[arg(long, default_value = "20/40", value_name = "RATE/BURST")]
    pub aws_read_rate: RateLimit,

    /// AWS RegisterTargets / DeregisterTargets calls (200 targets each at
    /// most): the most tokens per second / burst.
    #[arg(long, default_value = "10/20", value_name = "RATE/BURST")]
    pub aws_targets_rate: RateLimit,

    /// AWS create / modify / delete calls: the most tokens per second / burst.
    #[arg(long, default_value = "10/20", value_name = "RATE/BURST")]
    pub aws_write_rate: RateLimit,

    /// Attach one shared backend security group to every NLB and open the
    /// target ports (and health-check ports) from it on the security groups
    /// of the targets' ENIs, as aws-load-balancer-controller does; false if
    /// you manage those rules yourself (--provider=aws).
    #[arg(
        long,
        action = ArgAction::Set,
        default_value_t = true,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    pub aws_backend_security_group: bool,

    /// GCP project of the cluster (--provider=gcp).
    #[arg(long, env = "GOOGLE_CLOUD_PROJECT", required_if_eq("provider", "gcp"))]
    pub gcp_project: Option<String>,

    /// GCP region of the cluster and its load balancers (--provider=gcp).
    #[arg(long, value_name = "REGION", required_if_eq("provider", "gcp"))]
    pub gcp_region: Option<String>,

    /// VPC network of the nodes (--provider=gcp).
    #[arg(long, value_name = "NETWORK", required_if_eq("provider", "gcp"))]
    pub gcp_network: Option<String>,

    /// Subnetwork of the nodes: NEGs and internal addresses live in it
    /// (--provider=gcp).
    #[arg(long, value_name = "SUBNETWORK", required_if_eq("provider", "gcp"))]
    pub gcp_subnetwork: Option<String>,

    /// Zones of the cluster, comma-separated; every Service port gets a NEG
    /// in each up front. Default: every zone of --gcp-region.
    #[arg(long, value_name = "ZONE,...", value_delimiter = ',')]
    pub gcp_zones: Vec<String>,

    /// The region's proxy-only subnet range (repeatable): the proxies
    /// connect to Pods from it, so the firewall rule admits it with the
    /// health checkers' ranges.
    #[arg(long, value_name = "CIDR")]
    pub gcp_proxy_source_range: Vec<String>,

    /// Compute API base URL; unset means compute.googleapis.com with
    /// Application Default Credentials. Another URL is called without
    /// credentials (an emulator).
    #[arg(long, value_name = "URL")]
    pub gcp_endpoint: Option<String>,

    /// GCE's quota of each API method group, in calls a minute per project
    /// (1,500 by default; read, write and operation-read requests are
    /// separate groups). cnlb sends at most 96 % of it in any minute,
    /// however fast its --gcp-*-rate ceilings would go, and less when GCE
    /// throttles (--provider=gcp).
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u32).range(1..), value_name = "CALLS")]
    pub gcp_quota_per_minute: u32,

    /// GCP get / list calls: the most tokens per second / burst; the rate
    /// in use adapts below it when GCE throttles (--provider=gcp). Reads
    /// default to the quota's steady pace: a burst that used up a minute's
    /// reads would stall every health poll until the minute ends.
    #[arg(long, default_value = "24/24", value_name = "RATE/BURST")]
    pub gcp_read_rate: RateLimit,

    /// GCP attach / detach network endpoint calls (500 endpoints each at
    /// most): the most tokens per second / burst.
    #[arg(long, default_value = "100/100", value_name = "RATE/BURST")]
    pub gcp_targets_rate: RateLimit,

    /// GCP insert / patch / delete calls: the most tokens per second / burst.
    #[arg(long, default_value = "100/100", value_name = "RATE/BURST")]
    pub gcp_write_rate: RateLimit,

    /// GCP waits for operations (one or more per insert, patch, delete,
    /// attach or detach): the most tokens per second / burst.
    #[arg(long, default_value = "100/100", value_name = "RATE/BURST")]
    pub gcp_operation_rate: RateLimit,

    /// Maximum number of objects reconciled at the same time; bounded so
    /// that a burst cannot flood a rate-limited cloud API.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub concurrency: u16,

    /// Controllers to run, comma-separated, as kube-controller-manager
    /// names them: service, cloud-node, cloud-node-lifecycle; "*" for all,
    /// "-NAME" to leave one out (e.g. "*,-cloud-node-lifecycle").
    #[arg(long, default_value = "*", value_name = "NAME,...", value_parser = parse_controllers)]
    pub controllers: Controllers,

    /// How often the instances of NotReady Nodes are checked
    /// (cloud-node-lifecycle), e.g. 5s.
    #[arg(long, default_value = "5s", value_name = "DURATION", value_parser = positive_duration)]
    pub node_monitor_period: Duration,

    /// How often the Nodes' addresses are synced from their instances
    /// (cloud-node), e.g. 5m.
    #[arg(long, default_value = "5m", value_name = "DURATION", value_parser = positive_duration)]
    pub node_status_update_frequency: Duration,
}

impl Args {
    /// The GCP client-side limits: the --gcp-*-rate ceilings, and just
    /// under the quota in any minute (GCE counts a call when it receives
    /// it, some time after it is sent).
    pub fn gcp_rate_limits(&self) -> RateLimits {
        let quota = self.gcp_quota_per_minute;
        RateLimits {
            read: self.gcp_read_rate,
            targets: self.gcp_targets_rate,
            write: self.gcp_write_rate,
            operations: self.gcp_operation_rate,
            per_window: Some(Window {
                calls: quota - quota / 25,
                span: Duration::from_secs(60),
            }),
        }
    }

    /// Mutual TLS to a tcp:// --onprem-plugin, from the
    /// --onprem-plugin-tls-* files (read and checked now, so a bad file
    /// stops the start naming its flag); `None` without them.
    pub fn onprem_plugin_tls(&self) -> Result<Option<ClientTls>, String> {
        let (Some(ca), Some(cert), Some(key)) = (
            &self.onprem_plugin_tls_ca,
            &self.onprem_plugin_tls_cert,
            &self.onprem_plugin_tls_key,
        ) else {
            // clap requires the three together.
            return Ok(None);
        };
        if let Some(endpoint @ PluginEndpoint::Unix(_)) = &self.onprem_plugin {
            return Err(format!(
                "--onprem-plugin-tls-ca, --onprem-plugin-tls-cert and --onprem-plugin-tls-key \
                 are for a tcp:// --onprem-plugin; {endpoint} is a unix socket, guarded by its \
                 file mode"
            ));
        }
        ClientTls::load(
            &PemFile::new("--onprem-plugin-tls-ca", ca),
            &PemFile::new("--onprem-plugin-tls-cert", cert),
            &PemFile::new("--onprem-plugin-tls-key", key),
            self.onprem_plugin_tls_server_name.as_deref(),
        )
        .map(Some)
        .map_err(|e| e.to_string())
    }
}

fn parse_tls_server_name(s: &str) -> Result<String, String> {
    cnlb_provider_onprem::tls::check_server_name(s)?;
    Ok(s.to_string())
}

/// The controllers `--controllers` enables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Controllers {
    pub service: bool,
    pub cloud_node: bool,
    pub cloud_node_lifecycle: bool,
}

const CONTROLLERS: [&str; 3] = ["service", "cloud-node", "cloud-node-lifecycle"];

fn parse_controllers(s: &str) -> Result<Controllers, String> {
    let mut on = std::collections::BTreeSet::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (remove, name) = match item.strip_prefix('-') {
            Some(name) => (true, name),
            None => (false, item),
        };
        let names: Vec<&str> = match name {
            "*" => CONTROLLERS.to_vec(),
            n if CONTROLLERS.contains(&n) => vec![n],
            n => {
                return Err(format!(
                    "unknown controller {n:?}: the controllers are {}",
                    CONTROLLERS.join(", ")
                ));
            }
        };
        for n in names {
            if remove {
                on.remove(n);
            } else {
                on.insert(n);
            }
        }
    }
    Ok(Controllers {
        service: on.contains("service"),
        cloud_node: on.contains("cloud-node"),
        cloud_node_lifecycle: on.contains("cloud-node-lifecycle"),
    })
}

fn parse_vpc_id(s: &str) -> Result<String, String> {
    let ok = s
        .strip_prefix("vpc-")
        .is_some_and(|rest| !rest.is_empty() && rest.chars().all(|c| c.is_ascii_hexdigit()));
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a VPC ID (vpc- followed by hex digits)"
        ))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Provider {
    Aws,
    Gcp,
    Onprem,
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Aws => "aws",
            Self::Gcp => "gcp",
            Self::Onprem => "onprem",
        })
    }
}

/// Where the HTTP server listens, or `Disabled` for "0".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindAddress {
    Disabled,
    Addr(SocketAddr),
}

impl FromStr for BindAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "0" {
            return Ok(Self::Disabled);
        }
        s.parse()
            .map(Self::Addr)
            .map_err(|_| "expected HOST:PORT (for example 0.0.0.0:10258) or 0 to disable".into())
    }
}

impl fmt::Display for BindAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Disabled => f.write_str("0"),
            Self::Addr(addr) => addr.fmt(f),
        }
    }
}

/// Cluster names end up in cloud tags and resource names: accept what EKS
/// and GKE accept for cluster names (letters, digits, '-', '_'; at most 100).
fn parse_cluster_name(s: &str) -> Result<String, String> {
    let starts_alnum = s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    let valid_chars = s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if s.len() > 100 || !starts_alnum || !valid_chars {
        return Err("must be 1-100 characters of letters, digits, '-' or '_', \
             starting with a letter or digit"
            .into());
    }
    Ok(s.to_owned())
}

/// A Kubernetes loadBalancerClass is a label-style key; unprefixed names are
/// reserved for end users, so ours must carry a DNS prefix.
fn parse_load_balancer_class(s: &str) -> Result<String, String> {
    let Some((prefix, name)) = s.split_once('/') else {
        return Err("must be prefixed, like example.com/name".into());
    };
    parse_dns_subdomain(prefix).map_err(|e| format!("prefix {prefix:?} {e}"))?;
    let edges_alnum = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    let valid_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if name.len() > 63 || !edges_alnum || !valid_chars {
        return Err(format!(
            "name {name:?} must be at most 63 characters of letters, digits, '-', '_' or '.', \
             starting and ending with a letter or digit"
        ));
    }
    Ok(s.to_owned())
}

/// RFC 1123 label, as Kubernetes requires for namespace names.
fn parse_dns_label(s: &str) -> Result<String, String> {
    if is_dns_label(s) {
        Ok(s.to_owned())
    } else {
        Err(
            "must be a DNS label: at most 63 lowercase letters, digits or '-', \
             starting and ending with a letter or digit"
                .into(),
        )
    }
}

/// RFC 1123 subdomain, as Kubernetes requires for most object names.
fn parse_dns_subdomain(s: &str) -> Result<String, String> {
    if s.len() <= 253 && s.split('.').all(is_dns_label) {
        Ok(s.to_owned())
    } else {
        Err(
            "must be a DNS subdomain: dot-separated lowercase labels of letters, digits or '-', \
             at most 253 characters"
                .into(),
        )
    }
}

fn is_dns_label(s: &str) -> bool {
    let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| valid(c) || c == '-')
        && s.chars().next().is_some_and(valid)
        && s.chars().last().is_some_and(valid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(extra: &[&str]) -> Result<Args, clap::Error> {
        let base = [
            "cnlb-ccm",
            "--cluster-name",
            "demo",
            "--provider",
            "aws",
            "--aws-vpc-id=vpc-0a1b",
        ];
        Args::try_parse_from(base.iter().chain(extra))
    }

    #[test]
    fn aws_needs_a_valid_vpc_id() {
        let bare = ["cnlb-ccm", "--cluster-name", "demo", "--provider", "aws"];
        let err = Args::try_parse_from(bare).unwrap_err().to_string();
        assert!(err.contains("--aws-vpc-id"), "{err}");
        let bad = [
            "cnlb-ccm",
            "--cluster-name=demo",
            "--provider=aws",
            "--aws-vpc-id=subnet-1",
        ];
        let err = Args::try_parse_from(bad).unwrap_err().to_string();
        assert!(
            err.contains("--aws-vpc-id") && err.contains("not a VPC ID"),
            "{err}"
        );
    }

    #[test]
    fn aws_rates_parse_and_reject_nonsense() {
        let args = parse(&["--aws-write-rate=4/8"]).unwrap();
        assert_eq!(args.aws_write_rate, RateLimit::new(4, 8));
        assert_eq!(args.aws_read_rate, RateLimit::new(20, 40));
        let err = parse(&["--aws-targets-rate=0/5"]).unwrap_err().to_string();
        assert!(err.contains("--aws-targets-rate"), "{err}");
        assert!(parse(&["--aws-read-rate=fast"]).is_err());
    }

    #[test]
    fn command_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn controllers_are_named_as_kube_controller_manager_names_them() {
        let all = Controllers {
            service: true,
            cloud_node: true,
            cloud_node_lifecycle: true,
        };
        assert_eq!(parse(&[]).unwrap().controllers, all);
        let only = parse(&["--controllers=service"]).unwrap().controllers;
        assert_eq!(
            (only.service, only.cloud_node, only.cloud_node_lifecycle),
            (true, false, false)
        );
        let but = parse(&["--controllers=*,-cloud-node-lifecycle"])
            .unwrap()
            .controllers;
        assert_eq!(
            (but.service, but.cloud_node, but.cloud_node_lifecycle),
            (true, true, false)
        );
        let err = parse(&["--controllers=service,nodes"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--controllers") && err.contains("\"nodes\""),
            "{err}"
        );
    }

    #[test]
    fn node_periods_are_durations() {
        let args = parse(&[]).unwrap();
        assert_eq!(args.node_monitor_period, Duration::from_secs(5));
        assert_eq!(args.node_status_update_frequency, Duration::from_secs(300));
        let args = parse(&["--node-monitor-period=1m30s"]).unwrap();
        assert_eq!(args.node_monitor_period, Duration::from_secs(90));
        for bad in ["often", "0s", "-5s"] {
            let err = parse(&[&format!("--node-monitor-period={bad}")])
                .unwrap_err()
                .to_string();
            assert!(err.contains("--node-monitor-period"), "{bad}: {err}");
        }
    }

    #[test]
    fn defaults() {
        let args = parse(&[]).unwrap();
        assert_eq!(args.cluster_name, "demo");
        assert_eq!(args.provider, Provider::Aws);
        assert_eq!(args.load_balancer_class, "cnlb.dev/nlb");
        assert!(!args.manage_unclassed);
        assert_eq!(args.kubeconfig, None);
        assert!(args.leader_elect);
        assert_eq!(args.leader_elect_lease_name, "cnlb-ccm");
        assert_eq!(args.leader_elect_namespace, "kube-system");
        assert_eq!(
            args.metrics_bind_address,
            BindAddress::Addr("0.0.0.0:10258".parse().unwrap())
        );
        assert_eq!(args.log_format, LogFormat::Text);
        assert_eq!(args.concurrency, 8);
    }

    #[test]
    fn explicit_values() {
        let args = parse(&[
            "--manage-unclassed",
            "--leader-elect=false",
            "--metrics-bind-address",
            "0",
            "--log-format",
            "json",
            "--concurrency",
            "3",
            "--kubeconfig",
            "/tmp/kc",
            "--load-balancer-class",
            "example.com/edge",
        ])
        .unwrap();
        assert!(args.manage_unclassed);
        assert!(!args.leader_elect);
        assert_eq!(args.metrics_bind_address, BindAddress::Disabled);
        assert_eq!(args.log_format, LogFormat::Json);
        assert_eq!(args.concurrency, 3);
        assert_eq!(args.kubeconfig, Some(PathBuf::from("/tmp/kc")));
        assert_eq!(args.load_balancer_class, "example.com/edge");
    }

    #[test]
    fn bare_leader_elect_means_true() {
        assert!(parse(&["--leader-elect"]).unwrap().leader_elect);
    }

    #[test]
    fn cluster_name_is_required() {
        let err = Args::try_parse_from(["cnlb-ccm", "--provider", "gcp"]).unwrap_err();
        assert!(err.to_string().contains("--cluster-name"), "{err}");
    }

    #[test]
    fn gcp_needs_its_project_region_and_network() {
        let base = ["cnlb-ccm", "--cluster-name", "demo", "--provider", "gcp"];
        let err = Args::try_parse_from(base).unwrap_err();
        assert!(err.to_string().contains("--gcp-region"), "{err}");
        let required = [
            "--gcp-project",
            "p",
            "--gcp-region",
            "us-central1",
            "--gcp-network",
            "net",
            "--gcp-subnetwork",
            "nodes",
            "--gcp-zones",
            "us-central1-a,us-central1-b",
        ];
        let with = |flag: &str| Args::try_parse_from(base.iter().chain(&required).chain(&[flag]));
        let args = Args::try_parse_from(base.iter().chain(&required)).unwrap();
        assert_eq!(args.gcp_zones, vec!["us-central1-a", "us-central1-b"]);
        assert_eq!(args.gcp_endpoint, None);
        let limits = args.gcp_rate_limits();
        assert_eq!(limits.read, RateLimit::new(24, 24));
        assert_eq!(limits.write, RateLimit::new(100, 100));
        let minute = Duration::from_secs(60);
        let window = |calls| {
            Some(Window {
                calls,
                span: minute,
            })
        };
        assert_eq!(limits.per_window, window(1440), "96 % of GCE's default");
        for (quota, calls) in [("6000", 5760), ("1", 1)] {
            let flag = format!("--gcp-quota-per-minute={quota}");
            let args = with(&flag).unwrap();
            assert_eq!(args.gcp_rate_limits().per_window, window(calls));
        }
        for bad in ["0", "-5", "many"] {
            let flag = format!("--gcp-quota-per-minute={bad}");
            let err = with(&flag).unwrap_err();
            assert!(err.to_string().contains("--gcp-quota-per-minute"), "{err}");
        }
    }

    #[test]
    fn onprem_needs_its_plugin_endpoint() {
        let base = ["cnlb-ccm", "--cluster-name", "demo", "--provider", "onprem"];
        let err = Args::try_parse_from(base).unwrap_err();
        assert!(err.to_string().contains("--onprem-plugin"), "{err}");
        let args = Args::try_parse_from(
            base.iter()
                .chain(&["--onprem-plugin", "unix:///run/p.sock"]),
        )
        .unwrap();
        assert_eq!(
            args.onprem_plugin.unwrap().to_string(),
            "unix:///run/p.sock"
        );
        let err =
            Args::try_parse_from(base.iter().chain(&["--onprem-plugin", "http://x"])).unwrap_err();
        assert!(err.to_string().contains("--onprem-plugin"), "{err}");
    }

    #[test]
    fn onprem_plugin_tls_errors_name_their_flag() {
        let onprem = |extra: &[&str]| {
            let base = ["cnlb-ccm", "--cluster-name", "demo", "--provider", "onprem"];
            Args::try_parse_from(base.iter().chain(extra))
        };
        let tls = |plugin: &str, ca: &str| {
            onprem(&[
                "--onprem-plugin",
                plugin,
                "--onprem-plugin-tls-ca",
                ca,
                "--onprem-plugin-tls-cert",
                "/nonexistent/tls.crt",
                "--onprem-plugin-tls-key",
                "/nonexistent/tls.key",
            ])
            .unwrap()
            .onprem_plugin_tls()
            .map(|tls| tls.is_some())
        };
        // The three files go together, and with a plugin endpoint.
        let tcp = ["--onprem-plugin", "tcp://192.0.2.10:50051"];
        let err = onprem(&[&tcp[..], &["--onprem-plugin-tls-ca", "/ca.pem"]].concat()).unwrap_err();
        assert!(
            err.to_string().contains("--onprem-plugin-tls-cert"),
            "{err}"
        );
        let err = onprem(&[&tcp[..], &["--onprem-plugin-tls-key", "/k.pem"]].concat()).unwrap_err();
        assert!(err.to_string().contains("--onprem-plugin-tls-ca"), "{err}");
        let err = parse(&["--onprem-plugin-tls-ca=/ca.pem"]).unwrap_err();
        assert!(err.to_string().contains("--onprem-plugin"), "{err}");
        let err = onprem(&[&tcp[..], &["--onprem-plugin-tls-server-name", "a b"]].concat());
        let err = err.unwrap_err().to_string();
        assert!(err.contains("--onprem-plugin-tls-server-name"), "{err}");
        // Without them: plaintext, no files read.
        assert_eq!(
            onprem(&tcp)
                .unwrap()
                .onprem_plugin_tls()
                .map(|t| t.is_some()),
            Ok(false)
        );

        // TLS is for tcp:// endpoints.
        let err = tls("unix:///run/p.sock", "/ca.pem").unwrap_err();
        assert!(
            err.contains("--onprem-plugin-tls-ca") && err.contains("unix"),
            "{err}"
        );
        // Files are read at start; an unreadable or non-PEM one is named.
        let err = tls(tcp[1], "/nonexistent/ca.pem").unwrap_err();
        assert!(
            err.starts_with("--onprem-plugin-tls-ca /nonexistent/ca.pem: cannot read it"),
            "{err}"
        );
        let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let err = tls(tcp[1], manifest).unwrap_err();
        assert_eq!(
            err,
            format!(
                "--onprem-plugin-tls-ca {manifest}: no PEM CERTIFICATE block (no PEM block at all)"
            )
        );
    }

    #[test]
    fn zero_concurrency_is_rejected_naming_the_flag() {
        let err = parse(&["--concurrency", "0"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(err.to_string().contains("--concurrency"), "{err}");
    }

    #[test]
    fn bad_values_name_their_flag() {
        for (flag, value) in [
            ("--cluster-name", "-bad"),
            ("--cluster-name", ""),
            ("--provider", "azure"),
            ("--metrics-bind-address", "localhost"),
            ("--log-format", "xml"),
            ("--load-balancer-class", "nlb"),
            ("--load-balancer-class", "Example.com/nlb"),
            ("--leader-elect-namespace", "Kube_System"),
            ("--leader-elect-lease-name", "Lease"),
            ("--concurrency", "257"),
        ] {
            // Keep the required flags, except the one under test.
            let mut argv = vec!["cnlb-ccm"];
            for (required, default) in [("--cluster-name", "demo"), ("--provider", "aws")] {
                if required != flag {
                    argv.extend([required, default]);
                }
            }
            // "--flag=value", so a value like "-bad" is not taken for a flag.
            let pair = format!("{flag}={value}");
            argv.push(&pair);
            let err = Args::try_parse_from(argv).unwrap_err();
            assert!(
                matches!(
                    err.kind(),
                    clap::error::ErrorKind::ValueValidation | clap::error::ErrorKind::InvalidValue
                ),
                "{flag} {value}: {err}"
            );
            assert!(err.to_string().contains(flag), "{flag} {value}: {err}");
        }
    }
}
