//! AWS: `cnlb-ccm --provider=aws` on real Nodes with moto, one test binary.
//! Every test has its own environment (moto included) and passes the AWS
//! endpoints to its processes and clients explicitly, so they run in
//! parallel. The tests that configure this process's AWS SDK through the
//! environment (`common::use_endpoints`) are binaries of their own:
//! `aws_moto`, `aws_localstack`, `aws_provider`, `aws_emulated_vpc`,
//! `aws_datapath`.

#[path = "../common/mod.rs"]
mod common;

mod controller;
mod controller_changes;
mod controller_crash;
mod failover;
mod faults;
mod foreign_resources;
mod nodes;
mod pod_lifecycle;
mod readiness_gate;
mod service_controller;
mod throttling;
