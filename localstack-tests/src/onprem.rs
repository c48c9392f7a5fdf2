//! The on-prem stack the demo and its tests run on: the local environment
//! with real Nodes (vpc-ipam's DaemonSet giving Pods addresses from each
//! Node's pod CIDR; the sample app's Pods are real containers), an HAProxy in
//! master-worker mode, the `cnlb-onprem-haproxy` plugin that drives it, and
//! `cnlb-ccm --provider=onprem` talking to the plugin, installed as users
//! install it: the Helm chart of deploy/, two replicas electing a leader, in
//! the host network to reach the plugin on loopback. HAProxy and the plugin
//! are [`Proc`]s in the environment's directory (recorded in its pids file),
//! so dropping the [`Stack`] and `cnlb-env down` stop them like every other
//! part.
//!
//! Also here: the sample app (a Deployment whose Pods answer HTTP with
//! `<namespace>/<name> <ip>`) and its LoadBalancer Service, scaling and
//! rolling updates, and [`Load`], a request loop at a fixed rate that opens
//! a fresh TCP connection per request and counts successes, failures and
//! answers per Pod.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cnlb_provider_core::LoadBalancerKey;
use cnlb_provider_onprem::PluginEndpoint;
use cnlb_provider_onprem::haproxy::{parse_servers_state, proxy_name};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event, Pod, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::task::JoinHandle;

use crate::env::record_pid;
use crate::paths::workspace_bin;
use crate::process::{Proc, free_port};
use crate::{Env, NodeConfig, eventually};

/// The `spec.loadBalancerClass` the demo's controller handles.
pub const CLASS: &str = "cnlb.dev/onprem";
/// Namespace, Deployment, Service and `app` label of the sample app.
pub const NAMESPACE: &str = "default";
pub const APP: &str = "hello";
/// The Service port (the load balancer's) and the Pods' container port.
pub const PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;
/// The readiness gate the controller opens once HAProxy reports a Pod healthy.
pub const READINESS_GATE: &str = "cnlb.dev/load-balancer-ready";

/// What to start.
#[derive(Clone, Debug)]
pub struct StackConfig {
    /// Environment name (prefix of its directory) and the controller's cluster name.
    pub name: String,
    pub nodes: u8,
    /// Readiness deadline of each part.
    pub timeout: Duration,
}

impl StackConfig {
    pub fn new(name: &str) -> StackConfig {
        StackConfig {
            name: name.to_string(),
            nodes: 3,
            timeout: Duration::from_secs(90),
        }
    }
}

/// HAProxy and the `cnlb-onprem-haproxy` plugin that drives it, with their
/// files (configuration, state, sockets) in one directory. Field order is
/// drop order: the plugin stops before HAProxy.
pub struct LbHost {
    plugin: Option<Proc>,
    haproxy: Option<Proc>,
    pub dir: PathBuf,
    /// Frontend addresses the plugin hands out (`--address-pool`).
    pub address_pool: String,
    /// Extra plugin flags (poll and converge intervals).
    plugin_args: Vec<String>,
    /// Where the plugin serves the provider protocol.
    pub plugin_endpoint: PluginEndpoint,
    timeout: Duration,
    /// The environment whose pids file lists these processes, so that
    /// `cnlb-env down` kills them should their owner die first.
    env_dir: Option<PathBuf>,
}

impl LbHost {
    /// Nothing runs yet: see [`LbHost::start_plugin`] (first: it writes the
    /// configuration HAProxy starts from) and [`LbHost::start_haproxy`].
    pub fn new(
        dir: &Path,
        address_pool: &str,
        plugin_args: &[&str],
        plugin_endpoint: PluginEndpoint,
        timeout: Duration,
        env_dir: Option<&Path>,
    ) -> Result<LbHost> {
        std::fs::create_dir_all(dir)?;
        Ok(LbHost {
            plugin: None,
            haproxy: None,
            dir: dir.to_path_buf(),
            address_pool: address_pool.to_string(),
            plugin_args: plugin_args.iter().map(|a| a.to_string()).collect(),
            plugin_endpoint,
            timeout,
            env_dir: env_dir.map(Path::to_path_buf),
        })
    }

    pub fn config_file(&self) -> PathBuf {
        self.dir.join("haproxy.cfg")
    }

