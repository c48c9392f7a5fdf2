//! `cnlb-ccm --provider=aws` (moto) when the API server fails under it:
//! kube-apiserver and etcd killed and restarted mid-reconcile; watches that
//! resume from a compacted resourceVersion (410 Gone) and relist; a leader
//! cut off from the API server that must stop before another replica leads;
//! a leader SIGKILLed mid-work whose standby finishes the work.
//!
//! No Nodes: the Services have no selector and the test writes their
//! EndpointSlices, as the EndpointSlice controller would for a Deployment,
//! with the addresses of an ENI in moto's VPC. What is checked is what a
//! user checks: the Service's status and condition, its NLB's target
//! group's targets, and one NLB and target group per Service.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::common;
use crate::common::ccm::{Cluster, counts, owned_security_groups};
use cnlb_ccm::conditions::LOAD_BALANCER_READY;
use cnlb_ccm::service::IDS_ANNOTATION;
use cnlb_localstack_tests::paths::workspace_bin;
use cnlb_localstack_tests::process::Proc;
use cnlb_localstack_tests::{Env, eventually};
use cnlb_provider_aws::plan::TARGET_GROUP_ID_PREFIX;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long Services may take to converge after a fault.
const WAIT: Duration = Duration::from_secs(90);
/// What cnlb-ccm's leader election uses (client-go's defaults, leader.rs).
const LEASE_DURATION: Duration = Duration::from_secs(15);
const RETRY_PERIOD: Duration = Duration::from_secs(2);

/// `cnlb-ccm --provider=aws` in the cluster's VPC with moto's endpoints,
/// talking to the API server through `kubeconfig` (the environment's own
/// when None).
fn spawn_ccm(c: &Cluster, name: &str, leader_elect: bool, kubeconfig: Option<PathBuf>) -> Proc {
    let env = &c.env;
    let kubeconfig = kubeconfig.unwrap_or_else(|| env.kube().unwrap().kubeconfig.clone());
    let mut cmd = Command::new(workspace_bin("cnlb-ccm").unwrap());
    cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(["--cluster-name=test", "--provider=aws"])
        .arg(format!("--aws-vpc-id={}", c.net.vpc))
        .arg(format!("--leader-elect={leader_elect}"))
        .args(["--metrics-bind-address=0"])
        .args(["--aws-write-rate=20/40", "--aws-targets-rate=20/40"])
        .envs(env.aws().unwrap().env_vars());
    Proc::spawn(name, cmd, &env.dir).unwrap()
}

/// The ENI addresses `range` of the cluster's pod subnet, as endpoints.
fn ips(c: &Cluster, range: std::ops::Range<usize>) -> Vec<String> {
    c.net.pod_ips[range].to_vec()
}

/// A LoadBalancer Service of class cnlb.dev/nlb without a selector, port
/// 80 -> 8080, and its EndpointSlice with `ips` ready.
async fn create_service(client: &Client, name: &str, ips: &[String]) {
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "type": "LoadBalancer", "loadBalancerClass": "cnlb.dev/nlb",
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
        },
    }))
    .unwrap();
    Api::<Service>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &svc)
        .await
        .unwrap();
    set_endpoints(client, name, ips).await;
}

