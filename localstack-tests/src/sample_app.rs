//! The sample app's container: `cnlb-pod-server` from the locally built
//! image (never pulled), told its Pod's name and IP by the downward API,
//! answering HTTP on its ports with `<namespace>/<name> <ip>`, and Ready
//! once it answers `/healthz` (a readiness probe every second).

use serde_json::{Value, json};

use crate::images::pod_server_image;

/// A container named `name` serving HTTP on each of `ports` (the first
/// named `http`).
pub fn container(name: &str, ports: &[u16]) -> Value {
    let mut args = vec![
        "--pod=$(POD_NAMESPACE)/$(POD_NAME)".to_string(),
        "--ip=$(POD_IP)".to_string(),
    ];
    args.extend(ports.iter().map(|p| format!("--port={p}")));
    let container_ports: Vec<Value> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if i == 0 {
                json!({"name": "http", "containerPort": p})
            } else {
                json!({"containerPort": p})
            }
        })
        .collect();
    let field = |name: &str, path: &str| json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}});
    json!({
        "name": name,
        "image": pod_server_image(),
        "imagePullPolicy": "Never",
        "args": args,
        "env": [
            field("POD_NAMESPACE", "metadata.namespace"),
            field("POD_NAME", "metadata.name"),
            field("POD_IP", "status.podIP"),
        ],
        "ports": container_ports,
        "readinessProbe": {
            "httpGet": {"path": "/healthz", "port": ports.first().copied().unwrap_or(8080)},
            "periodSeconds": 1,
        },
    })
}