    /// HAProxy's worker admin socket (the runtime API).
    pub fn runtime_socket(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }

    pub fn master_socket(&self) -> PathBuf {
        self.dir.join("master.sock")
    }

    /// Pid (process group) of HAProxy's master and of the plugin, when running.
    pub fn haproxy_pid(&self) -> Option<i32> {
        self.haproxy.as_ref().map(Proc::pid)
    }

    pub fn plugin_pid(&self) -> Option<i32> {
        self.plugin.as_ref().map(Proc::pid)
    }

    fn procs(&self) -> impl Iterator<Item = &Proc> {
        [&self.plugin, &self.haproxy].into_iter().flatten()
    }

    fn spawn(&self, name: &str, cmd: Command) -> Result<Proc> {
        let proc = Proc::spawn(name, cmd, &self.dir)?;
        if let Some(env_dir) = &self.env_dir {
            record_pid(env_dir, &proc)?;
        }
        Ok(proc)
    }

    /// Starts `cnlb-onprem-haproxy` and waits until it has written the
    /// configuration and listens (it needs no running HAProxy for that).
    pub async fn start_plugin(&mut self) -> Result<()> {
        self.plugin = None;
        if let PluginEndpoint::Unix(socket) = &self.plugin_endpoint {
            let _ = std::fs::remove_file(socket);
        }
        let mut cmd = Command::new(workspace_bin("cnlb-onprem-haproxy")?);
        cmd.arg(format!("--listen={}", self.plugin_endpoint))
            .arg("--config-file")
            .arg(self.config_file())
            .arg("--runtime-socket")
            .arg(self.runtime_socket())
            .arg("--master-socket")
            .arg(self.master_socket())
            .arg(format!("--address-pool={}", self.address_pool))
            .args(&self.plugin_args);
        let proc = self.spawn("cnlb-onprem-haproxy", cmd)?;
        let config = self.config_file();
        proc.wait_ready(self.timeout, || async {
            if !config.is_file() {
                bail!("no configuration file yet");
            }
            match &self.plugin_endpoint {
                PluginEndpoint::Unix(socket) => UnixStream::connect(socket).await.map(drop),
                PluginEndpoint::Tcp(addr) => TcpStream::connect(addr).await.map(drop),
            }
            .context("the plugin does not listen yet")
        })
        .await?;
        self.plugin = Some(proc);
        Ok(())
    }

    /// SIGKILLs the plugin, as a crash would.
    pub fn kill_plugin(&mut self) {
        if let Some(p) = self.plugin.take() {
            p.kill();
        }
    }

    /// Starts HAProxy from the plugin's configuration file, as an
    /// operator's unit would (`haproxy -W -S <master> -f <config>`), and
    /// waits until its runtime API answers.
    pub async fn start_haproxy(&mut self) -> Result<()> {
        self.haproxy = None;
        let mut cmd = Command::new("/usr/sbin/haproxy");
        cmd.arg("-W")
            .arg("-S")
            .arg(self.master_socket())
            .arg("-f")
            .arg(self.config_file());
        let proc = self.spawn("haproxy", cmd)?;
        let admin = self.runtime_socket();
        proc.wait_ready(self.timeout, || {
            let admin = admin.clone();
            async move { haproxy_cli(&admin, "show info").await.map(|_| ()) }
        })
        .await?;
        self.haproxy = Some(proc);
        Ok(())
    }

    /// Stops HAProxy (SIGTERM, then SIGKILL after 5 s).
    pub fn stop_haproxy(&mut self) {
        self.haproxy = None;
    }

    /// One command on HAProxy's runtime API.
    pub async fn haproxy(&self, command: &str) -> Result<String> {
        haproxy_cli(&self.runtime_socket(), command).await
    }

    /// Servers of a backend that take new connections (neither draining
    /// nor in maintenance), from `show servers state`; `None` when HAProxy
    /// has no such backend.
    pub async fn servers(&self, backend: &str) -> Result<Option<BTreeSet<SocketAddr>>> {
        let reply = self
            .haproxy(&format!("show servers state {backend}"))
            .await?;
        if reply.contains("Can't find backend") {
            return Ok(None);
        }
        Ok(Some(
            parse_servers_state(&reply)?
                .into_iter()
                .filter(|s| !s.draining() && !s.in_maintenance())
                .map(|s| s.addr)
                .collect(),
        ))
    }
}

