//! Crash trials of vpc-ipam-agent on the AWS backend while EC2 throttles
//! and loses answers: the real agent and CNI plugin, the Node in the real
//! kube-apiserver, EC2 in moto behind `fault_proxy`. Pods come and go
//! through the plugin while the agent is SIGKILLed at seeded random
//! moments (serving, or still starting up) and started again. After every
//! restart, and once every Pod is deleted, what a user would check holds:
//! no address twice, none leaked, none lost.
//!
//! `CNLB_CHAOS_TRIALS` (default 3; `make chaos` runs 100) sets the number
//! of trials, `CNLB_CHAOS_SEED` replays a kill schedule.

#![allow(clippy::unwrap_used)] // test code

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use cnlb_localstack_tests::fault_proxy::{Cloud, FaultProxy, Faults, Outcome};
use cnlb_localstack_tests::ipam::{self, CniCall, IpamAgent, ipam_add, ipam_del};
use cnlb_localstack_tests::{AwsEndpoints, Env};
use cnlb_provider_aws::Clients;
use cnlb_provider_aws::ec2::types::{Filter, ResourceType, Tag, TagSpecification};
use cnlb_vpc_ipam::backend::aws::TAG_INSTANCE;
use serde_json::Value;

const NODE: &str = "chaos-node";
/// One pod subnet per Pod ENI the instance takes, all in the node's zone.
/// The agent puts a new ENI in the tagged subnet with the most free
/// addresses, which is one without an ENI: moto picks an ENI's addresses
/// at random in its subnet without looking at the other ENIs (EC2 never
/// gives one address to two ENIs), so only with an ENI per subnet does an
/// address on two ENIs mean that the agent asked for it.
const POD_SUBNETS: [&str; 3] = ["100.64.0.0/18", "100.64.64.0/18", "100.64.128.0/18"];

// The agent's pool, as configured below.
/// The primary ENI and 3 Pod ENIs...
const MAX_ENIS: usize = 4;
/// ...of 9 Pod addresses each (one slot is the ENI's own address): 27.
const IPS_PER_ENI: usize = 10;
const MIN_FREE: usize = 2;
const WARM_FREE: usize = 4;
const MAX_FREE: usize = 8;
/// Pods at most: 4 workers of 5 Pods, 20 Pods and the warm 4 fit in 27.
const WORKERS: usize = 4;
const PODS_PER_WORKER: usize = 5;

#[test]
fn chaos_agent_sigkill_under_throttling() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(scenario());
}

fn env_number(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
    )
}

