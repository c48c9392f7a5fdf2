//! One local environment: the parts a test asks for, started at once, ready
//! checks with deadlines, and teardown on drop (also when the test panics,
//! in which case the logs are kept and their place printed).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::aws::{AwsEndpoints, Emulator, external_url};
use crate::controlplane::ControlPlane;
use crate::gce::{GceEmulator, GceOptions, NamedRange};
use crate::kubelet::{Kubelet, NodeConfig};
use crate::paths::run_root;
use crate::podnet::{AgentBackend, PodNet, PodNetContext, PodNetworkConfig, PodSandbox};
use crate::process::{Proc, free_port};

/// Set to keep an environment's directory (logs, kubeconfig) after a passing run too.
pub const KEEP_VAR: &str = "CNLB_KEEP_LOGS";

pub struct EnvBuilder {
    name: String,
    kube: bool,
    nodes: Vec<NodeConfig>,
    moto: bool,
    localstack: bool,
    pod_network: Option<PodNetworkConfig>,
    gce: Option<GceOptions>,
    timeout: Duration,
}

/// The secondary range of the GCE emulator's subnetwork that holds the
/// environment's Pod CIDR (with `.pod_network()`).
pub const GCE_POD_RANGE: &str = "pods";

impl EnvBuilder {
    /// The real control plane (etcd, kube-apiserver, kube-controller-manager).
    pub fn kube(mut self) -> Self {
        self.kube = true;
        self
    }

    /// Nodes the harness creates and plays kubelet for (implies `kube`).
    pub fn nodes(mut self, nodes: Vec<NodeConfig>) -> Self {
        self.kube = true;
        self.nodes = nodes;
        self
    }

    /// moto server for EC2 and ELBv2 (skipped when `CNLB_LOCALSTACK_URL` is set).
    pub fn moto(mut self) -> Self {
        self.moto = true;
        self
    }

    /// LocalStack (host mode) for EC2 (skipped when `CNLB_LOCALSTACK_URL` is set).
    pub fn localstack(mut self) -> Self {
        self.localstack = true;
        self
    }

    /// cnlb's GCE emulator (`cnlb-gce-emulator`, see GCE_EMULATOR.md) with
    /// [`EnvBuilder::default_gce_options`]; reach it through [`Env::gce`].
    pub fn gce(mut self) -> Self {
        self.gce.get_or_insert_with(EnvBuilder::default_gce_options);
        self
    }

    /// The GCE emulator with these flags. With `.pod_network()`, the
    /// environment's Pod CIDR is added as secondary range `pods`.
    pub fn gce_options(mut self, opts: GceOptions) -> Self {
        self.gce = Some(opts);
        self
    }

    /// The binary's defaults (project `cnlb-test`, region `us-central1`,
    /// zones `-a,-b,-c`, network `cnlb-net`), except: the subnetwork's
    /// primary range is `nodes=10.0.0.0/16`, which holds the harness
    /// Nodes' internal IPs ([`NodeConfig::numbered`]), and health checks
    /// run ten times faster than GCE's (time scale 0.1, floor 100 ms).
    pub fn default_gce_options() -> GceOptions {
        let mut o = GceOptions::default();
        if let Ok(r) = NamedRange::new("nodes", "10.0.0.0/16") {
            o.subnetwork = r;
        }
        o.health_check_time_scale = 0.1;
        o.health_check_min_interval_ms = 100;
        o
    }

    /// Real Pod networking on the harness's Nodes (needs `nodes`): a
    /// `vpc-ipam-agent` per Node, and per Pod a network namespace attached
    /// by CNI ADD through Debian's ptp plugin, with `cnlb-pod-server`
    /// inside answering on the Pod's container ports. Pod IPs come from
    /// this environment's own /16 (see [`Env::pod_range`]). Without it Pods
    /// get made-up IPs and nothing runs.
    pub fn pod_network(mut self) -> Self {
        self.pod_network
            .get_or_insert_with(PodNetworkConfig::default);
        self
    }

