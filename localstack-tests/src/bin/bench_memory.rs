//! `cnlb-bench-memory`: cnlb-ccm's memory and CPU at scale. N LoadBalancer
//! Services without selectors, each with one EndpointSlice of M endpoints
//! written directly (no Pods), exist before cnlb-ccm starts (the worst
//! case: everything is listed and reconciled at once). The provider is the
//! in-memory one served over the on-prem plugin protocol from this process,
//! so it answers at once and the figures are cnlb-ccm's own. Prints
//! cnlb-ccm's RSS as a standby (the Lease held by another: caches only),
//! then, leading, the time until every load balancer holds its targets,
//! its RSS (now and peak) and its CPU time per 1,000 endpoint changes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use cnlb_localstack_tests::paths::workspace_bin;
use cnlb_localstack_tests::process::{Proc, group_memory};
use cnlb_localstack_tests::{Env, eventually};
use cnlb_provider_core::fake::Fake;
use cnlb_provider_onprem::PluginEndpoint;
use cnlb_provider_onprem::server::{Plugin, serve};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// LoadBalancer Services, one EndpointSlice each.
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// Endpoints per EndpointSlice.
    #[arg(long, default_value_t = 25)]
    endpoints: usize,
    /// EndpointSlices changed (one endpoint replaced in each) for the CPU
    /// figure.
    #[arg(long, default_value_t = 1000)]
    changes: usize,
    /// Passed to cnlb-ccm.
    #[arg(long = "ccm-arg")]
    ccm_args: Vec<String>,
}

const WAIT: Duration = Duration::from_secs(1800);
const NAMESPACE: &str = "default";
/// Requests to the API server at once while writing the objects.
const WRITERS: usize = 16;

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    println!("starting the environment (control plane)...");
    let env = Env::builder("bench-memory").kube().start().await?;
    let client = env.kube()?.admin_client()?;

    let t = Instant::now();
    let uids = create_services(&client, args.services).await?;
    write_slices(&client, args.services, args.endpoints, false).await?;
    println!(
        "wrote {} Services and {} EndpointSlices of {} endpoints ({} endpoints) in {:.0} s",
        args.services,
        args.services,
        args.endpoints,
        args.services * args.endpoints,
        t.elapsed().as_secs_f64()
    );

    let fake = Arc::new(Fake::default());
    let socket = env.dir.join("memory-plugin.sock");
    let endpoint = PluginEndpoint::Unix(socket.clone());
    let plugin: Arc<dyn Plugin> = fake.clone();
    tokio::spawn(async move {
        let served = serve(
            plugin,
            &endpoint,
            None,
            Duration::from_secs(1),
            std::future::pending(),
        )
        .await;
        if let Err(e) = served {
            eprintln!("the in-memory plugin stopped: {e:#}");
        }
    });

    let mut cmd = std::process::Command::new(workspace_bin("cnlb-ccm")?);
    cmd.arg(format!("--kubeconfig={}", env.kube()?.kubeconfig.display()))
        .args([
            "--cluster-name=bench",
            "--provider=onprem",
            &format!("--onprem-plugin=unix://{}", socket.display()),
            "--leader-elect=true",
            "--metrics-bind-address=0",
            "--log-format=json",
        ])
        .args(&args.ccm_args);
    // First a standby (the Lease is another's): its caches alone.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-system");
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "cnlb-ccm"},
        "spec": {"holderIdentity": "cnlb-bench-memory", "leaseDurationSeconds": 3600},
    }))?;
    leases.create(&PostParams::default(), &lease).await?;
    let ccm = Proc::spawn("cnlb-ccm", cmd, &env.dir)?;
    eventually("the standby's caches are filled", WAIT, || async {
        ccm.check_running()?;
        Ok(std::fs::read_to_string(ccm.log())?.contains("caches filled"))
    })
    .await?;
    let m = group_memory(&[ccm.pid()], &[]);
    println!(
        "standby with filled caches: cnlb-ccm RSS {} MiB, peak {} MiB",
        m.rss >> 20,
        m.peak >> 20
    );
    leases.delete("cnlb-ccm", &Default::default()).await?;
    let t = Instant::now();
    eventually("every load balancer holds its targets", WAIT, || async {
        ccm.check_running()?;
        Ok(uids.iter().all(|uid| {
            fake.load_balancer(uid).is_some_and(|lb| {
                lb.targets.values().map(|t| t.len()).sum::<usize>() == args.endpoints
            })
        }))
    })
    .await?;
    let m = group_memory(&[ccm.pid()], &[]);
    println!(
        "start: {} load balancers with {} targets in {:.1} s; cnlb-ccm RSS {} MiB, peak {} MiB",
        fake.count(),
        args.services * args.endpoints,
        t.elapsed().as_secs_f64(),
        m.rss >> 20,
        m.peak >> 20
    );

    // One endpoint replaced in `changes` EndpointSlices.
    let cpu = cpu_time(ccm.pid())?;
    let t = Instant::now();
    write_slices(&client, args.changes, args.endpoints, true).await?;
    eventually("every change reached its load balancer", WAIT, || async {
        ccm.check_running()?;
        Ok((0..args.changes).all(|i| {
            fake.load_balancer(&uids[i]).is_some_and(|lb| {
                lb.targets
                    .values()
                    .flat_map(|t| t.iter())
                    .any(|t| t.ip == changed_ip(i))
            })
        }))
    })
    .await?;
    let spent = cpu_time(ccm.pid())? - cpu;
    let m = group_memory(&[ccm.pid()], &[]);
    println!(
        "{} endpoint changes reached the load balancers in {:.1} s; cnlb-ccm CPU {:.0} ms per 1,000 changes",
        args.changes,
        t.elapsed().as_secs_f64(),
        spent.as_secs_f64() * 1000.0 * 1000.0 / args.changes as f64
    );
    println!(
        "cnlb-ccm RSS: {} MiB now, {} MiB peak",
        m.rss >> 20,
        m.peak >> 20
    );
    Ok(())
}