async fn scenario() {
    let trials = env_number("CNLB_CHAOS_TRIALS").unwrap_or(3);
    let seed = env_number("CNLB_CHAOS_SEED").unwrap_or_else(|| fastrand::u64(..));
    // The kill schedule and the proxy's draws follow the seed; how the
    // agent's calls interleave with them does not.
    println!("chaos: seed {seed} (CNLB_CHAOS_SEED={seed} replays the schedule), {trials} trials");
    let mut rng = fastrand::Rng::with_seed(seed);

    let env = Env::builder("vpc-ipam-aws-crash")
        .kube()
        .moto()
        .start()
        .await
        .unwrap();
    let kube = env.kube().unwrap();
    let moto = env.aws().unwrap();
    // The test sees moto directly; only the agent goes through the proxy.
    let aws = common::clients_for(&moto).await;
    let instance = node(&aws, &kube.admin_client().unwrap()).await;

    let proxy = FaultProxy::start(Cloud::Aws, &moto.ec2, seed).unwrap();
    proxy.set_faults(Faults {
        throttle: 0.2,
        reset_after: 0.05,
        ..Faults::default()
    });
    // moto ignores CreateNetworkInterface's ClientToken: the agent's retry
    // of a create whose answer was lost would make a second ENI there,
    // where EC2 returns the first. Crashes between create and attach are
    // still among the trials.
    proxy.set_operation_faults(
        "ec2:CreateNetworkInterface",
        Faults {
            throttle: 0.2,
            ..Faults::default()
        },
    );
    let mut envs: Vec<(String, String)> = AwsEndpoints::single(proxy.url())
        .env_vars()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    envs.push(("KUBECONFIG".into(), kube.kubeconfig.display().to_string()));

    let dir = env.dir.join("agent");
    std::fs::create_dir_all(&dir).unwrap();
    let dir = dir.canonicalize().unwrap();
    let tag = format!("cnlb.dev/pods={NODE}");
    let (max_enis, ips_per_eni) = (MAX_ENIS.to_string(), IPS_PER_ENI.to_string());
    let (min, warm, max) = (
        MIN_FREE.to_string(),
        WARM_FREE.to_string(),
        MAX_FREE.to_string(),
    );
    let mut agent = IpamAgent::start(
        &dir,
        NODE,
        &[
            "--cluster-name",
            "chaos",
            "--backend",
            "aws",
            "--aws-pod-subnet-tag",
            &tag,
            // The host has no ENI links: routing is aws_datapath.rs's.
            "--aws-node-routing=false",
            "--aws-max-enis",
            &max_enis,
            "--aws-ips-per-eni",
            &ips_per_eni,
            "--aws-write-rate",
            "20/40",
            "--aws-read-rate",
            "40/80",
            "--min-target",
            &min,
            "--warm-target",
            &warm,
            "--max-target",
            &max,
            // Released addresses are free at once, so that the pool's
            // watermarks alone say what the node may hold.
            "--cooldown",
            "0s",
            "--add-timeout",
            "30s",
        ],
        &envs,
    )
    .await
    .unwrap();
    let conf = agent.netconf("1.1.0", "vpc-ipam");

    let mut pods: Vec<Pods> = (0..WORKERS).map(|_| Pods::default()).collect();
    let mut tally = Tally::default();
    let (mut kills, mut kills_starting) = (0, 0);
    let mut ready_in: Vec<Duration> = Vec::new();
    let started = Instant::now();
    for trial in 1..=trials {
        let trial_started = Instant::now();
        let churn = Churn::start(pods, &conf, rng.u64(..));
        let serving = Duration::from_millis(rng.u64(200..2500));
        tokio::time::sleep(serving).await;
        agent.kill9();
        kills += 1;
        tokio::time::sleep(Duration::from_millis(rng.u64(0..500))).await;
        // One restart in four is killed too while it reconciles with EC2
        // (attaching what a crash left, reassigning, delivering DELs).
        let mut during_start = None;
        if rng.u8(..4) == 0 {
            let after = Duration::from_millis(rng.u64(0..1500));
            let (restarted, killed) = tokio::join!(agent.restart(), kill_starting(&dir, after));
            if let (Err(e), false) = (&restarted, killed) {
                panic!("trial {trial} (seed {seed}): restart failed: {e:#}");
            }
            if killed {
                kills += 1;
                kills_starting += 1;
                during_start = Some(after);
            }
        }
        let restarting = Instant::now();
        agent
            .restart()
            .await
            .unwrap_or_else(|e| panic!("trial {trial} (seed {seed}): restart failed: {e:#}"));
        let ready = restarting.elapsed();
        ready_in.push(ready);
        let stopping = Instant::now();
        let (back, done) = churn.stop().await.unwrap();
        let stopped = stopping.elapsed();
        pods = back;
        tally.add(&done);

        let live: BTreeMap<String, Value> = pods.iter().flat_map(|p| p.live.clone()).collect();
        let checking = Instant::now();
        let cloud = check(&agent, &aws, &instance, &conf, &live)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "trial {trial} (seed {seed}): {e:#}\nagent log: {}",
                    agent
                        .log()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                )
            });
        println!(
            "trial {trial}/{trials}: killed after {serving:.1?} serving{}, ready {ready:.1?} \
             after the restart; {} Pods on {} addresses of {} ENIs; churn stopped in \
             {stopped:.1?}, checked in {:.1?}; {:.1?}",
            during_start.map_or(String::new(), |d| format!(" and {d:.1?} into a restart")),
            live.len(),
            cloud.addresses,
            cloud.enis,
            checking.elapsed(),
            trial_started.elapsed(),
        );
    }
    let elapsed = started.elapsed();

    // Every Pod deleted: the pool gives back all but its warm target.
    let live: Vec<String> = pods.iter().flat_map(|p| p.live.keys().cloned()).collect();
    for id in &live {
        del(&conf, id).await.unwrap();
    }
    tally.dels += live.len();
    let cloud = check(&agent, &aws, &instance, &conf, &BTreeMap::new())
        .await
        .unwrap_or_else(|e| panic!("after deleting every Pod (seed {seed}): {e:#}"));
    // With every address free (no cooldown), Pool::plan gives back the
    // surplus over the maximum down to the warm target, and asks for
    // nothing while the free addresses are between the two: the node
    // keeps WARM_FREE to MAX_FREE addresses (WARM_FREE when the release
    // went through at once), on no more ENIs, since `check` found none
    // empty (an emptied ENI is detached and deleted).
    assert!(
        (WARM_FREE..=MAX_FREE).contains(&cloud.addresses),
        "{} addresses left on the node",
        cloud.addresses
    );
    // At rest nothing calls EC2 (no retry loop, no crash loop).
    let calls = proxy.calls().len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(proxy.calls().len(), calls, "EC2 calls at rest");

    ready_in.sort();
    let created = succeeded(&proxy, "ec2:CreateNetworkInterface");
    let deleted = succeeded(&proxy, "ec2:DeleteNetworkInterface");
    println!(
        "chaos figures: seed {seed}, {trials} trials in {elapsed:.1?} ({:.1?} per trial); \
         {} ADDs ({} failed: {:?} by CNI code), {} DELs; {kills} SIGKILLs ({kills_starting} \
         while starting); ready after a restart p50 {:.1?} max {:.1?}; ENIs created {created}, \
         deleted {deleted}; left at rest: {} addresses on {} ENIs; EC2 through the proxy: {}",
        elapsed / u32::try_from(trials.max(1)).unwrap_or(u32::MAX),
        tally.adds + tally.failed_adds,
        tally.failed_adds,
        tally.failure_codes,
        tally.dels,
        ready_in[ready_in.len() / 2],
        ready_in[ready_in.len() - 1],
        cloud.addresses,
        cloud.enis,
        proxy.summary(),
    );
    agent.kill9();
}

