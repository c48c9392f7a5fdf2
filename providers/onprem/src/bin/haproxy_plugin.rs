//! `cnlb-onprem-haproxy`: the HAProxy provider served as a cnlb plugin,
//! with the machines of an inventory file as its Node part.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use cnlb_provider_onprem::PluginEndpoint;
use cnlb_provider_onprem::haproxy::{AddressPool, HaproxyConfig, HaproxyProvider};
use cnlb_provider_onprem::server::{Plugin, serve};
use cnlb_runtime::signals::Signals;
use cnlb_runtime::telemetry::{self, LogFormat};

/// Serves the cnlb provider protocol for an HAProxy (>= 2.6) run in
/// master-worker mode: `haproxy -W -S <master socket> -f <config file>`.
/// The plugin owns the configuration file.
#[derive(Debug, Parser)]
#[command(name = "cnlb-onprem-haproxy", version)]
struct Args {
    /// Where to serve the protocol: unix:///path.sock or tcp://ip:port.
    #[arg(
        long,
        env = "CNLB_PLUGIN_LISTEN",
        default_value = "unix:///run/cnlb/haproxy.sock"
    )]
    listen: PluginEndpoint,
    /// HAProxy configuration file, written by the plugin.
    #[arg(long, default_value = "/etc/haproxy/cnlb.cfg")]
    config_file: PathBuf,
    /// The plugin's state file [default: the config file's path + `.state.json`].
    #[arg(long)]
    state_file: Option<PathBuf>,
    /// HAProxy worker admin socket (written into the configuration).
    #[arg(long, default_value = "/run/haproxy/cnlb-admin.sock")]
    runtime_socket: PathBuf,
    /// HAProxy master CLI socket (`haproxy -S`), for reloads.
    #[arg(long, default_value = "/run/haproxy/cnlb-master.sock")]
    master_socket: PathBuf,
    /// The haproxy binary, to check configurations before using them.
    #[arg(long, default_value = "/usr/sbin/haproxy")]
    haproxy_bin: PathBuf,
    /// Frontend addresses, CIDRs or single addresses separated by commas
    /// (e.g. 192.0.2.0/24); each load balancer gets one.
    #[arg(long)]
    address_pool: AddressPool,
    /// How long a reload may take, in seconds.
    #[arg(long, default_value_t = 10)]
    reload_timeout_secs: u64,
    /// How often backend health is read for WatchBackendHealth, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    health_poll_ms: u64,
    /// How often HAProxy's servers are converged to the state (drained
    /// servers deleted, missing ones added), in seconds.
    #[arg(long, default_value_t = 5)]
    converge_interval_secs: u64,
    /// The machines behind Nodes, a JSON file the operator writes (read on
    /// every GetInstances; see the `inventory` module): with it the plugin
    /// serves the Node part of the protocol, without it it has none.
    #[arg(long)]
    inventory: Option<PathBuf>,
    /// Log output format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::init(args.log_format)?;
    let state_file = args.state_file.clone().unwrap_or_else(|| {
        let mut name = args.config_file.clone().into_os_string();
        name.push(".state.json");
        PathBuf::from(name)
    });
    let provider = HaproxyProvider::open(HaproxyConfig {
        config_file: args.config_file.clone(),
        state_file,
        runtime_socket: args.runtime_socket.clone(),
        master_socket: args.master_socket.clone(),
        haproxy_bin: args.haproxy_bin.clone(),
        address_pool: args.address_pool.clone(),
        reload_timeout: Duration::from_secs(args.reload_timeout_secs),
        inventory: args.inventory.clone(),
    })
    .await
    .context("opening the HAProxy provider")?;
    let provider = Arc::new(provider);

    let converger = {
        let provider = Arc::clone(&provider);
        let every = Duration::from_secs(args.converge_interval_secs.max(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                match provider.converge().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(servers = n, "added or deleted HAProxy servers"),
                    Err(e) => tracing::warn!(error = %e, "converging HAProxy servers"),
                }
            }
        })
    };

    let mut signals = Signals::install().context("installing the SIGTERM/SIGINT handlers")?;
    let shutdown = async move {
        let signal = signals.recv().await;
        tracing::info!(signal, "shutting down");
    };
    tracing::info!(listen = %args.listen, "serving the cnlb provider protocol");
    let plugin: Arc<dyn Plugin> = provider;
    let served = serve(
        plugin,
        &args.listen,
        Duration::from_millis(args.health_poll_ms.max(100)),
        shutdown,
    )
    .await;
    converger.abort();
    served
}
