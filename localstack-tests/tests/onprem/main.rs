//! On-prem: the HAProxy plugin alone and `cnlb-ccm --provider=onprem`
//! through the whole stack, one test binary. Every stack has its own
//! environment, and its HAProxy frontends its own addresses
//! (`127.<k>.0.0/28`, see `cnlb_localstack_tests::range`); the plugin
//! test's addresses are per process and test.
//!
//! Needs the workspace binaries: `cargo build --workspace --bins`.

#[path = "../common/mod.rs"]
mod common;

mod ccm;
mod demo;
mod haproxy;
mod nodes;
