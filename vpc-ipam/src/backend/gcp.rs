//! GCP, GKE style: a node's Pod addresses are an alias IP range on its
//! instance's first network interface (`nic0`), carved out of a secondary
//! range of the instance's subnetwork (`--gcp-pod-range-name`, default
//! `pods`). GCE routes the whole range to the instance, so nothing is
//! assigned per Pod, and cloud-provider-gcp's CloudAllocator copies the
//! range into `node.spec.podCIDRs`.
//!
//! On start the backend reads `nic0` (`instances.get`). Alias ranges that
//! come from the configured secondary range are the node's Pod ranges,
//! whatever their size. When there is none, it asks for one:
//! `instances.updateNetworkInterface` with `/<--gcp-alias-size>` (a netmask
//! only: GCE picks a free block of the secondary range), the ranges `nic0`
//! already has, and the interface's fingerprint; it waits for the zone
//! operation and reads `nic0` again to learn the block. If `nic0` changed
//! between the read and the update (412 conditionNotMet: another agent,
//! an operator, GKE), it reads `nic0` again and decides again, at most
//! [`MAX_UPDATE_ATTEMPTS`] times; a range someone else added meanwhile is
//! taken as it is. An update retried after it succeeded fails the same way
//! (the fingerprint changed), so no second range is ever added.
//!
//! **Alias ranges from other ranges.** When `nic0` has alias ranges but
//! none from the configured secondary range, start fails with a permanent
//! error naming them (most likely `--gcp-pod-range-name` names the wrong
//! range, e.g. on GKE the cluster's pod range is `gke-<cluster>-pods-<id>`):
//! the agent neither hands out addresses of a range it was not told to use
//! (it may serve something else on the VM) nor adds a second range beside
//! it. Alias ranges from other ranges beside one from the configured range
//! are left alone.
//!
//! **Capacity.** Every address of the node's ranges but, as with static
//! ranges, the network address, the first host (the Pods' gateway, which
//! Debian's ptp plugin puts on the host side of each Pod's veth) and the
//! broadcast address: 253 Pods in a /24. GCE reserves no address inside
//! alias ranges, so these three are the only ones skipped. The range stays
//! the node's (nothing is given back to the cloud), so after start the pool
//! is fixed and Compute is not called again until the next start.
//!
//! **Project.** The instance, and the project whose zone operations are
//! waited for, come from the Node's `spec.providerID`
//! (`gce://<project>/<zone>/<instance>`), read once when the backend is
//! made; the subnetwork's project comes from its URL (the host project
//! with Shared VPC).

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use clap::Args;
use cnlb_cloud_calls::{RateLimit, RateLimits};
use cnlb_provider_core::ProviderError;
use cnlb_provider_gcp::Connection;
use cnlb_provider_gcp::ipam::{AliasRange, GcpIpam, InstanceRef, NIC0, Nic, SubnetInfo};
use prometheus_client::registry::Registry;

use super::static_ranges::usable_addresses;
use super::{
    Assigned, Backend, BackendError, BackendResult, backend_error, kube_client, node_provider_id,
};
use crate::cidr::Cidr;

/// Updates of `nic0` tried before start gives up for this round (each
/// after reading `nic0` again); the agent retries start after a pause.
pub const MAX_UPDATE_ATTEMPTS: usize = 5;

/// How long making the backend waits for the Node's `spec.providerID`
/// (the cloud controller manager sets it when it initialises the Node).
const PROVIDER_ID_WAIT: Duration = Duration::from_secs(60);
const PROVIDER_ID_POLL: Duration = Duration::from_secs(2);

/// Flags of the GCP backend (`--backend gcp`).
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "GCP backend (--backend gcp)")]
pub struct GcpArgs {
    /// Secondary range of the instance's subnetwork that the node's alias
    /// IP range comes from (on GKE the cluster's pod range).
    #[arg(long, default_value = "pods", value_name = "NAME", value_parser = parse_range_name)]
    pub gcp_pod_range_name: String,

