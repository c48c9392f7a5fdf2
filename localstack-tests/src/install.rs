//! cnlb installed as a user installs it: the Helm charts of `deploy/`, with
//! the local environment's values, by the `helm` binary `make env-deps`
//! builds, against the environment's API server.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::ListParams;
use serde_json::{Value, json};

use crate::controlplane::ControlPlane;
use crate::eventually;
use crate::images::TAG;

/// `deploy/charts/<name>` of the checkout this crate was built from.
pub fn chart(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("deploy")
        .join("charts")
        .join(name)
}

/// `helm install <release> <chart> -n kube-system -f <values>`, the values
/// written to `<dir>/<release>-values.json` (kept with the logs).
pub async fn helm_install(
    cp: &ControlPlane,
    dir: &Path,
    release: &str,
    chart_name: &str,
    values: &Value,
) -> Result<()> {
    let values_file = dir.join(format!("{release}-values.json"));
    std::fs::write(&values_file, serde_json::to_vec_pretty(values)?)?;
    let mut cmd = Command::new(crate::paths::helm()?);
    cmd.arg("install")
        .arg(release)
        .arg(chart(chart_name))
        .args(["--namespace", "kube-system"])
        .arg(format!("--kubeconfig={}", cp.kubeconfig.display()))
        .arg(format!("--values={}", values_file.display()));
    let out = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .output()
        .await
        .context("running helm")?;
    if !out.status.success() {
        bail!(
            "helm install {release}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The Kubernetes API as the environment's host-network Pods reach it: the
/// API server on loopback, named the way kube-proxy-free clusters do
/// (Cilium's `k8sServiceHost`), since no kube-proxy serves the
/// `kubernetes` Service's cluster IP here.
pub fn api_server_env(cp: &ControlPlane) -> Result<Value> {
    let port = cp
        .server
        .rsplit(':')
        .next()
        .context("API server address without a port")?;
    Ok(json!([
        {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
        {"name": "KUBERNETES_SERVICE_PORT", "value": port},
    ]))
}

/// The vpc-ipam chart's values: the locally built image (never pulled),
/// the cluster's name, text logs, `backend` and its flags, and an agent
/// that reuses released addresses at once (no load balancer outlives a
/// test).
pub fn vpc_ipam_values(
    cp: &ControlPlane,
    cluster: &str,
    backend: &str,
    backend_args: &[String],
) -> Result<Value> {
    let mut args = vec!["--cooldown=0s".to_string()];
    args.extend(backend_args.iter().cloned());
    Ok(json!({
        "clusterName": cluster,
        "backend": backend,
        "logFormat": "text",
        "image": {"tag": TAG, "pullPolicy": "Never"},
        "extraArgs": args,
        "extraEnv": api_server_env(cp)?,
    }))
}

/// The cnlb-ccm chart's values: the locally built image (never pulled),
/// two replicas in the host network (to reach emulators and plugins on
/// loopback) electing a leader, text logs, and the provider's flags and
/// environment.
pub fn ccm_values(
    cp: &ControlPlane,
    cluster: &str,
    provider: &str,
    class: &str,
    args: &[String],
    env: &[(String, String)],
) -> Result<Value> {
    let mut extra_env = api_server_env(cp)?;
    if let Some(list) = extra_env.as_array_mut() {
        list.extend(env.iter().map(|(k, v)| json!({"name": k, "value": v})));
    }
    Ok(json!({
        "clusterName": cluster,
        "provider": provider,
        "loadBalancerClass": class,
        "hostNetwork": true,
        "logFormat": "text",
        "image": {"tag": TAG, "pullPolicy": "Never"},
        "extraArgs": args,
        "extraEnv": extra_env,
    }))
}

/// Waits until Deployment `kube-system/<name>` has all its replicas ready.
pub async fn wait_deployment_ready(cp: &ControlPlane, name: &str, timeout: Duration) -> Result<()> {
    let deployments: Api<Deployment> = Api::namespaced(cp.admin_client()?, "kube-system");
    eventually(&format!("Deployment {name} ready"), timeout, || async {
        let d = deployments.get(name).await?;
        let want = d.spec.and_then(|s| s.replicas).unwrap_or(1);
        let ready = d.status.and_then(|s| s.ready_replicas).unwrap_or(0);
        Ok(ready >= want)
    })
    .await
}

/// Waits until every one of `nodes` Nodes is Ready (their network is, once
/// the agent's init container wrote the CNI configuration) and, with
/// `agents_ready`, DaemonSet `kube-system/<name>` has a ready Pod on each.
/// (An agent that needs its Node's provider ID waits for a cloud
/// controller manager to set it.)
pub async fn wait_daemonset_and_nodes(
    cp: &ControlPlane,
    name: &str,
    nodes: usize,
    agents_ready: bool,
    timeout: Duration,
) -> Result<()> {
    let client = cp.admin_client()?;
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), "kube-system");
    let node_api: Api<Node> = Api::all(client);
    eventually(
        &format!("DaemonSet {name} ready on {nodes} Nodes, and the Nodes Ready"),
        timeout,
        || async {
            let ds = daemonsets.get(name).await?;
            let ready = ds.status.map(|s| s.number_ready).unwrap_or(0);
            let list = node_api.list(&ListParams::default()).await?;
            let ready_nodes = list
                .items
                .iter()
                .filter(|n| crate::node::is_ready(n))
                .count();
            let agents = !agents_ready || usize::try_from(ready).unwrap_or(0) >= nodes;
            Ok(agents && ready_nodes >= nodes)
        },
    )
    .await
}