    /// The agents' backend (default static over each Node's pod range;
    /// implies `pod_network`).
    pub fn agent_backend(mut self, backend: AgentBackend) -> Self {
        self.pod_network
            .get_or_insert_with(PodNetworkConfig::default)
            .backend = backend;
        self
    }

    /// How long a deleted Pod keeps serving, not Ready, before its server
    /// stops (default 0; a container's preStop `sleep` takes precedence;
    /// implies `pod_network`).
    pub fn pod_drain(mut self, drain: Duration) -> Self {
        self.pod_network
            .get_or_insert_with(PodNetworkConfig::default)
            .drain = drain;
        self
    }

    /// Deadline for each part's readiness check (default 60 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub async fn start(mut self) -> Result<Env> {
        if self.pod_network.is_some() && self.nodes.is_empty() {
            bail!("a pod network needs nodes");
        }
        let started = Instant::now();
        let root = run_root();
        std::fs::create_dir_all(&root)?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}-", self.name))
            .tempdir_in(&root)
            .context("creating the environment's directory")?;
        let mut env = Env {
            dir: dir.path().to_path_buf(),
            tmp: Some(dir),
            kubelet: None,
            pod_net: None,
            control_plane: None,
            moto: None,
            localstack: None,
            gce: None,
            external: external_url().map(|u| AwsEndpoints::single(&u)),
            started,
            ready_in: Duration::ZERO,
            keep: false,
        };
        // Spawn everything first so the parts come up in parallel.
        if self.kube {
            env.control_plane = Some(ControlPlane::spawn(&env.dir).await?);
        }
        if env.external.is_none() {
            if self.moto {
                env.moto = Some(Emulator::spawn_moto(&env.dir)?);
            }
            if self.localstack {
                env.localstack = Some(Emulator::spawn_localstack(&env.dir)?);
            }
        }
        // The GCE emulator's address is known before it starts, so that the
        // pod network's agents can be pointed at it; its subnetwork takes
        // the Pod CIDR, known once the pod network has taken its range.
        let gce = match self.gce.take() {
            Some(opts) => {
                let port = free_port()?;
                Some((
                    port,
                    GceEmulator::new(&format!("http://127.0.0.1:{port}"), opts),
                ))
            }
            None => None,
        };
        if let Some(cp) = &env.control_plane
            && !self.nodes.is_empty()
            && let Some(config) = self.pod_network.take()
        {
            let aws = env.aws().ok();
            let ctx = PodNetContext {
                env_dir: &env.dir,
                cluster: &self.name,
                aws: aws.as_ref(),
                gce: gce.as_ref().map(|(_, g)| g),
                kubeconfig: Some(&cp.kubeconfig),
            };
            env.pod_net = Some(Arc::new(PodNet::new(config, &mut self.nodes, &ctx)?));
        }
        if let Some((port, handle)) = gce {
            let mut opts = handle.options().clone();
            if let Some(net) = &env.pod_net
                && !opts
                    .secondary_ranges
                    .iter()
                    .any(|r| r.name == GCE_POD_RANGE)
            {
                opts.secondary_ranges
                    .push(NamedRange::new(GCE_POD_RANGE, &net.cidr()).map_err(anyhow::Error::msg)?);
            }
            let proc = crate::gce::spawn(&env.dir, port, &opts)?;
            env.gce = Some(GceProcess {
                handle: GceEmulator::new(handle.endpoint(), opts),
                proc,
            });
        }
        env.record_pids()?;

        let t = self.timeout;
        let kube = async {
            match &env.control_plane {
                Some(cp) => cp.wait_ready(t).await,
                None => Ok(()),
            }
        };
        let moto = async {
            match &env.moto {
                Some(m) => m.wait_ready(t).await,
                None => Ok(()),
            }
        };
        let localstack = async {
            match &env.localstack {
                Some(l) => l.wait_ready(t).await,
                None => Ok(()),
            }
        };
        let gce = async {
            match &env.gce {
                Some(g) => {
                    g.proc
                        .wait_ready(t, || async { g.handle.ping().await })
                        .await
                }
                None => Ok(()),
            }
        };
        let ready = tokio::try_join!(kube, moto, localstack, gce);
        // A part that failed to start is what the logs are for.
        env.keep = ready.is_err();
        ready?;

        if let Some(cp) = &env.control_plane
            && !self.nodes.is_empty()
        {
            let kubelet =
                Kubelet::start(cp.admin_client()?, self.nodes, env.pod_net.clone(), t).await;
            // An agent that failed to start is what the logs are for.
            env.keep = kubelet.is_err();
            env.kubelet = Some(kubelet?);
        }
        env.ready_in = started.elapsed();
        tracing::info!(dir = %env.dir.display(), "environment ready in {:.1?}", env.ready_in);
        Ok(env)
    }
}

