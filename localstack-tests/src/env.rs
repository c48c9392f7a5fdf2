//! One local environment: the parts a test asks for, started at once, ready
//! checks with deadlines, and teardown on drop (also when the test panics,
//! in which case the logs are kept and their place printed).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::aws::{AwsEndpoints, Emulator, external_url};
use crate::controlplane::{ControlPlane, ControlPlaneOptions};
use crate::gce::{self, GceEmulator, GceOptions, NamedRange};
use crate::node::{NodeConfig, NodeContext, RealNode};
use crate::paths::{run_root, workspace_bin};
use crate::podnet::{AgentBackend, PodNet, PodNetContext, PodNetworkConfig, PodSandbox};
use crate::process::{Proc, free_port};
use crate::range::RangeLease;
use crate::simulated_kubelet::SimulatedKubelet;

/// Set to keep an environment's directory (logs, kubeconfig) after a passing run too.
pub const KEEP_VAR: &str = "CNLB_KEEP_LOGS";

pub struct EnvBuilder {
    name: String,
    kube: bool,
    nodes: Vec<NodeConfig>,
    /// The nodes are played by [`SimulatedKubelet`], not real kubelets.
    simulated: bool,
    external_cloud_provider: bool,
    agent_backend: AgentBackend,
    /// Imported into real Nodes besides the sandbox, sample app and vpc-ipam images.
    images: Vec<String>,
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

    /// Real Nodes (implies `kube`): per Node a containerd and a kubelet
    /// (see [`crate::node`]), and the Pod network as users install it:
    /// vpc-ipam's DaemonSet from `deploy/` (ptp and the vpc-ipam plugin;
    /// the backend is [`EnvBuilder::agent_backend`], by default static
    /// ranges from the Nodes' `spec.podCIDRs`, which kube-controller-manager
    /// assigns from the environment's /16). Node names, zones and regions
    /// come from `nodes`; their addresses from the environment's range.
    pub fn nodes(mut self, nodes: Vec<NodeConfig>) -> Self {
        self.kube = true;
        self.nodes = nodes;
        self.simulated = false;
        self
    }

    /// Nodes the harness registers and plays kubelet for, with no
    /// container runtime (see [`SimulatedKubelet`]): for benchmarks with
    /// thousands of Pods. Pods get made-up IPs, or real network namespaces
    /// with [`EnvBuilder::pod_network`].
    pub fn simulated_nodes(mut self, nodes: Vec<NodeConfig>) -> Self {
        self.kube = true;
        self.nodes = nodes;
        self.simulated = true;
        self
    }

