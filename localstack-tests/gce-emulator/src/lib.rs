//! A Google Compute Engine emulator: the `/compute/v1` REST paths the
//! `google-cloud-compute-v1` clients call for cnlb (regions, zones, the
//! network and subnetwork, instances and their alias IP ranges, zonal
//! GCE_VM_IP_PORT NEGs, region health checks, backend services, target TCP
//! proxies, forwarding rules, addresses, global firewalls, operations),
//! with GCE's asynchronous operations, limits, fingerprints, errors, rate
//! quotas and real health probing. No public emulator exists; see
//! `localstack-tests/gce-emulator/GCE_EMULATOR.md` for what it models and
//! what not.
//!
//! - [`server`]: the HTTP side (also runnable in-process: [`server::start`]);
//!   the binary is `cnlb-gce-emulator` (`src/main.rs`).
//! - [`state`]: the world model; [`health`]: the prober.
//! - [`GceEmulator`]: the handle tests use (endpoint and admin API). The
//!   local environment (`cnlb-localstack-tests`, which re-exports this crate
//!   as `cnlb_localstack_tests::gce`) runs the binary as a process.

pub mod admin;
pub mod cidr;
pub mod config;
pub mod error;
mod filter;
pub mod health;
pub mod server;
pub mod state;
mod util;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use google_cloud_compute_v1::model as m;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use admin::{
    Calls, Fault, ForceHealth, HealthRow, NegDump, QuotaSetting, Resources, SeedAliasRange,
    SeedInstance, WorldConfig,
};
pub use cidr::Cidr;
pub use config::{GceOptions, NamedRange, QuotaGroup};

/// The binary's name.
pub const BIN: &str = "cnlb-gce-emulator";

/// Where an emulator serves and what world it models: the compute
/// clients' endpoint and typed calls to the admin API.
#[derive(Clone, Debug)]
pub struct GceEmulator {
    url: String,
    opts: GceOptions,
    http: reqwest::Client,
}

impl GceEmulator {
    /// A handle for an emulator serving at `url` (`http://127.0.0.1:PORT`)
    /// with the world `opts`.
    pub fn new(url: &str, opts: GceOptions) -> GceEmulator {
        GceEmulator {
            url: url.trim_end_matches('/').to_string(),
            opts,
            http: reqwest::Client::new(),
        }
    }

    /// Base URL for the clients' `with_endpoint` (`http://127.0.0.1:PORT`).
    pub fn endpoint(&self) -> &str {
        &self.url
    }

    pub fn options(&self) -> &GceOptions {
        &self.opts
    }

    pub fn project(&self) -> &str {
        &self.opts.project
    }

    pub fn region(&self) -> &str {
        &self.opts.region
    }

    pub fn zones(&self) -> &[String] {
        &self.opts.zones
    }

    pub fn network(&self) -> &str {
        &self.opts.network
    }

    /// The subnetwork's name.
    pub fn subnetwork(&self) -> &str {
        &self.opts.subnetwork.name
    }

    /// The subnetwork's primary range.
    pub fn primary_range(&self) -> Cidr {
        self.opts.subnetwork.cidr
    }

    pub fn secondary_range(&self, name: &str) -> Option<Cidr> {
        self.opts
            .secondary_ranges
            .iter()
            .find(|r| r.name == name)
            .map(|r| r.cidr)
    }

