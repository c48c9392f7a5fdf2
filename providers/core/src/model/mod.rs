//! The desired-state model: what a load balancer should look like and which
//! Pod IPs it should send traffic to. Plain data and pure functions only, so
//! the controller can diff cheaply and skip cloud calls when nothing changed.

mod key;
mod spec;
mod target;

pub use key::{
    LoadBalancerKey, OWNER_TAG_PREFIX, SHORT_NAME_MAX_LEN, TAG_CLUSTER, TAG_SERVICE,
    TAG_SERVICE_UID, is_owned_by, is_owned_by_cluster, key_from_owner_tags, owner_tags,
};
pub use spec::{
    HealthCheck, HealthCheckPort, HealthCheckProtocol, IpAddressType, Listener, LoadBalancerSpec,
    Protocol, Scheme,
};
pub use target::{Target, TargetDelta, TargetSet, TargetState, diff_targets};