    /// Real kubelets start with `--cloud-provider=external`: Nodes carry
    /// the `node.cloudprovider.kubernetes.io/uninitialized` taint until a
    /// cloud controller manager initializes them (sets their provider ID,
    /// addresses and topology labels). Without it the kubelets set the
    /// provider ID and labels of their [`NodeConfig`] themselves.
    pub fn external_cloud_provider(mut self) -> Self {
        self.external_cloud_provider = true;
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

    /// cnlb's GCE emulator (`cnlb-gce-emulator`, see gce-emulator/GCE_EMULATOR.md) with
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
    /// primary range is `nodes=10.0.0.0/16` (an environment with Nodes
    /// takes `10.127.0.0/16`, where their addresses are), and health checks
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

    /// Also imports this image of [`crate::images::workspace_images`]
    /// (e.g. [`crate::images::ccm_image`]) into the real Nodes; they always
    /// have the Pod sandbox's, the sample app's and vpc-ipam's.
    pub fn image(mut self, reference: &str) -> Self {
        self.images.push(reference.to_string());
        self
    }

    /// Pod networking on simulated Nodes (see [`EnvBuilder::simulated_nodes`]):
    /// a `vpc-ipam-agent` per Node, and per Pod a network namespace attached
    /// by CNI ADD through Debian's ptp plugin, with `cnlb-pod-server`
    /// inside answering on the Pod's container ports. Pod IPs come from
    /// this environment's own /16 (see [`Env::pod_range`]). Without it Pods
    /// get made-up IPs and nothing runs. Real Nodes always have a Pod network.
    pub fn pod_network(mut self) -> Self {
        self.pod_network
            .get_or_insert_with(PodNetworkConfig::default);
        self
    }

    /// vpc-ipam's backend: on real Nodes the DaemonSet's, on simulated ones
    /// each agent's (implies `pod_network` there). Default: static ranges.
    pub fn agent_backend(mut self, backend: AgentBackend) -> Self {
        self.agent_backend = backend;
        self
    }

    /// On simulated Nodes: how long a deleted Pod keeps serving, not Ready,
    /// before its server stops (default 0; a container's preStop `sleep`
    /// takes precedence; implies `pod_network`).
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
        let real_nodes = !self.simulated && !self.nodes.is_empty();
        if self.simulated {
            if let Some(net) = &mut self.pod_network {
                net.backend = self.agent_backend.clone();
            } else if !matches!(self.agent_backend, AgentBackend::Static) {
                self.pod_network = Some(PodNetworkConfig {
                    backend: self.agent_backend.clone(),
                    ..PodNetworkConfig::default()
                });
            }
        }
        if self.pod_network.is_some() && !self.simulated {
            bail!(
                "pod_network() and pod_drain() are for simulated_nodes(): real Nodes always have vpc-ipam's Pod network"
            );
        }
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
            nodes: Vec::new(),
            kubelet: None,
            pod_net: None,
            control_plane: None,
            moto: None,
            localstack: None,
            gce: None,
            range: None,
            external: external_url().map(|u| AwsEndpoints::single(&u)),
            started,
            ready_in: Duration::ZERO,
            keep: false,
        };
        if real_nodes || self.pod_network.is_some() {
            let range = RangeLease::acquire(&env.dir)?;
            for (i, node) in self.nodes.iter_mut().enumerate().filter(|_| real_nodes) {
                node.internal_ip = range.node_ip(i)?;
                node.pod_cidr = String::new();
            }
            env.range = Some(range);
        }
        let static_pods = real_nodes && matches!(self.agent_backend, AgentBackend::Static);
        // Spawn everything first so the parts come up in parallel.
        if self.kube {
            let options = ControlPlaneOptions {
                cluster_cidr: env
                    .range
                    .as_ref()
                    .filter(|_| static_pods)
                    .map(RangeLease::pod_cidr),
                // The Node lifecycle tests stop kubelets and wait for NotReady.
                node_monitor_grace_period: self
                    .external_cloud_provider
                    .then_some(Duration::from_secs(20)),
            };
            env.control_plane = Some(ControlPlane::spawn(&env.dir, &options).await?);
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
        // the Pod CIDR, known once the environment has taken its range.
        let gce = match self.gce.take() {
            Some(mut opts) => {
                let port = free_port()?;
                if !self.nodes.is_empty()
                    && let Ok(r) = NamedRange::new("nodes", "10.127.0.0/16")
                {
                    // Where the Nodes' addresses are, real or simulated
                    // (see crate::range and NodeConfig::numbered).
                    opts.subnetwork = r;
                }
                Some((
                    port,
                    GceEmulator::new(&format!("http://127.0.0.1:{port}"), opts),
                ))
            }
            None => None,
        };
        // Real Nodes' instances; the pod network seeds simulated Nodes' own.
        let instances = match (&gce, &env.range) {
            (Some((_, g)), Some(range))
                if real_nodes && matches!(self.agent_backend, AgentBackend::Gcp) =>
            {
                self.nodes
                    .iter_mut()
                    .enumerate()
                    .map(|(i, node)| {
                        node.pod_cidr = format!("10.{}.{i}.0/24", range.k());
                        crate::podnet::gce_node(g, i, node)
                    })
                    .collect::<Result<Vec<_>>>()?
            }
            _ => Vec::new(),
        };
        if let (Some(cp), Some(config), Some(range)) =
            (&env.control_plane, self.pod_network.take(), &env.range)
        {
            let aws = env.aws().ok();
            let ctx = PodNetContext {
                env_dir: &env.dir,
                k: range.k(),
                cluster: &self.name,
                aws: aws.as_ref(),
                gce: gce.as_ref().map(|(_, g)| g),
                kubeconfig: Some(&cp.kubeconfig),
            };
            env.pod_net = Some(Arc::new(PodNet::new(config, &mut self.nodes, &ctx)?));
        }
        if let Some((port, handle)) = gce {
            let mut opts = handle.options().clone();
            if let Some(range) = &env.range
                && !opts
                    .secondary_ranges
                    .iter()
                    .any(|r| r.name == GCE_POD_RANGE)
            {
                opts.secondary_ranges.push(
                    NamedRange::new(GCE_POD_RANGE, &range.pod_cidr())
                        .map_err(anyhow::Error::msg)?,
                );
            }
            let proc = spawn_gce(&env.dir, port, &opts)?;
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
                        .await?;
                    for instance in &instances {
                        g.handle
                            .seed(instance)
                            .await
                            .with_context(|| format!("seeding GCE instance {}", instance.name))?;
                    }
                    Ok(())
                }
                None => Ok(()),
            }
        };
        // Images are written while the parts start (it reads every binary).
        let images = async {
            if !real_nodes {
                return Ok(Vec::new());
            }
            let mut wanted = vec![
                crate::images::pause_image(),
                crate::images::pod_server_image(),
                crate::images::vpc_ipam_image(),
            ];
            wanted.extend(self.images.iter().cloned());
            tokio::task::spawn_blocking(move || crate::images::workspace_archives(&wanted))
                .await
                .map_err(|e| anyhow!("building images: {e}"))?
        };
        let ready = tokio::try_join!(kube, moto, localstack, gce, images);
        // A part that failed to start is what the logs are for.
        env.keep = ready.is_err();
        let ((), (), (), (), images) = ready?;
        tracing::info!(
            "control plane and emulators ready in {:.1?}",
            started.elapsed()
        );

        if let Some(cp) = &env.control_plane
            && !self.nodes.is_empty()
        {
            let started = if let Some(range) = env.range.as_ref().filter(|_| real_nodes) {
                let ctx = NodeContext {
                    control_plane: cp,
                    env_dir: &env.dir,
                    k: range.k(),
                    images: &images,
                    external_cloud_provider: self.external_cloud_provider,
                    timeout: t,
                };
                let starts = self.nodes.iter().map(|n| RealNode::start(&ctx, n.clone()));
                let mut first_error = None;
                for node in futures::future::join_all(starts).await {
                    match node {
                        Ok(node) => env.nodes.push(node),
                        Err(e) => {
                            first_error.get_or_insert(e);
                        }
                    }
                }
                tracing::info!("Nodes registered in {:.1?}", started.elapsed());
                match first_error {
                    Some(e) => Err(e),
                    None => {
                        let gce = env.gce.as_ref().map(|g| g.handle.endpoint().to_string());
                        install_pod_network(cp, &env.dir, &self, gce.as_deref()).await
                    }
                }
            } else {
                SimulatedKubelet::start(cp.admin_client()?, self.nodes, env.pod_net.clone(), t)
                    .await
                    .map(|k| env.kubelet = Some(k))
            };
            // A Node that failed to start is what the logs are for.
            env.keep = started.is_err();
            started?;
        }
        env.ready_in = started.elapsed();
        tracing::info!(dir = %env.dir.display(), "environment ready in {:.1?}", env.ready_in);
        Ok(env)
    }
}

