//! vpc-ipam: a node agent that gives Pods IP addresses from VPC secondary
//! ranges, and the CNI IPAM plugin that asks it for them.

pub mod agent_cli;
pub mod cidr;
pub mod cni;
pub mod plugin;
pub mod telemetry;

/// Where the agent listens and the plugin connects, unless configured
/// (`--socket` on the agent, `ipam.agentSocket` in the CNI configuration).
pub const DEFAULT_AGENT_SOCKET: &str = "/run/cnlb/vpc-ipam.sock";
