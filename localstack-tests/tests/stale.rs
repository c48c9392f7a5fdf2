//! A test process killed with SIGKILL cannot drop its environment; the
//! parts it started keep running. `cnlb-env down` (run by `make test` first)
//! finds them by the directory they run in, kills them and removes it.
//! Its own test binary: it must not race other tests' environments.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use cnlb_localstack_tests::env::clean_stale;
use cnlb_localstack_tests::paths::workspace_bin;
use cnlb_localstack_tests::process::is_running;

#[test]
fn down_cleans_up_after_a_killed_owner_and_spares_live_ones() {
    let mut up = Command::new(workspace_bin("cnlb-env").unwrap())
        .args(["up", "--nodes=0", "--no-aws"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut dir = None;
    for line in BufReader::new(up.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(d) = line.trim().strip_prefix("directory (logs, certificates): ") {
            dir = Some(PathBuf::from(d));
        }
        if line.starts_with("Running;") {
            break;
        }
    }
    let dir = dir.expect("cnlb-env up printed its directory");
    let parts: Vec<i32> = std::fs::read_to_string(dir.join("pids"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("owner"))
        .map(|l| l.split('\t').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(
        parts.len(),
        3,
        "etcd, kube-apiserver, kube-controller-manager"
    );

    // While its owner lives, the environment is not touched.
    let cleaned = clean_stale().unwrap();
    assert!(!cleaned.removed.contains(&dir));
    assert!(parts.iter().all(|p| is_running(*p)));

    up.kill().unwrap(); // SIGKILL: no drop, no cleanup
    up.wait().unwrap();
    assert!(
        parts.iter().all(|p| is_running(*p)),
        "the parts outlive a killed owner"
    );

    let cleaned = clean_stale().unwrap();
    assert!(cleaned.removed.contains(&dir), "{cleaned:?}");
    assert!(
        parts.iter().all(|p| !is_running(*p)),
        "leftover processes: {parts:?}"
    );
    assert!(!dir.exists());
}
