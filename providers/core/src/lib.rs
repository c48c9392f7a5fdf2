//! Cloud-neutral core of cnlb: no Kubernetes and no cloud SDK dependency.
//!
//! Layering:
//! - [`model`]: the desired state (a [`LoadBalancerSpec`] per Service, a
//!   [`TargetSet`] of Pod IPs per listener) and pure functions over it: the
//!   target diff ([`diff_targets`]), batching, stable names and ownership tags.
//! - [`provider`]: the trait a cloud's load balancers implement
//!   ([`LoadBalancerProvider`]); [`node`]: the one its instances implement
//!   ([`NodeProvider`]). AWS, GCP and on-prem crates depend on this crate only.
//! - [`error`]: typed [`ProviderError`]s whose [`RetryPolicy`] tells the
//!   controller whether to wait for a change, retry at a time, or back off.
//! - [`fake`]: an in-memory provider for the controller's tests.
//!
//! The controller (`ccm`) translates Kubernetes objects into the model, diffs,
//! and calls a provider only when something changed.

pub mod error;
pub mod fake;
pub mod model;
pub mod node;
pub mod provider;

pub use error::{ProviderError, Result, RetryPolicy};
pub use model::{
    HealthCheck, HealthCheckPort, HealthCheckProtocol, IpAddressType, Listener, LoadBalancerKey,
    LoadBalancerSpec, OWNER_TAG_PREFIX, Protocol, SHORT_NAME_MAX_LEN, Scheme, TAG_CLUSTER,
    TAG_SERVICE, TAG_SERVICE_UID, Target, TargetDelta, TargetSet, TargetState, diff_targets,
    is_owned_by, is_owned_by_cluster, key_from_owner_tags, owner_tags,
};
pub use node::{
    Instance, InstanceMetadata, InstanceState, NodeAddress, NodeAddressKind, NodeProvider, NodeRef,
};
pub use provider::{
    IpMode, LoadBalancerIngress, LoadBalancerProvider, LoadBalancerStatus, OwnedLoadBalancer,
    ResourceIds, TargetHealth, TargetHealthState, registered_targets,
};
