//! `cnlb-onprem-haproxy`: the HAProxy provider served as a cnlb plugin,
//! with the machines of an inventory file as its Node part.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use cnlb_provider_onprem::haproxy::{AddressPool, HaproxyConfig, HaproxyProvider};
use cnlb_provider_onprem::server::{Plugin, serve};
use cnlb_provider_onprem::{PemFile, PluginEndpoint, ServerTls};
use cnlb_runtime::signals::Signals;
use cnlb_runtime::telemetry::{self, LogFormat};

/// Serves the cnlb provider protocol for an HAProxy (>= 2.6) run in
/// master-worker mode: `haproxy -W -S <master socket> -f <config file>`.
/// The plugin owns the configuration file.
#[derive(Debug, Parser)]
#[command(name = "cnlb-onprem-haproxy", version)]
struct Args {
    /// Where to serve the protocol: unix:///path.sock or tcp://ip:port
    /// (mutual TLS with --tls-cert, --tls-key and --tls-client-ca;
    /// plaintext only on loopback, or with --insecure-listen).
    #[arg(
        long,
        env = "CNLB_PLUGIN_LISTEN",
        default_value = "unix:///run/cnlb/haproxy.sock"
    )]
    listen: PluginEndpoint,
    /// The plugin's TLS certificate (PEM, with its chain) for a tcp://
    /// --listen. With --tls-key and --tls-client-ca: mutual TLS, clients
    /// must present a certificate issued by --tls-client-ca. Files are read
    /// at start: restart the plugin to rotate them.
    #[arg(
        long,
        value_name = "PATH",
        requires = "tls_key",
        requires = "tls_client_ca"
    )]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM, unencrypted).
    #[arg(
        long,
        value_name = "PATH",
        requires = "tls_cert",
        requires = "tls_client_ca"
    )]
    tls_key: Option<PathBuf>,
    /// The CA certificate(s) (PEM) that client certificates must chain to.
    #[arg(long, value_name = "PATH", requires = "tls_cert", requires = "tls_key")]
    tls_client_ca: Option<PathBuf>,
    /// Serve plaintext TCP on a non-loopback --listen address, without
    /// TLS: anyone who reaches the port can program the load balancer.
    #[arg(long, conflicts_with = "tls_cert")]
    insecure_listen: bool,
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

/// The TLS side of --listen, checked before anything starts.
///
/// Plaintext TCP on a non-loopback address is refused unless
/// --insecure-listen says so: the plugin creates frontends and picks
/// backends, so whoever reaches the port controls where traffic goes, and
/// an operator moving the plugin off the node (the reason for TCP) expects
/// that to need a credential. Loopback is reachable from the host only (a
/// sidecar), as the unix socket is; it is allowed, with serve's warning.
fn server_tls(args: &Args) -> anyhow::Result<Option<ServerTls>> {
    let files = match (&args.tls_cert, &args.tls_key, &args.tls_client_ca) {
        (Some(cert), Some(key), Some(ca)) => Some((cert, key, ca)),
        // clap requires the three together.
        _ => None,
    };
    match (&args.listen, files) {
        (PluginEndpoint::Unix(_), Some(_)) => anyhow::bail!(
            "--tls-cert, --tls-key and --tls-client-ca are for a tcp:// --listen; \
             --listen {} is a unix socket, guarded by its file mode",
            args.listen
        ),
        (PluginEndpoint::Unix(_), None) => Ok(None),
        (PluginEndpoint::Tcp(_), Some((cert, key, ca))) => Ok(Some(ServerTls::load(
            &PemFile::new("--tls-cert", cert),
            &PemFile::new("--tls-key", key),
            &PemFile::new("--tls-client-ca", ca),
        )?)),
        (PluginEndpoint::Tcp(addr), None) => {
            if addr.ip().to_canonical().is_loopback() || args.insecure_listen {
                Ok(None)
            } else {
                anyhow::bail!(
                    "--listen {}: plaintext TCP on a non-loopback address lets anyone who \
                     reaches it program the load balancer; give --tls-cert, --tls-key and \
                     --tls-client-ca (mutual TLS), or --insecure-listen to accept that",
                    args.listen
                )
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::init(args.log_format)?;
    let tls = server_tls(&args)?;
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
    tracing::info!(
        listen = %args.listen,
        mutual_tls = tls.is_some(),
        "serving the cnlb provider protocol"
    );
    let plugin: Arc<dyn Plugin> = provider;
    let served = serve(
        plugin,
        &args.listen,
        tls.as_ref(),
        Duration::from_millis(args.health_poll_ms.max(100)),
        shutdown,
    )
    .await;
    converger.abort();
    served
}
