//! A vpc-ipam agent as a process, and the CNI plugin run the way a runtime
//! runs it: the IPAM plugin alone, or Debian's `ptp` delegating to it in a
//! real network namespace.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use aws_sdk_ec2::types::{Filter, InstanceType, ResourceType, Tag, TagSpecification};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};

use crate::paths::workspace_bin;
use crate::process::{Proc, free_port, stdout_of};

/// Debian's containernetworking-plugins.
pub const DEBIAN_CNI_DIR: &str = "/usr/lib/cni";
/// The newest version Debian's plugins (1.1.1) speak.
pub const PTP_CNI_VERSION: &str = "1.0.0";

/// `--node-name --socket --state-dir --metrics-addr` and their values.
const COMMON_ARGS: usize = 8;

pub struct IpamAgent {
    proc: Option<Proc>,
    /// The network namespace it runs in (the emulated VPC's node), with
    /// its metrics port forwarded from the host.
    netns: Option<(String, crate::vpc::Forward)>,
    args: Vec<OsString>,
    envs: Vec<(String, String)>,
    dir: PathBuf,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub metrics_port: u16,
    starts: u32,
}

impl IpamAgent {
    /// Starts `vpc-ipam-agent --node-name <node>` with its socket and state
    /// in `dir`, plus `extra` flags (backend, ranges, targets) and `envs`,
    /// and waits until it is ready (state reconciled).
    pub async fn start(
        dir: &Path,
        node: &str,
        extra: &[&str],
        envs: &[(String, String)],
    ) -> Result<IpamAgent> {
        Self::start_in(None, dir, node, extra, envs).await
    }

    /// [`Self::start`] inside network namespace `netns` (`ip netns exec`),
    /// as on a node of the emulated VPC.
    pub async fn start_in(
        netns: Option<&str>,
        dir: &Path,
        node: &str,
        extra: &[&str],
        envs: &[(String, String)],
    ) -> Result<IpamAgent> {
        std::fs::create_dir_all(dir)?;
        let metrics_port = free_port()?;
        let socket = dir.join("vpc-ipam.sock");
        let state_dir = dir.join("state");
        let mut args: Vec<OsString> = vec![
            "--node-name".into(),
            node.into(),
            "--socket".into(),
            socket.clone().into(),
            "--state-dir".into(),
            state_dir.clone().into(),
            "--metrics-addr".into(),
            format!("127.0.0.1:{metrics_port}").into(),
        ];
        debug_assert_eq!(args.len(), COMMON_ARGS);
        args.extend(extra.iter().map(OsString::from));
        let netns = match netns {
            Some(ns) => Some((
                ns.to_string(),
                crate::vpc::forward_from_host(ns, metrics_port).await?,
            )),
            None => None,
        };
        let mut agent = IpamAgent {
            proc: None,
            netns,
            args,
            envs: envs.to_vec(),
            dir: dir.to_path_buf(),
            socket,
            state_dir,
            metrics_port,
            starts: 0,
        };
        agent.launch().await?;
        Ok(agent)
    }

    async fn launch(&mut self) -> Result<()> {
        let agent = workspace_bin("vpc-ipam-agent")?;
        let mut cmd = match &self.netns {
            Some((ns, _)) => {
                let mut cmd = std::process::Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(agent);
                cmd
            }
            None => std::process::Command::new(agent),
        };
        cmd.args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info,cnlb_vpc_ipam=debug");
        self.starts += 1;
        let proc = Proc::spawn(&format!("vpc-ipam-agent-{}", self.starts), cmd, &self.dir)?;
        let url = format!("http://127.0.0.1:{}/readyz", self.metrics_port);
        proc.wait_ready(Duration::from_secs(60), || {
            let url = url.clone();
            async move {
                let status = reqwest::get(&url).await?.status();
                if !status.is_success() {
                    bail!("/readyz: {status}");
                }
                Ok(())
            }
        })
        .await?;
        self.proc = Some(proc);
        Ok(())
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(p) = self.proc.take() {
            p.kill();
        }
    }