/// Writes Service `name`'s one EndpointSlice: `ips` ready on port 8080.
async fn set_endpoints(client: &Client, name: &str, ips: &[String]) {
    let endpoints: Vec<_> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
        .collect();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{name}-test"),
            "labels": {
                "kubernetes.io/service-name": name,
                "endpointslice.kubernetes.io/managed-by": "cnlb-test",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
    .unwrap();
    Api::<EndpointSlice>::namespaced(client.clone(), "default")
        .patch(
            &format!("{name}-test"),
            &PatchParams::apply("cnlb-test").force(),
            &Patch::Apply(slice),
        )
        .await
        .unwrap();
}

async fn delete_service(client: &Client, name: &str) {
    Api::<Service>::namespaced(client.clone(), "default")
        .delete(name, &DeleteParams::default())
        .await
        .unwrap();
}

/// Fails, saying why, unless Service `name` is what its user expects: its
/// NLB's address in `status.loadBalancer`, LoadBalancerReady True, and its
/// one target group (named in `cnlb.dev/resource-ids`) holding exactly
/// `ips` on port 8080.
async fn converged(c: &Cluster, name: &str, ips: &[String]) -> anyhow::Result<()> {
    let services: Api<Service> = Api::namespaced(c.client.clone(), "default");
    let Some(svc) = services.get_opt(name).await? else {
        bail!("{name}: no such Service");
    };
    let status = svc.status.clone().unwrap_or_default();
    let address = status
        .load_balancer
        .and_then(|lb| lb.ingress)
        .and_then(|i| i.into_iter().next())
        .and_then(|i| i.hostname);
    let ready = status
        .conditions
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == LOAD_BALANCER_READY && c.status == "True");
    let ids: BTreeMap<String, String> = match svc.annotations().get(IDS_ANNOTATION) {
        Some(json) => serde_json::from_str(json)?,
        None => BTreeMap::new(),
    };
    let groups: Vec<&String> = ids
        .iter()
        .filter(|(k, _)| k.starts_with(TARGET_GROUP_ID_PREFIX))
        .map(|(_, arn)| arn)
        .collect();
    let [group] = groups[..] else {
        bail!("{name}: target groups {groups:?}");
    };
    if address.is_none() || !ready {
        bail!("{name}: address {address:?}, ready {ready}");
    }
    let health = c
        .aws
        .elbv2
        .describe_target_health()
        .target_group_arn(group)
        .send()
        .await?;
    let registered: BTreeSet<String> = health
        .target_health_descriptions()
        .iter()
        .filter_map(|d| d.target())
        .map(|t| format!("{}:{}", t.id().unwrap_or_default(), t.port().unwrap_or(0)))
        .collect();
    let want: BTreeSet<String> = ips.iter().map(|ip| format!("{ip}:8080")).collect();
    if registered != want {
        bail!("{name}: targets {registered:?}, want {want:?}");
    }
    Ok(())
}

/// Waits until every Service of `want` (name -> endpoints) has converged,
/// every Service of `gone` no longer exists, and the cloud holds exactly
/// one NLB, one target group and one frontend security group per Service.
async fn wait_converged(c: &Cluster, want: &[(&str, Vec<String>)], gone: &[&str]) {
    let services: Api<Service> = Api::namespaced(c.client.clone(), "default");
    eventually("the Services converge", WAIT, || async {
        for (name, ips) in want {
            converged(c, name, ips).await?;
        }
        for name in gone {
            if services.get_opt(name).await?.is_some() {
                bail!("{name} still exists");
            }
        }
        let (lbs, groups) = counts(&c.aws).await;
        if (lbs, groups) != (want.len(), want.len()) {
            bail!("{lbs} NLBs and {groups} target groups");
        }
        Ok(true)
    })
    .await
    .unwrap();
    assert_eq!(owned_security_groups(&c.aws).await, want.len());
}

/// While cnlb-ccm builds load balancers for six Services, etcd and
/// kube-apiserver are killed with SIGKILL and started again (same data,
/// ports, certificates). cnlb-ccm keeps running (its reconciles and watches
/// fail and retry), every Service converges without a duplicate, and
/// changes made after the restart are acted on: a new Service, a deleted
/// one, endpoints that grew (a scaled Deployment).
#[tokio::test]
async fn apiserver_and_etcd_restarted_mid_reconcile() {
    let mut c = common::ccm::cluster("apiserver-restart", 0).await;
    let names: Vec<String> = (0..6).map(|i| format!("svc-{i}")).collect();
    for name in &names {
        create_service(&c.client, name, &ips(&c, 0..2)).await;
    }
    // Leader election off: an outage longer than its renew deadline ends
    // leadership by design (see the leader tests below); here the
    // controller itself must ride the outage out.
    let ccm = spawn_ccm(&c, "cnlb-ccm", false, None);
    eventually("the first target group exists", WAIT, || async {
        Ok(counts(&c.aws).await.1 > 0)
    })
    .await
    .unwrap();
    let before = counts(&c.aws).await;
    let cp = c.env.kube_mut().unwrap();
    cp.kill_apiserver();
    cp.kill_etcd();
    assert!(
        before.0 < names.len() || before.1 < names.len(),
        "killed too late to be mid-reconcile: {before:?}"
    );
    // Long enough for reconciles and watches to fail and back off.
    tokio::time::sleep(Duration::from_secs(3)).await;
    cp.start_etcd(Duration::from_secs(60)).await.unwrap();
    cp.start_apiserver(Duration::from_secs(60)).await.unwrap();
    ccm.check_running().unwrap();

    create_service(&c.client, "svc-new", &ips(&c, 2..4)).await;
    delete_service(&c.client, "svc-0").await;
    set_endpoints(&c.client, "svc-1", &ips(&c, 0..3)).await;
    let mut want: Vec<(&str, Vec<String>)> = names[2..]
        .iter()
        .map(|n| (n.as_str(), ips(&c, 0..2)))
        .collect();
    want.push(("svc-1", ips(&c, 0..3)));
    want.push(("svc-new", ips(&c, 2..4)));
    wait_converged(&c, &want, &["svc-0"]).await;
    ccm.check_running().unwrap();
}