pub struct Env {
    /// Logs, certificates, kubeconfig and emulator state of this environment.
    pub dir: PathBuf,
    tmp: Option<tempfile::TempDir>,
    // Field order is drop order: the kubelet stops before the API server.
    kubelet: Option<Kubelet>,
    pod_net: Option<Arc<PodNet>>,
    control_plane: Option<ControlPlane>,
    moto: Option<Emulator>,
    localstack: Option<Emulator>,
    gce: Option<GceProcess>,
    external: Option<AwsEndpoints>,
    started: Instant,
    ready_in: Duration,
    /// Keep the directory on drop (also when panicking or with `CNLB_KEEP_LOGS`).
    keep: bool,
}

impl Env {
    pub fn builder(name: &str) -> EnvBuilder {
        EnvBuilder {
            name: name.to_string(),
            kube: false,
            nodes: Vec::new(),
            moto: false,
            localstack: false,
            pod_network: None,
            gce: None,
            timeout: Duration::from_secs(60),
        }
    }

    pub fn kube(&self) -> Result<&ControlPlane> {
        self.control_plane
            .as_ref()
            .context("this environment was built without .kube()")
    }

    /// EC2 and ELBv2: the user's LocalStack Pro if set, else moto.
    pub fn aws(&self) -> Result<AwsEndpoints> {
        if let Some(ext) = &self.external {
            return Ok(ext.clone());
        }
        let m = self
            .moto
            .as_ref()
            .context("this environment was built without .moto()")?;
        Ok(AwsEndpoints::single(&m.url))
    }

    /// LocalStack's EC2 (its community build has no ELBv2, so ELBv2 is only
    /// usable here when the user's LocalStack Pro serves both).
    pub fn localstack(&self) -> Result<AwsEndpoints> {
        if let Some(ext) = &self.external {
            return Ok(ext.clone());
        }
        let l = self
            .localstack
            .as_ref()
            .context("this environment was built without .localstack()")?;
        Ok(AwsEndpoints::single(&l.url))
    }

    /// The GCE emulator: its endpoint (for the compute clients'
    /// `with_endpoint`), the world it models and its admin API.
    pub fn gce(&self) -> Result<GceEmulator> {
        self.gce
            .as_ref()
            .map(|g| g.handle.clone())
            .context("this environment was built without .gce()")
    }

    fn pod_net(&self) -> Result<&Arc<PodNet>> {
        self.pod_net
            .as_ref()
            .context("this environment was built without .pod_network()")
    }

    /// This environment's Pod addresses, `10.<k>.0.0/16`: `k` is unique
    /// among the environments running on this host.
    pub fn pod_cidr(&self) -> Result<String> {
        Ok(self.pod_net()?.cidr())
    }