    /// Starts the agent again with the same flags (after [`Self::kill9`]).
    pub async fn restart(&mut self) -> Result<()> {
        self.kill9();
        self.launch().await
    }

    /// Starts the agent again with `flags` instead of the extra flags it
    /// had (the common ones stay).
    pub async fn restart_with(&mut self, flags: &[&str]) -> Result<()> {
        self.kill9();
        self.args.truncate(COMMON_ARGS);
        self.args.extend(flags.iter().map(OsString::from));
        self.launch().await
    }

    /// `times` crashes `every` apart: SIGKILL, 300 ms down (plugins find no
    /// agent), then a restart.
    pub async fn crash_repeatedly(&mut self, times: usize, every: Duration) -> Result<()> {
        for _ in 0..times {
            tokio::time::sleep(every).await;
            self.kill9();
            tokio::time::sleep(Duration::from_millis(300)).await;
            self.restart().await?;
        }
        Ok(())
    }

    /// The agent holds exactly the addresses of `live` (container id ->
    /// address): no address twice, and as many allocations as containers.
    pub async fn check_holds_exactly(&self, live: &BTreeMap<String, String>) -> Result<()> {
        let unique: HashSet<&String> = live.values().collect();
        if unique.len() != live.len() {
            bail!("duplicate addresses: {live:?}");
        }
        let allocated = self
            .metric("vpc_ipam_addresses{state=\"allocated\"}")
            .await?;
        if allocated != live.len() as f64 {
            bail!(
                "allocations leaked or lost: {allocated} allocated, {} live",
                live.len()
            );
        }
        Ok(())
    }

    pub fn pid(&self) -> Option<i32> {
        self.proc.as_ref().map(Proc::pid)
    }

    pub fn log(&self) -> Option<PathBuf> {
        self.proc.as_ref().map(|p| p.log().to_path_buf())
    }

    /// The agent's Prometheus text.
    pub async fn metrics(&self) -> Result<String> {
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics_port);
        Ok(reqwest::get(&url).await?.error_for_status()?.text().await?)
    }

    /// One sample of a metric: `name{labels}` as printed, e.g.
    /// `vpc_ipam_addresses{state="allocated"}`.
    pub async fn metric(&self, sample: &str) -> Result<f64> {
        let text = self.metrics().await?;
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
            .with_context(|| format!("no sample {sample} in:\n{text}"))
    }

    /// The network configuration a runtime would pass (`type` is the main
    /// plugin: `ptp`, or `vpc-ipam` to run the IPAM plugin alone).
    pub fn netconf(&self, version: &str, plugin: &str) -> Value {
        json!({
            "cniVersion": version,
            "name": "cnlb-pods",
            "type": plugin,
            "ipam": { "type": "vpc-ipam", "agentSocket": self.socket },
        })
    }
}

/// How one plugin run went.
#[derive(Debug)]
pub struct CniRun {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CniRun {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.stdout)
            .with_context(|| format!("plugin stdout is not JSON: {self:?}"))
    }

    /// The first address of an ADD result, without its prefix length.
    pub fn ip(&self) -> Result<String> {
        if !self.ok() {
            bail!("ADD failed: {self:?}");
        }
        let address = self.json()?["ips"][0]["address"]
            .as_str()
            .context("result without ips[0].address")?
            .to_owned();
        Ok(address
            .split_once('/')
            .map_or(address.clone(), |(ip, _)| ip.to_owned()))
    }
}

/// One CNI invocation: `plugin` is `vpc-ipam` (ours, alone) or a Debian
/// plugin such as `ptp` that delegates to it.
pub struct CniCall<'a> {
    pub plugin: &'a str,
    pub command: &'a str,
    pub container_id: &'a str,
    pub netns: Option<&'a str>,
    /// The network namespace the plugin runs in (a node of the emulated
    /// VPC); the host's by default.
    pub within: Option<&'a str>,
    pub ifname: &'a str,
    pub args: String,
}