/// cnlb-ccm misses changes while it is cut off from the API server, and
/// its watches cannot resume: they get 410 Gone, relist, and the changes
/// are acted on: a Service deleted (with cnlb's finalizer, an update),
/// another's endpoints changed, and a third's EndpointSlice deleted (that
/// deletion event is lost for good: only the slice's absence from the
/// relist tells).
///
/// Why the 410 really occurs: cnlb-ccm's connections go through a
/// [`Partition`], cut during those writes, so no event of them reaches it
/// (not even into a socket buffer) and its watches' last resourceVersions
/// are older than them. Then etcd's history is compacted up to its current
/// revision and kube-apiserver restarted. The partition heals with every
/// connection closed, and cnlb-ccm resumes each watch from its last
/// resourceVersion. The restarted apiserver's watch cache begins at etcd's
/// revision at its start, after that resourceVersion, so it answers "too
/// old resource version" (410 Gone); served by etcd itself (without the
/// cache) the watch would find the revision compacted: 410 Gone too.
/// Neither can replay the missed events: only a new LIST (kube-runtime's
/// relist on 410) shows them.
#[tokio::test]
async fn expired_watches_relist_and_see_missed_changes() {
    let mut c = common::ccm::cluster("watch-expiry", 0).await;
    for name in ["gone", "moved", "emptied"] {
        create_service(&c.client, name, &ips(&c, 0..2)).await;
    }
    let partition = Partition::start(apiserver_addr(&c.env)).await;
    let kubeconfig = kubeconfig_via(&c.env, partition.addr);
    let ccm = spawn_ccm(&c, "cnlb-ccm", false, Some(kubeconfig));
    let want: Vec<(&str, Vec<String>)> = ["gone", "moved", "emptied"]
        .into_iter()
        .map(|n| (n, ips(&c, 0..2)))
        .collect();
    wait_converged(&c, &want, &[]).await;

    partition.cut();
    delete_service(&c.client, "gone").await;
    set_endpoints(&c.client, "moved", &ips(&c, 2..4)).await;
    Api::<EndpointSlice>::namespaced(c.client.clone(), "default")
        .delete("emptied-test", &DeleteParams::default())
        .await
        .unwrap();
    let cp = c.env.kube_mut().unwrap();
    cp.compact_etcd().await.unwrap();
    cp.kill_apiserver();
    cp.start_apiserver(Duration::from_secs(60)).await.unwrap();
    partition.heal();

    wait_converged(
        &c,
        &[("moved", ips(&c, 2..4)), ("emptied", Vec::new())],
        &["gone"],
    )
    .await;
    let log = std::fs::read_to_string(ccm.log()).unwrap();
    // The watch cache's words, or etcd's (both are 410 Gone, reason Expired).
    assert!(
        log.contains("too old resource version") || log.contains("provided watch is too old"),
        "no watch got 410 Gone:\n{log}"
    );
    ccm.check_running().unwrap();
}

