//! `cnlb-bench-nodes` (`make bench-nodes`): N Nodes, each an EC2 instance
//! in moto, registered as kubelets with `--cloud-provider=external` register
//! them (Node objects with the `uninitialized` taint, named by their
//! instances' private DNS names), initialized by `cnlb-ccm`'s node
//! controllers at their default rates. Prints the time to initialize them
//! all and the DescribeInstances calls (from cnlb-ccm's
//! `cnlb_cloud_api_calls_total`) for initialization, per address sync
//! period (every Node Ready) and per lifecycle period (every Node NotReady).

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use cnlb_localstack_tests::paths::workspace_bin;
use cnlb_localstack_tests::process::{Proc, free_port};
use cnlb_localstack_tests::{Env, eventually};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Nodes (and instances).
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// cnlb-ccm's --node-status-update-frequency, in seconds.
    #[arg(long, default_value_t = 10)]
    address_sync_secs: u64,
    /// cnlb-ccm's --node-monitor-period, in seconds.
    #[arg(long, default_value_t = 5)]
    monitor_secs: u64,
    /// Periods of each kind over which calls are counted.
    #[arg(long, default_value_t = 3)]
    periods: u64,
}

const UNINITIALIZED: &str = "node.cloudprovider.kubernetes.io/uninitialized";
const WAIT: Duration = Duration::from_secs(1800);

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    println!("starting the environment (control plane, moto)...");
    let env = Env::builder("bench-nodes").kube().moto().start().await?;
    let client = env.kube()?.admin_client()?;
    let aws = env.aws()?;
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(&aws.ec2)
        .region(aws_config::Region::new(cnlb_localstack_tests::aws::REGION))
        .test_credentials()
        .load()
        .await;
    let ec2 = aws_sdk_ec2::Client::new(&conf);
    let (vpc, names) = instances(&ec2, args.nodes).await?;
    println!("{} instances running in moto", names.len());

    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let mut cmd = Command::new(workspace_bin("cnlb-ccm")?);
    cmd.arg(format!("--kubeconfig={}", env.kube()?.kubeconfig.display()))
        .args([
            "--cluster-name=bench",
            "--provider=aws",
            "--leader-elect=false",
        ])
        .args(["--controllers=cloud-node,cloud-node-lifecycle"])
        .arg(format!("--aws-vpc-id={vpc}"))
        .arg(format!("--metrics-bind-address={metrics}"))
        .arg(format!(
            "--node-status-update-frequency={}s",
            args.address_sync_secs
        ))
        .arg(format!("--node-monitor-period={}s", args.monitor_secs))
        .envs(aws.env_vars());
    let ccm = Proc::spawn("cnlb-ccm", cmd, &env.dir)?;
    let calls = || describe_calls(metrics);
    eventually(
        "cnlb-ccm serves its metrics",
        Duration::from_secs(60),
        || async { calls().await.map(|_| true) },
    )
    .await?;

    // Registered as fast as the API takes them, 20 at a time.
    let nodes: Api<Node> = Api::all(client.clone());
    let started = Instant::now();
    futures::stream::iter(names.iter().cloned())
        .map(|name| register(&nodes, name))
        .buffer_unordered(20)
        .collect::<Vec<Result<()>>>()
        .await
        .into_iter()
        .collect::<Result<()>>()?;
    let registered = started.elapsed();
    eventually(
        &format!("{} Nodes initialized", args.nodes),
        WAIT,
        || async {
            let list = nodes.list(&ListParams::default()).await?;
            Ok(list.items.len() == args.nodes && list.items.iter().all(initialized))
        },
    )
    .await?;
    let initialized_in = started.elapsed();
    let init_calls = calls().await?;

    // Every Node Ready: the lifecycle controller asks nothing; each
    // address sync asks about every Node.
    set_ready(&client, &names, true).await?;
    let sync_period = Duration::from_secs(args.address_sync_secs);
    let monitor_period = Duration::from_secs(args.monitor_secs);
    tokio::time::sleep(monitor_period).await;
    let periods = u32::try_from(args.periods)?;
    let sync = per_periods(&calls, sync_period, periods).await? / f64::from(periods);
    // Every Node NotReady: each lifecycle check asks about every Node too;
    // over whole sync periods, the syncs' share is known.
    set_ready(&client, &names, false).await?;
    tokio::time::sleep(monitor_period).await;
    let both = per_periods(&calls, sync_period, periods).await?;
    let checks = f64::from(periods) * sync_period.as_secs_f64() / monitor_period.as_secs_f64();
    let lifecycle = (both - sync * f64::from(periods)).max(0.0) / checks;
    ccm.check_running()?;

    let per_200 = |calls: f64| calls / (args.nodes as f64 / 200.0);
    println!();
    println!("| figure | value |");
    println!("|---|---|");
    println!("| Nodes (EC2 instances in moto) | {} |", args.nodes);
    println!(
        "| registered (20 at a time) in | {:.1} s |",
        registered.as_secs_f64()
    );
    println!(
        "| every Node initialized (provider ID, addresses, labels, taint removed) after | {:.1} s |",
        initialized_in.as_secs_f64()
    );
    println!(
        "| DescribeInstances for initialization | {init_calls} ({:.2} per 200 Nodes) |",
        init_calls / (args.nodes as f64 / 200.0)
    );
    println!(
        "| DescribeInstances per address sync (every {} s) | {sync:.1} ({:.2} per 200 Nodes) |",
        args.address_sync_secs,
        per_200(sync)
    );
    println!(
        "| DescribeInstances per lifecycle check (every {} s, every Node NotReady) | {lifecycle:.1} ({:.2} per 200 Nodes) |",
        args.monitor_secs,
        per_200(lifecycle)
    );
    Ok(())
}