/// The running stack. Field order is drop order: the plugin and HAProxy
/// stop first, then the environment (Nodes with the controller's Pods,
/// control plane, directory).
pub struct Stack {
    /// HAProxy and its plugin, in `<env dir>/lb`.
    pub lb: LbHost,
    /// Admin client of the environment's API server.
    pub client: Client,
    /// The controller's `--cluster-name`.
    pub cluster: String,
    pub env: Env,
}

impl Stack {
    /// Starts the environment (control plane, Nodes, pod network), then
    /// the plugin (which writes HAProxy's configuration), HAProxy, and the
    /// controller's Deployment, each waited for.
    pub async fn start(config: StackConfig) -> Result<Stack> {
        let env = Env::builder(&config.name)
            .nodes((1..=config.nodes).map(NodeConfig::numbered).collect())
            .image(&crate::images::ccm_image())
            .timeout(config.timeout)
            .start()
            .await?;
        // 127.<k>.0.0/28 is this environment's alone (see crate::range).
        let cidr = env.pod_cidr()?;
        let k = cidr
            .split('.')
            .nth(1)
            .with_context(|| format!("pod CIDR {cidr}"))?;
        // TCP: the controller's Pods run as an unprivileged user, who may
        // not open a root-owned socket.
        let plugin = PluginEndpoint::Tcp(SocketAddr::from(([127, 0, 0, 1], free_port()?)));
        let lb = LbHost::new(
            &env.dir.join("lb"),
            &format!("127.{k}.0.0/28"),
            &["--converge-interval-secs=1", "--health-poll-ms=500"],
            plugin.clone(),
            config.timeout,
            Some(&env.dir),
        )?;
        let client = env.kube()?.admin_client()?;
        let mut stack = Stack {
            lb,
            client,
            cluster: config.name.clone(),
            env,
        };
        stack.lb.start_plugin().await?;
        stack.lb.start_haproxy().await?;
        let cp = stack.env.kube()?;
        let values = crate::install::ccm_values(
            cp,
            &stack.cluster,
            "onprem",
            CLASS,
            &[format!("--onprem-plugin={plugin}")],
            &[],
        )?;
        crate::install::helm_install(cp, &stack.env.dir, "cnlb-ccm", "cnlb-ccm", &values).await?;
        crate::install::wait_deployment_ready(cp, "cnlb-ccm", config.timeout).await?;
        Ok(stack)
    }

    /// Log files of the stack's own parts.
    pub fn logs(&self) -> Vec<PathBuf> {
        self.lb.procs().map(|p| p.log().to_path_buf()).collect()
    }

    /// Fails if a part of the stack has exited.
    pub fn check_running(&self) -> Result<()> {
        for p in self.lb.procs() {
            p.check_running()?;
        }
        for n in self.env.nodes() {
            n.check_running()?;
        }
        Ok(())
    }

    /// Waits until HAProxy's live servers for `backend` are exactly the
    /// Ready Pods' IP:[`TARGET_PORT`]; with `n`, once the Deployment has
    /// rolled out to `n` Pods and for exactly `n` servers.
    pub async fn wait_servers_follow(
        &self,
        backend: &str,
        n: Option<usize>,
        timeout: Duration,
    ) -> Result<()> {
        if let Some(n) = n {
            wait_rollout(&self.client, n, timeout).await?;
        }
        let what = match n {
            Some(n) => format!("HAProxy's servers are the {n} Ready Pods"),
            None => "HAProxy's servers are the Ready Pods".to_string(),
        };
        crate::eventually(&what, timeout, || async {
            let servers = self.lb.servers(backend).await?.unwrap_or_default();
            let ready = ready_targets(&self.client).await?;
            Ok(n.is_none_or(|n| servers.len() == n) && servers == ready)
        })
        .await
    }

    /// The HAProxy backend (and frontend) of the Service's port [`PORT`].
    pub async fn backend_name(&self, service: &str) -> Result<String> {
        let api: Api<Service> = Api::namespaced(self.client.clone(), NAMESPACE);
        let svc = api.get(service).await?;
        let uid = svc.uid().context("Service without uid")?;
        let key = LoadBalancerKey::new(&self.cluster, NAMESPACE, service, uid);
        Ok(proxy_name(&key, PORT))
    }
}

