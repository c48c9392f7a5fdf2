//! `cnlb-bench-lb`: N LoadBalancer Services x M endpoints against the local
//! environment (real control plane; moto for `--provider aws`, the GCE
//! emulator with real Pods on alias-range IPs for `--provider gcp`), driven
//! through `cnlb-ccm`. Prints propagation latency (EndpointSlice change ->
//! RegisterTargets / attachNetworkEndpoints answered), cloud calls per
//! change, at rest, on a failover to a standby (the leader SIGKILLed) and
//! on a restart, and the controller's RSS.
//!
//! The cloud is reached through the fault proxy, which records every call:
//! each phase prints the calls it saw. With `--account-limits SCALE` it
//! enforces the account's documented rate limits (1: as documented),
//! shared by every caller, and each phase also prints how many calls it
//! throttled and the least time the buckets allow for the calls that got
//! through, beside the time measured.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
use clap::{Parser, ValueEnum};
use cnlb_localstack_tests::aws::AwsEndpoints;
use cnlb_localstack_tests::fault_proxy::{self, AccountLimits, FaultProxy, Outcome};
use cnlb_localstack_tests::gce::GceEmulator;
use cnlb_localstack_tests::paths::workspace_bin;
use cnlb_localstack_tests::podnet::AgentBackend;
use cnlb_localstack_tests::process::{Proc, free_port, group_memory};
use cnlb_localstack_tests::{Env, NodeConfig, eventually};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::json;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Provider {
    Aws,
    Gcp,
}

#[derive(Parser)]
struct Args {
    #[arg(long, value_enum)]
    provider: Provider,
    /// LoadBalancer Services, all in front of the same Pods.
    #[arg(long, default_value_t = 200)]
    services: usize,
    /// Endpoints (Pods) per Service.
    #[arg(long, default_value_t = 50)]
    endpoints: usize,
    /// Seconds of rest over which cloud calls are counted.
    #[arg(long, default_value_t = 60)]
    rest_secs: u64,
    /// Passed to cnlb-ccm (e.g. --ccm-arg=--aws-write-rate=20/40).
    #[arg(long = "ccm-arg")]
    ccm_args: Vec<String>,
    /// Enforce the account's documented API rate limits, scaled (1: as
    /// documented), through the fault proxy.
    #[arg(long, value_name = "SCALE")]
    account_limits: Option<f64>,
}

/// Quiet that means the health polls after a change are over too: the
/// first comes when the health check can have decided (20 s with the
/// default check), the next ones at most 10 s apart.
const SETTLED: Duration = Duration::from_secs(25);