    /// `https://www.googleapis.com/compute/v1/projects/P/zones/Z/networkEndpointGroups/N`-style
    /// links, as the emulator writes them.
    pub fn link(&self, path: &str) -> String {
        format!(
            "{}projects/{}/{}",
            state::API,
            self.opts.project,
            path.trim_start_matches('/')
        )
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T> {
        let url = format!("{}/emulator/v1/{path}", self.url);
        let mut req = self.http.request(method.clone(), &url);
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(serde_json::to_vec(b)?);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {url}"))?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        if !status.is_success() {
            bail!(
                "{method} {url}: {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        serde_json::from_slice(&bytes)
            .with_context(|| format!("{method} {url}: decoding the answer"))
    }

    /// Ok once the emulator answers.
    pub async fn ping(&self) -> Result<()> {
        let url = format!("{}/emulator/v1/healthz", self.url);
        let resp = self.http.get(&url).send().await?;
        if !resp.status().is_success() {
            bail!("{url}: {}", resp.status());
        }
        Ok(())
    }

    /// The world the running emulator models (its flags).
    pub async fn config(&self) -> Result<WorldConfig> {
        self.call::<(), _>(reqwest::Method::GET, "config", None)
            .await
    }

    /// A VM `name` in `zone` whose `nic0` has the primary IP `ip`.
    pub async fn seed_instance(&self, zone: &str, name: &str, ip: Ipv4Addr) -> Result<m::Instance> {
        self.seed(&SeedInstance {
            zone: zone.to_string(),
            name: name.to_string(),
            network_ip: ip.to_string(),
            ..SeedInstance::default()
        })
        .await
    }

    /// A VM with everything [`SeedInstance`] can say (alias ranges, status, labels).
    pub async fn seed(&self, instance: &SeedInstance) -> Result<m::Instance> {
        self.call(reqwest::Method::POST, "instances", Some(instance))
            .await
    }

    /// Removes a VM (its endpoints leave every NEG).
    pub async fn delete_instance(&self, zone: &str, name: &str) -> Result<()> {
        let _: serde_json::Value = self
            .call::<(), _>(
                reqwest::Method::DELETE,
                &format!("instances/{zone}/{name}"),
                None,
            )
            .await?;
        Ok(())
    }

    /// The next `n` calls of `method` (`networkEndpointGroups.attachNetworkEndpoints`,
    /// ...; any method when `None`) fail with 403 `rateLimitExceeded`.
    pub async fn fail_next(&self, method: Option<&str>, n: u32) -> Result<()> {
        self.inject(&Fault::rate_limit(method, n)).await
    }

    /// Any fault (see [`Fault`]: other errors, failing the operation instead
    /// of the call, ErrorInfo details).
    pub async fn inject(&self, fault: &Fault) -> Result<()> {
        let _: serde_json::Value = self
            .call(reqwest::Method::POST, "faults", Some(fault))
            .await?;
        Ok(())
    }

    pub async fn clear_faults(&self) -> Result<()> {
        let _: serde_json::Value = self
            .call::<(), _>(reqwest::Method::DELETE, "faults", None)
            .await?;
        Ok(())
    }

    /// A per-minute rate quota for a group of calls (`None`: unlimited).
    pub async fn set_quota(&self, group: QuotaGroup, per_minute: Option<u32>) -> Result<()> {
        let _: serde_json::Value = self
            .call(
                reqwest::Method::PUT,
                &format!("quotas/{}", group.as_str()),
                Some(&QuotaSetting { per_minute }),
            )
            .await?;
        Ok(())
    }

    /// Reports `state` (HEALTHY, UNHEALTHY, UNKNOWN, DRAINING) for the
    /// endpoint `ip:port` under every health check, whatever the probes say.
    pub async fn force_health(&self, ip: Ipv4Addr, port: u16, state: &str) -> Result<()> {
        let _: serde_json::Value = self
            .call(
                reqwest::Method::PUT,
                &format!("health/{ip}/{port}"),
                Some(&ForceHealth {
                    health_state: state.to_string(),
                }),
            )
            .await?;
        Ok(())
    }

    /// Back to what the probes say.
    pub async fn clear_health(&self, ip: Ipv4Addr, port: u16) -> Result<()> {
        let _: serde_json::Value = self
            .call::<(), _>(
                reqwest::Method::DELETE,
                &format!("health/{ip}/{port}"),
                None,
            )
            .await?;
        Ok(())
    }

    /// Every endpoint under a health check, probed and forced state.
    pub async fn health(&self) -> Result<Vec<HealthRow>> {
        self.call::<(), _>(reqwest::Method::GET, "health", None)
            .await
    }

    /// Calls received per method, and the total.
    pub async fn calls(&self) -> Result<Calls> {
        self.call::<(), _>(reqwest::Method::GET, "calls", None)
            .await
    }

    pub async fn reset_calls(&self) -> Result<()> {
        let _: serde_json::Value = self
            .call::<(), _>(reqwest::Method::DELETE, "calls", None)
            .await?;
        Ok(())
    }

    /// Every resource (and the number of unfinished operations).
    pub async fn resources(&self) -> Result<Resources> {
        self.call::<(), _>(reqwest::Method::GET, "resources", None)
            .await
    }

    /// Waits until no operation is pending.
    pub async fn settle(&self, timeout: Duration) -> Result<Resources> {
        let start = Instant::now();
        loop {
            let r = self.resources().await?;
            if r.pending_operations == 0 {
                return Ok(r);
            }
            if start.elapsed() > timeout {
                bail!(
                    "{} operations still pending after {timeout:?}",
                    r.pending_operations
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// How long new operations take from now on.
    pub async fn set_operation_delay(&self, delay: Duration) -> Result<()> {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        let _: serde_json::Value = self
            .call(
                reqwest::Method::PUT,
                "operation-delay",
                Some(&serde_json::json!({ "ms": ms })),
            )
            .await?;
        Ok(())
    }
}