/// One command on an HAProxy CLI socket.
pub async fn haproxy_cli(socket: &Path, command: &str) -> Result<String> {
    let mut stream = UnixStream::connect(socket)
        .await
        .with_context(|| format!("connecting {}", socket.display()))?;
    stream.write_all(format!("{command}\n").as_bytes()).await?;
    stream.shutdown().await?;
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut reply))
        .await
        .context("HAProxy did not answer in 5 s")??;
    Ok(reply)
}

/// The sample app: `replicas` Pods answering HTTP on [`TARGET_PORT`],
/// each kept serving `drain_seconds` after its deletion (a preStop sleep)
/// so the load balancer can stop sending it new connections first;
/// rolling updates add one Pod before removing one (maxSurge 1,
/// maxUnavailable 0), and a new Pod counts as Ready only once the load
/// balancer reports it healthy (the readiness gate).
pub fn app(replicas: i32, drain_seconds: u32) -> Result<Deployment> {
    let mut container = crate::sample_app::container("hello", &[TARGET_PORT]);
    container["lifecycle"] = json!({"preStop": {"sleep": {"seconds": drain_seconds}}});
    Ok(serde_json::from_value(json!({
        "metadata": {"name": APP, "namespace": NAMESPACE},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": APP}},
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": {"app": APP}, "annotations": {"cnlb.dev/version": "1"}},
                "spec": {
                    "readinessGates": [{"conditionType": READINESS_GATE}],
                    "terminationGracePeriodSeconds": drain_seconds + 10,
                    "containers": [container],
                },
            },
        },
    }))?)
}

/// The LoadBalancer Service of class [`CLASS`] in front of the app, with
/// a quick health check (every 5 s, 2 to change state) and a
/// deregistration delay of `drain_seconds` (what a draining Pod may keep).
pub fn service(name: &str, drain_seconds: u32) -> Result<Service> {
    const LBC: &str = "service.beta.kubernetes.io/aws-load-balancer-";
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": NAMESPACE, "annotations": {
            format!("{LBC}healthcheck-interval"): "5",
            format!("{LBC}healthcheck-timeout"): "2",
            format!("{LBC}healthcheck-healthy-threshold"): "2",
            format!("{LBC}healthcheck-unhealthy-threshold"): "2",
            format!("{LBC}target-group-attributes"):
                format!("deregistration_delay.timeout_seconds={drain_seconds}"),
        }},
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": CLASS,
            "selector": {"app": APP},
            "ports": [{"name": "http", "protocol": "TCP", "port": PORT, "targetPort": TARGET_PORT}],
        },
    }))?)
}

pub async fn deploy_app(client: &Client, replicas: i32, drain_seconds: u32) -> Result<()> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    api.create(&PostParams::default(), &app(replicas, drain_seconds)?)
        .await
        .context("creating the Deployment")?;
    Ok(())
}

pub async fn create_service(client: &Client, name: &str, drain_seconds: u32) -> Result<()> {
    let api: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    api.create(&PostParams::default(), &service(name, drain_seconds)?)
        .await
        .context("creating the Service")?;
    Ok(())
}

pub async fn delete_service(client: &Client, name: &str) -> Result<()> {
    let api: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    api.delete(name, &DeleteParams::default()).await?;
    Ok(())
}

/// True once the Service is gone from the API (its finalizer released).
pub async fn service_gone(client: &Client, name: &str) -> Result<bool> {
    let api: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    Ok(api.get_opt(name).await?.is_none())
}

/// `status.loadBalancer.ingress[0].ip`, once the controller wrote it.
pub async fn lb_ip(client: &Client, name: &str) -> Result<Option<IpAddr>> {
    let api: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    let svc = api.get(name).await?;
    let ip = svc
        .status
        .and_then(|s| s.load_balancer)
        .and_then(|lb| lb.ingress)
        .and_then(|i| i.into_iter().next())
        .and_then(|i| i.ip);
    Ok(match ip {
        Some(ip) => Some(ip.parse()?),
        None => None,
    })
}