/// An EC2 instance for the node (see `ipam::aws_node`) and the pod subnets
/// of [`POD_SUBNETS`], tagged for it. Returns the instance ID.
async fn node(aws: &Clients, kube: &kube::Client) -> String {
    let instance = ipam::aws_node(&aws.ec2, kube, NODE, POD_SUBNETS[0])
        .await
        .unwrap();
    let described = aws
        .ec2
        .describe_instances()
        .instance_ids(&instance)
        .send()
        .await
        .unwrap();
    let vpc = described.reservations()[0].instances()[0]
        .vpc_id()
        .unwrap()
        .to_string();
    for cidr in &POD_SUBNETS[1..] {
        aws.ec2
            .create_subnet()
            .vpc_id(&vpc)
            .availability_zone(ipam::AWS_ZONE)
            .cidr_block(*cidr)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Subnet)
                    .tags(Tag::builder().key("cnlb.dev/pods").value(NODE).build())
                    .build(),
            )
            .send()
            .await
            .unwrap();
    }
    instance
}

/// The Pods of one churn worker: container id -> its ADD result.
#[derive(Default)]
struct Pods {
    live: BTreeMap<String, Value>,
    /// How many Pods the worker is heading for.
    target: usize,
    /// Container ids are never reused.
    next: usize,
}

#[derive(Default)]
struct Tally {
    adds: usize,
    failed_adds: usize,
    failure_codes: BTreeMap<i64, usize>,
    dels: usize,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.adds += other.adds;
        self.failed_adds += other.failed_adds;
        self.dels += other.dels;
        for (code, n) in &other.failure_codes {
            *self.failure_codes.entry(*code).or_default() += n;
        }
    }
}

/// Pods coming and going through the plugin, [`WORKERS`] at a time, each
/// worker keeping its Pods across trials: it ADDs new containers up to
/// [`PODS_PER_WORKER`] or DELs its own at random down to none, which way
/// drawn anew each time it gets there, so that the node's Pods swing by
/// more than the pool's watermarks and ENIs come and go. A failed
/// ADD is followed by its DEL and a pause, as kubelet does; every DEL must
/// succeed, agent up or not (the plugin queues it for the agent's start).
struct Churn {
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<Result<(Pods, Tally)>>>,
}

impl Churn {
    fn start(pods: Vec<Pods>, conf: &Value, seed: u64) -> Churn {
        let stop = Arc::new(AtomicBool::new(false));
        let workers = pods
            .into_iter()
            .enumerate()
            .map(|(w, pods)| {
                let (conf, stop) = (conf.clone(), stop.clone());
                let rng = fastrand::Rng::with_seed(seed.wrapping_add(w as u64));
                tokio::spawn(worker(w, pods, conf, rng, stop))
            })
            .collect();
        Churn { stop, workers }
    }