    /// The pod range of the Node at `node` (index in the builder's list),
    /// `10.<k>.<node>.0/24`; also the Node's `spec.podCIDR`.
    pub fn pod_range(&self, node: usize) -> Result<String> {
        self.pod_net()?.pod_range(node)
    }

    /// The unix socket of the Node's vpc-ipam-agent.
    pub fn agent_socket(&self, node: usize) -> Result<PathBuf> {
        self.pod_net()?.agent_socket(node)
    }

    /// The state directory of the Node's vpc-ipam-agent.
    pub fn agent_state_dir(&self, node: usize) -> Result<PathBuf> {
        self.pod_net()?.agent_state_dir(node)
    }

    /// Where the Node's vpc-ipam-agent serves its metrics (`--metrics-addr`).
    pub fn agent_metrics_addr(&self, node: usize) -> Result<SocketAddr> {
        self.pod_net()?.agent_metrics_addr(node)
    }

    /// Pid (and process group) of the Node's vpc-ipam-agent, if running.
    pub fn agent_pid(&self, node: usize) -> Result<Option<i32>> {
        self.pod_net()?.agent_pid(node)
    }

    /// Kills the Node's agent if it still runs (SIGKILL), starts it again
    /// with the same flags and state, and waits until it serves.
    pub async fn restart_agent(&self, node: usize) -> Result<()> {
        self.pod_net()?
            .restart_agent(node, Duration::from_secs(60))
            .await
    }

    /// The sandbox (network namespace, IP, server) of a running Pod.
    pub fn pod_sandbox(&self, namespace: &str, name: &str) -> Result<Option<PodSandbox>> {
        Ok(self
            .pod_net()?
            .sandboxes()
            .into_iter()
            .find(|s| s.namespace == namespace && s.name == name))
    }

    /// Every Pod sandbox of this environment.
    pub fn pod_sandboxes(&self) -> Result<Vec<PodSandbox>> {
        Ok(self.pod_net()?.sandboxes())
    }

    /// Every network namespace of this environment's Pods starts with it
    /// (`cnlb-<k>-`, `k` as in [`Env::pod_cidr`]).
    pub fn netns_prefix(&self) -> Result<String> {
        Ok(self.pod_net()?.netns_prefix())
    }

    /// The network namespaces of this environment that exist now (by name,
    /// from /run/netns): what must be gone after teardown.
    pub fn pod_netns(&self) -> Result<Vec<String>> {
        Ok(crate::podnet::netns_with_prefix(
            &self.pod_net()?.netns_prefix(),
        ))
    }

    /// Time from `start()` to every part ready.
    pub fn ready_in(&self) -> Duration {
        self.ready_in
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    fn procs(&self) -> Vec<&Proc> {
        let mut v: Vec<&Proc> = Vec::new();
        if let Some(cp) = &self.control_plane {
            v.extend(cp.procs());
        }
        v.extend(self.moto.iter().map(Emulator::proc));
        v.extend(self.localstack.iter().map(Emulator::proc));
        v.extend(self.gce.iter().map(|g| &g.proc));
        v
    }

    /// Process group ids of the running parts (with the pod network's
    /// agents and Pod servers).
    pub fn pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self.procs().iter().map(|p| p.pid()).collect();
        if let Some(net) = &self.pod_net {
            pids.extend(net.pids());
        }
        pids
    }

    /// Current and peak resident memory of every process of the environment
    /// (all members of each part's process group), in bytes.
    pub fn memory(&self) -> Memory {
        crate::process::group_memory(&self.pids())
    }

    /// `owner<TAB>pid` of this process, then `pid<TAB>name` per part: read by
    /// `cnlb-env down` to clean up after a test process that was killed
    /// before it could drop its environment.
    fn record_pids(&self) -> Result<()> {
        let mut f = std::fs::File::create(self.dir.join(PIDS))?;
        writeln!(f, "owner\t{}", std::process::id())?;
        for p in self.procs() {
            writeln!(f, "{}\t{}", p.pid(), p.name())?;
        }
        Ok(())
    }
}

