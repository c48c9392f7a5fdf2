//! NLB targets through the life of real Pods, with a real kubelet's
//! timing: a Pod gets its IP first and its containers become ready only
//! when the readiness probe passes; a deleted Pod runs its preStop hook
//! before its container gets SIGTERM; a container that exits is restarted.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::ccm;
use cnlb_localstack_tests::eventually;
use cnlb_localstack_tests::onprem::get_body;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

const GATE: &str = "cnlb.dev/load-balancer-ready";
const WAIT: Duration = Duration::from_secs(90);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn create_service(client: &Client) {
    Api::<Service>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &ccm::service("web", json!({})))
        .await
        .unwrap();
}

fn pod_ip(pod: &Pod) -> Option<String> {
    pod.status.as_ref()?.pod_ip.clone()
}

/// The readiness probe holds each container back 5 s after the Pod has its
/// IP and endpoint. Its target is registered only once its containers are
/// ready, and the gate opens after that; then the Pod is Ready.
#[test]
fn the_gate_opens_after_the_readiness_probe_passes() {
    runtime().block_on(async {
        let cluster = ccm::cluster("aws-probe-gate", 2).await;
        let (env, aws, net) = (&cluster.env, &cluster.aws, &cluster.net);
        let _ccm = ccm::spawn(env, &net.vpc, "cnlb-ccm");
        let client = cluster.client.clone();
        create_service(&client).await;
        let mut web = ccm::web(3, Some(GATE));
        web["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["initialDelaySeconds"] =
            json!(5);
        let created = Instant::now();
        ccm::create_deployment(&client, web).await;

        // Per Pod, when each step was first seen (sampled every 100 ms).
        #[derive(Default, Debug)]
        struct Seen {
            ip: Option<Duration>,
            containers_ready: Option<Duration>,
            registered: Option<Duration>,
            gate: Option<Duration>,
            ready: Option<Duration>,
        }
        let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
        loop {
            let t = created.elapsed();
            assert!(t < WAIT, "not every Pod became Ready: {seen:#?}");
            // Targets, Pods, targets: a target seen before the Pods were
            // read was registered before what that read shows (containers
            // ready); a gate seen open must have its target in the read after.
            let registered = ccm::all_targets(aws).await;
            let pods = ccm::web_pods(&client).await;
            let registered_after = ccm::all_targets(aws).await;
            for pod in pods {
                let s = seen.entry(pod.name_any()).or_default();
                let ip = pod_ip(&pod);
                if ip.is_some() {
                    s.ip.get_or_insert(t);
                }
                if ccm::pod_condition(&pod, "ContainersReady") {
                    s.containers_ready.get_or_insert(t);
                }
                let target = format!("{}:8080", ip.as_deref().unwrap_or_default());
                if ip.is_some() && registered.contains(&target) {
                    s.registered.get_or_insert(t);
                }
                if ccm::pod_condition(&pod, GATE) {
                    s.gate.get_or_insert(t);
                    assert!(
                        registered_after.contains(&target),
                        "{}: gate open before registration: {s:?}",
                        pod.name_any()
                    );
                }
                if ccm::pod_condition(&pod, "Ready") {
                    s.ready.get_or_insert(t);
                }
            }
            if seen.len() == 3
                && seen
                    .values()
                    .all(|s| s.ready.is_some() && s.registered.is_some())
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut to_ready = Vec::new();
        for (name, s) in &seen {
            let (ip, containers, registered, gate, ready) = (
                s.ip.unwrap(),
                s.containers_ready.unwrap(),
                s.registered.unwrap(),
                s.gate.unwrap(),
                s.ready.unwrap(),
            );
            assert!(
                containers >= ip + Duration::from_secs(4),
                "{name}: the probe held it back: {s:?}"
            );
            assert!(
                registered >= containers,
                "{name}: registered before its containers were ready: {s:?}"
            );
            assert!(ready >= gate, "{name}: Ready before its gate: {s:?}");
            to_ready.push(ready);
        }
        to_ready.sort();
        println!(
            "Pod creation to Ready with the gate (readiness probe after 5 s): {:?}",
            to_ready
        );
        assert_eq!(ccm::all_targets(aws).await, ccm::pod_targets(&client).await);
    });
}

/// A deleted Pod's target is deregistered at once, while its container
/// still serves through its preStop sleep; only then does it get SIGTERM
/// (and this server exits on it).
#[test]
fn a_deleted_pod_is_deregistered_before_its_container_gets_sigterm() {
    runtime().block_on(async {
        let cluster = ccm::cluster("aws-prestop", 1).await;
        let (env, aws, net) = (&cluster.env, &cluster.aws, &cluster.net);
        let _ccm = ccm::spawn(env, &net.vpc, "cnlb-ccm");
        let client = cluster.client.clone();
        create_service(&client).await;
        let mut web = ccm::web(2, None);
        let spec = &mut web["spec"]["template"]["spec"];
        spec["terminationGracePeriodSeconds"] = json!(30);
        spec["containers"][0]["lifecycle"] = json!({"preStop": {"sleep": {"seconds": 8}}});
        ccm::create_deployment(&client, web).await;
        eventually("both Pods are targets", WAIT, || async {
            let pods = ccm::pod_targets(&client).await;
            Ok(pods.len() == 2 && ccm::all_targets(aws).await == pods)
        })
        .await
        .unwrap();

        let victim = ccm::web_pods(&client).await.remove(0);
        let ip = pod_ip(&victim).unwrap();
        let target = format!("{ip}:8080");
        let addr: SocketAddr = target.parse().unwrap();
        Api::<Pod>::namespaced(client.clone(), "default")
            .delete(&victim.name_any(), &DeleteParams::default())
            .await
            .unwrap();
        let deleted = Instant::now();
        let (mut deregistered, mut stopped) = (None, None);
        while stopped.is_none() {
            assert!(deleted.elapsed() < WAIT, "the container never stopped");
            if deregistered.is_none() && !ccm::all_targets(aws).await.contains(&target) {
                deregistered = Some(deleted.elapsed());
            }
            if get_body(addr).await.is_err() {
                stopped = Some(deleted.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (deregistered, stopped) = (deregistered.unwrap(), stopped.unwrap());
        println!("deregistered {deregistered:?} after the deletion; SIGTERM (server gone) after {stopped:?}");
        assert!(
            deregistered + Duration::from_secs(5) < stopped,
            "deregistered at {deregistered:?}, the container stopped serving at {stopped:?}"
        );
    });
}

/// A container that exits 1 makes its Pod not ready: its target goes; the
/// kubelet restarts it, the probe passes, and its target comes back.
#[test]
fn a_crashed_container_is_deregistered_and_registered_again_after_its_restart() {
    runtime().block_on(async {
        let cluster = ccm::cluster("aws-crash-container", 1).await;
        let (env, aws, net) = (&cluster.env, &cluster.aws, &cluster.net);
        let _ccm = ccm::spawn(env, &net.vpc, "cnlb-ccm");
        let client = cluster.client.clone();
        create_service(&client).await;
        // The kubelet restarts a first crash at once; the probe's delay
        // keeps the new container unready for 3 s, long enough to see.
        let mut web = ccm::web(2, None);
        web["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["initialDelaySeconds"] =
            json!(3);
        ccm::create_deployment(&client, web).await;
        eventually("both Pods are targets", WAIT, || async {
            let pods = ccm::pod_targets(&client).await;
            Ok(pods.len() == 2 && ccm::all_targets(aws).await == pods)
        })
        .await
        .unwrap();
        let pod = ccm::web_pods(&client).await.remove(0);
        let ip = pod_ip(&pod).unwrap();
        let target = format!("{ip}:8080");
        // The sample app exits with the status it is asked for.
        let mut exit = tokio::net::TcpStream::connect(format!("{ip}:8080"))
            .await
            .unwrap();
        tokio::io::AsyncWriteExt::write_all(
            &mut exit,
            b"GET /exit?code=1 HTTP/1.1\r\nhost: x\r\n\r\n",
        )
        .await
        .unwrap();
        drop(exit);
        eventually("its target is deregistered", WAIT, || async {
            Ok(!ccm::all_targets(aws).await.contains(&target))
        })
        .await
        .unwrap();
        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
        eventually("restarted, Ready and registered again", WAIT, || async {
            let p = pods.get(&pod.name_any()).await?;
            let restarts = p
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|cs| cs.first())
                .map(|c| c.restart_count)
                .unwrap_or(0);
            Ok(restarts >= 1
                && ccm::pod_condition(&p, "Ready")
                && ccm::all_targets(aws).await.contains(&target))
        })
        .await
        .unwrap();
        assert_eq!(ccm::all_targets(aws).await, ccm::pod_targets(&client).await);
    });
}
