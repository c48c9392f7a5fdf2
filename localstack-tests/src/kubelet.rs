//! The harness's stand-in for kube-scheduler and the kubelet, for Pods on the
//! Nodes it creates: it binds pending Pods to its Nodes, gives each Pod an IP
//! from its Node's pod CIDR and reports it Running and Ready (honouring
//! readiness gates), finishes graceful deletions, and renews each Node's Lease
//! so kube-controller-manager's node lifecycle controller sees live nodes.
//! Later work replaces the IP bookkeeping with real CNI ADDs in network namespaces.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::task::JoinHandle;

const MANAGER: &str = "cnlb-env-kubelet";
const LEASE_SECONDS: i32 = 40;

/// A Node the harness creates and serves.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub name: String,
    pub zone: String,
    pub internal_ip: Ipv4Addr,
    /// An IPv4 /24 the Node's Pods get addresses from (host .1 is the gateway).
    pub pod_cidr: String,
}

impl NodeConfig {
    /// `node-<i>` in zone `us-east-1<a|b|c>` with pod CIDR `100.64.<i>.0/24`.
    pub fn numbered(i: u8) -> NodeConfig {
        let zone = ["a", "b", "c"][usize::from(i) % 3];
        NodeConfig {
            name: format!("node-{i}"),
            zone: format!("{}{zone}", crate::aws::REGION),
            internal_ip: Ipv4Addr::new(10, 0, 0, 10 + i),
            pod_cidr: format!("100.64.{i}.0/24"),
        }
    }

    fn pod_base(&self) -> Result<Ipv4Addr> {
        let (addr, len) = self
            .pod_cidr
            .split_once('/')
            .context("pod CIDR without prefix")?;
        if len != "24" {
            bail!("pod CIDR {} must be a /24", self.pod_cidr);
        }
        Ok(addr.parse()?)
    }
}

/// Runs until dropped.
pub struct Kubelet {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Kubelet {
    pub async fn start(client: Client, nodes: Vec<NodeConfig>) -> Result<Kubelet> {
        for node in &nodes {
            register_node(&client, node).await?;
        }
        let heartbeat = tokio::spawn(heartbeat(client.clone(), nodes.clone()));
        let mut pods = PodLoop::new(client, nodes)?;
        let pod_loop = tokio::spawn(async move { pods.run().await });
        Ok(Kubelet {
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
                "topology.kubernetes.io/region": crate::aws::REGION,
                "topology.kubernetes.io/zone": node.zone,
            },
        },
        "spec": {"podCIDR": node.pod_cidr, "podCIDRs": [node.pod_cidr]},
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
    next_node: usize,
}

impl PodLoop {
    fn new(client: Client, nodes: Vec<NodeConfig>) -> Result<PodLoop> {
        for n in &nodes {
            n.pod_base()?;
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
            next_node: 0,
        })
    }

    async fn run(&mut self) {
        let api: Api<Pod> = Api::all(self.client.clone());
        let mut events = watcher(api, watcher::Config::default()).boxed();
        while let Some(event) = events.next().await {
            let result = match event {
                Ok(watcher::Event::Apply(pod)) | Ok(watcher::Event::InitApply(pod)) => {
                    self.sync(pod).await
                }
                Ok(watcher::Event::Delete(pod)) => {
                    self.release(&pod);
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

    async fn sync(&mut self, pod: Pod) -> Result<()> {
        let ns = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let spec = pod.spec.as_ref().context("pod without spec")?;
        let Some(node_name) = spec.node_name.clone() else {
            if pod.metadata.deletion_timestamp.is_none() {
                self.bind(&api, &name).await?;
            }
            return Ok(());
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
        let status = pod.status.clone().unwrap_or_default();
        let ip = match status.pod_ip.clone() {
            Some(ip) => ip,
            None => self.assign(&pod, &node)?.to_string(),
        };
        let ready = readiness_gates_true(&pod);
        let already = status.phase.as_deref() == Some("Running")
            && status.pod_ip.is_some()
            && condition(&pod, "Ready") == Some(ready);
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
            .with_context(|| format!("reporting status of pod {ns}/{name}"))?;
        Ok(())
    }

    async fn bind(&mut self, api: &Api<Pod>, name: &str) -> Result<()> {
        let Some(node) = self.nodes.get(self.next_node % self.nodes.len().max(1)) else {
            return Ok(()); // no nodes: leave pods pending, as a cluster would
        };
        self.next_node += 1;
        let binding = json!({
            "apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": name},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node.name},
        });
        let pp = PostParams::default();
        match api
            .create_subresource::<_, serde_json::Value>("binding", name, &pp, &binding)
            .await
        {
            Ok(_) => Ok(()),
            // Already bound by an earlier event for the same pod.
            Err(kube::Error::Api(s)) if s.is_conflict() => Ok(()),
            Err(e) => Err(anyhow!("binding pod {name} to {}: {e}", node.name)),
        }
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
        let [a, b, c, _] = node.pod_base()?.octets();
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
