//! `cnlb-env`: start the local environment by hand, or clean up after one.

use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use cnlb_localstack_tests::env::{KEEP_VAR, clean_stale};
use cnlb_localstack_tests::{Env, NodeConfig};
use k8s_openapi::api::core::v1::Node;
use kube::api::ListParams;
use kube::{Api, ResourceExt};

#[derive(Parser)]
#[command(
    about = "Start or stop cnlb's local environment (real control plane, AWS and GCE emulators)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start every part, print how to reach them, run until Ctrl-C.
    Up {
        /// Real Nodes to start (containerd and a kubelet each).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(0..=200))]
        nodes: u8,
        /// Simulated Nodes instead (no containers: Pods get made-up IPs).
        #[arg(long)]
        simulated: bool,
        /// Start the kubelets with --cloud-provider=external (Nodes stay
        /// tainted until a cloud controller manager initializes them).
        #[arg(long)]
        external_cloud_provider: bool,
        /// Skip the AWS emulators.
        #[arg(long)]
        no_aws: bool,
        /// Also start the GCE emulator (cnlb-gce-emulator; build it first:
        /// `cargo build -p cnlb-localstack-tests --bins`).
        #[arg(long)]
        gce: bool,
        /// Stop as soon as everything is ready, after printing start time and memory.
        #[arg(long)]
        check: bool,
        /// Readiness deadline per part, in seconds.
        #[arg(long, default_value_t = 90)]
        timeout: u64,
    },
    /// Kill what a killed test or `up` left behind and remove its directories
    /// (environments of running processes and kept logs are left alone).
    Down,
    /// Write cnlb's images (and the local environment's) as OCI archives,
    /// from the binaries of this build.
    Images {
        /// Directory to write `<name>-<tag>.tar` into.
        #[arg(long)]
        out: std::path::PathBuf,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube_client=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Cmd::Images { out } => {
            for spec in cnlb_localstack_tests::images::workspace_images()? {
                let archive = cnlb_localstack_tests::images::write_archive(&spec, &out)?;
                let size = std::fs::metadata(&archive.path)?.len();
                println!(
                    "{}  {}  {} MiB  {}",
                    archive.reference,
                    archive.digest,
                    size >> 20,
                    archive.path.display()
                );
            }
        }
        Cmd::Down => {
            let cleaned = clean_stale()?;
            for what in &cleaned.ranges {
                println!("cnlb-env: removed {what}");
            }
            for dir in &cleaned.removed {
                println!("cnlb-env: stopped and removed {}", dir.display());
            }
            for dir in &cleaned.kept {
                println!(
                    "cnlb-env: left logs of a failed run in {} (remove by hand)",
                    dir.display()
                );
            }
        }
        Cmd::Up {
            nodes,
            simulated,
            external_cloud_provider,
            no_aws,
            gce,
            check,
            timeout,
        } => {
            let nodes = (1..=nodes).map(NodeConfig::numbered).collect();
            let mut b = Env::builder("up")
                .kube()
                .timeout(Duration::from_secs(timeout));
            b = if simulated {
                b.simulated_nodes(nodes)
            } else {
                b.nodes(nodes)
            };
            if external_cloud_provider {
                b = b.external_cloud_provider();
            }
            if !no_aws {
                b = b.moto().localstack();
            }
            if gce {
                b = b.gce();
            }
            let env = b.start().await?;
            print_summary(&env, no_aws, gce).await?;
            if !check {
                // Keep the directory until Ctrl-C so the printed paths stay valid.
                println!("\nRunning; Ctrl-C stops and removes everything.");
                tokio::signal::ctrl_c().await?;
                if std::env::var_os(KEEP_VAR).is_none() {
                    println!("cnlb-env: stopping");
                }
            }
        }
    }
    Ok(())
}

async fn print_summary(env: &Env, no_aws: bool, with_gce: bool) -> Result<()> {
    let mem = env.memory();
    println!("cnlb-env ready in {:.1} s", env.ready_in().as_secs_f64());
    println!(
        "  memory: {} MiB resident now, {} MiB peak, {} processes",
        mem.rss >> 20,
        mem.peak >> 20,
        mem.processes
    );
    println!("  directory (logs, certificates): {}", env.dir.display());
    let cp = env.kube()?;
    println!(
        "\nKubernetes:\n  export KUBECONFIG={}",
        cp.kubeconfig.display()
    );
    if let Ok(kubectl) = cnlb_localstack_tests::paths::control_plane_bin("kubectl") {
        println!("  {} get nodes", kubectl.display());
    }
    let nodes: Api<Node> = Api::all(cp.admin_client()?);
    let list = nodes.list(&ListParams::default()).await?;
    if !list.items.is_empty() {
        println!("\nNodes:");
    }
    for node in &list.items {
        let info = node.status.as_ref().and_then(|s| s.node_info.clone());
        let ip = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .and_then(|a| a.iter().find(|a| a.type_ == "InternalIP"))
            .map(|a| a.address.clone())
            .unwrap_or_default();
        let ready = if cnlb_localstack_tests::node::is_ready(node) {
            "Ready"
        } else {
            "NotReady"
        };
        println!(
            "  {:<8} {ready:<8} {ip:<15} kubelet {:<9} {}",
            node.name_any(),
            info.as_ref()
                .map(|i| i.kubelet_version.as_str())
                .unwrap_or("?"),
            info.as_ref()
                .map(|i| i.container_runtime_version.as_str())
                .unwrap_or("no container runtime (simulated)"),
        );
    }
    if let Ok(cidr) = env.pod_cidr() {
        println!("\nPod network: {cidr} (vpc-ipam)");
    }
    if !no_aws {
        println!("\nAWS (moto: EC2 + ELBv2):");
        for (k, v) in env.aws()?.env_vars() {
            println!("  export {k}={v}");
        }
        println!("LocalStack (EC2): {}", env.localstack()?.ec2);
    }
    if with_gce {
        let gce = env.gce()?;
        println!("\nGCE (cnlb-gce-emulator, see localstack-tests/gce-emulator/GCE_EMULATOR.md):");
        println!("  endpoint: {}", gce.endpoint());
        println!(
            "  project {}, region {}, zones {}, network {}, subnetwork {}",
            gce.project(),
            gce.region(),
            gce.zones().join(","),
            gce.network(),
            gce.options().subnetwork
        );
        println!("  state: curl {}/emulator/v1/resources", gce.endpoint());
    }
    Ok(())
}