/// Waits for the load balancer's address: `<ingress ip>:`[`PORT`].
pub async fn wait_lb_address(client: &Client, name: &str, timeout: Duration) -> Result<SocketAddr> {
    let start = Instant::now();
    loop {
        if let Some(ip) = lb_ip(client, name).await? {
            return Ok(SocketAddr::new(ip, PORT));
        }
        if start.elapsed() > timeout {
            let events = service_events(client, name).await.unwrap_or_default();
            bail!(
                "Service {name} has no load balancer address after {timeout:?}; events: {events:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `(reason, message)` of the Events about a Service, oldest first.
pub async fn service_events(client: &Client, name: &str) -> Result<Vec<(String, String)>> {
    let api: Api<Event> = Api::namespaced(client.clone(), NAMESPACE);
    let lp = ListParams::default().fields(&format!(
        "involvedObject.kind=Service,involvedObject.name={name}"
    ));
    let mut events = api.list(&lp).await?.items;
    events.sort_by_key(|e| e.metadata.creation_timestamp.clone());
    Ok(events
        .into_iter()
        .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect())
}

pub async fn scale(client: &Client, replicas: i32) -> Result<()> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    let patch = json!({"spec": {"replicas": replicas}});
    api.patch(APP, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .context("scaling the Deployment")?;
    Ok(())
}

/// Starts a rolling update: a new Pod template (its `cnlb.dev/version`
/// annotation), so every Pod is replaced.
pub async fn rolling_update(client: &Client, version: &str) -> Result<()> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    let patch =
        json!({"spec": {"template": {"metadata": {"annotations": {"cnlb.dev/version": version}}}}});
    api.patch(APP, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .context("updating the Pod template")?;
    Ok(())
}

fn condition(pod: &Pod, kind: &str) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == kind && c.status == "True"))
}

/// The app's Pods as the API has them.
pub async fn pods(client: &Client) -> Result<Vec<Pod>> {
    let api: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    Ok(api
        .list(&ListParams::default().labels(&format!("app={APP}")))
        .await?
        .items)
}

/// `ip:`[`TARGET_PORT`] of every Ready Pod of the app that is not being deleted.
pub async fn ready_targets(client: &Client) -> Result<BTreeSet<SocketAddr>> {
    let mut out = BTreeSet::new();
    for pod in pods(client).await? {
        if pod.metadata.deletion_timestamp.is_some() || !condition(&pod, "Ready") {
            continue;
        }
        if let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.as_ref()) {
            out.insert(SocketAddr::new(ip.parse()?, TARGET_PORT));
        }
    }
    Ok(out)
}

/// `n` Pods of the app run and serve (their containers are ready, they
/// have an IP), whether or not their readiness gate is open yet.
pub async fn pods_serving(client: &Client, n: usize) -> Result<bool> {
    let pods = pods(client).await?;
    Ok(pods.len() == n
        && pods.iter().all(|p| {
            p.metadata.deletion_timestamp.is_none()
                && condition(p, "ContainersReady")
                && p.status.as_ref().is_some_and(|s| s.pod_ip.is_some())
        }))
}

/// The Deployment's rollout is complete: `replicas` Pods of the current
/// template, all Ready, and no other Pod left (the old ones have drained
/// and gone).
pub async fn rollout_done(client: &Client, replicas: usize) -> Result<bool> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    let d = api.get(APP).await?;
    let generation = d.metadata.generation.unwrap_or(0);
    let Some(status) = d.status else {
        return Ok(false);
    };
    let want = i32::try_from(replicas)?;
    let deployment_done = status.observed_generation.unwrap_or(0) >= generation
        && status.updated_replicas == Some(want)
        && status.ready_replicas == Some(want)
        && status.replicas == Some(want);
    let pods = pods(client).await?;
    Ok(deployment_done
        && pods.len() == replicas
        && pods
            .iter()
            .all(|p| p.metadata.deletion_timestamp.is_none() && condition(p, "Ready")))
}

pub async fn wait_rollout(client: &Client, replicas: usize, timeout: Duration) -> Result<()> {
    eventually(
        &format!("the Deployment has {replicas} Ready Pods and no other"),
        timeout,
        || rollout_done(client, replicas),
    )
    .await
}

