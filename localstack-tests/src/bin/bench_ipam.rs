//! `cnlb-bench-ipam`: vpc-ipam's latency and throughput, printed.
//!
//! - warm-pool ADD latency, p50/p99, of the IPAM plugin alone (process
//!   start, socket round trip, durable commit) and through Debian's ptp
//!   plugin in a fresh network namespace;
//! - sustained allocations per second (concurrent ADD+DEL pairs);
//! - with the AWS backend on moto: cold-pool ADD latency (the pool is empty,
//!   the ADD waits for the cloud) and EC2 calls per Pod, warm and cold;
//! - bursts: the agent with its default pool and rates, on a node that just
//!   warmed up, behind the fault proxy acting as an account with EC2's
//!   documented rate limits; ADDs fired on a schedule (10/s, 50/s), not one
//!   after the other, as kubelet starts Pods of a scaled Deployment.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use cnlb_localstack_tests::fault_proxy::{AccountLimits, Call, Cloud, FaultProxy, Faults, Outcome};
use cnlb_localstack_tests::ipam::{
    self, CniCall, IpamAgent, Netns, PTP_CNI_VERSION, ipam_add, ipam_del,
};
use cnlb_localstack_tests::{AwsEndpoints, Env, eventually};

#[derive(Parser)]
struct Args {
    /// ADDs timed for the plugin alone.
    #[arg(long, default_value_t = 1000)]
    adds: usize,
    /// ADDs timed through ptp (each in a new network namespace).
    #[arg(long, default_value_t = 100)]
    ptp_adds: usize,
    /// Seconds of concurrent ADD+DEL for the throughput figure.
    #[arg(long, default_value_t = 10)]
    sustained_secs: u64,
    /// Concurrent workers for the throughput figure.
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// ADDs timed on an empty pool (AWS backend, moto).
    #[arg(long, default_value_t = 20)]
    cold_adds: usize,
    /// ADDs at a steady pace on a warm pool (AWS backend, moto), for EC2
    /// calls per Pod.
    #[arg(long, default_value_t = 100)]
    warm_adds: usize,
    /// ADDs of each burst (AWS backend, default pool, account limits).
    #[arg(long, default_value_t = 100)]
    burst_adds: usize,
    /// ADDs per second of each burst (repeatable).
    #[arg(long = "burst-rate", default_values_t = [10, 50])]
    burst_rates: Vec<u32>,
    /// Only the bursts.
    #[arg(long)]
    burst_only: bool,
    /// A flag for the bursts' agents instead of a default, repeatable
    /// (`--burst-agent-flag=--warm-target=4`).
    #[arg(long = "burst-agent-flag", allow_hyphen_values = true)]
    burst_agent_flags: Vec<String>,
    /// Milliseconds the account adds to every EC2 call in the bursts (moto
    /// answers at once; EC2 takes tens to hundreds of ms, and an attach
    /// seconds).
    #[arg(long, default_value_t = 0)]
    burst_ec2_latency_ms: u64,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{what}: n={} p50={:.2} ms p99={:.2} ms max={:.2} ms",
        samples.len(),
        percentile(&samples, 50.0).as_secs_f64() * 1e3,
        percentile(&samples, 99.0).as_secs_f64() * 1e3,
        samples.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
}

