//! The configuration files of a real Node's containerd and kubelet (pure).

use std::net::Ipv4Addr;
use std::path::Path;

use serde_json::json;

/// What a Node's configuration depends on.
pub struct NodeFiles<'a> {
    pub ip: Ipv4Addr,
    /// The cgroup (in every v1 hierarchy) its Pods go under.
    pub cgroup: &'a str,
    pub sandbox_image: &'a str,
    /// The cluster's CA (kubelet clients: the API server) and the kubelet's
    /// serving certificate, signed by it.
    pub ca: &'a Path,
    pub serving_cert: &'a Path,
    pub serving_key: &'a Path,
    pub provider_id: Option<&'a str>,
}

/// Snapshotters and plugins a Node does without: each would look for its
/// own host setup (btrfs, ZFS, device mapper) or, like NRI, listen on one
/// fixed host path that every Node would share.
const DISABLED_PLUGINS: [&str; 6] = [
    "io.containerd.nri.v1.nri",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.erofs",
    "io.containerd.snapshotter.v1.blockfile",
];

/// containerd's configuration. Paths are containerd's defaults: in the
/// Node's mount namespace they are the Node's own directories.
pub fn containerd_toml(f: &NodeFiles) -> String {
    let disabled: Vec<String> = DISABLED_PLUGINS.iter().map(|p| format!("'{p}'")).collect();
    format!(
        "version = 3\n\
         disabled_plugins = [{disabled}]\n\
         \n\
         [plugins.'io.containerd.cri.v1.images'.pinned_images]\n\
         \x20 sandbox = '{sandbox}'\n\
         \n\
         [plugins.'io.containerd.cri.v1.runtime']\n\
         \x20 # The VM withholds CAP_SYS_RESOURCE even from root: without this\n\
         \x20 # every sandbox fails with \"can't get final child's PID from pipe\".\n\
         \x20 restrict_oom_score_adj = true\n\
         \x20 # Pod network namespaces under /run/containerd, the Node's own.\n\
         \x20 netns_mounts_under_state_dir = true\n\
         \n\
         [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]\n\
         \x20 BinaryName = '/usr/sbin/runc'\n\
         \n\
         [plugins.'io.containerd.grpc.v1.cri']\n\
         \x20 # kubectl exec, attach and port-forward, through the kubelet.\n\
         \x20 stream_server_address = '{ip}'\n\
         \x20 stream_server_port = '0'\n",
        disabled = disabled.join(", "),
        sandbox = f.sandbox_image,
        ip = f.ip,
    )
}

/// The kubelet's configuration (JSON, which the kubelet reads as YAML).
pub fn kubelet_config(f: &NodeFiles) -> serde_json::Value {
    let mut config = json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        // Every Node shares the host's network: each serves on its own address.
        "address": f.ip.to_string(),
        "healthzBindAddress": f.ip.to_string(),
        "readOnlyPort": 0,
        "tlsCertFile": f.serving_cert,
        "tlsPrivateKeyFile": f.serving_key,
        "authentication": {
            "anonymous": {"enabled": false},
            "webhook": {"enabled": true},
            "x509": {"clientCAFile": f.ca},
        },
        "authorization": {"mode": "Webhook"},
        // The machine has cgroup v1 only, and no systemd to manage cgroups.
        "failCgroupV1": false,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": format!("/{}", f.cgroup),
        "failSwapOn": false,
        "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
        // A shared test machine's disk is never a reason to evict or to
        // delete the imported images (they cannot be pulled again).
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": false,
    });
    if let Some(id) = f.provider_id {
        config["providerID"] = json!(id);
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> NodeFiles<'static> {
        NodeFiles {
            ip: Ipv4Addr::new(10, 127, 130, 10),
            cgroup: "cnlb-130-node-1",
            sandbox_image: "localhost/cnlb/pause:0.1.0",
            ca: Path::new("/env/ca.crt"),
            serving_cert: Path::new("/env/nodes/node-1/kubelet.crt"),
            serving_key: Path::new("/env/nodes/node-1/kubelet.key"),
            provider_id: None,
        }
    }

    #[test]
    fn containerd_runs_runc_with_the_local_pause_image() {
        let toml = containerd_toml(&files());
        assert!(
            toml.contains("sandbox = 'localhost/cnlb/pause:0.1.0'"),
            "{toml}"
        );
        assert!(toml.contains("restrict_oom_score_adj = true"), "{toml}");
        assert!(
            toml.contains("stream_server_address = '10.127.130.10'"),
            "{toml}"
        );
        assert!(toml.contains("'io.containerd.nri.v1.nri'"), "{toml}");
    }

    #[test]
    fn kubelet_serves_on_the_node_address_under_its_cgroup() {
        let mut f = files();
        let plain = kubelet_config(&f);
        assert_eq!(plain["address"], "10.127.130.10");
        assert_eq!(plain["cgroupRoot"], "/cnlb-130-node-1");
        assert_eq!(plain["failCgroupV1"], false);
        assert!(plain.get("providerID").is_none());
        f.provider_id = Some("aws:///us-east-1a/i-0123");
        assert_eq!(kubelet_config(&f)["providerID"], "aws:///us-east-1a/i-0123");
    }
}
