//! A test process killed with SIGKILL cannot drop its environment; the
//! parts it started keep running, and its Pods' network namespaces and
//! servers stay. `cnlb-env down` (run by `make test` first) finds the parts
//! by the directory they run in and the namespaces by their range's free
//! lock, kills and removes them. Its own test binary: it must not race other
//! tests' environments.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cnlb_localstack_tests::env::clean_stale;
use cnlb_localstack_tests::paths::{control_plane_bin, workspace_bin};
use cnlb_localstack_tests::podnet::netns_with_prefix;
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

fn netns_pids(netns: &str) -> Vec<i32> {
    stdout(Command::new("ip").args(["netns", "pids", netns]))
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

#[test]
fn down_cleans_up_after_a_killed_owner_and_spares_live_ones() {
    let mut up = Command::new(workspace_bin("cnlb-env").unwrap())
        .args(["up", "--nodes=1", "--no-aws", "--pod-network=vpc-ipam"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut dir = None;
    let mut netns_prefix = None;
    for line in BufReader::new(up.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(d) = line.trim().strip_prefix("directory (logs, certificates): ") {
            dir = Some(PathBuf::from(d));
        }
        if let Some(p) = line
            .trim()
            .strip_prefix("network namespaces: ip netns list | grep ")
        {
            netns_prefix = Some(p.to_string());
        }
        if line.starts_with("Running;") {
            break;
        }
    }
    let dir = dir.expect("cnlb-env up printed its directory");
    let prefix = netns_prefix.expect("cnlb-env up printed its namespaces' prefix");

    // A Pod, so there is a namespace with a server in it.
    stdout(
        Command::new(control_plane_bin("kubectl").unwrap())
            .arg(format!("--kubeconfig={}", dir.join("kubeconfig").display()))
            .args(["run", "web", "--image=example.invalid/web:1", "--port=8080"]),
    );
    let (netns, servers) = wait_for("the pod's namespace has its server", || {
        let netns = netns_with_prefix(&prefix).pop()?;
        let pids = netns_pids(&netns);
        (!pids.is_empty()).then_some((netns, pids))
    });

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
            "vpc-ipam-agent"
        ])
    );

    // While its owner lives, the environment is not touched.
    let cleaned = clean_stale().unwrap();
    assert!(!cleaned.removed.contains(&dir));
    assert!(!cleaned.netns.contains(&netns), "{cleaned:?}");
    assert!(parts.iter().all(|p| is_running(*p)));
    assert!(servers.iter().all(|p| is_running(*p)));

    up.kill().unwrap(); // SIGKILL: no drop, no cleanup
    up.wait().unwrap();
    assert!(
        parts.iter().all(|p| is_running(*p)),
        "the parts outlive a killed owner"
    );
    assert!(
        servers.iter().all(|p| is_running(*p)),
        "the pod's server outlives a killed owner"
    );

    let cleaned = clean_stale().unwrap();
    assert!(cleaned.removed.contains(&dir), "{cleaned:?}");
    assert!(
        parts.iter().all(|p| !is_running(*p)),
        "leftover processes: {parts:?}"
    );
    assert!(!dir.exists());
    assert!(cleaned.netns.contains(&netns), "{cleaned:?}");
    assert!(!Path::new("/run/netns").join(&netns).exists());
    assert!(
        servers.iter().all(|p| !is_running(*p)),
        "leftover pod servers: {servers:?}"
    );
}
