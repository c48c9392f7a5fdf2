//! The environment itself and what runs on its control plane: the control
//! plane and kubelets, the harness's teardown, the `cnlb-ccm` binary and
//! its leader election, the middle tier of the Service and node
//! controllers (in-memory providers, no cloud), and `cnlb-ccm` on moto
//! under API server faults; one test binary.
//! Every test has its own environment. `cnlb-env down`'s test cleans up
//! environments it does not own and is a binary of its own (`env_stale`).

#[path = "../common/mod.rs"]
mod common;

mod apiserver_faults;
mod ccm;
mod fault_proxy;
mod gateway_api;
mod kubernetes;
mod leader_election;
mod node_controller;
mod service_controller;
mod teardown;