    /// Prefix length of the alias IP range asked for when nic0 has none
    /// (24: 253 Pods); an existing range is used whatever its size.
    #[arg(
        long,
        default_value_t = 24,
        value_name = "PREFIX_LENGTH",
        value_parser = clap::value_parser!(u8).range(16..=28)
    )]
    pub gcp_alias_size: u8,

    /// Base URL of the Compute API (e.g. http://127.0.0.1:8080 for an
    /// emulator, called without credentials); default
    /// https://compute.googleapis.com with Application Default Credentials
    /// (on GKE, Workload Identity).
    #[arg(long, value_name = "URL", value_parser = parse_endpoint)]
    pub gcp_endpoint: Option<String>,

    /// Compute get calls: the most tokens per second / burst; the rate in
    /// use adapts below it when GCE throttles.
    #[arg(long, default_value = "20/40", value_name = "RATE/BURST")]
    pub gcp_read_rate: RateLimit,

    /// Compute updates (instances.updateNetworkInterface): the most tokens
    /// per second / burst.
    #[arg(long, default_value = "10/20", value_name = "RATE/BURST")]
    pub gcp_write_rate: RateLimit,

    /// Waits for the updates' operations: the most tokens per second /
    /// burst.
    #[arg(long, default_value = "10/20", value_name = "RATE/BURST")]
    pub gcp_operation_rate: RateLimit,
}

impl GcpArgs {
    fn rate_limits(&self) -> RateLimits {
        RateLimits {
            read: self.gcp_read_rate,
            write: self.gcp_write_rate,
            operations: self.gcp_operation_rate,
            ..RateLimits::default()
        }
    }
}

/// A GCE resource name: a lowercase letter, then up to 62 lowercase
/// letters, digits or dashes, not ending in a dash.
fn parse_range_name(s: &str) -> Result<String, String> {
    let ok = (1..=63).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && !s.ends_with('-')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a secondary range name (lowercase letters, digits and '-', \
             starting with a letter, like pods)"
        ))
    }
}

fn parse_endpoint(s: &str) -> Result<String, String> {
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"));
    match rest {
        Some(host) if !host.is_empty() && !host.starts_with('/') => {
            Ok(s.trim_end_matches('/').to_string())
        }
        _ => Err(format!(
            "{s:?}: expected an http:// or https:// URL, like http://127.0.0.1:8080"
        )),
    }
}

pub struct GcpBackend {
    cloud: GcpIpam,
    instance: InstanceRef,
    args: GcpArgs,
    /// The usable addresses of the node's alias ranges, found by `start`.
    addresses: Mutex<Vec<Assigned>>,
}

impl GcpBackend {
    /// The backend of Node `node_name`: reads its `spec.providerID`
    /// (waiting up to a minute for it), and connects to Compute; the
    /// `cnlb_cloud_api_*` metrics go into `registry`. Compute is not
    /// called yet: [`Backend::start`] reads the instance.
    pub async fn new(
        args: &GcpArgs,
        node_name: &str,
        registry: &mut Registry,
    ) -> BackendResult<GcpBackend> {
        let kube = kube_client().await?;
        let provider_id = wait_for_provider_id(&kube, node_name).await?;
        let instance = InstanceRef::from_provider_id(&provider_id).ok_or_else(|| {
            BackendError::Permanent(format!(
                "Node {node_name}: spec.providerID {provider_id:?} is not gce://PROJECT/ZONE/INSTANCE"
            ))
        })?;
        let connection = Connection {
            endpoint: args.gcp_endpoint.clone(),
        };
        let cloud = GcpIpam::connect(
            &connection,
            &instance.project,
            &args.rate_limits(),
            registry,
        )
        .await
        .map_err(backend_error)?;
        Ok(GcpBackend {
            cloud,
            instance,
            args: args.clone(),
            addresses: Mutex::new(Vec::new()),
        })
    }

    async fn nic0(&self) -> BackendResult<Nic> {
        self.cloud.nic0(&self.instance).await.map_err(backend_error)
    }

    /// The node's Pod ranges, asked for when `nic0` has none.
    async fn ensure_pod_ranges(&self) -> BackendResult<Vec<Cidr>> {
        let name = &self.args.gcp_pod_range_name;
        let instance = &self.instance;
        let mut nic = self.nic0().await?;
        let mut request: Option<AliasRange> = None;
        let mut attempts = 0;
        loop {
            let ranges = pod_ranges(&nic, name).map_err(|msg| {
                BackendError::Permanent(format!("instance {instance} {}: {msg}", nic.name))
            })?;
            if !ranges.is_empty() {
                return Ok(ranges);
            }
            if attempts == MAX_UPDATE_ATTEMPTS {
                return Err(BackendError::Transient(format!(
                    "instance {instance} {} changed during each of {attempts} attempts to add \
                     an alias IP range; trying again later",
                    nic.name
                )));
            }
            attempts += 1;
            let ask = match &request {
                Some(ask) => ask.clone(),
                None => {
                    let ask = self.alias_request(&nic).await?;
                    request = Some(ask.clone());
                    ask
                }
            };
            match self.cloud.add_alias_range(instance, &nic, &ask).await {
                Ok(()) => tracing::info!(
                    %instance, nic = %nic.name, range = %ask.cidr, secondary_range = %name,
                    "added an alias IP range for Pods"
                ),
                Err(ProviderError::Conflict { reason, .. }) => tracing::warn!(
                    %instance, nic = %nic.name, %reason, attempt = attempts,
                    "the network interface changed since it was read; reading it again"
                ),
                Err(e) => return Err(backend_error(e)),
            }
            nic = self.nic0().await?;
        }
    }

