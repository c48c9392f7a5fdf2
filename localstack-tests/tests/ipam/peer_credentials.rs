//! Only root may use vpc-ipam-agent's socket: the real agent (static
//! backend) and the real `vpc-ipam` plugin run as user `nobody`.
//!
//! The agent binds its socket 0600, so the filesystem refuses `nobody`
//! first. To test the agent's own check (SO_PEERCRED), as when the socket
//! is shared more widely (a hostPath in a non-root container with
//! CAP_DAC_OVERRIDE, or loose modes), the tests open the socket's directory
//! and then the socket itself to everyone. The plugin is copied next to
//! the socket: the build's target directory is under root's home, which
//! `nobody` cannot enter.

#![allow(clippy::unwrap_used)] // test code

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use cnlb_localstack_tests::ipam::{CniRun, IpamAgent};
use cnlb_localstack_tests::paths::workspace_bin;
use cnlb_vpc_ipam::protocol::{AttachmentKey, PodRef, Request, Response};
use serde_json::Value;
use tempfile::TempDir;

/// `nobody:nogroup`.
const NOBODY: u32 = 65534;

const ALLOCATED: &str = "vpc_ipam_addresses{state=\"allocated\"}";

/// The agent (static backend, `range`), with its socket in a directory
/// everyone may enter, and a copy of the plugin everyone may run.
async fn agent(range: &str) -> (TempDir, IpamAgent, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o755);
    let agent = IpamAgent::start(
        dir.path(),
        "node-1",
        &[
            "--cluster-name",
            "test",
            "--backend",
            "static",
            "--static-range",
            range,
        ],
        &[],
    )
    .await
    .unwrap();
    // Copied by cp: written from this process, the file could still be
    // open for writing in a child another test forks meanwhile, and
    // running it would fail with ETXTBSY.
    let plugin = dir.path().join("vpc-ipam");
    let cp = std::process::Command::new("cp")
        .arg(workspace_bin("vpc-ipam").unwrap())
        .arg(&plugin)
        .status()
        .unwrap();
    assert!(cp.success());
    chmod(&plugin, 0o755);
    (dir, agent, plugin)
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The plugin alone, as a runtime runs it, as `user` (root if `None`).
async fn plugin_as(
    user: Option<u32>,
    plugin: &Path,
    command: &str,
    container_id: &str,
    conf: &Value,
) -> CniRun {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(plugin);
    cmd.env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_NETNS", "/var/run/netns/unused")
        .env(
            "CNI_ARGS",
            format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME={container_id}"),
        )
        .env("CNI_PATH", plugin.parent().unwrap())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(id) = user {
        // std clears the supplementary groups when root drops to `uid`.
        cmd.uid(id).gid(id);
    }
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(conf.to_string().as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    CniRun {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// One request on the socket as `nobody`, without the plugin: Debian's
/// python3 connects, writes the request line and prints the answer line.
async fn raw_as_nobody(socket: &Path, request: &Request) -> Response {
    const CLIENT: &str = "import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
try:
    s.sendall(sys.argv[2].encode() + b'\\n')
except BrokenPipeError:
    pass  # refused before reading: the answer is there anyway
sys.stdout.write(s.makefile().readline())";
    let out = tokio::process::Command::new("/usr/bin/python3")
        .args(["-c", CLIENT])
        .arg(socket)
        .arg(serde_json::to_string(request).unwrap())
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "raw client: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

fn key(container_id: &str) -> AttachmentKey {
    AttachmentKey {
        container_id: container_id.into(),
        ifname: "eth0".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_root_client_is_refused_and_allocates_nothing() {
    let (_dir, agent, plugin) = agent("10.249.0.0/24").await;
    let conf = agent.netconf("1.0.0", "vpc-ipam");

    // As the agent binds it (0600), the socket refuses nobody already.
    let run = plugin_as(Some(NOBODY), &plugin, "ADD", "c1", &conf).await;
    assert!(!run.ok(), "{run:?}");
    let err = run.json().unwrap();
    assert_eq!(err["code"], 11, "{run:?}");
    let details = err["details"].as_str().unwrap();
    assert!(
        details.contains("Permission denied") && details.contains("root only"),
        "{run:?}"
    );

    // Open to everyone, the socket lets nobody connect: the agent's peer
    // credential check is what refuses now, and says why.
    chmod(&agent.socket, 0o666);
    let run = plugin_as(Some(NOBODY), &plugin, "ADD", "c1", &conf).await;
    assert!(!run.ok(), "{run:?}");
    let err = run.json().unwrap();
    assert_eq!(err["code"], 50, "{run:?}");
    assert_eq!(err["msg"], "permission denied", "{run:?}");
    assert_eq!(
        err["details"], "uid 65534 may not use the agent socket (root only)",
        "{run:?}"
    );
    assert_eq!(agent.metric(ALLOCATED).await.unwrap(), 0.0);
    // The agent never handled a request.
    let metrics = agent.metrics().await.unwrap();
    assert!(!metrics.contains("vpc_ipam_requests_total{"), "{metrics}");

    // The same call as root succeeds.
    let run = plugin_as(None, &plugin, "ADD", "c1", &conf).await;
    let ip = run.ip().unwrap();
    assert!(ip.starts_with("10.249.0."), "{run:?}");
    assert_eq!(agent.metric(ALLOCATED).await.unwrap(), 1.0);

    // The protocol spoken directly: no ADD, and neither a DEL of root's
    // container nor a GC that would free everything.
    let requests = [
        Request::Add {
            key: key("c2"),
            pod: PodRef::default(),
        },
        Request::Del { key: key("c1") },
        Request::Gc { valid: Vec::new() },
    ];
    for request in &requests {
        let answer = raw_as_nobody(&agent.socket, request).await;
        let Response::Error { code, msg, details } = answer else {
            panic!("{request:?} as nobody: {answer:?}");
        };
        assert_eq!((code, msg.as_str()), (50, "permission denied"));
        assert!(details.contains("uid 65534"), "{details}");
    }
    assert_eq!(agent.metric(ALLOCATED).await.unwrap(), 1.0);
    let again = plugin_as(None, &plugin, "ADD", "c1", &conf).await;
    assert_eq!(again.ip().unwrap(), ip, "root's allocation is untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_del_queued_by_a_non_root_user_is_not_delivered() {
    let (dir, mut agent, plugin) = agent("10.249.1.0/24").await;
    let conf = agent.netconf("1.0.0", "vpc-ipam");
    let ip = plugin_as(None, &plugin, "ADD", "c1", &conf)
        .await
        .ip()
        .unwrap();

    // While the agent is down, the plugin queues DELs in a directory next
    // to the socket, delivered at the agent's next start. With the
    // socket's directory writable by everyone, nobody can queue one too.
    agent.kill9();
    chmod(dir.path(), 0o777);
    let run = plugin_as(Some(NOBODY), &plugin, "DEL", "c1", &conf).await;
    assert!(run.ok(), "DEL tolerates a missing agent: {run:?}");
    let pending = agent.socket.with_extension("pending");
    let queued: Vec<PathBuf> = std::fs::read_dir(&pending)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(queued.len(), 1, "{run:?}");
    assert_eq!(std::fs::metadata(&queued[0]).unwrap().uid(), NOBODY);

    // The agent drops it instead of releasing root's allocation.
    agent.restart().await.unwrap();
    assert_eq!(agent.metric(ALLOCATED).await.unwrap(), 1.0);
    let again = plugin_as(None, &plugin, "ADD", "c1", &conf).await;
    assert_eq!(again.ip().unwrap(), ip);
    assert_eq!(std::fs::read_dir(&pending).unwrap().count(), 0);
    let log = std::fs::read_to_string(agent.log().unwrap()).unwrap();
    assert!(
        log.contains("ignoring a pending DEL not written by root"),
        "{log}"
    );
}
