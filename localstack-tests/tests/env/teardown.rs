//! The harness cleans up after itself: no process, container, cgroup,
//! address or directory survives an environment, also when the test panics
//! (then the logs are kept), and a part that dies is reported by name with
//! its log.

use std::process::Command;
use std::time::Duration;

use cnlb_localstack_tests::process::{Proc, is_running};
use cnlb_localstack_tests::{Env, NodeConfig, eventually, sample_app};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::PostParams;

#[tokio::test]
async fn dropping_an_environment_stops_every_process_and_removes_its_directory() {
    let env = Env::builder("teardown").moto().start().await.unwrap();
    let dir = env.dir.clone();
    let pids = env.pids();
    assert!(!pids.is_empty() && pids.iter().all(|p| is_running(*p)));
    drop(env);
    assert!(
        pids.iter().all(|p| !is_running(*p)),
        "processes left: {pids:?}"
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[test]
fn a_panicking_test_leaves_no_process_and_keeps_its_logs() {
    let (inner, seen) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let env = Env::builder("panics").moto().start().await.unwrap();
            inner.send((env.dir.clone(), env.pids())).unwrap();
            panic!("a failing test");
        })
    })
    .join();
    assert!(result.is_err(), "the inner test should have panicked");
    let (dir, pids) = seen.recv().unwrap();
    assert!(
        pids.iter().all(|p| !is_running(*p)),
        "processes left: {pids:?}"
    );
    assert!(
        dir.join("moto.log").is_file(),
        "logs of a failed test are kept"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_panicking_test_with_pods_leaves_no_container_and_no_process() {
    let (inner, seen) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let env = Env::builder("panics-pods")
                .nodes(vec![NodeConfig::numbered(1)])
                .start()
                .await
                .unwrap();
            let client = env.kube().unwrap().admin_client().unwrap();
            let pod: Pod = serde_json::from_value(serde_json::json!({
                "metadata": {"name": "web"},
                "spec": {"containers": [sample_app::container("web", &[8080])]},
            }))
            .unwrap();
            Api::<Pod>::namespaced(client, "default")
                .create(&PostParams::default(), &pod)
                .await
                .unwrap();
            let node = &env.nodes()[0];
            eventually(
                "the Pod's container runs",
                Duration::from_secs(60),
                || async { Ok(node.pids().iter().any(|p| comm(*p) == "cnlb-pod-server")) },
            )
            .await
            .unwrap();
            let mut pids = env.pids();
            pids.extend(node.pids());
            inner.send((env.dir.clone(), pids)).unwrap();
            panic!("a failing test");
        })
    })
    .join();
    assert!(result.is_err(), "the inner test should have panicked");
    let (dir, pids) = seen.recv().unwrap();
    assert!(
        pids.iter().all(|p| !is_running(*p)),
        "processes left: {pids:?}"
    );
    assert!(
        dir.join("nodes/node-1/kubelet.log").is_file(),
        "the kubelet's log is kept"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[tokio::test]
async fn a_part_that_exits_is_reported_with_its_name_and_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "echo 'listen tcp 127.0.0.1:1: bind: permission denied'; exit 3",
    ]);
    let proc = Proc::spawn("fake-part", cmd, dir.path()).unwrap();
    let err = proc
        .wait_ready(Duration::from_secs(10), || async {
            anyhow::bail!("not listening")
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("fake-part exited"), "{err}");
    assert!(err.contains("fake-part.log"), "{err}");
    assert!(
        err.contains("permission denied"),
        "the log's end is shown: {err}"
    );
}

#[tokio::test]
async fn a_part_that_never_gets_ready_times_out_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("sleep");
    cmd.arg("30");
    let proc = Proc::spawn("slow-part", cmd, dir.path()).unwrap();
    let err = proc
        .wait_ready(Duration::from_millis(500), || async {
            anyhow::bail!("port closed")
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("slow-part not ready after"), "{err}");
    assert!(err.contains("port closed"), "{err}");
    drop(proc);
}
