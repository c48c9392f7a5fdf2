//! vpc-ipam: the agent and plugin with the static and GCP backends, and
//! the Pod network of real Nodes, one test binary. Each test has its own
//! agents, ranges and network namespaces. The AWS backend's tests set this
//! process's AWS environment and are binaries of their own
//! (`vpc_ipam_aws`, `vpc_ipam_aws_backend`).

#[path = "../common/mod.rs"]
mod common;

mod gcp_backend;
mod peer_credentials;
mod pod_network;
mod static_backend;