async fn create_services(client: &Client, n: usize) -> Result<Vec<String>> {
    let api: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let svc: Service = serde_json::from_value(json!({
                    "metadata": {"name": format!("svc-{i}")},
                    "spec": {
                        "type": "LoadBalancer",
                        "loadBalancerClass": "cnlb.dev/nlb",
                        "allocateLoadBalancerNodePorts": false,
                        "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
                    },
                }))?;
                let created = api.create(&PostParams::default(), &svc).await?;
                created.uid().context("a created Service has a UID")
            }
        })
        .buffered(WRITERS)
        .try_collect()
        .await
}

/// The IP of endpoint `j` of Service `i` (10.128.0.0/9 holds 8 million).
fn endpoint_ip(i: usize, j: usize, per_service: usize) -> std::net::IpAddr {
    let n = u32::try_from(i * per_service + j).unwrap_or(u32::MAX);
    std::net::Ipv4Addr::from(0x0a80_0000 + n).into()
}

/// The IP that replaces endpoint 0 of Service `i` in the change phase.
fn changed_ip(i: usize) -> std::net::IpAddr {
    let n = u32::try_from(i).unwrap_or(u32::MAX);
    std::net::Ipv4Addr::from(0x0a00_0000 + n).into()
}

fn slice(i: usize, ips: &[std::net::IpAddr]) -> Result<EndpointSlice> {
    let endpoints: Vec<_> = ips
        .iter()
        .enumerate()
        .map(|(j, ip)| {
            json!({
                "addresses": [ip.to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": format!("node-{}", j % 50),
                "zone": format!("zone-{}", j % 3),
                "targetRef": {
                    "kind": "Pod",
                    "namespace": NAMESPACE,
                    "name": format!("svc-{i}-pod-{j}"),
                    "uid": format!("00000000-0000-4000-8000-{:012x}", i * 1000 + j),
                },
            })
        })
        .collect();
    Ok(serde_json::from_value(json!({
        "metadata": {
            "name": format!("svc-{i}-0"),
            "labels": {
                "kubernetes.io/service-name": format!("svc-{i}"),
                "endpointslice.kubernetes.io/managed-by": "cnlb-bench-memory",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))?)
}

/// Writes the EndpointSlices of Services `0..n`: creates them, or with
/// `changed` replaces endpoint 0 of each by [`changed_ip`].
async fn write_slices(client: &Client, n: usize, per_service: usize, changed: bool) -> Result<()> {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), NAMESPACE);
    futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let mut ips: Vec<_> = (0..per_service)
                    .map(|j| endpoint_ip(i, j, per_service))
                    .collect();
                if !changed {
                    api.create(&PostParams::default(), &slice(i, &ips)?).await?;
                    return Ok(());
                }
                ips[0] = changed_ip(i);
                let patch = json!({"endpoints": slice(i, &ips)?.endpoints});
                let name = format!("svc-{i}-0");
                api.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                    .await?;
                Ok::<_, anyhow::Error>(())
            }
        })
        .buffer_unordered(WRITERS)
        .try_collect()
        .await
}

/// User and system CPU time of `pid` so far.
fn cpu_time(pid: i32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // After "pid (comm) ": state is field 3; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').context("reading /proc/<pid>/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100);
    Ok(Duration::from_millis(
        ticks * 1000 / u64::try_from(per_second)?,
    ))
}
