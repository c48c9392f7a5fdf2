//! `cnlb-demo` (`make demo`): a LoadBalancer Service whose load balancer
//! (HAProxy, driven by cnlb's on-prem plugin) sends traffic straight to Pod
//! IPs, on the local environment; scaling and a rolling update under load
//! with no failed request; then it keeps running until Ctrl-C.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use cnlb_localstack_tests::onprem::{
    self, APP, CLASS, Load, LoadStats, NAMESPACE, PORT, Stack, StackConfig, TARGET_PORT,
};
use cnlb_localstack_tests::paths::control_plane_bin;
use kube::ResourceExt;

#[derive(Parser)]
#[command(
    name = "cnlb-demo",
    about = "cnlb on the local environment: a LoadBalancer Service served by HAProxy straight to Pod IPs"
)]
struct Args {
    /// Requests per second sent through the load balancer while scaling
    /// and during the rolling update.
    #[arg(long, default_value_t = 50)]
    rate: u32,
    /// Seconds a deleted Pod keeps serving (its preStop sleep) and the load
    /// balancer's deregistration delay.
    #[arg(long, default_value_t = 10)]
    drain: u32,
    /// Exit after the rolling update instead of running until Ctrl-C (also
    /// `CNLB_DEMO_EXIT=1`); fails if a request failed.
    #[arg(long, env = "CNLB_DEMO_EXIT", value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false)]
    no_wait: bool,
}

const WAIT: Duration = Duration::from_secs(180);

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error,kube_client=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let result = tokio::select! {
        r = demo(&args) => r,
        _ = tokio::signal::ctrl_c() => {
            println!("\nCtrl-C: stopping.");
            Ok(())
        }
    };
    // `demo` dropped its Stack on the way out: everything is stopped.
    println!(
        "Stopped and removed everything: the plugin, HAProxy, the Nodes with their containers, and the control plane."
    );
    result
}

fn step(n: u32, title: &str, why: &str) {
    println!("\n{n}. {title}");
    for line in why.lines() {
        println!("   {line}");
    }
}