    async fn stop(self) -> Result<(Vec<Pods>, Tally)> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        let mut tally = Tally::default();
        for w in self.workers {
            let (pods, done) = w.await??;
            all.push(pods);
            tally.add(&done);
        }
        Ok((all, tally))
    }
}

async fn worker(
    w: usize,
    mut pods: Pods,
    conf: Value,
    mut rng: fastrand::Rng,
    stop: Arc<AtomicBool>,
) -> Result<(Pods, Tally)> {
    let mut tally = Tally::default();
    while !stop.load(Ordering::Relaxed) {
        let n = pods.live.len();
        if n == pods.target {
            pods.target = if rng.bool() { PODS_PER_WORKER } else { 0 };
            continue;
        }
        if n < pods.target {
            let id = format!("chaos-w{w}-{}", pods.next);
            pods.next += 1;
            let add = ipam_add(&conf, &id).await?;
            if add.ok() {
                tally.adds += 1;
                pods.live.insert(id, add.json()?);
            } else {
                tally.failed_adds += 1;
                let code = add.json().ok().and_then(|j| j["code"].as_i64());
                *tally.failure_codes.entry(code.unwrap_or(-1)).or_default() += 1;
                del(&conf, &id).await?;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        } else {
            let id = pods
                .live
                .keys()
                .nth(rng.usize(..n))
                .cloned()
                .context("no Pod")?;
            del(&conf, &id).await?;
            pods.live.remove(&id);
            tally.dels += 1;
        }
    }
    Ok((pods, tally))
}

async fn del(conf: &Value, id: &str) -> Result<()> {
    let run = ipam_del(conf, id).await?;
    ensure!(
        run.ok(),
        "DEL of {id} must succeed, agent up or not: {run:?}"
    );
    Ok(())
}

/// SIGKILLs the agent of `dir` `after` its start began, if it is still
/// running then; returns whether it was killed. `IpamAgent` runs it in
/// `dir`, so it is the one process working there.
async fn kill_starting(dir: &Path, after: Duration) -> bool {
    tokio::time::sleep(after).await;
    let Some(pid) = process_in(dir) else {
        return false;
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .is_ok()
}

fn process_in(dir: &Path) -> Option<i32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid = entry.file_name().to_str()?.parse().ok()?;
            let cwd: PathBuf = std::fs::read_link(entry.path().join("cwd")).ok()?;
            (cwd == dir).then_some(pid)
        })
}

/// What the node has in EC2 once the pool settled.
struct Settled {
    addresses: usize,
    enis: usize,
}

