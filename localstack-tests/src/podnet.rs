//! Real Pod networking for the harness's Nodes, as a kubelet with a CNI
//! runtime does it: per Node one `vpc-ipam-agent`; per Pod a network
//! namespace, CNI ADD through Debian's `ptp` plugin (which execs our
//! `vpc-ipam` for the address), and `cnlb-pod-server`
//! inside the namespace answering on the Pod's container ports.
//!
//! ptp installs a host route per Pod IP, so environments running at the same
//! time on one host need disjoint addresses: each uses its own /16
//! `10.<k>.0.0/16` and names every namespace `cnlb-<k>-...`, from the
//! environment's [`crate::range::RangeLease`].

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

use crate::aws::AwsEndpoints;
use crate::env::GCE_POD_RANGE;
use crate::gce::{GceEmulator, SeedAliasRange, SeedInstance};
use crate::node::NodeConfig;
use crate::paths::workspace_bin;
use crate::process::{Proc, free_port, is_running};

/// Debian's containernetworking-plugins.
const SYSTEM_CNI_DIR: &str = "/usr/lib/cni";
/// Where `ip netns add` puts its namespaces.
const NETNS_DIR: &str = "/run/netns";
/// Debian's plugins (1.1.1) speak CNI up to 1.0.0, so that is the version of
/// the configuration; STATUS, a 1.1.0 command, goes to vpc-ipam directly.
const CNI_VERSION: &str = "1.0.0";
const NETWORK_NAME: &str = "cnlb-pods";
const IFNAME: &str = "eth0";
/// A CNI plugin or `ip` call that takes longer is stuck.
const EXEC_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a new Pod's server may take to accept connections.
const SERVE_TIMEOUT: Duration = Duration::from_secs(10);
/// The port the server listens on when the Pod declares none.
pub const DEFAULT_POD_PORT: u16 = 8080;

/// Flags and environment of one Node's agent, after the common ones
/// (`--node-name --socket --state-dir --cooldown --metrics-addr --cluster-name`).
#[derive(Clone, Debug, Default)]
pub struct AgentLaunch {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// What a backend needs to know to launch one Node's agent.
pub struct AgentContext<'a> {
    pub index: usize,
    pub node: &'a NodeConfig,
    /// The Node's pod range, `10.<k>.<index>.0/24`.
    pub pod_range: &'a str,
    /// The environment's AWS endpoints, when it has an emulator.
    pub aws: Option<&'a AwsEndpoints>,
    /// The environment's GCE emulator, when it has one (not serving yet
    /// while agents are prepared; its options do not list the Pod CIDR's
    /// secondary range yet, which is named [`crate::env::GCE_POD_RANGE`]).
    pub gce: Option<&'a GceEmulator>,
    pub kubeconfig: Option<&'a Path>,
}

type LaunchFn = dyn Fn(&AgentContext) -> Result<AgentLaunch> + Send + Sync;

/// The agent's address backend.
#[derive(Clone, Default)]
pub enum AgentBackend {
    /// `--backend static --static-range <the Node's pod range>`.
    #[default]
    Static,
    /// GKE style, against the environment's GCE emulator (needs `.gce()`):
    /// each Node is a GCE instance (zones round-robin over the emulator's,
    /// `spec.providerID` `gce://<project>/<zone>/<node>`, the zone and
    /// region labels to match, `nic0` at the Node's internal IP) whose
    /// alias IP range is the Node's pod range, from the secondary range
    /// [`GCE_POD_RANGE`] (the environment's Pod CIDR), as GKE creates its
    /// nodes and cloud-provider-gcp copies the range into `spec.podCIDR`.
    /// The agents run `--backend gcp --gcp-endpoint <emulator>`.
    Gcp,
    /// Anything else (e.g. `--backend aws` and `AWS_*` variables), per Node.
    Custom(Arc<LaunchFn>),
}

impl AgentBackend {
    pub fn custom(
        f: impl Fn(&AgentContext) -> Result<AgentLaunch> + Send + Sync + 'static,
    ) -> AgentBackend {
        AgentBackend::Custom(Arc::new(f))
    }