/// A TCP relay to the API server that can be cut: afterwards no byte (nor
/// the end of a stream) goes through in either direction, on open and new
/// connections alike, and nothing is reset: a client only waits, as behind
/// a network partition that drops packets. Healing closes every connection
/// (what a client sees after a long partition) and relays new ones again.
struct Partition {
    addr: std::net::SocketAddr,
    cut: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Partition {
    async fn start(upstream: std::net::SocketAddr) -> Partition {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (flag, conns) = (cut.clone(), connections.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let flag = flag.clone();
                let relay = tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    futures::join!(
                        pipe(client_read, server_write, &flag),
                        pipe(server_read, client_write, &flag)
                    );
                });
                conns.lock().unwrap().push(relay.abort_handle());
            }
        });
        Partition {
            addr,
            cut,
            connections,
            task,
        }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    fn heal(&self) {
        for relay in self.connections.lock().unwrap().drain(..) {
            relay.abort();
        }
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.task.abort();
        for relay in self.connections.lock().unwrap().drain(..) {
            relay.abort();
        }
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    cut: &AtomicBool,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let read = from.read(&mut buf).await;
        if cut.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        match read {
            Ok(n) if n > 0 => {
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            _ => break,
        }
    }
    let _ = to.shutdown().await;
}

/// The API server's `127.0.0.1:<port>`.
fn apiserver_addr(env: &Env) -> std::net::SocketAddr {
    let server = &env.kube().unwrap().server;
    server.trim_start_matches("https://").parse().unwrap()
}

/// The environment's admin kubeconfig, pointed at `addr` (a [`Partition`]).
fn kubeconfig_via(env: &Env, addr: std::net::SocketAddr) -> PathBuf {
    let cp = env.kube().unwrap();
    let mut kc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cp.kubeconfig).unwrap()).unwrap();
    kc["clusters"][0]["cluster"]["server"] = json!(format!("https://{addr}"));
    let path = env.dir.join("partitioned.kubeconfig");
    std::fs::write(&path, kc.to_string()).unwrap();
    path
}

async fn lease(client: &Client) -> Option<Lease> {
    Api::<Lease>::namespaced(client.clone(), "kube-system")
        .get_opt("cnlb-ccm")
        .await
        .ok()?
}

async fn holder(client: &Client) -> Option<String> {
    lease(client)
        .await?
        .spec?
        .holder_identity
        .filter(|h| !h.is_empty())
}

fn holds(holder: Option<&str>, p: &Proc) -> bool {
    holder.is_some_and(|h| h.ends_with(&format!("_{}", p.pid())))
}

/// The time at the start of the first line of `p`'s log containing `what`.
fn logged_at(p: &Proc, what: &str) -> Option<Timestamp> {
    let log = std::fs::read_to_string(p.log()).ok()?;
    let line = log.lines().find(|l| l.contains(what))?;
    line.split_whitespace().next()?.parse().ok()
}