/// A VPC with one /20 subnet and `n` instances in it (RunInstances of up
/// to 200 at a time); the VPC ID and the instances' private DNS names.
async fn instances(ec2: &aws_sdk_ec2::Client, n: usize) -> Result<(String, Vec<String>)> {
    if n > 4000 {
        bail!("at most 4000 Nodes fit the benchmark's subnet");
    }
    let vpc = ec2.create_vpc().cidr_block("10.1.0.0/16").send().await?;
    let vpc = vpc.vpc.and_then(|v| v.vpc_id).context("no VPC ID")?;
    let subnet = ec2
        .create_subnet()
        .vpc_id(&vpc)
        .availability_zone("us-east-1a")
        .cidr_block("10.1.0.0/20")
        .send()
        .await?;
    let subnet = subnet
        .subnet
        .and_then(|s| s.subnet_id)
        .context("no subnet ID")?;
    let images = ec2.describe_images().send().await?;
    let image = images
        .images()
        .first()
        .and_then(|i| i.image_id())
        .context("moto has no image")?
        .to_string();
    let mut names = Vec::new();
    while names.len() < n {
        let count = i32::try_from((n - names.len()).min(200))?;
        let run = ec2
            .run_instances()
            .image_id(&image)
            .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
            .subnet_id(&subnet)
            .min_count(count)
            .max_count(count)
            .send()
            .await?;
        names.extend(
            run.instances()
                .iter()
                .filter_map(|i| i.private_dns_name().map(String::from)),
        );
    }
    Ok((vpc, names))
}

async fn register(nodes: &Api<Node>, name: String) -> Result<()> {
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"taints": [{"key": UNINITIALIZED, "value": "true", "effect": "NoSchedule"}]},
    }))?;
    nodes.create(&PostParams::default(), &node).await?;
    Ok(())
}

fn initialized(node: &Node) -> bool {
    let spec = node.spec.clone().unwrap_or_default();
    spec.provider_id.is_some()
        && !spec
            .taints
            .unwrap_or_default()
            .iter()
            .any(|t| t.key == UNINITIALIZED)
}

/// Reports every Node Ready (or not), as their kubelets would.
async fn set_ready(client: &Client, names: &[String], ready: bool) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let status = if ready { "True" } else { "False" };
    let now = Time(Timestamp::now());
    let patch = json!({"status": {"conditions": [{
        "type": "Ready", "status": status, "reason": "Bench",
        "lastHeartbeatTime": now, "lastTransitionTime": now,
    }]}});
    let (params, patch) = (PatchParams::default(), Patch::Strategic(&patch));
    futures::stream::iter(names)
        .map(|name| nodes.patch_status(name, &params, &patch))
        .buffer_unordered(20)
        .map(|r| r.map(|_| ()))
        .try_collect::<()>()
        .await?;
    Ok(())
}

/// DescribeInstances calls of `periods` whole periods of `period`: from
/// the start of the next run (the first call seen, sampling every 100 ms)
/// to just before the run `periods` periods later.
async fn per_periods<F, Fut>(calls: &F, period: Duration, periods: u32) -> Result<f64>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<f64>>,
{
    let mut before = calls().await?;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = calls().await?;
        if now > before {
            break;
        }
        before = now;
    }
    tokio::time::sleep(period * periods - Duration::from_millis(500)).await;
    Ok(calls().await? - before)
}

async fn describe_calls(metrics: SocketAddr) -> Result<f64> {
    let text = reqwest::get(format!("http://{metrics}/metrics"))
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("cnlb_cloud_api_calls_total") && l.contains("DescribeInstances"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}
