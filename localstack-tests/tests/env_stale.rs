//! A test process killed with SIGKILL cannot drop its environment; the
//! parts it started keep running, and so do its Nodes with their
//! containers. `cnlb-env down` (run by `make test` first) finds the parts
//! by the directory they run in and the Nodes by their range's free lock
//! (their cgroups and addresses), kills and removes them. Its own test
//! binary: it must not race other tests' environments.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cnlb_localstack_tests::env::clean_stale;
use cnlb_localstack_tests::images::pod_server_image;
use cnlb_localstack_tests::node::cgroups;
use cnlb_localstack_tests::paths::{control_plane_bin, workspace_bin};
use cnlb_localstack_tests::process::is_running;

/// Polls `f` until it returns Some, for at most 60 s.
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if let Some(v) = f() {
            return v;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{what}: not after 60 s");
}

fn stdout(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn lo_has(ip: &str) -> bool {
    stdout(Command::new("ip").args(["-4", "-o", "address", "show", "dev", "lo"]))
        .contains(&format!("{ip}/32"))
}

#[test]
fn down_cleans_up_after_a_killed_owner_and_spares_live_ones() {
    let mut up = Command::new(workspace_bin("cnlb-env").unwrap())
        .args(["up", "--nodes=1", "--no-aws"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut dir = None;
    let mut k = None;
    let mut node_ip = None;
    for line in BufReader::new(up.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        let line = line.trim();
        if let Some(d) = line.strip_prefix("directory (logs, certificates): ") {
            dir = Some(PathBuf::from(d));
        }
        if let Some(cidr) = line.strip_prefix("Pod network: ") {
            k = cidr.split('.').nth(1).map(String::from);
        }
        if line.starts_with("node-1 ") {
            node_ip = line.split_whitespace().nth(2).map(String::from);
        }
        if line.starts_with("Running;") {
            break;
        }
    }
    let dir = dir.expect("cnlb-env up printed its directory");
    let cgroup = format!(
        "cnlb-{}-node-1",
        k.expect("cnlb-env up printed its Pod network")
    );
    let node_ip = node_ip.expect("cnlb-env up printed its Node");
    assert!(lo_has(&node_ip));

    // A Pod, so there is a container.
    stdout(
        Command::new(control_plane_bin("kubectl").unwrap())
            .arg(format!("--kubeconfig={}", dir.join("kubeconfig").display()))
            .args(["run", "web", "--image-pull-policy=Never"])
            .arg(format!("--image={}", pod_server_image()))
            .args(["--", "--pod=default/web", "--ip=0.0.0.0", "--port=8080"]),
    );
    let server = wait_for("the Pod's container runs", || {
        cgroups::pids(&cgroup)
            .into_iter()
            .find(|p| comm(*p) == "cnlb-pod-server")
    });
    let node_pids = cgroups::pids(&cgroup);
    let node_names: BTreeSet<String> = node_pids.iter().map(|p| comm(*p)).collect();
    for name in [
        "kubelet",
        "containerd",
        "containerd-shim",
        "cnlb-pod-server",
        "cnlb-pause",
    ] {
        assert!(
            node_names.iter().any(|n| n.starts_with(name)),
            "{name} in {node_names:?}"
        );
    }

    let pids = std::fs::read_to_string(dir.join("pids")).unwrap();
    let (parts, names): (Vec<i32>, Vec<&str>) = pids
        .lines()
        .filter(|l| !l.starts_with("owner"))
        .map(|l| l.split_once('\t').unwrap())
        .map(|(pid, name)| (pid.parse::<i32>().unwrap(), name))
        .unzip();
    assert_eq!(
        BTreeSet::from_iter(names),
        BTreeSet::from([
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
        ])
    );

    // While its owner lives, the environment is not touched.
    let cleaned = clean_stale().unwrap();
    assert!(!cleaned.removed.contains(&dir));
    assert!(cleaned.ranges.is_empty(), "{cleaned:?}");
    assert!(parts.iter().all(|p| is_running(*p)));
    assert!(node_pids.iter().all(|p| is_running(*p)));

    up.kill().unwrap(); // SIGKILL: no drop, no cleanup
    up.wait().unwrap();
    assert!(
        parts.iter().all(|p| is_running(*p)),
        "the parts outlive a killed owner"
    );
    assert!(
        is_running(server),
        "the Pod's container outlives a killed owner"
    );

    let cleaned = clean_stale().unwrap();
    assert!(cleaned.removed.contains(&dir), "{cleaned:?}");
    assert!(
        parts.iter().all(|p| !is_running(*p)),
        "leftover processes: {parts:?}"
    );
    assert!(!dir.exists());
    assert!(
        cleaned.ranges.iter().any(|r| r.contains(&cgroup)),
        "{cleaned:?}"
    );
    assert!(
        node_pids.iter().all(|p| !is_running(*p)),
        "leftover Node processes: {node_pids:?}"
    );
    assert!(
        cgroups::with_prefix(&cgroup).is_empty(),
        "cgroup {cgroup} left"
    );
    assert!(!lo_has(&node_ip), "address {node_ip} left on lo");
}