/// vpc-ipam's DaemonSet with the environment's backend, and the wait for
/// an agent on every Node and every Node Ready.
async fn install_pod_network(
    cp: &ControlPlane,
    dir: &Path,
    builder: &EnvBuilder,
    gce_endpoint: Option<&str>,
) -> Result<()> {
    let (backend, args) = match &builder.agent_backend {
        AgentBackend::Static => ("static", Vec::new()),
        AgentBackend::Gcp => {
            // GKE's node IPAM controller (the CloudAllocator) copies each
            // instance's alias IP range into its Node's spec.podCIDR.
            let nodes: kube::Api<k8s_openapi::api::core::v1::Node> =
                kube::Api::all(cp.admin_client()?);
            for node in &builder.nodes {
                let patch = serde_json::json!({"spec": {
                    "podCIDR": node.pod_cidr, "podCIDRs": [node.pod_cidr],
                }});
                nodes
                    .patch(
                        &node.name,
                        &kube::api::PatchParams::default(),
                        &kube::api::Patch::Merge(patch),
                    )
                    .await
                    .with_context(|| format!("setting Node {} spec.podCIDR", node.name))?;
            }
            let endpoint = gce_endpoint
                .context("AgentBackend::Gcp needs the GCE emulator: add .gce() to the builder")?;
            (
                "gcp",
                vec![
                    format!("--gcp-endpoint={endpoint}"),
                    format!("--gcp-pod-range-name={GCE_POD_RANGE}"),
                ],
            )
        }
        AgentBackend::Custom(_) => {
            bail!("AgentBackend::Custom launches agents of simulated Nodes only")
        }
    };
    let values = crate::install::vpc_ipam_values(cp, &builder.name, backend, &args)?;
    crate::install::helm_install(cp, dir, "cnlb-vpc-ipam", "cnlb-vpc-ipam", &values).await?;
    // Before a cloud controller manager initializes the Nodes, a cloud
    // backend's agents cannot know their instance.
    let agents_ready =
        !builder.external_cloud_provider || matches!(builder.agent_backend, AgentBackend::Static);
    crate::install::wait_daemonset_and_nodes(
        cp,
        "vpc-ipam-agent",
        builder.nodes.len(),
        agents_ready,
        builder.timeout,
    )
    .await
}