/// One HTTP GET over a fresh TCP connection: the answering Pod's
/// `<namespace>/<name>` (the body is `<namespace>/<name> <ip>`).
pub async fn get(addr: SocketAddr) -> Result<String> {
    let body = get_body(addr).await?;
    Ok(body
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// One HTTP GET over a fresh TCP connection: the body of a 200 answer,
/// trimmed (`<namespace>/<name> <ip>` from the sample app).
pub async fn get_body(addr: SocketAddr) -> Result<String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.context("connecting")?;
        stream
            .write_all(
                format!("GET / HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .context("sending")?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.context("reading")?;
        anyhow::Ok(reply)
    };
    let reply = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .context("no answer in 5 s")??;
    let Some((head, body)) = reply.split_once("\r\n\r\n") else {
        bail!("not an HTTP answer: {reply:?}");
    };
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{}", head.lines().next().unwrap_or_default());
    }
    let body = body.trim();
    if body.is_empty() {
        bail!("empty body");
    }
    Ok(body.to_string())
}

/// Counts of a [`Load`].
#[derive(Clone, Debug, Default)]
pub struct LoadStats {
    pub ok: u64,
    pub failed: u64,
    /// Successful answers per Pod (`<namespace>/<name>`).
    pub per_pod: BTreeMap<String, u64>,
    /// The first few failures, for the report.
    pub errors: Vec<String>,
    /// Since the loop started.
    pub elapsed: Duration,
}

impl LoadStats {
    pub fn total(&self) -> u64 {
        self.ok + self.failed
    }

    /// Requests completed per second.
    pub fn rate(&self) -> f64 {
        self.total() as f64 / self.elapsed.as_secs_f64().max(0.001)
    }

    /// What happened since `earlier` (a snapshot of the same loop).
    pub fn since(&self, earlier: &LoadStats) -> LoadStats {
        let per_pod = self
            .per_pod
            .iter()
            .map(|(k, v)| (k.clone(), v - earlier.per_pod.get(k).copied().unwrap_or(0)))
            .filter(|(_, v)| *v > 0)
            .collect();
        LoadStats {
            ok: self.ok - earlier.ok,
            failed: self.failed - earlier.failed,
            per_pod,
            errors: self.errors[earlier.errors.len().min(self.errors.len())..].to_vec(),
            elapsed: self.elapsed.saturating_sub(earlier.elapsed),
        }
    }
}

/// A request loop: `rate` requests per second to `addr`, each on a fresh
/// TCP connection (so every request is load balanced anew), run
/// concurrently so a slow answer does not slow the loop.
pub struct Load {
    stats: Arc<Mutex<LoadStats>>,
    started: Instant,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

const KEPT_ERRORS: usize = 20;

impl Load {
    pub fn start(addr: SocketAddr, rate: u32) -> Load {
        let stats = Arc::new(Mutex::new(LoadStats::default()));
        let started = Instant::now();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let task = {
            let stats = Arc::clone(&stats);
            tokio::spawn(async move {
                let period = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let mut inflight = tokio::task::JoinSet::new();
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = &mut stopped => break,
                    }
                    while inflight.try_join_next().is_some() {}
                    let stats = Arc::clone(&stats);
                    inflight.spawn(async move {
                        let result = get(addr).await;
                        let Ok(mut s) = stats.lock() else { return };
                        match result {
                            Ok(pod) => {
                                s.ok += 1;
                                *s.per_pod.entry(pod).or_default() += 1;
                            }
                            Err(e) => {
                                s.failed += 1;
                                if s.errors.len() < KEPT_ERRORS {
                                    let at = started.elapsed().as_secs_f64();
                                    s.errors.push(format!("at {at:.1} s: {e:#}"));
                                }
                            }
                        }
                    });
                }
                // Every request sent is counted: wait for those in flight
                // (each ends within its 5 s timeout).
                while inflight.join_next().await.is_some() {}
            })
        };
        Load {
            stats,
            started,
            stop: Some(stop),
            task,
        }
    }

    /// Counts of the requests completed so far.
    pub fn snapshot(&self) -> LoadStats {
        let mut s = self.stats.lock().map(|s| s.clone()).unwrap_or_default();
        s.elapsed = self.started.elapsed();
        s
    }

    /// Stops sending, waits for the requests in flight and returns the
    /// final counts (the elapsed time is the sending time).
    pub async fn stop(mut self) -> LoadStats {
        let sending = self.started.elapsed();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
        let mut s = self.snapshot();
        s.elapsed = sending;
        s
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.task.abort();
    }
}