/// The invariants, with the churn stopped:
/// - no address twice among the Pods, and every Pod's allocation is the
///   agent's (CNI CHECK of its ADD result), and the agent has no other
///   allocation: nothing a crash lost, every successful DEL released;
/// - once the pool settles (within 60 s), EC2 agrees: every ENI of the
///   instance is attached and holds a Pod address (none left behind
///   empty or detached), no address is on two ENIs, every Pod's address
///   is on one, and the addresses are exactly the agent's pool: the Pods'
///   and the free ones, between the warm and the maximum target
///   (Pool::plan asks for more below the warm target and gives back
///   above the maximum; with no cooldown the node holds nothing else).
async fn check(
    agent: &IpamAgent,
    aws: &Clients,
    instance: &str,
    conf: &Value,
    live: &BTreeMap<String, Value>,
) -> Result<Settled> {
    let mut pod_ips: BTreeMap<IpAddr, &String> = BTreeMap::new();
    for (id, result) in live {
        let ip = address_of(result)?;
        if let Some(other) = pod_ips.insert(ip, id) {
            bail!("{ip} is the address of both {other} and {id}");
        }
    }
    let checks = live.iter().map(|(id, result)| async move {
        let mut with_prev = conf.clone();
        with_prev["prevResult"] = result.clone();
        let run = CniCall::new("vpc-ipam", "CHECK", id)
            .netns("/var/run/netns/unused")
            .run(&with_prev)
            .await?;
        ensure!(run.ok(), "CHECK of {id}: {run:?}");
        Ok(())
    });
    for checked in futures::future::join_all(checks).await {
        checked.context("a Pod's allocation was lost")?;
    }
    let allocated = addresses(agent, "allocated").await?;
    ensure!(
        allocated == live.len() as f64,
        "the agent holds {allocated} allocations for {} Pods: a DEL did not release",
        live.len()
    );

    // Until then the pool may still be giving back what a crash left, or
    // topping up.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match settled(agent, aws, instance, allocated, &pod_ips).await {
            Ok(view) => return Ok(view),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context("not settled after 60 s"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The settled pool and EC2's view of the node, or what is not so yet.
async fn settled(
    agent: &IpamAgent,
    aws: &Clients,
    instance: &str,
    allocated: f64,
    pod_ips: &BTreeMap<IpAddr, &String>,
) -> Result<Settled> {
    let free = addresses(agent, "free").await?;
    let cooling = addresses(agent, "cooling").await?;
    let releasing = addresses(agent, "releasing").await?;
    let pool = free + cooling + allocated;
    ensure!(releasing == 0.0, "{releasing} addresses being released");
    ensure!(
        (WARM_FREE as f64..=MAX_FREE as f64).contains(&free),
        "{free} free addresses, want {WARM_FREE} to {MAX_FREE}"
    );
    let enis = pod_enis(aws, instance).await?;
    let mut holders: BTreeMap<IpAddr, Vec<&str>> = BTreeMap::new();
    for eni in &enis {
        ensure!(
            eni.attached,
            "{} is not attached to {instance}: {}",
            eni.id,
            eni.status
        );
        ensure!(!eni.ips.is_empty(), "{} holds no Pod address", eni.id);
        for ip in &eni.ips {
            holders.entry(*ip).or_default().push(&eni.id);
        }
    }
    if let Some((ip, on)) = holders.iter().find(|(_, on)| on.len() > 1) {
        bail!("{ip} is assigned to {on:?}");
    }
    if let Some((ip, id)) = pod_ips.iter().find(|(ip, _)| !holders.contains_key(ip)) {
        bail!("{ip}, the address of {id}, is not assigned to the node");
    }
    ensure!(
        holders.len() as f64 == pool,
        "EC2 assigns {} addresses to the node, the agent's pool has {pool} \
         ({allocated} allocated, {free} free, {cooling} cooling)",
        holders.len()
    );
    Ok(Settled {
        addresses: holders.len(),
        enis: enis.len(),
    })
}

/// The agent's addresses in `state` (free, allocated, cooling, releasing).
async fn addresses(agent: &IpamAgent, state: &str) -> Result<f64> {
    agent
        .metric(&format!("vpc_ipam_addresses{{state=\"{state}\"}}"))
        .await
}

fn address_of(result: &Value) -> Result<IpAddr> {
    let address = result["ips"][0]["address"]
        .as_str()
        .context("ADD result without ips[0].address")?;
    let ip = address.split_once('/').map_or(address, |(ip, _)| ip);
    Ok(ip.parse()?)
}

/// An ENI the agent made for the instance (tagged with it), as EC2 has it.
struct PodEni {
    id: String,
    status: String,
    attached: bool,
    /// Secondary addresses.
    ips: BTreeSet<IpAddr>,
}

async fn pod_enis(aws: &Clients, instance: &str) -> Result<Vec<PodEni>> {
    let out = aws
        .ec2
        .describe_network_interfaces()
        .filters(
            Filter::builder()
                .name(format!("tag:{TAG_INSTANCE}"))
                .values(instance)
                .build(),
        )
        .send()
        .await?;
    out.network_interfaces()
        .iter()
        .map(|eni| {
            let attachment = eni.attachment();
            let primary = eni.private_ip_address();
            Ok(PodEni {
                id: eni.network_interface_id().unwrap_or_default().to_string(),
                status: format!(
                    "{:?}, attachment {:?}",
                    eni.status(),
                    attachment.and_then(|a| a.status())
                ),
                attached: attachment.is_some_and(|a| {
                    a.instance_id() == Some(instance)
                        && a.device_index().is_some_and(|i| i > 0)
                        && a.status().is_some_and(|s| s.as_str() == "attached")
                }),
                ips: eni
                    .private_ip_addresses()
                    .iter()
                    .filter(|a| a.primary() != Some(true))
                    .filter_map(|a| a.private_ip_address())
                    .filter(|ip| Some(*ip) != primary)
                    .map(str::parse)
                    .collect::<Result<_, _>>()?,
            })
        })
        .collect()
}

/// Calls of `operation` that EC2 carried out and answered with success
/// (its answer may have been lost on the way back).
fn succeeded(proxy: &FaultProxy, operation: &str) -> usize {
    proxy
        .calls()
        .iter()
        .filter(|c| c.operation == operation)
        .filter(|c| {
            matches!(
                c.outcome,
                Outcome::Forwarded(200) | Outcome::ResetAfter(200)
            )
        })
        .count()
}
