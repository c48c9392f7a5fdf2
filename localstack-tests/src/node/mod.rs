//! Real Nodes: per Node a containerd (running runc) and a kubelet, with
//! Pods as real containers from images the project builds itself.
//!
//! Every Node shares the host's network (its address is a /32 on `lo`;
//! the kubelet and containerd's stream server listen on it), and has a
//! mount namespace of its own, held by a `sleep` and entered with `nsenter`
//! by containerd and the kubelet. In it, the paths a node's software and
//! cnlb's DaemonSet use (`/etc/cni/net.d`, `/opt/cni/bin`, `/run/cnlb`,
//! `/var/lib/kubelet`, `/run/containerd`, ...) are bind mounts of the Node's
//! own directories, so several Nodes on one host never share a file, and
//! the deploy/ manifests run unchanged. All the Node's processes, its
//! containers included, are in the cgroup `cnlb-<k>-<node>` (see
//! [`cgroups`]), which is how it is stopped.

pub mod cgroups;
pub mod config;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::PoisonError;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Node;
use kube::Api;

use crate::controlplane::ControlPlane;
use crate::images::OciArchive;
use crate::paths::{containerd_bin, control_plane_bin};
use crate::process::Proc;

/// A Node of the environment.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub name: String,
    /// `topology.kubernetes.io/zone`.
    pub zone: String,
    /// `topology.kubernetes.io/region`.
    pub region: String,
    /// The Node's address; real Nodes get one from the environment's range.
    pub internal_ip: Ipv4Addr,
    /// An IPv4 /24 the Node's Pods get addresses from (host .1 is the
    /// gateway); set by the environment.
    pub pod_cidr: String,
    /// `spec.providerID`, e.g. `gce://<project>/<zone>/<name>` for a Node
    /// seeded as a GCE instance; none by default.
    pub provider_id: Option<String>,
}

impl NodeConfig {
    /// `node-<i>` in zone `us-east-1<a|b|c>`; a real Node's address and
    /// pod range are set by the environment.
    pub fn numbered(i: u8) -> NodeConfig {
        let zone = ["a", "b", "c"][usize::from(i) % 3];
        NodeConfig {
            name: format!("node-{i}"),
            zone: format!("{}{zone}", crate::aws::REGION),
            region: crate::aws::REGION.to_string(),
            internal_ip: Ipv4Addr::new(10, 127, 0, 10 + i),
            pod_cidr: format!("100.64.{i}.0/24"),
            provider_id: None,
        }
    }
}

/// The directories a Node sees at the standard paths, in its mount namespace.
const NODE_PATHS: [&str; 9] = [
    "/etc/cni/net.d",
    "/opt/cni/bin",
    "/var/lib/kubelet",
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/containerd",
    "/run/containerd",
    // vpc-ipam's agent socket and state (deploy/vpc-ipam).
    "/run/cnlb",
    "/var/lib/cnlb",
];
/// Debian's CNI plugins (ptp, portmap, loopback, ...), which a node image
/// puts in /opt/cni/bin; vpc-ipam's DaemonSet adds its plugin beside them.
const SYSTEM_CNI_DIR: &str = "/usr/lib/cni";

/// What every Node of an environment shares.
pub struct NodeContext<'a> {
    pub control_plane: &'a ControlPlane,
    pub env_dir: &'a Path,
    /// The environment's `k` (see [`crate::range`]).
    pub k: u8,
    /// Imported into each Node's containerd before its kubelet starts.
    pub images: &'a [OciArchive],
    /// `--cloud-provider=external`: the kubelet registers the Node with
    /// the `node.cloudprovider.kubernetes.io/uninitialized` taint and
    /// leaves its provider ID, addresses and topology labels to a cloud
    /// controller manager. Otherwise the kubelet sets them itself.
    pub external_cloud_provider: bool,
    pub timeout: Duration,
}

