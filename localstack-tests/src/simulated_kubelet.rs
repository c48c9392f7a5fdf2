//! A simulated kubelet, for benchmarks that need thousands of Pods: it
//! registers Nodes with no container runtime, reports the Pods
//! kube-scheduler binds to them Running and Ready in one step (honouring
//! readiness gates), finishes graceful deletions, and renews each Node's
//! Lease so kube-controller-manager's node lifecycle controller sees live
//! nodes. Behaviour that depends on real kubelet timing (readiness probes,
//! preStop hooks, restarts) is tested on real Nodes ([`crate::node`]).
//!
//! Pod IPs are made up from each Node's pod CIDR, unless the environment has
//! a pod network (`podnet`): then each Pod gets a real sandbox (network
//! namespace, CNI ADD, a server inside), is Ready only once its server
//! accepts connections, and on deletion stops being Ready at once, keeps
//! serving for the drain time, and is torn down (CNI DEL) before it goes.
//! Each such Pod has its own worker task, so a draining Pod holds up no other.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::node::NodeConfig;
use crate::podnet::PodNet;

const MANAGER: &str = "cnlb-env-kubelet";
const LEASE_SECONDS: i32 = 40;

/// Runs until dropped.
pub struct SimulatedKubelet {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for SimulatedKubelet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl SimulatedKubelet {
    /// Registers the Nodes, starts the pod network's agents (waiting up to
    /// `timeout` for each), then serves Pods.
    pub async fn start(
        client: Client,
        nodes: Vec<NodeConfig>,
        net: Option<Arc<PodNet>>,
        timeout: Duration,
    ) -> Result<SimulatedKubelet> {
        for node in &nodes {
            register_node(&client, node).await?;
        }
        if let Some(net) = &net {
            net.start_agents(timeout).await?;
        }
        let heartbeat = tokio::spawn(heartbeat(client.clone(), nodes.clone()));
        let mut pods = PodLoop::new(client, nodes, net)?;
        let pod_loop = tokio::spawn(async move { pods.run().await });
        Ok(SimulatedKubelet {
            tasks: vec![heartbeat, pod_loop],
        })
    }
}

async fn register_node(client: &Client, node: &NodeConfig) -> Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    let obj: Node = serde_json::from_value(json!({
        "metadata": {
            "name": node.name,
            "labels": {
                "kubernetes.io/hostname": node.name,
                "kubernetes.io/os": "linux",
                "topology.kubernetes.io/region": node.region,
                "topology.kubernetes.io/zone": node.zone,
            },
        },
        "spec": {
            "podCIDR": node.pod_cidr,
            "podCIDRs": [node.pod_cidr],
            "providerID": node.provider_id,
        },
    }))?;
    api.create(&PostParams::default(), &obj)
        .await
        .with_context(|| format!("creating Node {}", node.name))?;
    let now = Time(Timestamp::now());
    let status = json!({"status": {
        "addresses": [
            {"type": "InternalIP", "address": node.internal_ip.to_string()},
            {"type": "Hostname", "address": node.name},
        ],
        "capacity": {"cpu": "8", "memory": "32Gi", "pods": "250"},
        "allocatable": {"cpu": "8", "memory": "32Gi", "pods": "250"},
        "conditions": [{
            "type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "cnlb-env plays the kubelet", "lastHeartbeatTime": now,
            "lastTransitionTime": now,
        }],
    }});
    api.patch_status(&node.name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .with_context(|| format!("reporting Node {} status", node.name))?;
    Ok(())
}

/// Renews each Node's Lease in kube-node-lease, as the kubelet does every 10 s.
async fn heartbeat(client: Client, nodes: Vec<NodeConfig>) {
    let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");
    loop {
        for node in &nodes {
            let lease = json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": node.name},
                "spec": {
                    "holderIdentity": node.name,
                    "leaseDurationSeconds": LEASE_SECONDS,
                    "renewTime": MicroTime(Timestamp::now()),
                },
            });
            let params = PatchParams::apply(MANAGER).force();
            if let Err(e) = leases
                .patch(&node.name, &params, &Patch::Apply(lease))
                .await
            {
                tracing::warn!(node = %node.name, "renewing node lease: {e}");
            }
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

struct PodLoop {
    client: Client,
    nodes: Vec<NodeConfig>,
    /// Host offsets (2..=254) in use per node, keyed by node name.
    used: BTreeMap<String, BTreeSet<u8>>,
    /// Pod uid -> (node, offset), to release on deletion.
    assigned: BTreeMap<String, (String, u8)>,
    /// With a pod network: a worker per Pod on our Nodes, fed the Pod's
    /// latest state (`None` once it is gone from the API).
    net: Option<Arc<PodNet>>,
    workers: BTreeMap<String, watch::Sender<Option<Pod>>>,
    /// Dropped with the loop, which aborts every worker.
    worker_tasks: JoinSet<()>,
}

impl PodLoop {
    fn new(client: Client, nodes: Vec<NodeConfig>, net: Option<Arc<PodNet>>) -> Result<PodLoop> {
        for n in &nodes {
            pod_base(n)?;
        }
        let used = nodes
            .iter()
            .map(|n| (n.name.clone(), BTreeSet::new()))
            .collect();
        Ok(PodLoop {
            client,
            nodes,
            used,
            assigned: BTreeMap::new(),
            net,
            workers: BTreeMap::new(),
            worker_tasks: JoinSet::new(),
        })
    }

    async fn run(&mut self) {
        let api: Api<Pod> = Api::all(self.client.clone());
        let mut events = watcher(api, watcher::Config::default()).boxed();
        while let Some(event) = events.next().await {
            let result = match event {
                Ok(watcher::Event::Apply(pod)) | Ok(watcher::Event::InitApply(pod)) => {
                    match self.pod_network_node(&pod) {
                        Some((net, node)) => {
                            self.dispatch(net, node, pod);
                            Ok(())
                        }
                        None => self.sync(pod).await,
                    }
                }
                Ok(watcher::Event::Delete(pod)) => {
                    self.release(&pod);
                    if let Some(worker) = pod.uid().and_then(|u| self.workers.remove(&u)) {
                        worker.send_replace(None);
                    }
                    Ok(())
                }
                Ok(watcher::Event::Init) | Ok(watcher::Event::InitDone) => Ok(()),
                Err(e) => Err(anyhow!("watching pods: {e}")),
            };
            if let Err(e) = result {
                tracing::warn!("kubelet: {e:#}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    /// The pod network and the index of the Pod's Node, when the Pod is
    /// bound to one of our Nodes and there is a pod network.
    fn pod_network_node(&self, pod: &Pod) -> Option<(Arc<PodNet>, usize)> {
        let net = self.net.as_ref()?;
        let node = pod.spec.as_ref()?.node_name.as_deref()?;
        Some((net.clone(), net.node_index(node)?))
    }

    /// Hands the Pod's new state to its worker, starting one if needed.
    fn dispatch(&mut self, net: Arc<PodNet>, node: usize, pod: Pod) {
        let Some(uid) = pod.uid() else { return };
        while self.worker_tasks.try_join_next().is_some() {}
        if let Some(worker) = self.workers.get(&uid)
            && !worker.is_closed()
        {
            worker.send_replace(Some(pod));
            return;
        }
        let Some(node_config) = self.nodes.get(node).cloned() else {
            return;
        };
        let (tx, rx) = watch::channel(Some(pod));
        self.workers.insert(uid.clone(), tx);
        let worker = PodWorker {
            client: self.client.clone(),
            net,
            node: node_config,
            node_index: node,
            uid,
            drained: false,
        };
        self.worker_tasks.spawn(worker.run(rx));
    }

    async fn sync(&mut self, pod: Pod) -> Result<()> {
        let ns = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let spec = pod.spec.as_ref().context("pod without spec")?;
        let Some(node_name) = spec.node_name.clone() else {
            return Ok(()); // kube-scheduler binds it
        };
        let Some(node) = self.nodes.iter().find(|n| n.name == node_name).cloned() else {
            return Ok(()); // someone else's node
        };
        if pod.metadata.deletion_timestamp.is_some() {
            // The containers "stop" at once; finish the graceful deletion.
            self.release(&pod);
            return match api
                .delete(&name, &DeleteParams::default().grace_period(0))
                .await
            {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
                Err(e) => Err(e.into()),
            };
        }
        let ip = match pod.status.as_ref().and_then(|s| s.pod_ip.clone()) {
            Some(ip) => ip,
            None => self.assign(&pod, &node)?.to_string(),
        };
        report_running(&api, &pod, &node, &ip).await
    }

    fn assign(&mut self, pod: &Pod, node: &NodeConfig) -> Result<Ipv4Addr> {
        let uid = pod.uid().context("pod without uid")?;
        let used = self.used.entry(node.name.clone()).or_default();
        let offset = match self.assigned.get(&uid) {
            Some((_, o)) => *o,
            None => (2..=254u8)
                .find(|o| !used.contains(o))
                .with_context(|| format!("node {} has no free pod IP", node.name))?,
        };
        used.insert(offset);
        self.assigned.insert(uid, (node.name.clone(), offset));
        let [a, b, c, _] = pod_base(node)?.octets();
        Ok(Ipv4Addr::new(a, b, c, offset))
    }

    fn release(&mut self, pod: &Pod) {
        if let Some((node, offset)) = pod.uid().and_then(|u| self.assigned.remove(&u))
            && let Some(used) = self.used.get_mut(&node)
        {
            used.remove(&offset);
        }
    }
}

/// The first address of the Node's pod CIDR, which must be a /24.
fn pod_base(node: &NodeConfig) -> Result<Ipv4Addr> {
    let (addr, len) = node
        .pod_cidr
        .split_once('/')
        .context("pod CIDR without prefix")?;
    if len != "24" {
        bail!("pod CIDR {} must be a /24", node.pod_cidr);
    }
    Ok(addr.parse()?)
}

/// Reports the Pod Running with `ip`, its containers ready, and Ready when
/// its readiness gates are true; nothing if it already says so.
async fn report_running(api: &Api<Pod>, pod: &Pod, node: &NodeConfig, ip: &str) -> Result<()> {
    let name = pod.name_any();
    let spec = pod.spec.as_ref().context("pod without spec")?;
    let status = pod.status.clone().unwrap_or_default();
    let ready = readiness_gates_true(pod);
    let already = status.phase.as_deref() == Some("Running")
        && status.pod_ip.as_deref() == Some(ip)
        && condition(pod, "Ready") == Some(ready);
    if already {
        return Ok(());
    }
    let now = Time(Timestamp::now());
    let flag = if ready { "True" } else { "False" };
    let containers: Vec<_> = spec
        .containers
        .iter()
        .map(|c| {
            json!({
                "name": c.name, "image": c.image, "imageID": "", "ready": true,
                "started": true, "restartCount": 0, "state": {"running": {"startedAt": now}},
            })
        })
        .collect();
    let patch = json!({"status": {
        "phase": "Running",
        "hostIP": node.internal_ip.to_string(),
        "hostIPs": [{"ip": node.internal_ip.to_string()}],
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "startTime": status.start_time.unwrap_or(now.clone()),
        "containerStatuses": containers,
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            {"type": "Initialized", "status": "True", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
            {"type": "Ready", "status": flag, "lastTransitionTime": now},
        ],
    }});
    // Strategic merge keeps conditions others own (readiness gates) by type.
    api.patch_status(&name, &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .with_context(|| {
            format!(
                "reporting status of pod {}/{name}",
                pod.namespace().unwrap_or_default()
            )
        })?;
    Ok(())
}

/// What a worker's step left to do.
enum Step {
    /// Wait for the Pod to change.
    Wait,
    /// The Pod is deleted and torn down: the worker ends.
    Finished,
}

/// Plays the kubelet for one Pod with a sandbox: creates it, reports the
/// Pod, drains and tears it down on deletion. Failed steps are retried
/// with backoff (1 s doubling to 10 s), or at once when the Pod changes.
struct PodWorker {
    client: Client,
    net: Arc<PodNet>,
    node: NodeConfig,
    node_index: usize,
    uid: String,
    /// The drain after deletion happened (a retried teardown skips it).
    drained: bool,
}

impl PodWorker {
    async fn run(mut self, mut rx: watch::Receiver<Option<Pod>>) {
        let mut backoff = Duration::from_secs(1);
        loop {
            let current = rx.borrow_and_update().clone();
            let Some(pod) = current else {
                // Gone from the API without passing through us (a forced
                // deletion): only the sandbox is left to remove.
                if let Err(e) = self.net.remove_sandbox(&self.uid).await {
                    tracing::warn!(uid = %self.uid, "removing the sandbox of a deleted pod: {e:#}");
                }
                return;
            };
            match self.step(&pod).await {
                Ok(Step::Finished) => return,
                Ok(Step::Wait) => {
                    backoff = Duration::from_secs(1);
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let (ns, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
                    tracing::warn!("kubelet: pod {ns}/{name}: {e:#}");
                    self.event(&pod, &e).await;
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        changed = rx.changed() => if changed.is_err() { return },
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    async fn step(&mut self, pod: &Pod) -> Result<Step> {
        let ns = pod.namespace().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        if pod.metadata.deletion_timestamp.is_some() {
            if !self.drained && self.net.sandbox(&self.uid).is_some() {
                // Out of the endpoints at once, while still serving.
                self.report_not_ready(&api, pod).await?;
                tokio::time::sleep(drain_time(pod, self.net.drain())).await;
            }
            self.drained = true;
            self.net.remove_sandbox(&self.uid).await?;
            return match api
                .delete(&pod.name_any(), &DeleteParams::default().grace_period(0))
                .await
            {
                Ok(_) => Ok(Step::Finished),
                Err(kube::Error::Api(s)) if s.is_not_found() => Ok(Step::Finished),
                Err(e) => Err(e.into()),
            };
        }
        let host_network = pod.spec.as_ref().and_then(|s| s.host_network) == Some(true);
        if host_network {
            // The node's network: no sandbox, the Pod has the node's address.
            let ip = self.node.internal_ip.to_string();
            report_running(&api, pod, &self.node, &ip).await?;
            return Ok(Step::Wait);
        }
        let sandbox = match self.net.sandbox(&self.uid) {
            Some(s) => s,
            None => {
                let s = self.net.create_sandbox(pod, self.node_index).await?;
                if let Err(e) = self.net.wait_serving(&self.uid).await {
                    self.net.remove_sandbox(&self.uid).await?;
                    return Err(e);
                }
                s
            }
        };
        let ip = sandbox.ip.context("sandbox without an IP")?;
        report_running(&api, pod, &self.node, &ip.to_string()).await?;
        Ok(Step::Wait)
    }

    async fn report_not_ready(&self, api: &Api<Pod>, pod: &Pod) -> Result<()> {
        if condition(pod, "Ready") != Some(true) {
            return Ok(());
        }
        let now = Time(Timestamp::now());
        let patch = json!({"status": {"conditions": [
            {"type": "ContainersReady", "status": "False", "lastTransitionTime": now},
            {"type": "Ready", "status": "False", "lastTransitionTime": now},
        ]}});
        match api
            .patch_status(
                &pod.name_any(),
                &PatchParams::default(),
                &Patch::Strategic(patch),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
            Err(e) => Err(e).context("reporting a deleted pod not ready"),
        }
    }

    /// A Warning Event on the Pod, where `kubectl describe` shows it, as
    /// the kubelet reports a sandbox it cannot create.
    async fn event(&self, pod: &Pod, error: &anyhow::Error) {
        let ns = pod.namespace().unwrap_or_default();
        let now = Time(Timestamp::now());
        let event = json!({
            "metadata": {"generateName": format!("{}.", pod.name_any())},
            "involvedObject": {
                "kind": "Pod", "apiVersion": "v1", "namespace": ns,
                "name": pod.name_any(), "uid": self.uid,
            },
            "reason": "FailedPodSandbox", "type": "Warning",
            "message": format!("{error:#}"),
            "source": {"component": "kubelet", "host": self.node.name},
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        });
        let Ok(event) = serde_json::from_value::<Event>(event) else {
            return;
        };
        let events: Api<Event> = Api::namespaced(self.client.clone(), &ns);
        if let Err(e) = events.create(&PostParams::default(), &event).await {
            tracing::debug!("recording an event: {e}");
        }
    }
}

/// How long a deleted Pod keeps serving: its longest preStop `sleep`, else
/// `default`; never past the deletion's grace period.
fn drain_time(pod: &Pod, default: Duration) -> Duration {
    let pre_stop = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .filter_map(|c| c.lifecycle.as_ref()?.pre_stop.as_ref()?.sleep.as_ref())
        .map(|s| Duration::from_secs(u64::try_from(s.seconds).unwrap_or(0)))
        .max();
    let drain = pre_stop.unwrap_or(default);
    match pod.metadata.deletion_grace_period_seconds {
        Some(grace) => drain.min(Duration::from_secs(u64::try_from(grace).unwrap_or(0))),
        None => drain,
    }
}

fn condition(pod: &Pod, kind: &str) -> Option<bool> {
    let conditions = pod.status.as_ref()?.conditions.as_ref()?;
    conditions
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| c.status == "True")
}

/// Ready needs every readiness gate's condition True, as the kubelet computes it.
fn readiness_gates_true(pod: &Pod) -> bool {
    let gates = pod.spec.as_ref().and_then(|s| s.readiness_gates.as_ref());
    gates
        .map(|gs| {
            gs.iter()
                .all(|g| condition(pod, &g.condition_type) == Some(true))
        })
        .unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn drain_is_the_longest_pre_stop_sleep_within_the_grace_period() {
        let default = Duration::from_secs(3);
        let plain =
            pod(json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}]}}));
        assert_eq!(drain_time(&plain, default), default);
        let sleeping = pod(json!({
            "metadata": {"name": "p", "deletionGracePeriodSeconds": 30},
            "spec": {"containers": [
                {"name": "a", "lifecycle": {"preStop": {"sleep": {"seconds": 5}}}},
                {"name": "b", "lifecycle": {"preStop": {"sleep": {"seconds": 7}}}},
                {"name": "c", "lifecycle": {"preStop": {"exec": {"command": ["true"]}}}},
            ]},
        }));
        assert_eq!(drain_time(&sleeping, default), Duration::from_secs(7));
        let short_grace = pod(json!({
            "metadata": {"name": "p", "deletionGracePeriodSeconds": 2},
            "spec": {"containers": [
                {"name": "a", "lifecycle": {"preStop": {"sleep": {"seconds": 5}}}},
            ]},
        }));
        assert_eq!(drain_time(&short_grace, default), Duration::from_secs(2));
    }
}