/// The leader loses the API server (a partition: its renewals hang, they
/// are not refused) while the standby can still reach it. The leader must
/// stop acting, and it does so by exiting, no later than the standby
/// acquires the Lease: there are never two writers. Then the new leader
/// acts on a new Service.
#[tokio::test]
async fn a_leader_that_cannot_renew_stops_before_another_leads() {
    let c = common::ccm::cluster("lease-partition", 0).await;
    let partition = Partition::start(apiserver_addr(&c.env)).await;
    let old = spawn_ccm(
        &c,
        "ccm-old",
        true,
        Some(kubeconfig_via(&c.env, partition.addr)),
    );
    eventually("ccm-old leads", WAIT, || async {
        Ok(holds(holder(&c.client).await.as_deref(), &old))
    })
    .await
    .unwrap();
    create_service(&c.client, "first", &ips(&c, 0..2)).await;
    wait_converged(&c, &[("first", ips(&c, 0..2))], &[]).await;
    let new = spawn_ccm(&c, "ccm-new", true, None);
    eventually("ccm-new waits for the lease", WAIT, || async {
        Ok(logged_at(&new, "connected to the Kubernetes API server").is_some())
    })
    .await
    .unwrap();

    partition.cut();
    let cut_at = Instant::now();
    let mut old_exited: Option<Timestamp> = None;
    while !holds(holder(&c.client).await.as_deref(), &new) {
        if old_exited.is_none() && old.try_status().unwrap().is_some() {
            old_exited = Some(Timestamp::now());
        }
        assert!(
            cut_at.elapsed() < LEASE_DURATION * 3,
            "ccm-new never took the lease"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let spec = lease(&c.client).await.unwrap().spec.unwrap();
    let acquired = spec.acquire_time.unwrap().0;
    let old_log = std::fs::read_to_string(old.log()).unwrap();
    let exited = old_exited.unwrap_or_else(|| {
        panic!("ccm-old still runs after ccm-new acquired the lease at {acquired}:\n{old_log}")
    });
    assert!(
        exited <= acquired,
        "ccm-old exited at {exited}, after ccm-new acquired the lease at {acquired}"
    );
    // The exit message follows the failed renewal (a backtrace may follow
    // it when RUST_BACKTRACE is set).
    let renewal_failed = old_log.find("could not renew");
    let exit_message = old_log.rfind("lost the leader lease");
    assert!(
        matches!((renewal_failed, exit_message), (Some(r), Some(e)) if r < e),
        "{old_log}"
    );
    assert!(!old.try_status().unwrap().unwrap().success());
    eventually("ccm-new logs its leadership", WAIT, || async {
        Ok(logged_at(&new, "became leader").is_some())
    })
    .await
    .unwrap();
    let became = logged_at(&new, "became leader").unwrap();
    assert!(exited <= became, "{exited} {became}");

    create_service(&c.client, "second", &ips(&c, 2..4)).await;
    wait_converged(
        &c,
        &[("first", ips(&c, 0..2)), ("second", ips(&c, 2..4))],
        &[],
    )
    .await;
}

/// The leader is SIGKILLed while eight Services are half built; the
/// standby takes the Lease over within its duration (plus the retry
/// periods in which it looks) and finishes every Service: all converged,
/// one NLB, target group and security group each, no duplicate.
/// (leader_election.rs checks the takeover itself; this checks the work.)
#[tokio::test]
async fn a_killed_leaders_standby_finishes_the_work() {
    let c = common::ccm::cluster("leader-kill", 0).await;
    let leader = spawn_ccm(&c, "ccm-a", true, None);
    eventually("ccm-a leads", WAIT, || async {
        Ok(holds(holder(&c.client).await.as_deref(), &leader))
    })
    .await
    .unwrap();
    let standby = spawn_ccm(&c, "ccm-b", true, None);
    let names: Vec<String> = (0..8).map(|i| format!("svc-{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        create_service(&c.client, name, &ips(&c, i % 2..i % 2 + 2)).await;
    }
    eventually("the first target group exists", WAIT, || async {
        Ok(counts(&c.aws).await.1 > 0)
    })
    .await
    .unwrap();
    leader.kill();
    let killed = Instant::now();
    let at_kill = counts(&c.aws).await;
    assert!(
        at_kill.0 < names.len() || at_kill.1 < names.len(),
        "killed too late to be mid-work: {at_kill:?}"
    );

    // The standby last saw the lease change at most a retry period before
    // the kill; it takes over at its first look after the lease duration.
    let bound = LEASE_DURATION + RETRY_PERIOD * 2 + Duration::from_secs(3);
    eventually("ccm-b takes the lease over", bound, || async {
        Ok(holds(holder(&c.client).await.as_deref(), &standby))
    })
    .await
    .unwrap();
    println!("takeover {:?} after the kill", killed.elapsed());

    let want: Vec<(&str, Vec<String>)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), ips(&c, i % 2..i % 2 + 2)))
        .collect();
    wait_converged(&c, &want, &[]).await;
    let lbs = c.aws.elbv2.describe_load_balancers().send().await.unwrap();
    let dns: BTreeSet<&str> = lbs
        .load_balancers()
        .iter()
        .filter_map(|l| l.dns_name())
        .collect();
    assert_eq!(dns.len(), names.len(), "one NLB per Service");
    standby.check_running().unwrap();
}