/// Each phase's limit: 1,000 Services behind the account's limits take
/// 83 min to create (CreateLoadBalancer: 0.2/s).
const WAIT: Duration = Duration::from_secs(4 * 3600);

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let nodes = (1..=u8::try_from(args.endpoints / 200 + 2)?)
        .map(NodeConfig::numbered)
        .collect();
    let (env, cloud, account) = match args.provider {
        Provider::Aws => {
            println!("starting the environment (control plane, moto)...");
            let env = Env::builder("bench-aws")
                .simulated_nodes(nodes)
                .moto()
                .start()
                .await?;
            let aws = env.aws()?;
            let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
                .endpoint_url(&aws.ec2)
                .region(aws_config::Region::new(cnlb_localstack_tests::aws::REGION))
                .test_credentials()
                .load()
                .await;
            let vpc = network(&aws_sdk_ec2::Client::new(&conf)).await?;
            let account = account(fault_proxy::Cloud::Aws, &aws.ec2, args.account_limits)?;
            let aws = AwsEndpoints::single(account.0.url());
            let cloud = Cloud {
                args: vec!["--provider=aws".into(), format!("--aws-vpc-id={vpc}")],
                env: aws
                    .env_vars()
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
            };
            (env, cloud, account)
        }
        Provider::Gcp => {
            println!("starting the environment (control plane, GCE emulator, Pod network)...");
            let env = Env::builder("bench-gcp")
                .simulated_nodes(nodes)
                .gce()
                .pod_network()
                .agent_backend(AgentBackend::Gcp)
                .start()
                .await?;
            let gce = env.gce()?;
            let account = account(fault_proxy::Cloud::Gce, gce.endpoint(), args.account_limits)?;
            let cloud = Cloud {
                args: gcp_args(&gce, account.0.url()),
                env: Vec::new(),
            };
            (env, cloud, account)
        }
    };
    let client = env.kube()?.admin_client()?;

    create_pods(&client, args.endpoints).await?;
    let ccm = Ccm::start(&env, &cloud, &args.ccm_args, "ccm-1")?;
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let t = Instant::now();
    let phase = account.mark();
    for i in 0..args.services {
        services
            .create(&PostParams::default(), &service(&format!("svc-{i}")))
            .await?;
    }
    eventually(
        "every Service has its load balancer and every target",
        WAIT,
        || async {
            Ok(ccm.synced_services()?.len() >= args.services
                && ccm.quiet(Duration::from_secs(3)).await?)
        },
    )
    .await?;
    println!(
        "create: {} Services x {} endpoints converged in {:.1} s with {} cloud calls",
        args.services,
        args.endpoints,
        t.elapsed().as_secs_f64(),
        ccm.calls().await?
    );
    account.report(phase);

    // Rest begins once the health polls that follow creation are over.
    let created = ccm.calls().await?;
    eventually("the health polls end", WAIT, || ccm.quiet(SETTLED)).await?;
    println!(
        "  settled, health polls included, within {:.1} s, with {} more cloud calls",
        (t.elapsed() - SETTLED).as_secs_f64(),
        ccm.calls().await? - created
    );

    let before = ccm.calls().await?;
    let phase = account.mark();
    tokio::time::sleep(Duration::from_secs(args.rest_secs)).await;
    println!(
        "rest: {} cloud calls in {} s",
        ccm.calls().await? - before,
        args.rest_secs
    );
    account.report(phase);

    // One more Pod: every Service's EndpointSlice changes once.
    let old_ips = pod_ips(&client).await?;
    let slice_times = watch_new_endpoint(client.clone(), old_ips, args.services);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = ccm.calls().await?;
    let phase = account.mark();
    let logged_before = ccm.synced_lines()?;
    scale(&client, args.endpoints + 1).await?;
    let changed_at = slice_times.await??;
    eventually("every Service registered the new Pod", WAIT, || async {
        Ok(
            ccm.synced_lines()?.len() >= logged_before.len() + args.services
                && ccm.quiet(SETTLED).await?,
        )
    })
    .await?;
    let synced = ccm.synced_lines()?;
    let mut latencies: Vec<f64> = synced[logged_before.len()..]
        .iter()
        .filter_map(|(svc, at)| {
            let from = changed_at.get(svc)?;
            Some(at.duration_since(*from).unwrap_or_default().as_secs_f64() * 1000.0)
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let calls = ccm.calls().await? - before;
    println!(
        "propagation (EndpointSlice change -> targets added, the cloud's answer included), {} Services: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        latencies.len(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default()
    );
    println!(
        "calls for one endpoint added to {} Services: {} ({:.2} per Service)",
        args.services,
        calls,
        calls as f64 / args.services as f64
    );
    account.report(phase);
    println!(
        "cnlb-ccm RSS: {} MiB now, {} MiB peak",
        ccm.rss()?.0 >> 20,
        ccm.rss()?.1 >> 20
    );

    // Failover: a standby whose caches are warm; the leader SIGKILLed.
    let standby = Ccm::start(&env, &cloud, &args.ccm_args, "ccm-2")?;
    eventually("the standby's caches are filled", WAIT, || async {
        Ok(standby.logged_at("caches filled")?.is_some())
    })
    .await?;
    let phase = account.mark();
    let (killed, killed_on_proxy) = (SystemTime::now(), account.0.elapsed());
    ccm.proc.kill();
    eventually("the standby verified every Service", WAIT, || async {
        Ok(standby.logged_at("every Service verified")?.is_some())
    })
    .await?;
    let since_kill = |at: Option<SystemTime>| {
        at.and_then(|at| at.duration_since(killed).ok())
            .unwrap_or_default()
    };
    let led = since_kill(standby.logged_at("became leader")?);
    let verified = since_kill(standby.logged_at("every Service verified")?);
    let until_verified = account.0.calls()[phase..]
        .iter()
        .filter(|c| c.at <= killed_on_proxy + verified)
        .count();
    println!(
        "failover (leader SIGKILLed, standby with warm caches): lease taken after {:.1} s, every Service verified after {:.1} s with {} cloud calls ({:.2} per Service)",
        led.as_secs_f64(),
        verified.as_secs_f64(),
        until_verified,
        until_verified as f64 / args.services as f64
    );
    eventually("the new leader settles", WAIT, || async {
        standby.quiet(Duration::from_secs(5)).await
    })
    .await?;
    println!(
        "  until settled (garbage collection included): {} cloud calls",
        standby.calls().await?
    );
    account.report(phase);
    drop(ccm);

    // Restart with nothing changed (SIGTERM hands the lease over at once).
    drop(standby);
    let t = Instant::now();
    let phase = account.mark();
    let ccm = Ccm::start(&env, &cloud, &args.ccm_args, "ccm-3")?;
    eventually("the restarted controller settles", WAIT, || async {
        Ok(ccm.calls().await.is_ok() && ccm.quiet(Duration::from_secs(5)).await?)
    })
    .await?;
    println!(
        "restart with nothing changed: {} cloud calls, settled in {:.1} s (including 5 s of quiet)",
        ccm.calls().await?,
        t.elapsed().as_secs_f64()
    );
    account.report(phase);
    let warnings: Vec<String> = Api::<Event>::namespaced(client.clone(), "default")
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| {
            e.type_.as_deref() == Some("Warning")
                && e.involved_object.kind.as_deref() == Some("Service")
        })
        .map(|e| {
            let (name, reason) = (e.involved_object.name, e.reason);
            format!("{name:?} {reason:?}: {:?}", e.message)
        })
        .collect();
    println!("Warning Events on the Services: {}", warnings.len());
    for warning in warnings {
        println!("  {warning}");
    }
    Ok(())
}