pub struct Env {
    /// Logs, certificates, kubeconfig and emulator state of this environment.
    pub dir: PathBuf,
    tmp: Option<tempfile::TempDir>,
    // Field order is drop order: the Nodes stop before the API server.
    nodes: Vec<RealNode>,
    kubelet: Option<SimulatedKubelet>,
    pod_net: Option<Arc<PodNet>>,
    control_plane: Option<ControlPlane>,
    moto: Option<Emulator>,
    localstack: Option<Emulator>,
    gce: Option<GceProcess>,
    /// Held until the end: what carries its number is this environment's.
    range: Option<RangeLease>,
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
            simulated: false,
            external_cloud_provider: false,
            agent_backend: AgentBackend::Static,
            images: Vec::new(),
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

    /// The control plane, to kill and start etcd and kube-apiserver again
    /// (fault tests).
    pub fn kube_mut(&mut self) -> Result<&mut ControlPlane> {
        self.control_plane
            .as_mut()
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
            .context("this environment has no simulated Nodes with .pod_network()")
    }

    /// The real Nodes, in the builder's order.
    pub fn nodes(&self) -> &[RealNode] {
        &self.nodes
    }

    /// The real Node named `name`.
    pub fn node(&self, name: &str) -> Result<&RealNode> {
        self.nodes
            .iter()
            .find(|n| n.config.name == name)
            .with_context(|| format!("no real Node {name}"))
    }

    /// This environment's Pod addresses, `10.<k>.0.0/16`: `k` is unique
    /// among the environments running on this host.
    pub fn pod_cidr(&self) -> Result<String> {
        self.range
            .as_ref()
            .map(RangeLease::pod_cidr)
            .context("this environment has no Pod network")
    }

    /// The pod range of the Node at `node` (index in the builder's list),
    /// `10.<k>.<node>.0/24`, where the environment chose it (simulated
    /// Nodes; real ones with the GCP backend, as their alias IP range).
    /// Otherwise kube-controller-manager assigns it: read the Node's
    /// `spec.podCIDR`.
    pub fn pod_range(&self, node: usize) -> Result<String> {
        if let Some(n) = self.nodes.get(node) {
            if n.config.pod_cidr.is_empty() {
                bail!(
                    "the pod range of Node {} is its spec.podCIDR",
                    n.config.name
                );
            }
            return Ok(n.config.pod_cidr.clone());
        }
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
        let node_pids: Vec<i32> = self.nodes.iter().flat_map(RealNode::pids).collect();
        crate::process::group_memory(&self.pids(), &node_pids)
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
        // Real Nodes all at once: each kills its processes and waits.
        std::thread::scope(|s| {
            for node in self.nodes.drain(..) {
                s.spawn(move || drop(node));
            }
        });
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

/// Starts `cnlb-gce-emulator` on `127.0.0.1:port` in `dir` (its log is
/// `<dir>/cnlb-gce-emulator.log`).
fn spawn_gce(dir: &Path, port: u16, opts: &GceOptions) -> Result<Proc> {
    opts.validate().map_err(|e| anyhow!(e))?;
    let mut cmd = Command::new(workspace_bin(gce::BIN)?);
    cmd.arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .args(opts.to_args());
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    Proc::spawn(gce::BIN, cmd, dir)
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
    /// What dead environments left on the host, removed: real Nodes'
    /// processes, cgroups and addresses, Pods' network namespaces.
    pub ranges: Vec<String>,
}

/// Stops what a killed test process left behind: first what dead
/// environments put on the host (real Nodes with their containers, Pod
/// network namespaces: see [`crate::range`]); then, for each environment
/// directory whose owner process is gone, every part still running there is
/// killed and the directory removed. Environments of live processes and
/// directories kept for their logs are left alone.
pub fn clean_stale() -> Result<Cleaned> {
    let mut cleaned = Cleaned {
        ranges: crate::range::clean_stale()?,
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