async fn demo(args: &Args) -> Result<()> {
    println!(
        "cnlb demo: a LoadBalancer Service whose load balancer sends traffic straight to Pod IPs."
    );
    println!(
        "Here the load balancer is HAProxy, driven through cnlb's on-prem plugin; everything runs on this machine."
    );

    step(
        1,
        "Starting the local environment",
        "A real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler)\n\
         and 3 real Nodes (a kubelet and containerd each), all built from source. cnlb is installed as\n\
         users install it, from the images `make images` builds and the Helm charts in deploy/: vpc-ipam\n\
         (a DaemonSet: its agent gives each Pod an IP from its Node's range), and cnlb-ccm (a Deployment\n\
         of 2 replicas, one leading) for Services of class cnlb.dev/onprem. The load balancer is HAProxy,\n\
         driven by the cnlb-onprem-haproxy plugin.",
    );
    let started = Instant::now();
    let stack = Stack::start(StackConfig::new("demo")).await?;
    let client = stack.client.clone();
    println!(
        "   ready in {:.1} s; logs in {}",
        started.elapsed().as_secs_f64(),
        stack.env.dir.display()
    );
    let kubeconfig = stack.env.kube()?.kubeconfig.display().to_string();
    let kubectl = control_plane_bin("kubectl")?;
    for args in [
        &["get", "nodes", "-o", "wide"][..],
        &["get", "pods", "-n", "kube-system", "-o", "wide"][..],
    ] {
        println!("\n   $ kubectl {}", args.join(" "));
        let out = std::process::Command::new(&kubectl)
            .arg(format!("--kubeconfig={kubeconfig}"))
            .args(args)
            .output()?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            println!("   {line}");
        }
    }

    step(
        2,
        "Deploying the sample app: Deployment \"hello\", 3 Pods",
        "Each Pod is a real container of the sample image, a small server answering HTTP on port 8080\n\
         with \"<namespace>/<pod name> <pod IP>\", with a readiness probe. They declare the readiness gate\n\
         cnlb.dev/load-balancer-ready, so they become Ready only once the load balancer reports them healthy.",
    );
    onprem::deploy_app(&client, 3, args.drain).await?;
    // Not Ready yet: their readiness gate waits for the load balancer.
    cnlb_localstack_tests::eventually("3 Pods serve", WAIT, || onprem::pods_serving(&client, 3))
        .await
        .or_else(|e| bail_with_logs(&stack, e))?;
    for pod in onprem::pods(&client).await? {
        let ip = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .unwrap_or_default();
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        println!("   {:<28} IP {ip:<14} on {node}", pod.name_any());
    }

    step(
        3,
        "Creating a LoadBalancer Service \"hello\" (loadBalancerClass cnlb.dev/onprem, port 80 -> 8080)",
        "cnlb-ccm asks the plugin for a load balancer: HAProxy gets a frontend on an address from its\n\
         pool, and the Pod IPs (from the EndpointSlices) as backend servers, added through its runtime\n\
         API without a reload. No NodePort, no kube-proxy hop.",
    );
    let t = Instant::now();
    onprem::create_service(&client, APP, args.drain).await?;
    let lb = onprem::wait_lb_address(&client, APP, WAIT)
        .await
        .or_else(|e| bail_with_logs(&stack, e))?;
    println!(
        "   status.loadBalancer.ingress[0].ip = {} (after {:.1} s)",
        lb.ip(),
        t.elapsed().as_secs_f64()
    );
    let backend = stack.backend_name(APP).await?;
    onprem::wait_rollout(&client, 3, WAIT)
        .await
        .or_else(|e| bail_with_logs(&stack, e))?;
    stack.wait_servers_follow(&backend, None, WAIT).await?;
    println!(
        "   HAProxy backend {backend}: {}",
        list(stack.lb.servers(&backend).await?.unwrap_or_default())
    );
    println!("   The Pods are Ready now: HAProxy's health check passed for each (readiness gate).");

    let url = if lb.port() == 80 {
        format!("http://{}/", lb.ip())
    } else {
        format!("http://{lb}/")
    };
    step(
        4,
        &format!("Requests to {url} (the load balancer), each on a new TCP connection"),
        "HAProxy spreads them over the Pods, round robin; each Pod answers with its name and IP:",
    );
    for _ in 0..6 {
        let t = Instant::now();
        let body = onprem::get_body(lb).await?;
        println!(
            "   GET {url} -> \"{body}\"  ({:.1} ms)",
            t.elapsed().as_secs_f64() * 1000.0
        );
    }

    let load = Load::start(lb, args.rate);
    step(
        5,
        &format!(
            "Scaling to 5 Pods, while sending {} requests/s through the load balancer",
            args.rate
        ),
        "New Pods are added to HAProxy as soon as they are in the EndpointSlice, and become Ready\n\
         once HAProxy's health check passes (the readiness gate cnlb.dev/load-balancer-ready).",
    );
    onprem::scale(&client, 5).await?;
    with_load(&load, async {
        onprem::wait_rollout(&client, 5, WAIT).await?;
        stack.wait_servers_follow(&backend, None, WAIT).await
    })
    .await
    .or_else(|e| bail_with_logs(&stack, e))?;
    println!(
        "   HAProxy backend: {}",
        list(stack.lb.servers(&backend).await?.unwrap_or_default())
    );

    step(
        6,
        "Rolling update of all 5 Pods (maxSurge 1, maxUnavailable 0), same load",
        &format!(
            "One new Pod at a time: added to HAProxy, Ready once healthy there; only then is an old Pod\n\
             deleted. A deleted Pod is drained at once (HAProxy sends it no new connection) and keeps\n\
             serving through its {} s preStop sleep, so connections in flight finish. No request should fail.",
            args.drain
        ),
    );
    let before = load.snapshot();
    onprem::rolling_update(&client, "2").await?;
    with_load(&load, async {
        onprem::wait_rollout(&client, 5, WAIT).await?;
        stack.wait_servers_follow(&backend, None, WAIT).await
    })
    .await
    .or_else(|e| bail_with_logs(&stack, e))?;
    let total = load.stop().await;
    let rollout = total.since(&before);
    println!(
        "   Rolling update: {} requests, {} failed ({:.1} requests/s).",
        rollout.total(),
        rollout.failed,
        rollout.rate()
    );
    println!(
        "   Since step 5: {} requests, {} failed; answers per Pod:",
        total.total(),
        total.failed
    );
    for (pod, n) in &total.per_pod {
        println!("     {pod:<36} {n}");
    }
    for e in &total.errors {
        println!("   failed: {e}");
    }
    println!(
        "   HAProxy backend now: {}",
        list(stack.lb.servers(&backend).await?.unwrap_or_default())
    );

    let kubectl = kubectl.display().to_string();
    step(
        7,
        "Running. Try it from another terminal:",
        &format!(
            "export KUBECONFIG={kubeconfig}\n\
             {kubectl} get nodes,pods,svc -o wide\n\
             {kubectl} logs -n kube-system deployment/cnlb-ccm\n\
             curl {url}            # the load balancer (Service {NAMESPACE}/{APP}, port {PORT})\n\
             {kubectl} scale deployment {APP} --replicas=2\n\
             echo 'show servers state' | socat stdio {}    # HAProxy's view (socat: apt install socat)\n\
             Pods answer on their own IPs too: curl http://<pod IP>:{TARGET_PORT}/\n\
             Logs: {}\n\
             Other Services of type LoadBalancer need spec.loadBalancerClass: {CLASS}.",
            stack.lb.runtime_socket().display(),
            stack.lb.dir.display(),
        ),
    );
    if args.no_wait {
        if total.failed > 0 {
            bail!("{} requests failed", total.failed);
        }
        println!("\n--no-wait: stopping.");
        return Ok(());
    }
    println!("\nCtrl-C stops and removes everything.");
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        stack
            .check_running()
            .context("a part of the demo stopped")?;
    }
}

/// Runs `work`, printing the load's counts every second.
async fn with_load<F: Future<Output = Result<()>>>(load: &Load, work: F) -> Result<()> {
    tokio::pin!(work);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last = load.snapshot();
    loop {
        tokio::select! {
            r = &mut work => {
                print_second(&load.snapshot().since(&last), &load.snapshot());
                return r;
            }
            _ = tick.tick() => {
                let now = load.snapshot();
                print_second(&now.since(&last), &now);
                last = now;
            }
        }
    }
}

fn print_second(second: &LoadStats, total: &LoadStats) {
    println!(
        "   [{:>5.1} s] {:>3} ok, {} failed in the last second, answered by {} Pods | total {} ok, {} failed",
        total.elapsed.as_secs_f64(),
        second.ok,
        second.failed,
        second.per_pod.len(),
        total.ok,
        total.failed
    );
}

fn list(addrs: impl IntoIterator<Item = SocketAddr>) -> String {
    addrs
        .into_iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// An error, with where to look.
fn bail_with_logs<T>(stack: &Stack, e: anyhow::Error) -> Result<T> {
    let logs: Vec<String> = stack
        .logs()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    Err(e.context(format!("logs: {}", logs.join(", "))))
}