/// The account: the fault proxy, which sees every call, enforcing the
/// account's limits at `scale` if asked.
fn account(cloud: fault_proxy::Cloud, upstream: &str, scale: Option<f64>) -> Result<Account> {
    let proxy = FaultProxy::start(cloud, upstream, 1)?;
    if let Some(scale) = scale {
        proxy.set_account_limits(Some(AccountLimits { scale }));
        println!("the cloud is behind the account's documented rate limits, scaled by {scale}");
    }
    Ok(Account(proxy, scale.is_some()))
}

/// The account's view of each phase (and whether its limits are on).
struct Account(FaultProxy, bool);

impl Account {
    /// Where a phase starts in the proxy's records.
    fn mark(&self) -> usize {
        self.0.calls().len()
    }

    /// The calls since `mark` as the account saw them.
    fn report(&self, mark: usize) {
        let calls = &self.0.calls()[mark..];
        let limited = calls
            .iter()
            .filter(|c| c.outcome == Outcome::Limited)
            .count();
        let bound = if self.1 {
            let least = self.0.least_time(calls).as_secs_f64();
            format!("; its buckets allow these calls in {least:.1} s at best")
        } else {
            String::new()
        };
        let mut by_operation: BTreeMap<&str, usize> = BTreeMap::new();
        for call in calls {
            *by_operation.entry(call.operation.as_str()).or_default() += 1;
        }
        let by_operation: Vec<String> = by_operation
            .into_iter()
            .map(|(op, n)| format!("{op} {n}"))
            .collect();
        println!(
            "  account: {} calls, {} throttled{bound}\n    by operation: {}",
            calls.len(),
            limited,
            by_operation.join(", ")
        );
    }
}

/// How cnlb-ccm reaches the cloud: its provider flags and environment.
struct Cloud {
    args: Vec<String>,
    env: Vec<(String, String)>,
}

/// `--provider=gcp` and the emulator's world, reached at `endpoint`.
fn gcp_args(gce: &GceEmulator, endpoint: &str) -> Vec<String> {
    vec![
        "--provider=gcp".into(),
        format!("--gcp-project={}", gce.project()),
        format!("--gcp-region={}", gce.region()),
        format!("--gcp-network={}", gce.network()),
        format!("--gcp-subnetwork={}", gce.subnetwork()),
        format!("--gcp-endpoint={endpoint}"),
    ]
}

/// A VPC (with the pod range as a secondary CIDR) and two subnets tagged for
/// internal load balancers.
async fn network(ec2: &aws_sdk_ec2::Client) -> Result<String> {
    let vpc = ec2.create_vpc().cidr_block("10.0.0.0/16").send().await?;
    let vpc = vpc.vpc.and_then(|v| v.vpc_id).context("no VPC id")?;
    ec2.associate_vpc_cidr_block()
        .vpc_id(&vpc)
        .cidr_block("100.64.0.0/16")
        .send()
        .await?;
    for (i, az) in ["us-east-1a", "us-east-1b"].iter().enumerate() {
        let tags = TagSpecification::builder()
            .resource_type(ResourceType::Subnet)
            .tags(
                Tag::builder()
                    .key("kubernetes.io/role/internal-elb")
                    .value("1")
                    .build(),
            )
            .build();
        ec2.create_subnet()
            .vpc_id(&vpc)
            .availability_zone(*az)
            .cidr_block(format!("10.0.{}.0/24", i + 1))
            .tag_specifications(tags)
            .send()
            .await?;
    }
    Ok(vpc)
}

fn service(name: &str) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": "cnlb.dev/nlb", "selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
    }))
    .unwrap_or_default()
}