async fn static_agent(dir: &std::path::Path, range: &str) -> Result<IpamAgent> {
    IpamAgent::start(
        dir,
        "bench-node",
        &[
            "--cluster-name",
            "bench",
            "--backend",
            "static",
            "--static-range",
            range,
            "--cooldown",
            "0s",
        ],
        &[],
    )
    .await
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    if args.burst_only {
        return aws(&args, dir.path()).await;
    }

    let agent = static_agent(&dir.path().join("static"), "10.239.0.0/22").await?;
    let conf = agent.netconf("1.1.0", "vpc-ipam");
    let mut samples = Vec::with_capacity(args.adds);
    for i in 0..args.adds {
        let id = format!("warm-{i}");
        let started = Instant::now();
        let add = ipam_add(&conf, &id).await?;
        samples.push(started.elapsed());
        add.ip()?;
        ipam_del(&conf, &id).await?;
    }
    report("warm ADD, IPAM plugin alone (static backend)", samples);

    let ptp_conf = agent.netconf(PTP_CNI_VERSION, "ptp");
    let mut samples = Vec::with_capacity(args.ptp_adds);
    for i in 0..args.ptp_adds {
        let id = format!("ptp-{i}");
        let netns = Netns::create(&format!("cnlb-bench-{i}"))?;
        let started = Instant::now();
        let add = CniCall::new("ptp", "ADD", &id)
            .netns(&netns.path())
            .run(&ptp_conf)
            .await?;
        samples.push(started.elapsed());
        add.ip()?;
        CniCall::new("ptp", "DEL", &id)
            .netns(&netns.path())
            .run(&ptp_conf)
            .await?;
    }
    report("warm ADD through ptp (veth + routes + IPAM)", samples);

    let deadline = Instant::now() + Duration::from_secs(args.sustained_secs);
    let workers: Vec<_> = (0..args.workers)
        .map(|w| {
            let conf = conf.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let id = format!("tp-{w}-{n}");
                    ipam_add(&conf, &id).await?.ip()?;
                    ipam_del(&conf, &id).await?;
                    n += 1;
                }
                anyhow::Ok(n)
            })
        })
        .collect();
    let mut total = 0;
    for w in workers {
        total += w.await.context("worker")??;
    }
    println!(
        "sustained: {:.0} allocations/s (ADD+DEL pairs, {} workers, {} s, plugin processes included)",
        total as f64 / args.sustained_secs as f64,
        args.workers,
        args.sustained_secs
    );
    drop(agent);

    aws(&args, dir.path()).await
}