    /// What to ask GCE for: `/<--gcp-alias-size>` from the configured
    /// secondary range, which must exist and be large enough.
    async fn alias_request(&self, nic: &Nic) -> BackendResult<AliasRange> {
        let Some(subnetwork) = &nic.subnetwork else {
            return Err(BackendError::Permanent(format!(
                "instance {} {} names no subnetwork",
                self.instance, nic.name
            )));
        };
        let subnet = self
            .cloud
            .subnetwork(subnetwork)
            .await
            .map_err(backend_error)?;
        alias_request(
            &subnet,
            &self.args.gcp_pod_range_name,
            self.args.gcp_alias_size,
        )
        .map_err(|msg| BackendError::Permanent(format!("subnetwork {subnetwork}: {msg}")))
    }
}

/// Polls the Node until it has a `spec.providerID`, for at most
/// [`PROVIDER_ID_WAIT`].
async fn wait_for_provider_id(kube: &kube::Client, node_name: &str) -> BackendResult<String> {
    let deadline = tokio::time::Instant::now() + PROVIDER_ID_WAIT;
    let mut logged = false;
    loop {
        match node_provider_id(kube, node_name).await {
            Err(BackendError::Transient(msg)) if tokio::time::Instant::now() < deadline => {
                if !logged {
                    tracing::warn!(node = %node_name, "{msg}; waiting for it");
                    logged = true;
                }
                tokio::time::sleep(PROVIDER_ID_POLL).await;
            }
            Err(BackendError::Transient(msg)) => {
                return Err(BackendError::Permanent(format!(
                    "{msg} after {PROVIDER_ID_WAIT:?}"
                )));
            }
            found => return found,
        }
    }
}

/// The alias ranges of `nic` Pods get addresses from: those from the
/// secondary range `range_name`, in order. None at all: empty. None from
/// it but others: an error naming them (see the module docs).
fn pod_ranges(nic: &Nic, range_name: &str) -> Result<Vec<Cidr>, String> {
    let (ours, others): (Vec<&AliasRange>, Vec<&AliasRange>) = nic
        .alias_ranges
        .iter()
        .partition(|r| r.range_name.as_deref() == Some(range_name));
    if ours.is_empty() && !others.is_empty() {
        let others: Vec<String> = others
            .iter()
            .map(|r| match &r.range_name {
                Some(name) => format!("{} from secondary range {name:?}", r.cidr),
                None => format!("{} from the primary range", r.cidr),
            })
            .collect();
        return Err(format!(
            "has alias IP ranges only from other ranges than --gcp-pod-range-name \
             {range_name:?} ({}); set --gcp-pod-range-name to the range the node's Pods use",
            others.join(", ")
        ));
    }
    ours.iter()
        .map(|r| {
            let cidr: Cidr = r
                .cidr
                .parse()
                .map_err(|e| format!("alias IP range {:?}: {e}", r.cidr))?;
            if !cidr.addr().is_ipv4() {
                return Err(format!("alias IP range {cidr} is not IPv4"));
            }
            Ok(cidr.network())
        })
        .collect()
}

/// The alias range to ask for: a `/size` netmask from the secondary range
/// `range_name` of `subnet`.
fn alias_request(subnet: &SubnetInfo, range_name: &str, size: u8) -> Result<AliasRange, String> {
    let Some(secondary) = subnet
        .secondary_ranges
        .iter()
        .find(|r| r.name == range_name)
    else {
        let names: Vec<&str> = subnet
            .secondary_ranges
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        return Err(format!(
            "no secondary range {range_name:?} (it has {}): create it or set --gcp-pod-range-name",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        ));
    };
    let cidr: Cidr = secondary
        .cidr
        .parse()
        .map_err(|e| format!("secondary range {range_name:?} {:?}: {e}", secondary.cidr))?;
    if cidr.prefix_len() > size {
        return Err(format!(
            "secondary range {range_name:?} ({cidr}) is smaller than a /{size}: \
             set --gcp-alias-size to {} or more",
            cidr.prefix_len()
        ));
    }
    Ok(AliasRange {
        cidr: format!("/{size}"),
        range_name: Some(range_name.to_string()),
    })
}

