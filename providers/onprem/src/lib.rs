//! On-prem provider for cnlb.
//!
//! Two ways to plug in a load balancer that sends traffic straight to Pod
//! IPs:
//! - in process, by implementing [`LoadBalancerProvider`] (the plugin API,
//!   documented on the trait);
//! - out of process, through a language-neutral gRPC protocol
//!   (`proto/cnlb/provider/v1/provider.proto`, CSI style: GetInfo with
//!   capabilities, Probe, EnsureLoadBalancer, UpdateBackends as deltas,
//!   DeleteLoadBalancer, ListLoadBalancers, WatchBackendHealth, and, for
//!   plugins with a Node part, GetInstances) over a unix socket or TCP,
//!   the latter with mutual TLS ([`tls`]).
//!
//! The two are one: [`GrpcProvider`] is a `LoadBalancerProvider` that calls
//! a plugin, and [`server::serve`] serves any `LoadBalancerProvider` as a
//! plugin. [`status`] maps gRPC codes to [`ProviderError`]s and back;
//! [`conformance`] checks a plugin against the contract. The reference
//! provider, [`haproxy::HaproxyProvider`], drives HAProxy (>= 2.6) through
//! its runtime API and is served by the `cnlb-onprem-haproxy` binary, with
//! an [`inventory::Inventory`] (machines listed in a file) as its Node part
//! when given one.

pub mod client;
pub mod conformance;
pub mod convert;
pub mod endpoint;
#[cfg(feature = "haproxy")]
pub mod haproxy;
#[cfg(feature = "haproxy")]
pub mod inventory;
pub mod server;
pub mod status;
pub mod tls;

/// Code generated from `provider.proto`.
pub mod proto {
    tonic::include_proto!("cnlb.provider.v1");
}

pub use client::{GrpcProvider, PluginInfo};
pub use cnlb_provider_core::{LoadBalancerProvider, ProviderError};
pub use endpoint::PluginEndpoint;
pub use server::Plugin;
pub use tls::{ClientTls, PemFile, ServerTls};

/// Oldest HAProxy whose runtime API can add servers without experimental mode.
pub const MIN_HAPROXY_VERSION: (u32, u32) = (2, 6);