    fn launch(&self, ctx: &AgentContext) -> Result<AgentLaunch> {
        match self {
            AgentBackend::Static => Ok(AgentLaunch {
                args: vec![
                    "--backend".into(),
                    "static".into(),
                    "--static-range".into(),
                    ctx.pod_range.to_string(),
                ],
                env: Vec::new(),
            }),
            AgentBackend::Gcp => {
                let gce = ctx.gce.context(
                    "AgentBackend::Gcp needs the GCE emulator: add .gce() to the builder",
                )?;
                Ok(AgentLaunch {
                    args: vec![
                        "--backend".into(),
                        "gcp".into(),
                        "--gcp-endpoint".into(),
                        gce.endpoint().to_string(),
                        "--gcp-pod-range-name".into(),
                        GCE_POD_RANGE.into(),
                    ],
                    env: Vec::new(),
                })
            }
            AgentBackend::Custom(f) => f(ctx),
        }
    }
}

/// With [`AgentBackend::Gcp`]: makes `node` (the `index`-th, with its pod
/// range set) a GCE instance of `gce`, and returns what to seed.
pub(crate) fn gce_node(
    gce: &GceEmulator,
    index: usize,
    node: &mut NodeConfig,
) -> Result<SeedInstance> {
    let zones = gce.zones();
    let zone = zones
        .get(index % zones.len().max(1))
        .context("the GCE emulator has no zone")?
        .clone();
    node.zone = zone.clone();
    node.region = gce.region().to_string();
    node.provider_id = Some(format!("gce://{}/{zone}/{}", gce.project(), node.name));
    Ok(SeedInstance {
        zone,
        name: node.name.clone(),
        network_ip: node.internal_ip.to_string(),
        alias_ip_ranges: vec![SeedAliasRange {
            ip_cidr_range: node.pod_cidr.clone(),
            subnetwork_range_name: Some(GCE_POD_RANGE.to_string()),
        }],
        ..SeedInstance::default()
    })
}

/// Options of the pod network (see `EnvBuilder::pod_network`).
#[derive(Clone, Default)]
pub struct PodNetworkConfig {
    pub backend: AgentBackend,
    /// How long a deleted Pod keeps serving (not Ready) before it stops,
    /// unless a container declares a preStop `sleep`.
    pub drain: Duration,
}

/// A Pod's sandbox as tests see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSandbox {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// Index of the Node in the environment's node list.
    pub node: usize,
    /// `ip netns` name; the namespace is `/run/netns/<netns>`.
    pub netns: String,
    pub container_id: String,
    pub ip: Option<Ipv4Addr>,
    pub ports: Vec<u16>,
    pub server_pid: Option<i32>,
}

// ---------------------------------------------------------------- the network

struct NodeNet {
    config: NodeConfig,
    range: String,
    dir: PathBuf,
    socket: PathBuf,
    state_dir: PathBuf,
    metrics: SocketAddr,
    launch: AgentLaunch,
    agent: Mutex<Option<Proc>>,
    /// With [`AgentBackend::Gcp`]: the Node's instance, seeded in the
    /// emulator before the agents start.
    instance: Option<SeedInstance>,
}

#[derive(Default)]
struct Registry {
    /// Set by `shutdown`: no new sandbox after it.
    closed: bool,
    /// By Pod uid.
    pods: BTreeMap<String, Arc<Mutex<Sandbox>>>,
}

struct Sandbox {
    info: PodSandbox,
    server: Option<Proc>,
    netns_created: bool,
    /// Torn down: nothing may be created for it any more.
    done: bool,
}

/// The pod network of one environment.
pub struct PodNet {
    config: PodNetworkConfig,
    /// The environment's `k` (see [`crate::range`]).
    k: u8,
    env_dir: PathBuf,
    cluster: String,
    kubeconfig: Option<PathBuf>,
    cni_path: String,
    nodes: Vec<NodeNet>,
    /// The GCE emulator the Nodes' instances are seeded in.
    gce: Option<GceEmulator>,
    registry: Mutex<Registry>,
    seq: AtomicU64,
}