impl<'a> CniCall<'a> {
    pub fn new(plugin: &'a str, command: &'a str, container_id: &'a str) -> Self {
        CniCall {
            plugin,
            command,
            container_id,
            netns: None,
            within: None,
            ifname: "eth0",
            args: format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={container_id}"),
        }
    }

    pub fn netns(mut self, path: &'a str) -> Self {
        self.netns = Some(path);
        self
    }

    pub fn within(mut self, node_netns: &'a str) -> Self {
        self.within = Some(node_netns);
        self
    }

    fn command(&self) -> Result<tokio::process::Command> {
        let ours = workspace_bin("vpc-ipam")?;
        let ours_dir = ours.parent().context("plugin without a directory")?;
        let path = if self.plugin == "vpc-ipam" {
            ours.clone()
        } else {
            Path::new(DEBIAN_CNI_DIR).join(self.plugin)
        };
        let mut cmd = match self.within {
            Some(ns) => {
                // By path: the plugin's environment is cleared.
                let mut cmd = tokio::process::Command::new("/bin/ip");
                cmd.args(["netns", "exec", ns]).arg(path);
                cmd
            }
            None => tokio::process::Command::new(path),
        };
        cmd.env_clear()
            .env("CNI_COMMAND", self.command)
            .env("CNI_CONTAINERID", self.container_id)
            .env("CNI_IFNAME", self.ifname)
            .env("CNI_ARGS", &self.args)
            .env(
                "CNI_PATH",
                format!("{DEBIAN_CNI_DIR}:{}", ours_dir.display()),
            )
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if let Some(netns) = self.netns {
            cmd.env("CNI_NETNS", netns);
        }
        Ok(cmd)
    }

    /// Runs the plugin with `conf` on stdin.
    pub async fn run(&self, conf: &Value) -> Result<CniRun> {
        self.run_raw(conf.to_string().as_bytes()).await
    }

    pub async fn run_raw(&self, stdin: &[u8]) -> Result<CniRun> {
        use tokio::io::AsyncWriteExt;
        let mut child = self.command()?.spawn().context("running the CNI plugin")?;
        if let Some(mut input) = child.stdin.take() {
            input.write_all(stdin).await?;
        }
        let Output {
            status,
            stdout,
            stderr,
        } = child.wait_with_output().await?;
        Ok(CniRun {
            code: status.code(),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        })
    }
}

/// ADD of `container_id` through our plugin alone (an IPAM plugin never
/// enters the namespace, so any path will do).
pub async fn ipam_add(conf: &Value, container_id: &str) -> Result<CniRun> {
    CniCall::new("vpc-ipam", "ADD", container_id)
        .netns("/var/run/netns/unused")
        .run(conf)
        .await
}

/// DEL of `container_id` through our plugin alone.
pub async fn ipam_del(conf: &Value, container_id: &str) -> Result<CniRun> {
    CniCall::new("vpc-ipam", "DEL", container_id)
        .run(conf)
        .await
}

/// What a [`Churn`] did.
#[derive(Debug, Default)]
pub struct ChurnResult {
    /// The containers left with an address: container id -> address.
    pub live: BTreeMap<String, String>,
    pub adds: usize,
    /// ADDs that failed (e.g. the agent was down); each was followed by its DEL.
    pub failed_adds: usize,
}

/// Pods coming and going on one agent while a test does something to it
/// (kill -9 and restart): `workers` tasks each ADD fresh containers
/// (`<prefix>-w<worker>-<n>`) through the plugin alone and, after every
/// second ADD, DEL their oldest, so that about half stay; a failed ADD is
/// followed by its DEL, as kubelet does. A worker holding more than 20
/// slows down. Every DEL must succeed, agent up or not.
pub struct Churn {
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<Result<ChurnResult>>>,
}

impl Churn {
    pub fn start(conf: &Value, prefix: &str, workers: usize) -> Churn {
        Self::start_in(conf, prefix, workers, None)
    }

