//! `vpc-ipam-agent`: the per-node agent behind the vpc-ipam CNI plugin.
//!
//! Start-up order matters for crash safety: the state is reconciled with
//! the backend before any request is answered; the socket is bound first
//! so that plugins arriving meanwhile queue instead of finding no agent.

use std::os::unix::fs::DirBuilderExt;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use cnlb_runtime::probes::{self, Health};
use cnlb_runtime::signals::Signals;
use cnlb_runtime::telemetry;
use cnlb_vpc_ipam::agent::{Agent, AgentConfig, StartError};
use cnlb_vpc_ipam::agent_cli::{
    AgentArgs, Backend as BackendKind, NLB_DEFAULT_DEREGISTRATION_DELAY,
};
use cnlb_vpc_ipam::backend::aws::AwsBackend;
use cnlb_vpc_ipam::backend::gcp::GcpBackend;
use cnlb_vpc_ipam::backend::static_ranges::StaticRanges;
use cnlb_vpc_ipam::backend::{Backend, kube_client};
use cnlb_vpc_ipam::datapath::DatapathConfig;
use cnlb_vpc_ipam::install::{InstallArgs, install};
use cnlb_vpc_ipam::metrics::Metrics;
use cnlb_vpc_ipam::pool::TargetFlags;
use cnlb_vpc_ipam::server;
use cnlb_vpc_ipam::store::Store;
use prometheus_client::registry::Registry;
use tracing::{error, info, warn};

/// Waits before retrying a start that failed on a transient cloud error.
const START_RETRY: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "install-cni")
    {
        let args = InstallArgs::parse_from(std::env::args_os().skip(1));
        return match install(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(msg) => {
                eprintln!("vpc-ipam-agent install-cni: {msg}");
                ExitCode::FAILURE
            }
        };
    }
    let args = AgentArgs::parse_validated();
    if let Err(err) = telemetry::init(args.log_format) {
        eprintln!("vpc-ipam-agent: {err}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("vpc-ipam-agent: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            error!("{msg}");
            eprintln!("vpc-ipam-agent: {msg}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: AgentArgs) -> Result<(), String> {
    info!(
        node = %args.node_name,
        backend = %args.backend,
        socket = %args.socket.display(),
        state_dir = %args.state_dir.display(),
        cooldown = ?args.cooldown,
        "starting vpc-ipam-agent"
    );
    if args.cooldown < NLB_DEFAULT_DEREGISTRATION_DELAY {
        warn!(
            cooldown = ?args.cooldown,
            "--cooldown is shorter than the NLB default deregistration delay (300s): \
             a released address may be reused while a load balancer still sends it traffic"
        );
    }
    // Allocation state is private to root: 0700 for a directory we create.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&args.state_dir)
        .map_err(|e| {
            format!(
                "cannot create --state-dir {}: {e}",
                args.state_dir.display()
            )
        })?;
    let store_path = args.state_dir.join("state.redb");
    let store = Store::open(&store_path)
        .map_err(|e| format!("cannot open {}: {e}", store_path.display()))?;

    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let backend: Arc<dyn Backend> = match args.backend {
        BackendKind::Static if args.static_node_pod_cidrs => Arc::new(StaticRanges::from_node(
            kube_client().await.map_err(|e| e.to_string())?,
            &args.node_name,
        )),
        BackendKind::Static => {
            Arc::new(StaticRanges::new(&args.static_ranges).map_err(|e| e.to_string())?)
        }
        BackendKind::Aws => Arc::new(
            AwsBackend::new(
                &args.aws,
                &args.cluster_name,
                &args.node_name,
                &mut registry,
            )
            .await
            .map_err(|e| e.to_string())?,
        ),
        BackendKind::Gcp => Arc::new(
            GcpBackend::new(&args.gcp, &args.node_name, &mut registry)
                .await
                .map_err(|e| e.to_string())?,
        ),
    };
    let registry = Arc::new(registry);

    // Ready once the state is reconciled and the socket accepts requests.
    let health = Arc::new(Health::new("reconciling"));
    let http = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .map_err(|e| format!("cannot listen on --metrics-addr {}: {e}", args.metrics_addr))?;
    let http_addr = http.local_addr().map_err(|e| e.to_string())?;
    info!(addr = %http_addr, "serving /metrics, /healthz and /readyz");
    let http = probes::Server::start(http, health.clone(), registry);

    let listener = server::bind(&args.socket)
        .map_err(|e| format!("cannot listen on --socket {}: {e}", args.socket.display()))?;

    let config = AgentConfig {
        targets: TargetFlags {
            min: args.min_target.map(|n| n as usize),
            warm: args.warm_target.map(|n| n as usize),
            max: args.max_target.map(|n| n as usize),
        },
        cooldown: args.cooldown,
        add_timeout: args.add_timeout,
        batch_delay: Duration::from_millis(100),
    };
    let routing = (matches!(args.backend, BackendKind::Aws) && args.aws.aws_node_routing)
        .then_some(DatapathConfig {
            mtu: args.aws.aws_eni_mtu,
            external_snat: args.aws.aws_external_snat,
        });
    let mut store = Some(store);
    let agent = loop {
        let Some(s) = store.take() else {
            return Err("internal: store consumed".into());
        };
        // The store moves into the agent only on success; on a transient
        // failure it is reopened (redb releases its lock on drop).
        match Agent::start(
            backend.clone(),
            s,
            config.clone(),
            routing.clone(),
            metrics.clone(),
        )
        .await
        {
            Ok(agent) => break agent,
            Err(StartError::Backend(err)) if err.is_transient() => {
                warn!(error = %err, "cannot reconcile with the backend yet; retrying");
                tokio::time::sleep(START_RETRY).await;
                store = Some(
                    Store::open(&store_path)
                        .map_err(|e| format!("cannot open {}: {e}", store_path.display()))?,
                );
            }
            Err(err) => return Err(format!("cannot start: {err}")),
        }
    };

    server::deliver_pending(&agent, &args.socket).await;
    if agent.elastic() {
        tokio::spawn(agent.clone().run_pool());
        tokio::spawn(agent.clone().run_garbage_collection(args.gc_interval));
    }
    // Until here a signal ends the process at once (nothing to drain).
    let mut signals =
        Signals::install().map_err(|e| format!("cannot install the signal handlers: {e}"))?;
    health.set_ready();
    info!(socket = %args.socket.display(), "serving the CNI plugin");
    server::serve(listener, agent, async move {
        let signal = signals.recv().await;
        info!(signal, "shutting down");
    })
    .await
    .map_err(|e| format!("socket {}: {e}", args.socket.display()))?;
    if let Err(e) = http.stop().await {
        warn!(error = %e, "HTTP server failed");
    }
    info!("stopped");
    Ok(())
}
