//! Process wiring: HTTP server, Kubernetes client, readiness, shutdown.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use k8s_openapi::apimachinery::pkg::version::Info;
use kube::config::{KubeConfigOptions, Kubeconfig, KubeconfigError};
use kube::{Client, Config};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tracing::{info, warn};

use cnlb_cloud_calls::RateLimits;
use cnlb_provider_aws::{AwsConfig, AwsProvider};
use cnlb_provider_core::{LoadBalancerProvider, NodeProvider};
use cnlb_provider_onprem::{ClientTls, GrpcProvider, PluginEndpoint};
use cnlb_runtime::probes::{Health, Server};
use cnlb_runtime::signals::Signals;

use crate::cli::{Args, BindAddress, Provider};
use crate::metrics::Metrics;
use crate::{gc, leader};
use cnlb_ccm::nodes::{self, PluginNodes};
use cnlb_ccm::service::{self, ControllerMetrics};

/// How often the API server is probed after start-up, for the
/// `cnlb_kube_api_reachable` gauge.
const API_CHECK_PERIOD: Duration = Duration::from_secs(30);
const API_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot install the SIGTERM/SIGINT handlers")]
    Signals(#[source] std::io::Error),
    #[error("cannot listen on --metrics-bind-address {addr}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load --kubeconfig {}", path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: KubeconfigError,
    },
    #[error("cannot find a Kubernetes configuration (KUBECONFIG, ~/.kube/config or in-cluster)")]
    InferConfig(#[source] kube::config::InferConfigError),
    #[error("cannot build the Kubernetes client")]
    Client(#[source] kube::Error),
    #[error("the Kubernetes API server did not answer")]
    ApiUnreachable(#[source] kube::Error),
    #[error("{0} is required with this provider")]
    MissingFlag(&'static str),
    #[error("cannot set up the provider: {0}")]
    Provider(String),
    #[error("lost the leader lease: exiting so that only one replica acts")]
    LostLeadership,
    #[error("the HTTP server failed")]
    Serve(#[source] std::io::Error),
}

pub async fn run(args: Args) -> Result<(), Error> {
    // Read first: a bad TLS file stops the start, naming its flag, before
    // anything else is tried.
    let plugin_tls = args.onprem_plugin_tls().map_err(Error::Provider)?;
    let mut signals = Signals::install().map_err(Error::Signals)?;
    info!(
        version = env!("CARGO_PKG_VERSION"),
        cluster = %args.cluster_name,
        provider = %args.provider,
        load_balancer_class = %args.load_balancer_class,
        manage_unclassed = args.manage_unclassed,
        concurrency = args.concurrency,
        "starting cnlb-ccm"
    );

    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new("the Kubernetes API has not answered yet"));
    let server = start_server(args.metrics_bind_address, &health, &metrics).await?;

    let client = kube_client(args.kubeconfig.as_deref()).await?;
    let version = tokio::select! {
        result = wait_for_api(&client, &metrics) => result.map_err(Error::ApiUnreachable)?,
        signal = signals.recv() => {
            info!(signal, "shutting down before the Kubernetes API answered");
            return stop_server(server).await;
        }
    };
    info!(
        server_version = %version.git_version,
        platform = %version.platform,
        "connected to the Kubernetes API server"
    );
    health.set_ready();

    let providers = build_provider(&args, plugin_tls.as_ref(), &metrics).await?;
    let controller_metrics = ControllerMetrics::register(&mut metrics.registry());
    let settings = service::Settings {
        cluster: args.cluster_name.clone(),
        class: args.load_balancer_class.clone(),
        manage_unclassed: args.manage_unclassed,
        manage_lbc_annotated: args.manage_lbc_annotated,
        concurrency: args.concurrency,
    };
    let api_check = tokio::spawn(check_api_periodically(client.clone(), metrics.clone()));
    let enabled = args.controllers;
    // The Service controller's caches fill while this replica waits for the
    // Lease: a new leader starts from warm caches.
    let (caches, watches) = if enabled.service {
        let (caches, watching) = service::watch(client.clone(), controller_metrics.clone());
        (Some(caches), Some(tokio::spawn(watching)))
    } else {
        (None, None)
    };

    // Only the holder of the Lease runs the controllers.
    let mut elector = args.leader_elect.then(|| {
        let config = leader::Config::new(
            &args.leader_elect_namespace,
            &args.leader_elect_lease_name,
            &identity(),
        );
        leader::Elector::new(client.clone(), config)
    });
    if let Some(elector) = elector.as_mut() {
        tokio::select! {
            () = elector.acquire() => {}
            signal = signals.recv() => {
                info!(signal, "shutting down before becoming leader");
                api_check.abort();
                if let Some(watches) = watches {
                    watches.abort();
                }
                return stop_server(server).await;
            }
        }
    }
    let deletions = Arc::new(Notify::new());
    let collector = enabled.service.then(|| {
        tokio::spawn(gc::run(
            client.clone(),
            providers.load_balancers.clone(),
            args.cluster_name.clone(),
            deletions.clone(),
        ))
    });
    let services = caches.map(|caches| {
        tokio::spawn(service::run(
            client.clone(),
            providers.load_balancers.clone(),
            settings,
            caches,
            controller_metrics,
            deletions,
        ))
    });
    let node_settings = nodes::Settings {
        initialize: enabled.cloud_node,
        lifecycle: enabled.cloud_node_lifecycle,
        monitor_period: args.node_monitor_period,
        status_update_frequency: args.node_status_update_frequency,
    };
    let node_controllers = (enabled.cloud_node || enabled.cloud_node_lifecycle)
        .then(|| tokio::spawn(nodes::run(client, providers.nodes.clone(), node_settings)));
    let outcome = match elector.as_mut() {
        Some(elector) => tokio::select! {
            () = elector.hold() => Err(Error::LostLeadership),
            signal = signals.recv() => {
                info!(signal, "shutting down");
                Ok(())
            }
        },
        None => {
            let signal = signals.recv().await;
            info!(signal, "shutting down");
            Ok(())
        }
    };
    for task in [services, watches, collector, node_controllers]
        .into_iter()
        .flatten()
    {
        task.abort();
    }
    if let (Some(elector), Ok(())) = (elector.as_mut(), &outcome) {
        elector.release().await;
    }
    api_check.abort();
    stop_server(server).await?;
    outcome
}

/// Unique per replica: the Pod's hostname, and the pid for several
/// processes on one host.
fn identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .unwrap_or_else(|| "cnlb-ccm".to_string());
    format!("{}_{}", host.trim(), std::process::id())
}

async fn start_server(
    bind: BindAddress,
    health: &Arc<Health>,
    metrics: &Arc<Metrics>,
) -> Result<Option<Server>, Error> {
    let BindAddress::Addr(addr) = bind else {
        info!("--metrics-bind-address=0: HTTP server (metrics and probes) disabled");
        return Ok(None);
    };
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })?;
    info!(%addr, "serving /metrics, /healthz and /readyz");
    Ok(Some(Server::start(
        listener,
        health.clone(),
        metrics.clone(),
    )))
}

