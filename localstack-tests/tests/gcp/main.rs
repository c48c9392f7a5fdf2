//! GCP: `cnlb-ccm --provider=gcp` on GKE-style real Nodes with cnlb's GCE
//! emulator, one test binary; every test has its own environment and
//! emulator.

#[path = "../common/mod.rs"]
mod common;

mod controller;
mod controller_crash;
mod faults;
mod foreign_resources;
mod new_zone;
mod nodes;
mod readiness_gate;