    /// [`Self::start`] with the plugin run inside network namespace `node`.
    pub fn start_within(conf: &Value, prefix: &str, workers: usize, node: &str) -> Churn {
        Self::start_in(conf, prefix, workers, Some(node.to_string()))
    }

    fn start_in(conf: &Value, prefix: &str, workers: usize, node: Option<String>) -> Churn {
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..workers)
            .map(|w| {
                let (conf, stop, prefix) = (conf.clone(), stop.clone(), prefix.to_string());
                let node = node.clone();
                tokio::spawn(async move {
                    let node = node.as_deref();
                    let mut done = ChurnResult::default();
                    while !stop.load(Ordering::Relaxed) {
                        let id = format!("{prefix}-w{w}-{}", done.adds);
                        done.adds += 1;
                        let add = ipam_call("ADD", &conf, &id, node).await?;
                        if add.ok() {
                            done.live.insert(id, add.ip()?);
                        } else {
                            done.failed_adds += 1;
                            del_ok(&conf, &id, node).await?;
                        }
                        if done.adds % 2 == 0
                            && let Some(old) = done.live.keys().next().cloned()
                        {
                            del_ok(&conf, &old, node).await?;
                            done.live.remove(&old);
                        }
                        if done.live.len() > 20 {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                    Ok(done)
                })
            })
            .collect();
        Churn { stop, workers }
    }

    /// Stops the workers and adds up what they did.
    pub async fn stop(self) -> Result<ChurnResult> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = ChurnResult::default();
        for w in self.workers {
            let done = w.await??;
            all.live.extend(done.live);
            all.adds += done.adds;
            all.failed_adds += done.failed_adds;
        }
        Ok(all)
    }
}

/// The IPAM plugin alone (it never enters the container's namespace, so
/// any path will do), in network namespace `node` or the host's.
async fn ipam_call(command: &str, conf: &Value, id: &str, node: Option<&str>) -> Result<CniRun> {
    let mut call = CniCall::new("vpc-ipam", command, id).netns("/var/run/netns/unused");
    call.within = node;
    call.run(conf).await
}

async fn del_ok(conf: &Value, id: &str, node: Option<&str>) -> Result<()> {
    let del = ipam_call("DEL", conf, id, node).await?;
    if !del.ok() {
        bail!("DEL of {id} must succeed, agent up or not: {del:?}");
    }
    Ok(())
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> Result<Netns> {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", name])
            .output();
        run("ip", &["netns", "add", name])?;
        run(
            "ip",
            &["netns", "exec", name, "ip", "link", "set", "lo", "up"],
        )?;
        Ok(Netns { name: name.into() })
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// Runs `argv` inside the namespace and returns its stdout.
    pub fn exec(&self, argv: &[&str]) -> Result<String> {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(argv);
        run("ip", &full)
    }
}

impl Netns {
    /// Starts `cnlb-pod-server` inside the namespace on `port`, answering
    /// `<pod> <ip>`; stopped when the returned process is dropped.
    pub fn serve(&self, pod: &str, ip: &str, port: u16, log_dir: &Path) -> Result<Proc> {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.name])
            .arg(workspace_bin("cnlb-pod-server")?)
            .args(["--pod", pod, "--ip", ip, "--port", &port.to_string()]);
        Proc::spawn(&format!("server-{}", self.name), cmd, log_dir)
    }
}