async fn stop_server(server: Option<Server>) -> Result<(), Error> {
    match server {
        Some(server) => server.stop().await.map_err(Error::Serve),
        None => Ok(()),
    }
}

async fn kube_client(kubeconfig: Option<&Path>) -> Result<Client, Error> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig_error = |source| Error::Kubeconfig {
                path: path.to_owned(),
                source,
            };
            let file = Kubeconfig::read_from(path).map_err(kubeconfig_error)?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(kubeconfig_error)?
        }
        None => Config::infer().await.map_err(Error::InferConfig)?,
    };
    info!(api_server = %config.cluster_url, "Kubernetes configuration loaded");
    build_client(config)
}

/// What --provider names: its load balancers and its Nodes' instances.
struct Providers {
    load_balancers: Arc<dyn LoadBalancerProvider>,
    nodes: Arc<dyn NodeProvider>,
}

/// The providers named by --provider; their cloud API metrics go to the
/// registry /metrics serves. `plugin_tls`: mutual TLS to the on-prem plugin.
async fn build_provider(
    args: &Args,
    plugin_tls: Option<&ClientTls>,
    metrics: &Metrics,
) -> Result<Providers, Error> {
    match args.provider {
        Provider::Aws => {
            let vpc_id = args
                .aws_vpc_id
                .clone()
                .ok_or(Error::MissingFlag("--aws-vpc-id"))?;
            let clients = cnlb_provider_aws::Clients::from_env().await;
            let mut config = AwsConfig::new(vpc_id);
            config.rate_limits = RateLimits {
                read: args.aws_read_rate,
                targets: args.aws_targets_rate,
                write: args.aws_write_rate,
                ..RateLimits::default()
            };
            config.backend_security_group = args.aws_backend_security_group;
            let provider = AwsProvider::new(clients, config, &mut metrics.registry());
            Ok(Providers {
                nodes: Arc::new(provider.nodes()),
                load_balancers: Arc::new(provider),
            })
        }
        Provider::Onprem => {
            let endpoint = args
                .onprem_plugin
                .as_ref()
                .ok_or(Error::MissingFlag("--onprem-plugin"))?;
            if let (PluginEndpoint::Tcp(addr), None) = (endpoint, plugin_tls)
                && !addr.ip().to_canonical().is_loopback()
            {
                warn!(
                    plugin = %endpoint,
                    "the plugin connection is plaintext: neither end is authenticated \
                     (see --onprem-plugin-tls-ca)"
                );
            }
            // Lazy: a plugin that is not up yet (or restarts) makes
            // reconciles fail and retry with Events, not the controller exit.
            let provider = GrpcProvider::lazy_with_tls(endpoint, plugin_tls, "onprem")
                .map_err(|e| Error::Provider(e.to_string()))?;
            let provider = Arc::new(provider);
            Ok(Providers {
                nodes: Arc::new(PluginNodes::new(provider.clone())),
                load_balancers: provider,
            })
        }
        Provider::Gcp => {
            let flag = |value: &Option<String>, name| value.clone().ok_or(Error::MissingFlag(name));
            let connection = cnlb_provider_gcp::Connection {
                endpoint: args.gcp_endpoint.clone(),
            };
            let compute = cnlb_provider_gcp::Compute::connect(&connection)
                .await
                .map_err(|e| Error::Provider(e.to_string()))?;
            let limits = args.gcp_rate_limits();
            let project = flag(&args.gcp_project, "--gcp-project")?;
            let calls = cnlb_provider_gcp::Calls::new(
                compute,
                project.clone(),
                &limits,
                &mut metrics.registry(),
            );
            let config = cnlb_provider_gcp::GcpConfig {
                project,
                region: flag(&args.gcp_region, "--gcp-region")?,
                network: flag(&args.gcp_network, "--gcp-network")?,
                subnetwork: flag(&args.gcp_subnetwork, "--gcp-subnetwork")?,
                zones: args.gcp_zones.clone(),
                proxy_source_ranges: args.gcp_proxy_source_range.clone(),
            };
            let provider = cnlb_provider_gcp::GcpProvider::new(calls, config)
                .await
                .map_err(|e| Error::Provider(e.to_string()))?;
            Ok(Providers {
                nodes: Arc::new(provider.nodes()),
                load_balancers: Arc::new(provider),
            })
        }
    }
}