/// A running Node. Dropping it kills every process of it (kubelet,
/// containerd, shims, containers) and removes its cgroup and address.
pub struct RealNode {
    pub config: NodeConfig,
    /// Configuration, certificates, logs, and (under `root/`) what the
    /// Node sees at [`NODE_PATHS`].
    pub dir: PathBuf,
    cgroup: String,
    holder: i32,
    /// Mount namespace holder, containerd.
    procs: Vec<Proc>,
    /// The kubelet, and its arguments (to start it again).
    kubelet: std::sync::Mutex<Option<Proc>>,
    kubelet_args: Vec<String>,
}

impl RealNode {
    /// Starts the Node's containerd, imports the images, starts its
    /// kubelet and waits until the Node is registered (not yet Ready: that
    /// needs a CNI configuration, which the pod network's DaemonSet writes).
    pub async fn start(ctx: &NodeContext<'_>, config: NodeConfig) -> Result<RealNode> {
        let dir = ctx.env_dir.join("nodes").join(&config.name);
        let cgroup = format!("cnlb-{}-{}", ctx.k, config.name);
        std::fs::create_dir_all(&dir)?;
        let mut node = RealNode {
            config,
            dir,
            cgroup,
            holder: 0,
            procs: Vec::new(),
            kubelet: std::sync::Mutex::new(None),
            kubelet_args: Vec::new(),
        };
        cgroups::create(&node.cgroup)?;
        lo_address("add", node.config.internal_ip)?;
        node.start_holder(ctx.timeout).await?;
        node.start_containerd(ctx).await?;
        for image in ctx.images {
            node.ctr(&["images", "import", &image.path.display().to_string()])
                .await
                .with_context(|| {
                    format!("importing {} into {}", image.reference, node.config.name)
                })?;
        }
        node.first_kubelet(ctx).await?;
        Ok(node)
    }

    fn root(&self, path: &str) -> PathBuf {
        self.dir.join("root").join(path.trim_start_matches('/'))
    }

    /// Where the Node keeps what it sees at `path` (one of [`NODE_PATHS`]),
    /// as the host sees it.
    pub fn host_path(&self, path: &str) -> PathBuf {
        self.root(path)
    }

