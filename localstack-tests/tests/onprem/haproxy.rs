//! The HAProxy provider as an out-of-process plugin, against a real HAProxy
//! (Debian's 2.6) in master-worker mode: the conformance suite through the
//! gRPC protocol, backends following deltas (runtime state and real TCP
//! traffic to listeners on 127.x addresses), an HAProxy restart that loses
//! nothing, deletion, and an unreachable plugin. No Kubernetes needed.
//!
//! Needs the plugin binary: `cargo build -p cnlb-provider-onprem --bins`.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cnlb_localstack_tests::eventually;
use cnlb_localstack_tests::onprem::LbHost;
use cnlb_localstack_tests::process::free_port;
use cnlb_provider_core::{
    Listener, LoadBalancerKey, LoadBalancerProvider, LoadBalancerSpec, Protocol, ProviderError,
    ResourceIds, RetryPolicy, Target, TargetDelta, TargetHealthState, TargetState,
    registered_targets,
};
use cnlb_provider_onprem::haproxy::{parse_servers_state, proxy_name};
use cnlb_provider_onprem::{GrpcProvider, PluginEndpoint, conformance};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const READY: Duration = Duration::from_secs(20);

/// 127.<a>.<b>.0/28 per test process, so parallel runs do not share addresses.
fn subnet(a: u8) -> [u8; 3] {
    let pid = std::process::id();
    [127, a, (pid % 250) as u8 + 1]
}