pub use crate::process::Memory;

impl Drop for Env {
    fn drop(&mut self) {
        self.kubelet.take();
        // Pods and agents go while the parts still run (nothing they do
        // needs the API), and before the directory their records are in.
        if let Some(net) = self.pod_net.take() {
            net.shutdown();
        }
        for p in self.procs() {
            p.terminate();
        }
        self.control_plane.take();
        self.moto.take();
        self.localstack.take();
        self.gce.take();
        let keep = self.keep || std::thread::panicking() || std::env::var_os(KEEP_VAR).is_some();
        if let Some(tmp) = self.tmp.take()
            && keep
        {
            let path = tmp.keep();
            let _ = std::fs::write(path.join(KEPT), "logs of a failed run\n");
            eprintln!("cnlb-env: logs kept in {}", path.display());
        }
    }
}

/// The emulator process and its handle.
struct GceProcess {
    handle: GceEmulator,
    proc: Proc,
}

const PIDS: &str = "pids";

/// Adds a process started after `start()` (an agent) to the pids file, for
/// `cnlb-env down`.
pub(crate) fn record_pid(dir: &Path, proc: &Proc) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join(PIDS))?;
    writeln!(f, "{}\t{}", proc.pid(), proc.name())?;
    Ok(())
}
/// Marks a directory kept for its logs: `cnlb-env down` leaves it alone.
const KEPT: &str = "KEPT";

/// What [`clean_stale`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Cleaned {
    /// Directories of dead test processes: their parts killed, then removed.
    pub removed: Vec<PathBuf>,
    /// Logs of failed runs, left for a person to read.
    pub kept: Vec<PathBuf>,
    /// Network namespaces of Pods of dead environments, removed.
    pub netns: Vec<String>,
}

/// Stops what a killed test process left behind: for each environment
/// directory whose owner process is gone, every part still running there is
/// killed and the directory removed; first their Pods' network namespaces
/// (servers killed, CNI DEL, namespace deleted). Environments of live
/// processes and directories kept for their logs are left alone.
pub fn clean_stale() -> Result<Cleaned> {
    let mut cleaned = Cleaned {
        netns: crate::podnet::clean_stale_netns()?,
        ..Cleaned::default()
    };
    let Ok(entries) = std::fs::read_dir(run_root()) else {
        return Ok(cleaned);
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        if dir.join(KEPT).exists() {
            cleaned.kept.push(dir);
            continue;
        }
        let pids = std::fs::read_to_string(dir.join(PIDS)).unwrap_or_default();
        let mut parts = Vec::new();
        let mut owner_alive = false;
        for line in pids.lines() {
            match line.split_once('\t') {
                Some(("owner", pid)) => {
                    // A zombie owner is dead too: it can no longer drop its environment.
                    owner_alive = pid.parse::<i32>().is_ok_and(crate::process::is_running);
                }
                Some((pid, _name)) => parts.extend(pid.parse::<i32>().ok()),
                None => {}
            }
        }
        if owner_alive {
            continue;
        }
        for pid in parts.into_iter().filter(|p| owned_by_env(*p, &dir)) {
            crate::process::kill_group(pid);
        }
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        cleaned.removed.push(dir);
    }
    Ok(cleaned)
}

/// True when `pid` still runs in `dir` or below (every part is started
/// there), so a recycled pid is never signalled.
fn owned_by_env(pid: i32, dir: &Path) -> bool {
    std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(dir))
}

/// Fails unless `cond` becomes true within `timeout`, polling every 200 ms.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut cond: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let start = Instant::now();
    let mut last = String::from("never checked");
    while start.elapsed() < timeout {
        match cond().await {
            Ok(true) => return Ok(()),
            Ok(false) => last = "condition false".into(),
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("{what}: not true after {timeout:?} ({last})")
}