    /// A private mount namespace whose [`NODE_PATHS`] are the Node's
    /// directories, held by a `sleep` in the Node's cgroup.
    async fn start_holder(&mut self, timeout: Duration) -> Result<()> {
        let mut script = vec![cgroups::join_script(&self.cgroup)];
        for path in NODE_PATHS {
            let source = self.root(path);
            std::fs::create_dir_all(&source)?;
            std::fs::create_dir_all(path)?;
            script.push(format!("mount --bind {} {path}", source.display()));
        }
        for plugin in std::fs::read_dir(SYSTEM_CNI_DIR)
            .with_context(|| format!("{SYSTEM_CNI_DIR} (containernetworking-plugins)"))?
            .flatten()
        {
            let link = self.root("/opt/cni/bin").join(plugin.file_name());
            if !link.exists() {
                std::os::unix::fs::symlink(plugin.path(), link)?;
            }
        }
        let ready = self.dir.join("namespace-ready");
        script.push(format!("touch {}", ready.display()));
        script.push("exec sleep infinity".into());
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "sh", "-ec"])
            .arg(script.join("\n"));
        let holder = Proc::spawn("mount-namespace", cmd, &self.dir)?;
        self.holder = holder.pid();
        self.procs.push(holder);
        let Some(holder) = self.procs.last() else {
            bail!("no holder")
        };
        holder
            .wait_ready(timeout, || async {
                if ready.exists() {
                    Ok(())
                } else {
                    bail!("mounting the Node's paths")
                }
            })
            .await
    }

    /// `program args...` in the Node's mount namespace and cgroup.
    fn in_node(&self, program: &Path) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-ec")
            .arg(format!(
                "{} && exec \"$@\"",
                cgroups::join_script(&self.cgroup)
            ))
            .arg("sh")
            .arg("nsenter")
            .arg(format!("--target={}", self.holder))
            .arg("--mount")
            .arg("--")
            .arg(program);
        cmd
    }

    async fn start_containerd(&mut self, ctx: &NodeContext<'_>) -> Result<()> {
        let serving = self.dir.join("kubelet.crt");
        let files = config::NodeFiles {
            ip: self.config.internal_ip,
            cgroup: &self.cgroup,
            sandbox_image: &crate::images::pause_image(),
            ca: &ctx.control_plane.ca_file,
            serving_cert: &serving,
            serving_key: &self.dir.join("kubelet.key"),
            provider_id: self.config.provider_id.as_deref(),
        };
        let toml = self.dir.join("containerd.toml");
        std::fs::write(&toml, config::containerd_toml(&files))?;
        let containerd = containerd_bin("containerd")?;
        let mut cmd = self.in_node(&containerd);
        cmd.arg(format!("--config={}", toml.display()));
        // containerd finds its shim, and the shim runc, on PATH.
        let bin_dir = containerd
            .parent()
            .context("containerd without a directory")?;
        cmd.env(
            "PATH",
            format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", bin_dir.display()),
        );
        let proc = Proc::spawn("containerd", cmd, &self.dir)?;
        proc.wait_ready(ctx.timeout, || async {
            self.ctr(&["version"]).await.map(|_| ())
        })
        .await?;
        self.procs.push(proc);
        Ok(())
    }

    async fn first_kubelet(&mut self, ctx: &NodeContext<'_>) -> Result<()> {
        let cp = ctx.control_plane;
        let ip = self.config.internal_ip;
        let (cert, key) = cp.serving_certificate(
            &format!("system:node:{}", self.config.name),
            &[ip.to_string(), self.config.name.clone()],
        )?;
        let (cert_file, key_file) = (self.dir.join("kubelet.crt"), self.dir.join("kubelet.key"));
        std::fs::write(&cert_file, cert)?;
        std::fs::write(&key_file, key)?;
        let files = config::NodeFiles {
            ip,
            cgroup: &self.cgroup,
            sandbox_image: &crate::images::pause_image(),
            ca: &cp.ca_file,
            serving_cert: &cert_file,
            serving_key: &key_file,
            provider_id: if ctx.external_cloud_provider {
                None
            } else {
                self.config.provider_id.as_deref()
            },
        };
        let config_file = self.dir.join("kubelet.json");
        std::fs::write(
            &config_file,
            serde_json::to_vec_pretty(&config::kubelet_config(&files))?,
        )?;
        let kubeconfig = cp.node_kubeconfig(&self.dir, &self.config.name)?;
        self.kubelet_args = vec![
            format!("--config={}", config_file.display()),
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--hostname-override={}", self.config.name),
            format!("--node-ip={ip}"),
            "-v=2".into(),
        ];
        if ctx.external_cloud_provider {
            self.kubelet_args.push("--cloud-provider=external".into());
        } else {
            self.kubelet_args.push(format!(
                "--node-labels=topology.kubernetes.io/region={},topology.kubernetes.io/zone={}",
                self.config.region, self.config.zone
            ));
        }
        self.spawn_kubelet()?;
        let nodes: Api<Node> = Api::all(cp.admin_client()?);
        let name = self.config.name.clone();
        let kubelet = self
            .kubelet
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(kubelet) = kubelet else {
            bail!("the kubelet did not start")
        };
        let ready = kubelet
            .wait_ready(ctx.timeout, || async {
                nodes.get(&name).await?;
                Ok(())
            })
            .await;
        *self.kubelet.lock().unwrap_or_else(PoisonError::into_inner) = Some(kubelet);
        ready
    }

    fn spawn_kubelet(&self) -> Result<()> {
        let mut cmd = self.in_node(&control_plane_bin("kubelet")?);
        cmd.args(&self.kubelet_args);
        let proc = Proc::spawn("kubelet", cmd, &self.dir)?;
        *self.kubelet.lock().unwrap_or_else(PoisonError::into_inner) = Some(proc);
        Ok(())
    }

    /// Kills the kubelet (SIGKILL, as a machine that stops would): the Node
    /// goes NotReady once kube-controller-manager misses its heartbeats.
    /// Its containers keep running.
    pub fn stop_kubelet(&self) {
        if let Some(kubelet) = self
            .kubelet
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            kubelet.kill();
        }
    }

    /// Starts the kubelet again with the same flags (after [`Self::stop_kubelet`]).
    pub fn start_kubelet(&self) -> Result<()> {
        self.stop_kubelet();
        self.spawn_kubelet()
    }

    fn ctr_command(&self, args: &[&str]) -> Result<Command> {
        let mut cmd = self.in_node(&containerd_bin("ctr")?);
        cmd.args(["--namespace", "k8s.io"]).args(args);
        Ok(cmd)
    }

    /// `ctr --namespace k8s.io <args>` against the Node's containerd.
    pub async fn ctr(&self, args: &[&str]) -> Result<String> {
        run(self.ctr_command(args)?).await
    }

    /// Every process of the Node: its own and its containers'.
    pub fn pids(&self) -> Vec<i32> {
        cgroups::pids(&self.cgroup)
    }

    /// Fails if containerd or the kubelet has exited.
    pub fn check_running(&self) -> Result<()> {
        for p in &self.procs {
            p.check_running()?;
        }
        if let Some(kubelet) = self
            .kubelet
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            kubelet.check_running()?;
        }
        Ok(())
    }

    /// The kubelet's log.
    pub fn kubelet_log(&self) -> PathBuf {
        self.dir.join("kubelet.log")
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        // Containers, shims, containerd, the kubelet and the namespace
        // holder, all at once; the mounts go with the last of them.
        cgroups::kill_all(&self.cgroup);
        self.kubelet
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        self.procs.clear();
        cgroups::remove(&self.cgroup);
        // Images and container filesystems; the logs stay with a kept directory.
        let _ = std::fs::remove_dir_all(self.root("/var/lib/containerd"));
        if let Err(e) = lo_address("del", self.config.internal_ip) {
            tracing::warn!("{e:#}");
        }
    }
}

