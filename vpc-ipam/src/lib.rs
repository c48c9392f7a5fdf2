//! vpc-ipam: a node agent that gives Pods IP addresses from VPC secondary
//! ranges, and the CNI IPAM plugin that asks it for them.
//!
//! - [`cni`]: the plugin's side of CNI (environment, stdin, results, errors);
//! - [`plugin`]: what the plugin does per command, as a client of the agent;
//! - [`protocol`]: the plugin ↔ agent messages on the unix socket;
//! - [`agent`], [`pool`], [`store`]: allocation, watermarks, crash-safe state;
//! - [`backend`]: where addresses come from (static ranges, AWS, GCP);
//! - [`datapath`]: policy routing and SNAT for Pods on secondary ENIs (AWS);
//! - [`server`], [`metrics`]: the agent's socket and HTTP endpoints;
//! - [`install`]: the DaemonSet's init container (plugin and configuration).

pub mod agent;
pub mod agent_cli;
pub mod backend;
pub mod cidr;
pub mod cni;
pub mod datapath;
pub mod install;
pub mod metrics;
pub mod plugin;
pub mod pool;
pub mod protocol;
pub mod server;
pub mod store;

/// Where the agent listens and the plugin connects, unless configured
/// (`--socket` on the agent, `ipam.agentSocket` in the CNI configuration).
pub const DEFAULT_AGENT_SOCKET: &str = "/run/cnlb/vpc-ipam.sock";
