//! On-prem provider for cnlb.
//!
//! Two ways to plug in a load balancer that sends traffic straight to Pod
//! IPs: in process, by implementing `cnlb_provider_core::LoadBalancerProvider`;
//! or out of process, through a language-neutral gRPC protocol served over a
//! unix socket or TCP with mTLS, CSI style (GetInfo with capabilities, Probe,
//! EnsureLoadBalancer, UpdateBackends as deltas, DeleteLoadBalancer,
//! ListLoadBalancers, WatchBackendHealth). The reference provider drives
//! HAProxy (>= 2.6) through its runtime API, adding and draining servers
//! without reloads and writing through to its configuration file so that a
//! restart loses nothing. Both land with the on-prem work.

pub use cnlb_provider_core::{LoadBalancerProvider, ProviderError};

/// Oldest HAProxy whose runtime API can add servers without experimental mode.
pub const MIN_HAPROXY_VERSION: (u32, u32) = (2, 6);
