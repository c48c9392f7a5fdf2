//! GCP provider for cnlb.
//!
//! On GCP, Pod IPs can be backends only of *proxy* load balancers, through
//! zonal `GCE_VM_IP_PORT` network endpoint groups (`GCE_VM_IP` NEGs hold node
//! IPs). A LoadBalancer Service becomes: one zonal NEG per port per cluster
//! zone, a region health check, a region backend service
//! (`EXTERNAL_MANAGED` or `INTERNAL_MANAGED`) with the NEGs as backends, a
//! region target TCP proxy, a forwarding rule, and a firewall rule for the
//! health-check ranges.
//!
//! - [`calls`]: the Compute clients and the one way they are called (rate
//!   limits, retries, metrics, waiting for operations).
//! - [`error`]: Compute errors as typed provider errors.
//! - [`plan`]: the desired resources as API bodies, names, ownership and
//!   drift rules (pure).
//! - [`provider`]: [`GcpProvider`], the `LoadBalancerProvider`.
//! - [`placements`]: where the NEGs' endpoints are, as far as this process
//!   knows (which zones a health read can skip).
//! - [`nodes`]: [`GcpNodes`], the `NodeProvider`: the instances behind
//!   Nodes, one `instances.list` per zone.
//! - [`ipam`]: the calls of vpc-ipam's GCP backend (the node's alias IP
//!   range on `nic0`, from a subnetwork secondary range).
//! - [`instance`]: the instance behind a Node (provider ID, zone).
//!
//! Feature `load-balancer` (cnlb-ccm) builds the load balancer and node
//! providers, feature `ipam` (vpc-ipam-agent) the alias-range calls; each
//! enables only the Compute clients it calls.

pub mod calls;
pub mod error;
pub mod instance;
#[cfg(feature = "ipam")]
pub mod ipam;
#[cfg(feature = "load-balancer")]
pub mod nodes;
#[cfg(feature = "load-balancer")]
pub mod placements;
#[cfg(feature = "load-balancer")]
pub mod plan;
#[cfg(feature = "load-balancer")]
pub mod provider;

pub use calls::{Calls, Compute, Connection};
pub use cnlb_cloud_calls::{Group, RateLimit, RateLimits};
#[cfg(feature = "load-balancer")]
pub use nodes::GcpNodes;
#[cfg(feature = "load-balancer")]
pub use plan::GcpConfig;
#[cfg(feature = "load-balancer")]
pub use provider::{GcpProvider, NEG_STATUS_ANNOTATION};

/// `attachNetworkEndpoints` / `detachNetworkEndpoints` take at most this many
/// endpoints per call.
pub const MAX_ENDPOINTS_PER_CALL: usize = 500;

/// Source ranges of Google Cloud health checks for proxy load balancers; the
/// firewall rule must admit them to the Pod ports.
pub const HEALTH_CHECK_SOURCE_RANGES: [&str; 2] = ["35.191.0.0/16", "130.211.0.0/22"];

/// The NEG type whose endpoints are (instance, Pod IP, port).
pub const NEG_TYPE: &str = "GCE_VM_IP_PORT";