/// GET http://ip:port/ from the host (through the veth and the host route
/// ptp installed), retried for up to 10 s while the server starts.
pub async fn http_get(ip: &str, port: u16) -> Result<String> {
    let url = format!("http://{ip}:{port}/");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match reqwest::get(&url).await.and_then(|r| r.error_for_status()) {
            Ok(response) => return Ok(response.text().await?),
            Err(err) if std::time::Instant::now() > deadline => {
                return Err(err).with_context(|| format!("GET {url}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    stdout_of(program, args, &out)
}

/// The zone of [`aws_node`]'s instance and subnets.
pub const AWS_ZONE: &str = "us-east-1a";

/// An EC2 node for the AWS backend: a VPC with the secondary CIDR
/// 100.64.0.0/16, a pod subnet `pod_cidr` in it tagged `cnlb.dev/pods=<node>`
/// (for `--aws-pod-subnet-tag`), an instance in a node subnet, and the
/// Kubernetes Node `node` whose providerID names it. Returns the instance id.
pub async fn aws_node(
    ec2: &aws_sdk_ec2::Client,
    kube: &kube::Client,
    node: &str,
    pod_cidr: &str,
) -> Result<String> {
    let vpc = ec2.create_vpc().cidr_block("10.0.0.0/16").send().await?;
    let vpc = vpc.vpc.and_then(|v| v.vpc_id).context("VPC without id")?;
    ec2.associate_vpc_cidr_block()
        .vpc_id(&vpc)
        .cidr_block("100.64.0.0/16")
        .send()
        .await?;
    let node_subnet = ec2
        .create_subnet()
        .vpc_id(&vpc)
        .availability_zone(AWS_ZONE)
        .cidr_block("10.0.1.0/24")
        .send()
        .await?
        .subnet
        .and_then(|s| s.subnet_id)
        .context("subnet without id")?;
    ec2.create_subnet()
        .vpc_id(&vpc)
        .availability_zone(AWS_ZONE)
        .cidr_block(pod_cidr)
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Subnet)
                .tags(Tag::builder().key("cnlb.dev/pods").value(node).build())
                .build(),
        )
        .send()
        .await?;
    let images = ec2.describe_images().send().await?;
    let image = images
        .images()
        .first()
        .and_then(|i| i.image_id())
        .context("the emulator lists no image")?
        .to_string();
    // moto picks the primary address at random in the subnet, the ones
    // EC2 reserves (network, router, DNS, future, broadcast) included.
    let mut attempts = 0;
    let instance = loop {
        let run = ec2
            .run_instances()
            .image_id(&image)
            .instance_type(InstanceType::M5Large)
            .subnet_id(&node_subnet)
            .min_count(1)
            .max_count(1)
            .send()
            .await?;
        let instance = run
            .instances()
            .first()
            .context("RunInstances returned no instance")?;
        let id = instance.instance_id().unwrap_or_default().to_string();
        let primary: std::net::Ipv4Addr = instance
            .private_ip_address()
            .context("instance without an address")?
            .parse()?;
        if ![0, 1, 2, 3, 255].contains(&primary.octets()[3]) {
            break id;
        }
        attempts += 1;
        if attempts == 5 {
            bail!("moto keeps giving reserved addresses, last {primary}");
        }
        ec2.terminate_instances().instance_ids(id).send().await?;
    };
    let object = serde_json::json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": node},
        "spec": {"providerID": format!("aws:///{AWS_ZONE}/{instance}")},
    });
    Api::<Node>::all(kube.clone())
        .create(&PostParams::default(), &serde_json::from_value(object)?)
        .await?;
    Ok(instance)
}

/// Secondary addresses of the instance's Pod ENIs (every ENI but device 0),
/// with the ENI holding each.
pub async fn pod_eni_addresses(
    ec2: &aws_sdk_ec2::Client,
    instance: &str,
) -> Result<BTreeMap<IpAddr, String>> {
    let out = ec2
        .describe_network_interfaces()
        .filters(
            Filter::builder()
                .name("attachment.instance-id")
                .values(instance)
                .build(),
        )
        .send()
        .await?;
    let mut addresses = BTreeMap::new();
    for eni in out.network_interfaces() {
        if eni.attachment().and_then(|a| a.device_index()) == Some(0) {
            continue;
        }
        let id = eni.network_interface_id().unwrap_or_default();
        for a in eni.private_ip_addresses() {
            if a.primary() == Some(true) {
                continue;
            }
            let ip: IpAddr = a.private_ip_address().unwrap_or_default().parse()?;
            if let Some(other) = addresses.insert(ip, id.to_string()) {
                // Real EC2 never does this; the emulators' random pick can.
                eprintln!("emulator assigned {ip} to both {other} and {id}");
            }
        }
    }
    Ok(addresses)
}