/// Every usable address of `ranges`, held by `nic`.
fn capacity(ranges: &[Cidr], instance: &InstanceRef, nic: &str) -> BackendResult<Vec<Assigned>> {
    let mut addresses = Vec::new();
    for range in ranges {
        let what = format!("alias IP range {range} of instance {instance} {nic}");
        addresses.extend(usable_addresses(range, nic, &what)?);
    }
    Ok(addresses)
}

#[async_trait]
impl Backend for GcpBackend {
    fn name(&self) -> &'static str {
        "gcp"
    }

    /// The node's range is fixed once start has it.
    fn elastic(&self) -> bool {
        false
    }

    async fn start(&self) -> BackendResult<()> {
        let ranges = self.ensure_pod_ranges().await?;
        let addresses = capacity(&ranges, &self.instance, NIC0)?;
        tracing::info!(
            instance = %self.instance,
            ranges = ?ranges.iter().map(ToString::to_string).collect::<Vec<_>>(),
            addresses = addresses.len(),
            "GCP backend: Pod addresses from the node's alias IP range"
        );
        *self
            .addresses
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = addresses;
        Ok(())
    }

    async fn assigned(&self) -> BackendResult<Vec<Assigned>> {
        Ok(self
            .addresses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use cnlb_provider_gcp::ipam::SecondaryRange;

    use super::*;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        gcp: GcpArgs,
    }

    fn parse(args: &[&str]) -> Result<GcpArgs, String> {
        Cli::try_parse_from(std::iter::once("agent").chain(args.iter().copied()))
            .map(|c| c.gcp)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn flags_parse_with_defaults() {
        let args = parse(&[]).unwrap();
        assert_eq!(args.gcp_pod_range_name, "pods");
        assert_eq!(args.gcp_alias_size, 24);
        assert_eq!(args.gcp_endpoint, None);
        assert_eq!(args.gcp_read_rate, RateLimit::new(20, 40));
        assert_eq!(args.gcp_write_rate, RateLimit::new(10, 20));
        assert_eq!(args.gcp_operation_rate, RateLimit::new(10, 20));
        let args = parse(&[
            "--gcp-pod-range-name=gke-c1-pods-1a2b3c4d",
            "--gcp-alias-size=26",
            "--gcp-endpoint=http://127.0.0.1:8080/",
            "--gcp-write-rate=4/8",
        ])
        .unwrap();
        assert_eq!(args.gcp_pod_range_name, "gke-c1-pods-1a2b3c4d");
        assert_eq!(args.gcp_alias_size, 26);
        assert_eq!(args.gcp_endpoint.as_deref(), Some("http://127.0.0.1:8080"));
        assert_eq!(args.rate_limits().write, RateLimit::new(4, 8));
        assert_eq!(args.rate_limits().targets, RateLimits::default().targets);
    }

    #[test]
    fn bad_flags_are_named() {
        for (arg, flag) in [
            ("--gcp-pod-range-name=Pods", "--gcp-pod-range-name"),
            ("--gcp-pod-range-name=pods-", "--gcp-pod-range-name"),
            ("--gcp-pod-range-name=1pods", "--gcp-pod-range-name"),
            ("--gcp-alias-size=15", "--gcp-alias-size"),
            ("--gcp-alias-size=29", "--gcp-alias-size"),
            ("--gcp-endpoint=127.0.0.1:8080", "--gcp-endpoint"),
            ("--gcp-endpoint=http://", "--gcp-endpoint"),
            ("--gcp-read-rate=5", "--gcp-read-rate"),
        ] {
            let err = parse(&[arg]).unwrap_err();
            assert!(err.contains(flag), "{arg}: {err}");
        }
    }

    fn nic(ranges: &[(&str, Option<&str>)]) -> Nic {
        Nic {
            name: NIC0.into(),
            network_ip: Some("10.0.0.7".into()),
            subnetwork: None,
            alias_ranges: ranges
                .iter()
                .map(|(cidr, name)| AliasRange {
                    cidr: cidr.to_string(),
                    range_name: name.map(str::to_string),
                })
                .collect(),
            fingerprint: b"fp".to_vec(),
        }
    }

    fn strings(ranges: &[Cidr]) -> Vec<String> {
        ranges.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn ranges_from_the_configured_secondary_range_are_the_pods() {
        assert_eq!(pod_ranges(&nic(&[]), "pods"), Ok(vec![]));
        let ours = pod_ranges(&nic(&[("10.4.3.0/24", Some("pods"))]), "pods").unwrap();
        assert_eq!(strings(&ours), ["10.4.3.0/24"]);
        // Others beside ours are left alone.
        let mixed = nic(&[
            ("10.0.0.32/30", None),
            ("10.4.3.0/24", Some("pods")),
            ("10.9.0.0/24", Some("other")),
            ("10.4.9.0/26", Some("pods")),
        ]);
        assert_eq!(
            strings(&pod_ranges(&mixed, "pods").unwrap()),
            ["10.4.3.0/24", "10.4.9.0/26"]
        );
        // Only others: an error naming them and the flag.
        let err = pod_ranges(
            &nic(&[("10.8.3.0/24", Some("gke-c1-pods")), ("10.0.0.32/30", None)]),
            "pods",
        )
        .unwrap_err();
        for needle in [
            "--gcp-pod-range-name",
            "10.8.3.0/24 from secondary range \"gke-c1-pods\"",
            "10.0.0.32/30 from the primary range",
        ] {
            assert!(err.contains(needle), "{err}");
        }
        assert!(pod_ranges(&nic(&[("fd00::/120", Some("pods"))]), "pods").is_err());
        assert!(pod_ranges(&nic(&[("10.4.3.0", Some("pods"))]), "pods").is_err());
    }

    fn subnet(ranges: &[(&str, &str)]) -> SubnetInfo {
        SubnetInfo {
            name: "nodes".into(),
            cidr: "10.0.0.0/20".into(),
            secondary_ranges: ranges
                .iter()
                .map(|(name, cidr)| SecondaryRange {
                    name: name.to_string(),
                    cidr: cidr.to_string(),
                })
                .collect(),
        }
    }

    #[test]
    fn a_new_range_is_a_netmask_from_the_secondary_range() {
        let s = subnet(&[("services", "10.8.0.0/20"), ("pods", "10.4.0.0/14")]);
        assert_eq!(
            alias_request(&s, "pods", 24),
            Ok(AliasRange {
                cidr: "/24".into(),
                range_name: Some("pods".into())
            })
        );
        // As large as the secondary range itself is fine.
        assert!(alias_request(&subnet(&[("pods", "10.4.0.0/24")]), "pods", 24).is_ok());
        let err = alias_request(&subnet(&[("pods", "10.4.0.0/26")]), "pods", 24).unwrap_err();
        assert!(err.contains("--gcp-alias-size to 26"), "{err}");
        let err = alias_request(&s, "gke-pods", 24).unwrap_err();
        assert!(err.contains("services, pods"), "{err}");
        assert!(err.contains("--gcp-pod-range-name"), "{err}");
        let err = alias_request(&subnet(&[]), "pods", 24).unwrap_err();
        assert!(err.contains("(it has none)"), "{err}");
    }

    #[test]
    fn capacity_skips_network_gateway_and_broadcast() {
        let instance = InstanceRef::from_provider_id("gce://p/us-central1-a/node-1").unwrap();
        let ranges: Vec<Cidr> = vec!["10.4.3.0/24".parse().unwrap()];
        let addresses = capacity(&ranges, &instance, NIC0).unwrap();
        assert_eq!(addresses.len(), 253);
        assert_eq!(addresses[0].ip.to_string(), "10.4.3.2");
        assert_eq!(addresses[252].ip.to_string(), "10.4.3.254");
        assert!(addresses.iter().all(|a| a.subnet == ranges[0]));
        assert_eq!(
            super::super::gateway(&ranges[0]).unwrap().to_string(),
            "10.4.3.1"
        );
        let two: Vec<Cidr> = vec![
            "10.4.3.0/24".parse().unwrap(),
            "10.4.9.0/28".parse().unwrap(),
        ];
        assert_eq!(capacity(&two, &instance, NIC0).unwrap().len(), 253 + 13);
        let huge: Vec<Cidr> = vec!["10.4.0.0/14".parse().unwrap()];
        let err = capacity(&huge, &instance, NIC0).unwrap_err().to_string();
        assert!(
            err.contains("alias IP range 10.4.0.0/14 of instance gce://p/us-central1-a/node-1"),
            "{err}"
        );
    }
}