fn build_client(config: Config) -> Result<Client, Error> {
    Client::try_from(config).map_err(Error::Client)
}

/// Asks the API server for its version until it answers, with exponential
/// backoff and jitter, bounded so a wrong address ends in a clear exit
/// (and a kubelet restart with its own backoff) instead of a silent hang.
async fn wait_for_api(client: &Client, metrics: &Metrics) -> Result<Info, kube::Error> {
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(30))
        .with_max_times(10)
        .with_jitter();
    let result = (|| client.apiserver_version())
        .retry(backoff)
        .when(is_transient)
        .notify(|err, delay| {
            metrics.set_kube_api_reachable(false);
            warn!(
                error = %error_chain(err),
                retry_in = ?delay,
                "Kubernetes API server not reachable yet"
            );
        })
        .await;
    metrics.set_kube_api_reachable(result.is_ok());
    result
}

/// Wrong credentials do not fix themselves: fail at once on 401/403.
fn is_transient(err: &kube::Error) -> bool {
    !matches!(err, kube::Error::Api(status) if matches!(status.code, 401 | 403))
}

/// Keeps `cnlb_kube_api_reachable` honest after start-up and logs changes.
async fn check_api_periodically(client: Client, metrics: Arc<Metrics>) {
    let mut reachable = true;
    let mut ticks = tokio::time::interval(API_CHECK_PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await; // the first tick is immediate; we just connected
    loop {
        ticks.tick().await;
        let now = match tokio::time::timeout(API_CHECK_TIMEOUT, client.apiserver_version()).await {
            Ok(Ok(_)) => true,
            Ok(Err(err)) => {
                if reachable {
                    warn!(error = %error_chain(&err), "Kubernetes API server not reachable");
                }
                false
            }
            Err(_) => {
                if reachable {
                    let timeout = API_CHECK_TIMEOUT;
                    warn!(?timeout, "Kubernetes API server did not answer in time");
                }
                false
            }
        };
        if now && !reachable {
            info!("Kubernetes API server reachable again");
        }
        reachable = now;
        metrics.set_kube_api_reachable(now);
    }
}

/// "outer: inner: root cause", since kube's top-level messages are terse.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        // Wrappers often repeat their cause's message; say it once.
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn builds_a_tls_client() {
        let config = Config::new("https://127.0.0.1:6443".parse().unwrap());
        build_client(config).unwrap();
    }

    #[test]
    fn auth_failures_are_not_retried() {
        let status = |code| {
            kube::Error::Api(Box::new(kube::core::Status {
                code,
                ..Default::default()
            }))
        };
        assert!(!is_transient(&status(401)));
        assert!(!is_transient(&status(403)));
        assert!(is_transient(&status(503)));
        assert!(is_transient(&status(429)));
    }
}