/// Runs `cmd` to completion; its stdout, or its stderr in the error.
async fn run(cmd: Command) -> Result<String> {
    let what = format!("{:?}", cmd.get_args().collect::<Vec<_>>());
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("{what}: no answer in 60 s"))??;
    if !out.status.success() {
        bail!(
            "{what}: {}{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip address <add|del> <ip>/32 dev lo`; adding an address that is
/// there, or deleting one that is not, is not an error.
fn lo_address(op: &str, ip: Ipv4Addr) -> Result<()> {
    let out = Command::new("ip")
        .args(["address", op, &format!("{ip}/32"), "dev", "lo"])
        .output()
        .context("running ip")?;
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success()
        || err.contains("File exists")
        || err.contains("Cannot assign requested address")
    {
        return Ok(());
    }
    bail!("ip address {op} {ip}/32 dev lo: {}", err.trim())
}

/// The Node addresses (10.127.0.0/16) on `lo`.
fn lo_node_addresses() -> Vec<Ipv4Addr> {
    let Ok(out) = Command::new("ip")
        .args(["-4", "-o", "address", "show", "dev", "lo"])
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|w| w.strip_suffix("/32")?.parse::<Ipv4Addr>().ok())
        .filter(|ip| ip.octets()[..2] == [10, 127])
        .collect()
}

/// Removes the Nodes a dead owner of range `k` left: their processes and
/// containers, cgroups and addresses. Returns what was removed.
pub(crate) fn clean_range(k: u8) -> Vec<String> {
    let mut removed = Vec::new();
    for name in cgroups::with_prefix(&format!("cnlb-{k}-")) {
        cgroups::kill_all(&name);
        cgroups::remove(&name);
        removed.push(format!("Node cgroup {name} and its processes"));
    }
    for ip in lo_node_addresses()
        .into_iter()
        .filter(|ip| ip.octets()[2] == k)
    {
        if lo_address("del", ip).is_ok() {
            removed.push(format!("Node address {ip} on lo"));
        }
    }
    removed
}

/// The ranges whose Nodes left a cgroup or an address on this host.
pub(crate) fn ranges_in_use() -> Vec<u8> {
    let mut ks: Vec<u8> = cgroups::with_prefix("cnlb-")
        .iter()
        .filter_map(|n| n.strip_prefix("cnlb-")?.split_once('-')?.0.parse().ok())
        .collect();
    ks.extend(lo_node_addresses().iter().map(|ip| ip.octets()[2]));
    ks
}

/// True when the Node's condition Ready is True.
pub fn is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}