/// Sum of `cnlb_cloud_api_calls_total` over all operations.
async fn ec2_calls(agent: &IpamAgent) -> Result<f64> {
    Ok(agent
        .metrics()
        .await?
        .lines()
        .filter(|l| l.starts_with("cnlb_cloud_api_calls_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// An agent on a new node; `cloud`: where the agent reaches EC2 (moto, or
/// the fault proxy in front of it); `extra`: pool and rate flags.
async fn aws_agent(
    dir: &std::path::Path,
    env: &Env,
    node: &str,
    cloud: &AwsEndpoints,
    extra: &[&str],
) -> Result<IpamAgent> {
    let kube = env.kube()?;
    let moto = env.aws()?;
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(&moto.ec2)
        .region(aws_config::Region::new(cnlb_localstack_tests::aws::REGION))
        .test_credentials()
        .load()
        .await;
    let ec2 = aws_sdk_ec2::Client::new(&conf);
    ipam::aws_node(&ec2, &kube.admin_client()?, node, "100.64.0.0/17").await?;
    let mut envs: Vec<(String, String)> = cloud
        .env_vars()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    envs.push(("KUBECONFIG".into(), kube.kubeconfig.display().to_string()));
    let tag = format!("cnlb.dev/pods={node}");
    let mut flags = vec![
        "--cluster-name",
        "bench",
        "--backend",
        "aws",
        "--aws-pod-subnet-tag",
        &tag,
        // The host has no ENI links: the emulated VPC tests route.
        "--aws-node-routing=false",
        // moto's instance is an m5.large (3 ENIs of 10 addresses, 18 for
        // Pods), which 100 Pods do not fit: these are an m5.4xlarge's.
        "--aws-max-enis",
        "8",
        "--aws-ips-per-eni",
        "30",
    ];
    flags.extend_from_slice(extra);
    IpamAgent::start(&dir.join(node), node, &flags, &envs).await
}

/// `--min-target`, `--warm-target`, `--max-target` and no cooldown.
fn pool_flags<'a>([min, warm, max]: [&'a str; 3], extra: &[&'a str]) -> Vec<&'a str> {
    let mut flags = vec![
        "--min-target",
        min,
        "--warm-target",
        warm,
        "--max-target",
        max,
        "--cooldown",
        "0s",
    ];
    flags.extend_from_slice(extra);
    flags
}

/// Cold ADDs: no warm pool, so each ADD waits for the cloud and each DEL's
/// address goes back. The first ADD of the node creates and attaches its
/// first Pod ENI; that address is kept so the ENI stays, and the others
/// measure AssignPrivateIpAddresses on an attached ENI.
async fn cold(
    args: &Args,
    dir: &std::path::Path,
    env: &Env,
    node: &str,
    extra: &[&str],
    limits: &str,
) -> Result<()> {
    let flags = pool_flags(["0", "0", "0"], extra);
    let agent = aws_agent(dir, env, node, &env.aws()?, &flags).await?;
    let conf = agent.netconf("1.1.0", "vpc-ipam");
    let started = Instant::now();
    ipam_add(&conf, "first").await?.ip()?;
    println!(
        "cold ADD, node without a Pod ENI (create, attach, assign), {limits}: {:.0} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    let mut samples = Vec::new();
    for i in 0..args.cold_adds {
        let id = format!("cold-{i}");
        let started = Instant::now();
        ipam_add(&conf, &id).await?.ip()?;
        samples.push(started.elapsed());
        ipam_del(&conf, &id).await?;
        eventually("address given back", Duration::from_secs(30), || async {
            Ok(agent.metric("vpc_ipam_addresses{state=\"free\"}").await? == 0.0)
        })
        .await?;
    }
    report(
        &format!("cold ADD, empty pool, Pod ENI attached, {limits}"),
        samples,
    );
    Ok(())
}

async fn aws(args: &Args, dir: &std::path::Path) -> Result<()> {
    println!("starting the environment (control plane, moto) for the AWS backend...");
    let env = Env::builder("bench-ipam").kube().moto().start().await?;
    if args.burst_only {
        return bursts(args, dir, &env).await;
    }

    cold(args, dir, &env, "cold", &[], "default rate limits").await?;
    cold(
        args,
        dir,
        &env,
        "cold-raised",
        &["--aws-write-rate", "20/40", "--aws-read-rate", "40/80"],
        "raised rate limits",
    )
    .await?;

    // Warm: small watermarks (min 1, warm 4, max 16, the defaults before
    // one refill unit), ADDs one after the other about 10/s.
    let flags = pool_flags(["1", "4", "16"], &[]);
    let agent = aws_agent(dir, &env, "warm", &env.aws()?, &flags).await?;
    let conf = agent.netconf("1.1.0", "vpc-ipam");
    eventually("warm pool", Duration::from_secs(30), || async {
        Ok(agent.metric("vpc_ipam_addresses{state=\"free\"}").await? >= 4.0)
    })
    .await?;
    let calls_before = ec2_calls(&agent).await?;
    let waits_before = agent.metric("vpc_ipam_add_waits_total").await?;
    let mut samples = Vec::new();
    for i in 0..args.warm_adds {
        let started = Instant::now();
        CniCall::new("vpc-ipam", "ADD", &format!("warm-{i}"))
            .netns("/var/run/netns/x")
            .run(&conf)
            .await?
            .ip()?;
        samples.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let calls = ec2_calls(&agent).await? - calls_before;
    let waits = agent.metric("vpc_ipam_add_waits_total").await? - waits_before;
    report("warm ADD, AWS backend on moto, 10 ADDs/s", samples);
    println!(
        "EC2 calls per Pod: {:.2} (pool refills in the background: {calls} calls for {} Pods); \
         on the ADD path: 0 ({waits} of {} ADDs waited for the cloud)",
        calls / args.warm_adds as f64,
        args.warm_adds,
        args.warm_adds
    );
    let rest_before = ec2_calls(&agent).await?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    println!(
        "EC2 calls in 10 s at rest: {}",
        ec2_calls(&agent).await? - rest_before
    );
    drop(agent);
    bursts(args, dir, &env).await
}

async fn bursts(args: &Args, dir: &std::path::Path, env: &Env) -> Result<()> {
    for (i, rate) in args.burst_rates.iter().enumerate() {
        burst(args, dir, env, &format!("burst-{i}"), *rate).await?;
    }
    Ok(())
}

/// The pool's warm target, as the agent resolved it.
async fn warm_target(agent: &IpamAgent) -> Result<f64> {
    agent
        .metric("vpc_ipam_pool_target{watermark=\"warm\"}")
        .await
}

/// A burst on a node that just started and warmed up to its default
/// watermarks: `args.burst_adds` ADDs at `rate` per second, each started
/// on schedule whether or not the ones before have answered. The account
/// (a fresh fault proxy with EC2's documented limits) sees only the agent.
async fn burst(args: &Args, dir: &std::path::Path, env: &Env, node: &str, rate: u32) -> Result<()> {
    let proxy = FaultProxy::start(Cloud::Aws, &env.aws()?.ec2, 1)?;
    proxy.set_account_limits(Some(AccountLimits::documented()));
    proxy.set_faults(Faults {
        latency: Duration::from_millis(args.burst_ec2_latency_ms),
        ..Faults::default()
    });
    let flags: Vec<&str> = args.burst_agent_flags.iter().map(String::as_str).collect();
    let agent = aws_agent(dir, env, node, &AwsEndpoints::single(proxy.url()), &flags).await?;
    let conf = agent.netconf("1.1.0", "vpc-ipam");
    let warm = warm_target(&agent).await?;
    eventually(
        "pool at its warm target",
        Duration::from_secs(60),
        || async { Ok(agent.metric("vpc_ipam_addresses{state=\"free\"}").await? >= warm) },
    )
    .await?;
    let mark = proxy.calls().len();
    let waits_before = agent.metric("vpc_ipam_add_waits_total").await?;
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let started = tokio::time::Instant::now();
    let adds: Vec<_> = (0..args.burst_adds)
        .map(|i| {
            let conf = conf.clone();
            let at = started + interval * u32::try_from(i).unwrap_or(u32::MAX);
            tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                let sent = Instant::now();
                let add = CniCall::new("vpc-ipam", "ADD", &format!("burst-{i}"))
                    .netns("/var/run/netns/x")
                    .run(&conf)
                    .await?;
                let took = sent.elapsed();
                add.ip()?;
                anyhow::Ok(took)
            })
        })
        .collect();
    let mut samples = Vec::with_capacity(adds.len());
    for add in adds {
        samples.push(add.await.context("ADD task")??);
    }
    let answered = proxy.calls().len();
    let waits = agent.metric("vpc_ipam_add_waits_total").await? - waits_before;
    // The refill after the burst, until the pool is warm again.
    let refill_started = Instant::now();
    eventually("pool warm again", Duration::from_secs(120), || async {
        Ok(agent.metric("vpc_ipam_addresses{state=\"free\"}").await? >= warm)
    })
    .await?;
    let refill = refill_started.elapsed();
    let calls = proxy.calls();
    report(
        &format!(
            "burst ADD, {rate} ADDs/s, {} (warm target {warm}), account limits{}",
            match args.burst_agent_flags.is_empty() {
                true => "default pool".to_string(),
                false => args.burst_agent_flags.join(" "),
            },
            match args.burst_ec2_latency_ms {
                0 => String::new(),
                ms => format!(", {ms} ms per EC2 call"),
            }
        ),
        samples,
    );
    let during = &calls[mark..answered];
    let after = &calls[answered..];
    let limited = |calls: &[Call]| {
        calls
            .iter()
            .filter(|c| c.outcome == Outcome::Limited)
            .count()
    };
    println!(
        "  {waits} of {} ADDs waited for the cloud; account: {} EC2 calls ({} throttled) \
         until the last ADD answered, then {} ({} throttled) until the pool was warm again \
         ({:.1} s); {}",
        args.burst_adds,
        during.len(),
        limited(during),
        after.len(),
        limited(after),
        refill.as_secs_f64(),
        by_action(&calls[mark..]),
    );
    Ok(())
}

/// "N Action, ..." for the calls, most frequent first.
fn by_action(calls: &[Call]) -> String {
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for call in calls {
        let action = call
            .operation
            .strip_prefix("ec2:")
            .unwrap_or(&call.operation);
        *counts.entry(action).or_default() += 1;
    }
    let mut counts: Vec<_> = counts.into_iter().collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    counts
        .iter()
        .map(|(action, n)| format!("{n} {action}"))
        .collect::<Vec<_>>()
        .join(", ")
}
