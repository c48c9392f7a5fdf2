//! cnlb-ccm's library: the Service controller and its pure parts.
//!
//! - [`annotations`]: a Service and its annotations to a
//!   `LoadBalancerSpec`, one error per bad key (pure);
//! - [`targets`]: EndpointSlices to desired targets, readiness gate rules (pure);
//! - [`conditions`]: the Service conditions cnlb writes (pure);
//! - [`service`]: the controller that wires them to the Kubernetes API and
//!   a `LoadBalancerProvider`;
//! - [`nodes`]: the node controllers (initialization, addresses,
//!   lifecycle) over a `NodeProvider`, deciding with [`nodes::plan`] (pure);
//! - [`events`]: the one place Events are sent from.
//!
//! The `cnlb-ccm` binary adds the command line, leader election, the
//! probe and metrics server and garbage collection.

pub mod annotations;
pub mod conditions;
pub mod events;
pub mod nodes;
pub mod service;
pub mod targets;