/// A TCP server that answers every connection with its name.
async fn backend(ip: Ipv4Addr, name: &str) -> Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind((ip, 0)).await?;
    let addr = listener.local_addr()?;
    let name = name.to_string();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let name = name.clone();
            tokio::spawn(async move {
                let _ = stream.write_all(name.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    Ok((addr, task))
}

/// Names of the backends that answered `n` connections to `frontend`.
async fn traffic(frontend: SocketAddr, n: usize) -> Result<BTreeSet<String>> {
    let mut seen = BTreeSet::new();
    for _ in 0..n {
        let reply = tokio::time::timeout(Duration::from_secs(5), async {
            let mut stream = TcpStream::connect(frontend).await?;
            let mut reply = String::new();
            stream.read_to_string(&mut reply).await?;
            Ok::<_, std::io::Error>(reply)
        })
        .await
        .context("no reply in 5 s")??;
        if reply.is_empty() {
            bail!("empty reply from {frontend}");
        }
        seen.insert(reply);
    }
    Ok(seen)
}

fn names(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

fn target(addr: SocketAddr) -> Target {
    Target::new(addr.ip(), addr.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_plugin_conformance_backends_restart_delete() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let [a, b, c] = subnet(211);
    let endpoint = PluginEndpoint::Unix(dir.path().join("plugin.sock"));
    let mut haproxy = LbHost::new(
        dir.path(),
        &format!("{a}.{b}.{c}.0/28"),
        &["--converge-interval-secs=1", "--health-poll-ms=200"],
        endpoint.clone(),
        READY,
        None,
    )?;
    // The plugin writes the configuration HAProxy starts with.
    haproxy.start_plugin().await?;
    haproxy.start_haproxy().await?;
    let plugin = GrpcProvider::connect(&endpoint).await?;
    assert_eq!(plugin.name(), "haproxy");
    eventually("the plugin probes ready", READY, || async {
        Ok(plugin.probe().await.is_ok())
    })
    .await?;

    // Backends: small TCP servers on their own loopback addresses.
    let [_, pb, pc] = subnet(212);
    let mut tasks = Vec::new();
    let mut addrs = Vec::new();
    for i in 1..=3u8 {
        let (addr, task) = backend(Ipv4Addr::new(127, pb, pc, i), &format!("pod-{i}")).await?;
        addrs.push(addr);
        tasks.push(task);
    }

    // 1. The conformance suite, through the protocol.
    let passed = conformance::run(
        &plugin,
        &conformance::Config {
            cluster: format!("conformance-{}", std::process::id()),
            port: free_port()?,
            backends: addrs[..2].to_vec(),
            expect_healthy: true,
            timeout: READY,
            nodes: Vec::new(),
        },
    )
    .await?;
    println!("conformance passed: {passed:#?}");
    // Started without --inventory: no Node part, so GetInstances is refused.
    assert_eq!(passed.len(), 10, "{passed:?}");

    // 2. Backends follow deltas, with real traffic.
    let port = free_port()?;
    let key = LoadBalancerKey::new("c1", "default", "web", "uid-web-1");
    let listener = Listener {
        name: "tcp".into(),
        protocol: Protocol::Tcp,
        port,
        target_port: addrs[0].port(),
    };
    let mut spec = LoadBalancerSpec::new(key.clone());
    spec.listeners.push(listener.clone());
    spec.health_check.interval = Duration::from_secs(1);
    spec.health_check.timeout = Duration::from_secs(1);
    spec.health_check.healthy_threshold = 1;
    let status = plugin
        .ensure_load_balancer(&spec, &ResourceIds::new())
        .await?;
    let ip = status.ingress[0].ip.context("no ingress IP")?;
    assert!(
        matches!(ip, IpAddr::V4(v4) if v4.octets()[..3] == [a, b, c]),
        "{ip}"
    );
    let ids = status.ids;
    let frontend = SocketAddr::new(ip, port);
    let backend_name = proxy_name(&key, port);

    let delta = TargetDelta {
        register: vec![target(addrs[0]), target(addrs[1])],
        deregister: vec![],
    };
    plugin.sync_targets(&key, &listener, &delta, &ids).await?;
    assert_eq!(
        haproxy.servers(&backend_name).await?.unwrap_or_default(),
        BTreeSet::from([addrs[0], addrs[1]])
    );
    eventually("both pods serve", READY, || async {
        Ok(traffic(frontend, 6).await? == names(&["pod-1", "pod-2"]))
    })
    .await?;
    eventually("both pods healthy", READY, || async {
        let health = plugin.target_health(&key, &ids).await?;
        Ok(health.len() == 2 && health.iter().all(|h| h.state == TargetHealthState::Healthy))
    })
    .await?;

    // pod-1 terminates: drained, then gone; pod-3 joins.
    let mut terminating = target(addrs[0]);
    terminating.state = TargetState {
        ready: false,
        serving: true,
        terminating: true,
    };
    let delta = TargetDelta {
        register: vec![target(addrs[2])],
        deregister: vec![terminating],
    };
    plugin.sync_targets(&key, &listener, &delta, &ids).await?;
    assert_eq!(
        haproxy.servers(&backend_name).await?.unwrap_or_default(),
        BTreeSet::from([addrs[1], addrs[2]])
    );
    eventually("pod-1 is deleted from HAProxy", READY, || async {
        let reply = haproxy
            .haproxy(&format!("show servers state {backend_name}"))
            .await?;
        Ok(parse_servers_state(&reply)?
            .iter()
            .all(|s| s.addr != addrs[0]))
    })
    .await?;
    eventually("pods 2 and 3 serve", READY, || async {
        Ok(traffic(frontend, 6).await? == names(&["pod-2", "pod-3"]))
    })
    .await?;
    let health = plugin.target_health(&key, &ids).await?;
    let registered: BTreeSet<SocketAddr> = registered_targets(&health, "tcp")
        .iter()
        .map(Target::addr)
        .collect();
    assert_eq!(registered, BTreeSet::from([addrs[1], addrs[2]]));

    // The configuration was written through: it names exactly those servers.
    let text = std::fs::read_to_string(haproxy.config_file())?;
    assert!(text.contains(&format!("frontend {backend_name}")));
    assert!(!text.contains(&addrs[0].to_string()), "{text}");
    assert!(text.contains(&addrs[1].to_string()) && text.contains(&addrs[2].to_string()));

    // 3. An HAProxy restart loses no backend.
    haproxy.stop_haproxy();
    match plugin.target_health(&key, &ids).await {
        Err(e) => assert_eq!(e.retry_policy(), RetryPolicy::Backoff, "{e}"),
        Ok(h) => bail!("health while HAProxy is down: {h:?}"),
    }
    haproxy.start_haproxy().await?;
    assert_eq!(
        haproxy.servers(&backend_name).await?.unwrap_or_default(),
        BTreeSet::from([addrs[1], addrs[2]])
    );
    eventually("pods 2 and 3 serve after the restart", READY, || async {
        Ok(traffic(frontend, 6).await? == names(&["pod-2", "pod-3"]))
    })
    .await?;

    // A server HAProxy lost behind the provider's back is added again.
    let lost = cnlb_provider_onprem::haproxy::server_name(addrs[1]);
    for command in ["set server {b}/{s} state maint", "del server {b}/{s}"] {
        let command = command.replace("{b}", &backend_name).replace("{s}", &lost);
        haproxy.haproxy(&command).await?;
    }
    assert_eq!(
        haproxy.servers(&backend_name).await?.unwrap_or_default(),
        BTreeSet::from([addrs[2]])
    );
    eventually("the lost server is back", READY, || async {
        Ok(haproxy.servers(&backend_name).await?.unwrap_or_default()
            == BTreeSet::from([addrs[1], addrs[2]]))
    })
    .await?;

    // 4. Deleting removes the frontend (and a second delete is a no-op).
    plugin.delete_load_balancer(&key, &ids).await?;
    plugin.delete_load_balancer(&key, &ids).await?;
    let text = std::fs::read_to_string(haproxy.config_file())?;
    assert!(!text.contains(&backend_name), "{text}");
    eventually("the frontend is gone", READY, || async {
        Ok(TcpStream::connect(frontend).await.is_err())
    })
    .await?;
    assert_eq!(haproxy.servers(&backend_name).await?, None);
    assert!(plugin.list_owned("c1").await?.is_empty());

    // 5. A plugin that went away gives a retryable error.
    haproxy.kill_plugin();
    let err = plugin.list_owned("c1").await.unwrap_err();
    assert!(
        matches!(
            err,
            ProviderError::Cloud {
                retryable: true,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.retry_policy(), RetryPolicy::Backoff);

    for task in tasks {
        task.abort();
    }
    haproxy.stop_haproxy();
    Ok(())
}

#[tokio::test]
async fn unreachable_plugin_is_a_retryable_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let endpoint = PluginEndpoint::Unix(dir.path().join("nobody.sock"));
    let plugin = GrpcProvider::lazy(&endpoint, "absent")?;
    let mut spec = LoadBalancerSpec::new(LoadBalancerKey::new("c1", "default", "web", "uid-1"));
    spec.listeners.push(Listener {
        name: "tcp".into(),
        protocol: Protocol::Tcp,
        port: 80,
        target_port: 8080,
    });
    let err = plugin
        .ensure_load_balancer(&spec, &ResourceIds::new())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ProviderError::Cloud { retryable: true, operation, .. } if operation == "EnsureLoadBalancer"),
        "{err:?}"
    );
    assert_eq!(err.retry_policy(), RetryPolicy::Backoff);
    assert!(GrpcProvider::connect(&endpoint).await.is_err());

    let tcp = PluginEndpoint::Tcp(SocketAddr::from(([127, 0, 0, 1], free_port()?)));
    let err = GrpcProvider::lazy(&tcp, "absent")?
        .list_owned("c1")
        .await
        .unwrap_err();
    assert_eq!(err.retry_policy(), RetryPolicy::Backoff, "{err:?}");
    Ok(())
}