/// What `PodNet::start` needs from the environment.
pub struct PodNetContext<'a> {
    pub env_dir: &'a Path,
    /// The environment's `k` (see [`crate::range`]).
    pub k: u8,
    pub cluster: &'a str,
    pub aws: Option<&'a AwsEndpoints>,
    pub gce: Option<&'a GceEmulator>,
    pub kubeconfig: Option<&'a Path>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not stop the cleanup.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl PodNet {
    /// Prepares each Node's directory; `nodes` get their `pod_cidr` set to
    /// their /24 of the environment's /16. Starts nothing yet.
    pub fn new(
        config: PodNetworkConfig,
        nodes: &mut [NodeConfig],
        ctx: &PodNetContext,
    ) -> Result<PodNet> {
        if nodes.len() > 256 {
            bail!("at most 256 nodes fit in a /16 of /24s");
        }
        let plugin = workspace_bin("vpc-ipam")?;
        let plugin_dir = plugin.parent().context("vpc-ipam without a directory")?;
        let cni_path = format!("{SYSTEM_CNI_DIR}:{}", plugin_dir.display());
        std::fs::create_dir_all(ctx.env_dir.join("netns"))?;
        let mut node_nets = Vec::new();
        for (i, node) in nodes.iter_mut().enumerate() {
            let pod_range = format!("10.{}.{i}.0/24", ctx.k);
            node.pod_cidr = pod_range.clone();
            let instance = match (&config.backend, ctx.gce) {
                (AgentBackend::Gcp, Some(gce)) => Some(gce_node(gce, i, node)?),
                _ => None,
            };
            let dir = ctx.env_dir.join(&node.name);
            std::fs::create_dir_all(&dir)?;
            let launch = config.backend.launch(&AgentContext {
                index: i,
                node: &*node,
                pod_range: &pod_range,
                aws: ctx.aws,
                gce: ctx.gce,
                kubeconfig: ctx.kubeconfig,
            })?;
            node_nets.push(NodeNet {
                config: node.clone(),
                range: pod_range,
                socket: dir.join("vpc-ipam.sock"),
                state_dir: dir.join("state"),
                dir,
                metrics: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)),
                launch,
                agent: Mutex::new(None),
                instance,
            });
        }
        Ok(PodNet {
            config,
            k: ctx.k,
            env_dir: ctx.env_dir.to_path_buf(),
            cluster: ctx.cluster.to_string(),
            kubeconfig: ctx.kubeconfig.map(Path::to_path_buf),
            cni_path,
            nodes: node_nets,
            gce: ctx.gce.cloned(),
            registry: Mutex::new(Registry::default()),
            seq: AtomicU64::new(0),
        })
    }

    /// `10.<k>.0.0/16`.
    pub fn cidr(&self) -> String {
        format!("10.{}.0.0/16", self.k)
    }

    /// Every namespace of this environment starts with it.
    pub fn netns_prefix(&self) -> String {
        netns_prefix(self.k)
    }

    pub fn drain(&self) -> Duration {
        self.config.drain
    }

    fn node(&self, i: usize) -> Result<&NodeNet> {
        self.nodes
            .get(i)
            .with_context(|| format!("no node {i}: the environment has {}", self.nodes.len()))
    }

    pub fn node_index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.config.name == name)
    }

    pub fn pod_range(&self, i: usize) -> Result<String> {
        Ok(self.node(i)?.range.clone())
    }

    pub fn agent_socket(&self, i: usize) -> Result<PathBuf> {
        Ok(self.node(i)?.socket.clone())
    }

    pub fn agent_state_dir(&self, i: usize) -> Result<PathBuf> {
        Ok(self.node(i)?.state_dir.clone())
    }

    pub fn agent_metrics_addr(&self, i: usize) -> Result<SocketAddr> {
        Ok(self.node(i)?.metrics)
    }

    /// The agent's pid, while the harness has one running for the Node.
    pub fn agent_pid(&self, i: usize) -> Result<Option<i32>> {
        Ok(lock(&self.node(i)?.agent).as_ref().map(Proc::pid))
    }

    /// Pids of the agents and Pod servers.
    pub fn pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .nodes
            .iter()
            .filter_map(|n| lock(&n.agent).as_ref().map(Proc::pid))
            .collect();
        pids.extend(self.sandboxes().iter().filter_map(|s| s.server_pid));
        pids
    }

    pub fn sandboxes(&self) -> Vec<PodSandbox> {
        let pods: Vec<_> = lock(&self.registry).pods.values().cloned().collect();
        pods.iter().map(|s| lock(s).info.clone()).collect()
    }

    pub fn sandbox(&self, uid: &str) -> Option<PodSandbox> {
        let sb = lock(&self.registry).pods.get(uid).cloned()?;
        let info = lock(&sb).info.clone();
        Some(info)
    }

    // ------------------------------------------------------------ agents

    fn agent_command(&self, node: &NodeNet) -> Result<Command> {
        let mut cmd = Command::new(workspace_bin("vpc-ipam-agent")?);
        cmd.arg("--node-name")
            .arg(&node.config.name)
            .arg("--socket")
            .arg(&node.socket)
            .arg("--state-dir")
            .arg(&node.state_dir)
            // The harness's Pods come and go in seconds; no load balancer
            // outlives a test.
            .args(["--cooldown", "0s"])
            .arg("--metrics-addr")
            .arg(node.metrics.to_string())
            .arg("--cluster-name")
            .arg(&self.cluster)
            .args(&node.launch.args);
        if let Some(kc) = &self.kubeconfig {
            cmd.env("KUBECONFIG", kc);
        }
        cmd.envs(node.launch.env.iter().map(|(k, v)| (k, v)));
        Ok(cmd)
    }

    /// Seeds the Nodes' GCE instances (with [`AgentBackend::Gcp`]), then
    /// starts every Node's agent (with vpc-ipam) and waits until each serves.
    pub async fn start_agents(&self, timeout: Duration) -> Result<()> {
        if let Some(gce) = &self.gce {
            for instance in self.nodes.iter().filter_map(|n| n.instance.as_ref()) {
                gce.seed(instance)
                    .await
                    .with_context(|| format!("seeding GCE instance {}", instance.name))?;
            }
        }
        let starts = (0..self.nodes.len()).map(|i| self.restart_agent(i, timeout));
        futures::future::try_join_all(starts).await?;
        Ok(())
    }

    /// Kills the Node's agent if it runs (SIGKILL, as a crash), starts it
    /// again with the same flags, and waits until it serves.
    pub async fn restart_agent(&self, i: usize, timeout: Duration) -> Result<()> {
        let node = self.node(i)?;
        if let Some(old) = lock(&node.agent).take() {
            old.kill();
        }
        let proc = Proc::spawn("vpc-ipam-agent", self.agent_command(node)?, &node.dir)?;
        crate::env::record_pid(&self.env_dir, &proc)?;
        let status = self.status_probe(node)?;
        proc.wait_ready(timeout, || {
            let status = status.clone();
            async move { status.run().await }
        })
        .await?;
        *lock(&node.agent) = Some(proc);
        Ok(())
    }

    /// `vpc-ipam` STATUS against the Node's agent: exit 0 means it serves ADDs.
    fn status_probe(&self, node: &NodeNet) -> Result<StatusProbe> {
        let conf = json!({
            "cniVersion": "1.1.0", "name": NETWORK_NAME, "type": "ptp",
            "ipam": {"type": "vpc-ipam", "agentSocket": node.socket},
        });
        Ok(StatusProbe {
            plugin: workspace_bin("vpc-ipam")?,
            conf: serde_json::to_vec(&conf)?,
        })
    }

    // ------------------------------------------------------------ sandboxes

    fn ipam_conf(&self, node: &NodeNet) -> Value {
        json!({"type": "vpc-ipam", "agentSocket": node.socket})
    }

    /// Network namespace, CNI ADD, loopback up and the Pod's server. On
    /// failure what was made is undone and the error returned.
    pub async fn create_sandbox(self: &Arc<Self>, pod: &Pod, node: usize) -> Result<PodSandbox> {
        let uid = pod.uid().context("pod without uid")?;
        let node_net = self.node(node)?;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let info = PodSandbox {
            namespace: pod.namespace().unwrap_or_default(),
            name: pod.name_any(),
            uid: uid.clone(),
            node,
            netns: format!(
                "{}{seq}-{}",
                self.netns_prefix(),
                truncate(&pod.name_any(), 40)
            ),
            container_id: uid.clone(),
            ip: None,
            ports: pod_ports(pod),
            server_pid: None,
        };
        let record = CniRecord {
            plugin: PathBuf::from(SYSTEM_CNI_DIR).join("ptp"),
            conf: json!({
                "cniVersion": CNI_VERSION, "name": NETWORK_NAME, "type": "ptp",
                "ipam": self.ipam_conf(node_net),
            }),
            container_id: info.container_id.clone(),
            netns: info.netns.clone(),
            cni_args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID={uid}",
                info.namespace, info.name
            ),
            cni_path: self.cni_path.clone(),
        };
        let sandbox = Arc::new(Mutex::new(Sandbox {
            info,
            server: None,
            netns_created: false,
            done: false,
        }));
        {
            let mut reg = lock(&self.registry);
            if reg.closed {
                bail!("the environment is shutting down");
            }
            if reg.pods.contains_key(&uid) {
                bail!("pod {uid} already has a sandbox");
            }
            reg.pods.insert(uid.clone(), sandbox.clone());
        }
        let net = self.clone();
        let made = tokio::task::spawn_blocking(move || {
            let mut sb = lock(&sandbox);
            if sb.done {
                bail!("the environment is shutting down");
            }
            let made = net.setup(&mut sb, &record);
            if made.is_err() {
                // Undone at once: DEL after a failed ADD, as the CNI spec asks.
                if let Err(e) = net.teardown(&mut sb, true) {
                    tracing::warn!("undoing a failed sandbox: {e:#}");
                }
            }
            made.map(|()| sb.info.clone())
        })
        .await
        .map_err(|e| anyhow!("sandbox setup task: {e}"));
        let made = made.and_then(|r| r);
        if made.is_err() {
            lock(&self.registry).pods.remove(&uid);
        }
        made
    }

    fn setup(&self, sb: &mut Sandbox, record: &CniRecord) -> Result<()> {
        let node = self.node(sb.info.node)?;
        record.save(&self.env_dir)?;
        ip(&["netns", "add", &record.netns])?;
        sb.netns_created = true;
        let result = record.exec("ADD")?;
        let address = result["ips"][0]["address"]
            .as_str()
            .with_context(|| format!("CNI ADD result without ips[0].address: {result}"))?;
        let pod_ip: Ipv4Addr = address
            .split('/')
            .next()
            .unwrap_or_default()
            .parse()
            .with_context(|| format!("CNI ADD gave address {address:?}"))?;
        sb.info.ip = Some(pod_ip);
        ip(&["-n", &record.netns, "link", "set", "lo", "up"])?;

        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &record.netns])
            .arg(workspace_bin("cnlb-pod-server")?)
            .arg("--pod")
            .arg(format!("{}/{}", sb.info.namespace, sb.info.name))
            .arg("--ip")
            .arg(pod_ip.to_string());
        for port in &sb.info.ports {
            cmd.arg("--port").arg(port.to_string());
        }
        let server = Proc::spawn(&format!("pod-{}", record.netns), cmd, &node.dir)?;
        sb.info.server_pid = Some(server.pid());
        sb.server = Some(server);
        Ok(())
    }

    /// Server stopped, CNI DEL, namespace deleted. A failed DEL is returned
    /// (to be retried, as the kubelet does) unless `force`.
    fn teardown(&self, sb: &mut Sandbox, force: bool) -> Result<()> {
        if let Some(server) = sb.server.take() {
            drop(server); // SIGTERM, wait, SIGKILL
            sb.info.server_pid = None;
        }
        if sb.netns_created {
            let del = CniRecord::load(&self.env_dir, &sb.info.netns).and_then(|r| r.exec("DEL"));
            if let Err(e) = del {
                if !force {
                    return Err(e);
                }
                tracing::warn!(netns = %sb.info.netns, "{e:#}");
            }
            remove_netns(&sb.info.netns)?;
            sb.netns_created = false;
        }
        let _ = std::fs::remove_file(CniRecord::path(&self.env_dir, &sb.info.netns));
        sb.done = true;
        Ok(())
    }

    /// Stops the Pod's server and releases its address and namespace.
    pub async fn remove_sandbox(self: &Arc<Self>, uid: &str) -> Result<()> {
        let Some(sandbox) = lock(&self.registry).pods.get(uid).cloned() else {
            return Ok(());
        };
        let net = self.clone();
        tokio::task::spawn_blocking(move || net.teardown(&mut lock(&sandbox), false))
            .await
            .map_err(|e| anyhow!("sandbox teardown task: {e}"))??;
        lock(&self.registry).pods.remove(uid);
        Ok(())
    }

    /// Waits until the Pod's server accepts TCP connections from the host on
    /// every port: what Ready means here.
    pub async fn wait_serving(&self, uid: &str) -> Result<()> {
        let sandbox = lock(&self.registry)
            .pods
            .get(uid)
            .cloned()
            .context("no sandbox")?;
        let info = lock(&sandbox).info.clone();
        let ip = info.ip.context("sandbox without an IP")?;
        let start = Instant::now();
        for port in &info.ports {
            let addr = SocketAddr::from((ip, *port));
            loop {
                let probe = tokio::time::timeout(
                    Duration::from_millis(500),
                    tokio::net::TcpStream::connect(addr),
                );
                if let Ok(Ok(_)) = probe.await {
                    break;
                }
                if let Some(server) = &lock(&sandbox).server {
                    server.check_running()?;
                }
                if start.elapsed() > SERVE_TIMEOUT {
                    bail!(
                        "the pod's server does not accept connections at {addr} after {SERVE_TIMEOUT:?}"
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    /// Tears everything down without the API: sandboxes (server, DEL while
    /// the agents still run, namespace), then the agents, then whatever
    /// namespace of this range is left. Blocks; for `Env`'s drop.
    pub fn shutdown(&self) {
        let pods: Vec<_> = {
            let mut reg = lock(&self.registry);
            reg.closed = true;
            std::mem::take(&mut reg.pods).into_values().collect()
        };
        for sandbox in pods {
            let mut sb = lock(&sandbox);
            if let Err(e) = self.teardown(&mut sb, true) {
                tracing::warn!(netns = %sb.info.netns, "{e:#}");
            }
        }
        let agents: Vec<Proc> = self
            .nodes
            .iter()
            .filter_map(|n| lock(&n.agent).take())
            .collect();
        crate::process::stop_all(agents);
        for name in netns_with_prefix(&self.netns_prefix()) {
            kill_netns_processes(&name);
            if let Err(e) = remove_netns(&name) {
                tracing::warn!("{e:#}");
            }
        }
    }
}

/// Clones cheaply into the readiness probe's future.
#[derive(Clone)]
struct StatusProbe {
    plugin: PathBuf,
    conf: Vec<u8>,
}

impl StatusProbe {
    async fn run(&self) -> Result<()> {
        let mut child = tokio::process::Command::new(&self.plugin)
            .env("CNI_COMMAND", "STATUS")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("running {}", self.plugin.display()))?;
        if let Some(mut stdin) = child.stdin.take() {
            tokio::io::AsyncWriteExt::write_all(&mut stdin, &self.conf).await?;
        }
        let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
            .await
            .context("vpc-ipam STATUS timed out")??;
        if out.status.success() {
            Ok(())
        } else {
            bail!(
                "vpc-ipam STATUS: {}{}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )
        }
    }
}

/// The TCP container ports of a Pod, or the default one.
pub fn pod_ports(pod: &Pod) -> Vec<u16> {
    let mut ports: Vec<u16> = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
        .filter_map(|p| u16::try_from(p.container_port).ok())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    if ports.is_empty() {
        ports.push(DEFAULT_POD_PORT);
    }
    ports
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

// ---------------------------------------------------------------- CNI

/// How a sandbox was attached: enough to run CNI DEL later, also from
/// another process (`cnlb-env down`). Kept in `<env dir>/netns/<netns>.json`.
#[derive(serde::Serialize, serde::Deserialize)]
struct CniRecord {
    plugin: PathBuf,
    conf: Value,
    container_id: String,
    netns: String,
    cni_args: String,
    cni_path: String,
}

impl CniRecord {
    fn path(env_dir: &Path, netns: &str) -> PathBuf {
        env_dir.join("netns").join(format!("{netns}.json"))
    }

    fn save(&self, env_dir: &Path) -> Result<()> {
        let path = Self::path(env_dir, &self.netns);
        std::fs::write(&path, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    fn load(env_dir: &Path, netns: &str) -> Result<CniRecord> {
        let path = Self::path(env_dir, netns);
        let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(serde_json::from_slice(&text)?)
    }

    /// Runs the plugin with `command`; its result (`null` for DEL) or its
    /// CNI error as an error.
    fn exec(&self, command: &str) -> Result<Value> {
        let mut cmd = Command::new(&self.plugin);
        cmd.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &self.container_id)
            .env("CNI_NETNS", Path::new(NETNS_DIR).join(&self.netns))
            .env("CNI_IFNAME", IFNAME)
            .env("CNI_ARGS", &self.cni_args)
            .env("CNI_PATH", &self.cni_path);
        let what = format!(
            "CNI {command} ({}) for {}",
            self.plugin.display(),
            self.netns
        );
        let out = run(cmd, &serde_json::to_vec(&self.conf)?, &what)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            let err: Value = serde_json::from_str(&stdout).unwrap_or(Value::Null);
            bail!(
                "{what}: {} (code {}): {}{}",
                err["msg"].as_str().unwrap_or("failed"),
                err["code"],
                err["details"].as_str().unwrap_or(&stdout),
                stderr_note(&out.stderr)
            );
        }
        if stdout.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&stdout).with_context(|| format!("{what}: result {stdout:?}"))
    }
}

fn stderr_note(stderr: &[u8]) -> String {
    let s = String::from_utf8_lossy(stderr);
    if s.trim().is_empty() {
        String::new()
    } else {
        format!("; stderr: {}", s.trim())
    }
}

/// Runs `cmd` with `stdin`, killing it after `EXEC_TIMEOUT`.
fn run(mut cmd: Command, stdin: &[u8], what: &str) -> Result<std::process::Output> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("{what}: starting {:?}", cmd.get_program()))?;
    if let Some(mut input) = child.stdin.take() {
        // A plugin that fails early stops reading: its answer tells why.
        let _ = input.write_all(stdin);
    }
    let pid = Pid::from_raw(i32::try_from(child.id())?);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(EXEC_TIMEOUT) {
        Ok(out) => Ok(out?),
        Err(_) => {
            let _ = kill(pid, Signal::SIGKILL);
            bail!("{what}: no answer after {EXEC_TIMEOUT:?}")
        }
    }
}

/// `ip <args>`, its stderr in the error.
fn ip(args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    let what = format!("ip {}", args.join(" "));
    let out = run(cmd, b"", &what)?;
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

// ---------------------------------------------------------------- cleanup

fn netns_prefix(k: u8) -> String {
    format!("cnlb-{k}-")
}

/// Names of the network namespaces starting with `prefix`.
pub fn netns_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

/// SIGKILL to every process in the namespace (a server whose owner died),
/// then waits (up to 5 s) until they are gone.
fn kill_netns_processes(name: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() else {
        return;
    };
    let pids: Vec<i32> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    for pid in &pids {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| is_running(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn remove_netns(name: &str) -> Result<()> {
    if !Path::new(NETNS_DIR).join(name).exists() {
        return Ok(());
    }
    ip(&["netns", "del", name])
}

/// Removes what a dead owner of range `k` left: processes in its
/// namespaces, their attachments (CNI DEL from the records in the owner's
/// directory, while its agents may still answer), and the namespaces.
/// The caller holds the range's lock.
pub(crate) fn clean_range(k: u8, owner: Option<&Path>) -> Vec<String> {
    let names = netns_with_prefix(&netns_prefix(k));
    for name in &names {
        kill_netns_processes(name);
        if let Some(owner) = owner
            && let Ok(record) = CniRecord::load(owner, name)
            && let Err(e) = record.exec("DEL")
        {
            tracing::warn!("{e:#}");
        }
        if let Err(e) = remove_netns(name) {
            tracing::warn!("{e:#}");
        }
    }
    names
        .into_iter()
        .map(|n| format!("network namespace {n}"))
        .collect()
}

/// The ranges some network namespace on this host belongs to.
pub(crate) fn ranges_in_use() -> Vec<u8> {
    netns_with_prefix("cnlb-")
        .iter()
        .filter_map(|n| n.strip_prefix("cnlb-")?.split_once('-')?.0.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_default_to_8080_and_skip_udp() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [
                {"name": "a", "ports": [{"containerPort": 9090}, {"containerPort": 53, "protocol": "UDP"}]},
                {"name": "b", "ports": [{"containerPort": 8081, "protocol": "TCP"}, {"containerPort": 9090}]},
            ]},
        }))
        .unwrap();
        assert_eq!(pod_ports(&pod), vec![8081, 9090]);
        let bare: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}]},
        }))
        .unwrap();
        assert_eq!(pod_ports(&bare), vec![DEFAULT_POD_PORT]);
    }

    #[test]
    fn names_are_truncated_on_char_boundaries() {
        assert_eq!(truncate("abcdef", 3), "abc");
        assert_eq!(truncate("ab", 3), "ab");
        assert_eq!(truncate("äöü", 2), "äö");
    }
}