async fn create_pods(client: &Client, replicas: usize) -> Result<()> {
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "web", "image": "example.invalid/web:1",
                                                       "ports": [{"containerPort": 8080}]}]}}},
    }))?;
    Api::<Deployment>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &d)
        .await?;
    eventually("every Pod has an IP", WAIT, || async {
        Ok(pod_ips(client).await?.len() == replicas)
    })
    .await
}

async fn scale(client: &Client, replicas: usize) -> Result<()> {
    let patch = json!({"spec": {"replicas": replicas}});
    Api::<Deployment>::namespaced(client.clone(), "default")
        .patch("web", &PatchParams::default(), &Patch::Merge(patch))
        .await?;
    Ok(())
}

async fn pod_ips(client: &Client) -> Result<BTreeSet<String>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let list = pods.list(&ListParams::default().labels("app=web")).await?;
    Ok(list
        .items
        .iter()
        .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
        .collect())
}

/// When each Service's EndpointSlice first shows an endpoint not in `old`.
fn watch_new_endpoint(
    client: Client,
    old: BTreeSet<String>,
    services: usize,
) -> tokio::task::JoinHandle<Result<BTreeMap<String, SystemTime>>> {
    tokio::spawn(async move {
        let api: Api<EndpointSlice> = Api::namespaced(client, "default");
        let mut events = watcher(api, watcher::Config::default()).boxed();
        let mut seen = BTreeMap::new();
        while let Some(ev) = events.next().await {
            let slice = match ev? {
                watcher::Event::Apply(s) | watcher::Event::InitApply(s) => s,
                _ => continue,
            };
            let Some(svc) = slice.labels().get("kubernetes.io/service-name").cloned() else {
                continue;
            };
            let new = slice
                .endpoints
                .iter()
                .flatten()
                .flat_map(|e| e.addresses.iter())
                .any(|a| !old.contains(a));
            if new {
                seen.entry(format!("default/{svc}"))
                    .or_insert_with(SystemTime::now);
                if seen.len() >= services {
                    return Ok(seen);
                }
            }
        }
        bail!("the EndpointSlice watch ended")
    })
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Ccm {
    proc: Proc,
    metrics: String,
    http: reqwest::Client,
}

impl Ccm {
    fn start(env: &Env, cloud: &Cloud, extra: &[String], name: &str) -> Result<Ccm> {
        let port = free_port()?;
        let mut cmd = Command::new(workspace_bin("cnlb-ccm")?);
        cmd.arg(format!("--kubeconfig={}", env.kube()?.kubeconfig.display()))
            .args([
                "--cluster-name=bench",
                "--leader-elect=true",
                "--log-format=json",
            ])
            .args(&cloud.args)
            .arg(format!("--metrics-bind-address=127.0.0.1:{port}"))
            .args(extra)
            .envs(cloud.env.iter().cloned());
        Ok(Ccm {
            proc: Proc::spawn(name, cmd, &env.dir)?,
            metrics: format!("http://127.0.0.1:{port}/metrics"),
            http: reqwest::Client::new(),
        })
    }

    /// Total cloud API calls (every attempt) so far.
    async fn calls(&self) -> Result<u64> {
        let text = self.http.get(&self.metrics).send().await?.text().await?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with("cnlb_cloud_api_calls_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64)
    }

    /// True if no cloud call happened during `period`.
    async fn quiet(&self, period: Duration) -> Result<bool> {
        let before = self.calls().await?;
        tokio::time::sleep(period).await;
        Ok(self.calls().await? == before)
    }

    /// (service, time) of every "targets synced" log line so far.
    fn synced_lines(&self) -> Result<Vec<(String, SystemTime)>> {
        let log = std::fs::read_to_string(self.proc.log())?;
        Ok(log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["message"] == "targets synced")
            .filter_map(|v| {
                let at: Timestamp = v["timestamp"].as_str()?.parse().ok()?;
                Some((v["service"].as_str()?.to_string(), SystemTime::from(at)))
            })
            .collect())
    }

    /// When the first log line whose message contains `message` was
    /// written, if one was.
    fn logged_at(&self, message: &str) -> Result<Option<SystemTime>> {
        let log = std::fs::read_to_string(self.proc.log())?;
        Ok(log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["message"].as_str().is_some_and(|m| m.contains(message)))
            .and_then(|v| v["timestamp"].as_str()?.parse::<Timestamp>().ok())
            .map(SystemTime::from))
    }

    fn synced_services(&self) -> Result<BTreeSet<String>> {
        Ok(self.synced_lines()?.into_iter().map(|(s, _)| s).collect())
    }

    /// Resident memory now and at peak, in bytes.
    fn rss(&self) -> Result<(u64, u64)> {
        let m = group_memory(&[self.proc.pid()], &[]);
        Ok((m.rss, m.peak))
    }
}
