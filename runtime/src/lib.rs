//! What every cnlb process shares, so cnlb-ccm, vpc-ipam-agent and
//! cnlb-onprem-haproxy start, log, serve probes and stop the same way:
//!
//! - [`telemetry`]: logging (`RUST_LOG`, `--log-format text|json`);
//! - `probes` (feature `probes`): the `/metrics`, `/healthz` and `/readyz`
//!   HTTP server;
//! - [`signals`]: SIGTERM and SIGINT as a graceful stop;
//! - [`flags`]: values of flags more than one program takes.

pub mod flags;
#[cfg(feature = "probes")]
pub mod probes;
pub mod signals;
pub mod telemetry;
