//! `cnlb-env`: start the local environment by hand, or clean up after one.

use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use cnlb_localstack_tests::env::{KEEP_VAR, clean_stale};
use cnlb_localstack_tests::{Env, NodeConfig};

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
        /// Nodes to create and play kubelet for.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(0..=200))]
        nodes: u8,
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
        /// Real Pod networking (network namespaces, ptp, a server per Pod)
        /// with this IPAM; `none` makes Pod IPs up.
        #[arg(long, value_enum, default_value_t = PodNetwork::None)]
        pod_network: PodNetwork,
    },
    /// Kill what a killed test or `up` left behind and remove its directories
    /// (environments of running processes and kept logs are left alone).
    Down,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PodNetwork {
    None,
    /// vpc-ipam with a vpc-ipam-agent per Node (static backend).
    VpcIpam,
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
        Cmd::Down => {
            let cleaned = clean_stale()?;
            for netns in &cleaned.netns {
                println!("cnlb-env: removed network namespace {netns}");
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
            no_aws,
            gce,
            check,
            timeout,
            pod_network,
        } => {
            let mut b = Env::builder("up")
                .nodes((1..=nodes).map(NodeConfig::numbered).collect())
                .kube()
                .timeout(Duration::from_secs(timeout));
            if !no_aws {
                b = b.moto().localstack();
            }
            if gce {
                b = b.gce();
            }
            match pod_network {
                PodNetwork::None => {}
                PodNetwork::VpcIpam => b = b.pod_network(),
            }
            let env = b.start().await?;
            print_summary(&env, no_aws, gce)?;
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

fn print_summary(env: &Env, no_aws: bool, with_gce: bool) -> Result<()> {
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
    if let Ok(cidr) = env.pod_cidr() {
        println!("\nPod network: {cidr}");
        println!(
            "  network namespaces: ip netns list | grep {}",
            env.netns_prefix()?
        );
        for i in 0.. {
            let Ok(range) = env.pod_range(i) else { break };
            match env.agent_pid(i)? {
                Some(_) => println!(
                    "  node {i}: pod range {range}, agent socket {}",
                    env.agent_socket(i)?.display()
                ),
                None => println!("  node {i}: pod range {range}"),
            }
        }
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
        println!("\nGCE (cnlb-gce-emulator, see localstack-tests/GCE_EMULATOR.md):");
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
