//! The AWS datapath through an emulated VPC that enforces EC2's checks
//! (`cnlb_localstack_tests::vpc`): the real vpc-ipam agent in the node's
//! network namespace, Pods made by the real ptp + vpc-ipam plugins, their
//! addresses on secondary ENIs in moto, and cnlb-ccm's NLB target group.
//! Traffic from the "load balancer" namespace to every registered target
//! is real TCP, and it must pass EC2's source/destination check and the
//! targets' security groups:
//! - with the backend security-group rules off, no target answers;
//! - with them on but the node's routing off, Pods on secondary ENIs
//!   still do not answer (their replies leave by the primary ENI);
//! - with both on, every target answers;
//! - Pod traffic to the internet leaves as the node (SNAT), and as the
//!   Pod with external SNAT;
//! - kill -9 of the agent during churn leaves every Pod answering and no
//!   rule stale or missing.

#![allow(clippy::unwrap_used)] // test code

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::Tag;
use cnlb_localstack_tests::ipam::{self, Churn, CniCall, IpamAgent, Netns, PTP_CNI_VERSION};
use cnlb_localstack_tests::process::Proc;
use cnlb_localstack_tests::range::RangeLease;
use cnlb_localstack_tests::vpc::{self, EmulatedVpc};
use cnlb_localstack_tests::{Env, eventually};
use cnlb_provider_aws::Clients;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};

const NODE: &str = "dp-node";
const POD_CIDR: &str = "100.64.0.0/17";
/// Inside the VPC (10.0.0.0/16), outside every subnet: the NLB's address.
const LB_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 0, 200, 10);
const POD_PORT: u16 = 8080;
const PODS: usize = 6;

#[test]
fn pods_on_secondary_enis_answer_the_load_balancer_through_the_emulated_vpc() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(scenario());
}

struct Pod {
    id: String,
    ip: Ipv4Addr,
    netns: Netns,
    _server: Proc,
}

async fn scenario() {
    let env = Env::builder("aws-datapath")
        .kube()
        .moto()
        .start()
        .await
        .unwrap();
    let kube = env.kube().unwrap();
    let client = kube.admin_client().unwrap();
    let endpoints = env.aws().unwrap();
    common::use_endpoints(&endpoints);
    let aws = Clients::from_env().await;
    let instance = ipam::aws_node(&aws.ec2, &client, NODE, POD_CIDR)
        .await
        .unwrap();
    let (vpc_id, node_subnet, node_ip) = instance_network(&aws, &instance).await;
    tag_for_load_balancers(&aws, &node_subnet).await;

    // Named after a range number, so a dead run's namespaces are cleaned.
    let lease = RangeLease::acquire(&env.dir).unwrap();
    let prefix = format!("cnlb-{}-dp", lease.k());
    let vpc = EmulatedVpc::start(
        &prefix,
        aws.ec2.clone(),
        aws.elbv2.clone(),
        &instance,
        LB_ADDRESS,
    )
    .await
    .unwrap();
    let ports: BTreeSet<u16> = [&endpoints.ec2, &endpoints.elbv2, &kube.server]
        .into_iter()
        .map(|url| port_of(url))
        .collect();
    for port in ports {
        vpc.expose_to_node(port).await.unwrap();
    }

    // 1. Node routing off: Pods get addresses on secondary ENIs.
    let mut envs: Vec<(String, String)> = endpoints
        .env_vars()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    envs.push(("KUBECONFIG".into(), kube.kubeconfig.display().to_string()));
    let tag = format!("cnlb.dev/pods={NODE}");
    let flags = |extra: &[&'static str]| -> Vec<String> {
        let mut f: Vec<String> = [
            "--cluster-name=test",
            "--backend=aws",
            &format!("--aws-pod-subnet-tag={tag}"),
            // 3 Pod addresses per ENI: 6 Pods need 2 secondary ENIs.
            "--aws-ips-per-eni=4",
            "--aws-max-enis=4",
            "--aws-write-rate=20/40",
            "--warm-target=2",
            "--cooldown=1s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        f.extend(extra.iter().map(|s| s.to_string()));
        f
    };
    let dir = env.dir.join("agent");
    let off = flags(&["--aws-node-routing=false"]);
    let mut agent = IpamAgent::start_in(Some(vpc.node_ns()), &dir, NODE, &refs(&off), &envs)
        .await
        .unwrap();
    let conf = agent.netconf(PTP_CNI_VERSION, "ptp");
    let mut pods = Vec::new();
    for i in 0..PODS {
        pods.push(add_pod(&vpc, &conf, &format!("{prefix}-p{i}"), &env.dir).await);
    }
    vpc.sync().await.unwrap();
    let enis = ipam::pod_eni_addresses(&aws.ec2, &instance).await.unwrap();
    let holders: BTreeSet<&String> = pods.iter().map(|p| &enis[&IpAddr::V4(p.ip)]).collect();
    assert!(holders.len() >= 2, "Pods on {holders:?}: want several ENIs");

    // 2. cnlb-ccm without backend rules registers the Pods; none answers.
    create_service(&client, &pods).await;
    let targets: BTreeSet<String> = pods
        .iter()
        .map(|p| format!("{}:{POD_PORT}", p.ip))
        .collect();
    let ccm = spawn_ccm(&env, &vpc_id, "ccm-no-rules", false);
    eventually("every Pod registered", Duration::from_secs(60), || async {
        let got = common::ccm::all_targets(&aws).await;
        anyhow::ensure!(got == targets, "{got:?}");
        Ok(true)
    })
    .await
    .unwrap();
    vpc.sync().await.unwrap();
    let before = vpc.drops().unwrap();
    assert_eq!(answering(&vpc, &pods).await, 0, "no rule lets the NLB in");
    let after = vpc.drops().unwrap();
    assert!(
        total(&after.security_group) > total(&before.security_group),
        "security groups dropped them: {after:?}"
    );
    drop(ccm);

    // 3. Backend rules on, node routing off (the ENI links up, as a
    //    distribution brings up a hot-plugged NIC): the source/destination
    //    check drops the replies of Pods on secondary ENIs.
    set_secondary_links_up(&vpc, &aws, &instance).await;
    let _ccm = spawn_ccm(&env, &vpc_id, "ccm", true);
    eventually(
        "backend rules on the Pod ENIs",
        Duration::from_secs(60),
        || async {
            vpc.sync().await?;
            let drops = vpc.drops()?;
            let before = total(&drops.src_dst_check);
            let n = answering(&vpc, &pods[..1]).await;
            let drops = vpc.drops()?;
            anyhow::ensure!(
                n == 0 && total(&drops.src_dst_check) > before,
                "want a source/destination drop, got {n} answers, {drops:?}"
            );
            Ok(true)
        },
    )
    .await
    .unwrap();
    assert_eq!(answering(&vpc, &pods).await, 0, "replies leave by eth0");

    // 4. Node routing on (a restart rebuilds it from the allocations):
    //    every registered target answers.
    agent.restart_with(&refs(&flags(&[]))).await.unwrap();
    assert_eq!(answering(&vpc, &pods).await, PODS, "every target answers");
    let rules = node_rules(&vpc);
    let vpc_cidrs = 2; // 10.0.0.0/16 and 100.64.0.0/16
    assert_eq!(rules.to_pod, PODS, "{rules:?}");
    assert_eq!(rules.from_pod, PODS * vpc_cidrs, "{rules:?}");
    println!(
        "rules per Pod on a secondary ENI: 1 to + {vpc_cidrs} from (one per VPC CIDR with SNAT)"
    );

    // 5. SNAT: to the internet as the node; with external SNAT as the Pod.
    let internet = vpc.internet_address();
    let _peer = vpc::serve_peer_address(vpc.inet_ns(), IpAddr::V4(internet), 80).unwrap();
    let seen = vpc::http_get_in(&pods[0].netns.name, IpAddr::V4(internet), 80)
        .await
        .unwrap();
    assert_eq!(
        seen.trim(),
        node_ip.to_string(),
        "SNAT to the node's address"
    );
    agent
        .restart_with(&refs(&flags(&["--aws-external-snat"])))
        .await
        .unwrap();
    let seen = vpc::http_get_in(&pods[0].netns.name, IpAddr::V4(internet), 80)
        .await
        .unwrap();
    assert_eq!(seen.trim(), pods[0].ip.to_string(), "external SNAT");
    assert_eq!(answering(&vpc, &pods).await, PODS);
    agent.restart_with(&refs(&flags(&[]))).await.unwrap();

    // 6. ADD latency with the rules (the IPAM plugin alone: the agent's
    //    part), then kill -9 during churn.
    let ipam_conf = agent.netconf(PTP_CNI_VERSION, "vpc-ipam");
    let route_sum = "vpc_ipam_route_duration_seconds_sum";
    let route_count = "vpc_ipam_route_duration_seconds_count";
    let (sum0, count0) = (
        agent.metric(route_sum).await.unwrap(),
        agent.metric(route_count).await.unwrap(),
    );
    let mut took = Vec::new();
    for i in 0..20 {
        let id = format!("lat-{i}");
        let started = Instant::now();
        let add = CniCall::new("vpc-ipam", "ADD", &id)
            .netns("/var/run/netns/unused")
            .within(vpc.node_ns())
            .run(&ipam_conf)
            .await
            .unwrap();
        took.push(started.elapsed());
        assert!(add.ok(), "{add:?}");
        ipam_in(&vpc, "DEL", &id, &ipam_conf).await;
    }
    took.sort();
    let routing = (agent.metric(route_sum).await.unwrap() - sum0)
        / (agent.metric(route_count).await.unwrap() - count0);
    println!(
        "ADD with routing: the rules take {:.2} ms per ADD or DEL in the agent (mean); \
         a whole plugin run (ip netns exec, plugin, agent, waits for the pool) p50 {:?}, \
         max {:?}; {} ADDs",
        routing * 1e3,
        took[took.len() / 2],
        took[took.len() - 1],
        took.len()
    );

    let churn = Churn::start_within(&ipam_conf, "churn", 2, vpc.node_ns());
    agent
        .crash_repeatedly(2, Duration::from_millis(1500))
        .await
        .unwrap();
    let done = churn.stop().await.unwrap();
    println!(
        "churn: {} ADDs, {} failed while the agent was down, {} left",
        done.adds,
        done.failed_adds,
        done.live.len()
    );
    let mut live: BTreeMap<String, String> = done.live.clone();
    live.extend(pods.iter().map(|p| (p.id.clone(), p.ip.to_string())));
    agent.check_holds_exactly(&live).await.unwrap();
    vpc.sync().await.unwrap();
    assert_eq!(answering(&vpc, &pods).await, PODS, "after kill -9");
    let rules = node_rules(&vpc);
    assert_eq!(rules.to_pod, live.len(), "{rules:?}");
    assert_eq!(rules.from_pod, live.len() * vpc_cidrs, "{rules:?}");
    let addresses: BTreeSet<String> = live.values().cloned().collect();
    assert_eq!(rules.addresses, addresses, "no stale rule, none missing");
    for id in done.live.keys() {
        ipam_in(&vpc, "DEL", id, &ipam_conf).await;
    }
    let rules = node_rules(&vpc);
    assert_eq!(rules.to_pod, PODS, "DEL removes the rules: {rules:?}");
}

fn total(drops: &BTreeMap<String, u64>) -> u64 {
    drops.values().sum()
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap()
}

/// The instance's VPC, subnet and primary address.
async fn instance_network(aws: &Clients, instance: &str) -> (String, String, Ipv4Addr) {
    let out = aws
        .ec2
        .describe_instances()
        .instance_ids(instance)
        .send()
        .await
        .unwrap();
    let i = &out.reservations()[0].instances()[0];
    (
        i.vpc_id().unwrap().to_string(),
        i.subnet_id().unwrap().to_string(),
        i.private_ip_address().unwrap().parse().unwrap(),
    )
}

/// The node subnet is where cnlb-ccm puts NLBs, found by tag as on EKS.
async fn tag_for_load_balancers(aws: &Clients, subnet: &str) {
    aws.ec2
        .create_tags()
        .resources(subnet)
        .tags(
            Tag::builder()
                .key("kubernetes.io/role/elb")
                .value("1")
                .build(),
        )
        .tags(
            Tag::builder()
                .key("kubernetes.io/role/internal-elb")
                .value("1")
                .build(),
        )
        .send()
        .await
        .unwrap();
}

/// A Pod as kubelet makes one: a network namespace, CNI ADD through ptp
/// (which execs vpc-ipam) in the node's namespace, the server inside.
async fn add_pod(vpc: &EmulatedVpc, conf: &Value, id: &str, log_dir: &Path) -> Pod {
    let netns = Netns::create(id).unwrap();
    let path = netns.path();
    let add = CniCall::new("ptp", "ADD", id)
        .netns(&path)
        .within(vpc.node_ns())
        .run(conf)
        .await
        .unwrap();
    let ip: Ipv4Addr = add.ip().unwrap().parse().unwrap();
    let server = netns
        .serve(&format!("default/{id}"), &ip.to_string(), POD_PORT, log_dir)
        .unwrap();
    Pod {
        id: id.to_string(),
        ip,
        netns,
        _server: server,
    }
}

async fn ipam_in(vpc: &EmulatedVpc, command: &str, id: &str, conf: &Value) {
    let run = CniCall::new("vpc-ipam", command, id)
        .netns("/var/run/netns/unused")
        .within(vpc.node_ns())
        .run(conf)
        .await
        .unwrap();
    assert!(run.ok(), "{command} {id}: {run:?}");
}

/// How many Pods answer HTTP from the load balancer's namespace, each
/// naming itself.
async fn answering(vpc: &EmulatedVpc, pods: &[Pod]) -> usize {
    let mut n = 0;
    for pod in pods {
        if let Ok(body) = vpc::http_get_in(vpc.lb_ns(), IpAddr::V4(pod.ip), POD_PORT).await {
            assert!(body.contains(&pod.id), "{} answered {body:?}", pod.ip);
            n += 1;
        }
    }
    n
}

/// A Service without selector in front of the Pods, and its EndpointSlice,
/// as a controller outside Kubernetes would publish them.
async fn create_service(client: &kube::Client, pods: &[Pod]) {
    let service: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "dp", "namespace": "default"},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": "cnlb.dev/nlb",
                 "ports": [{"name": "http", "port": 80, "targetPort": POD_PORT, "protocol": "TCP"}]},
    }))
    .unwrap();
    Api::<Service>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &service)
        .await
        .unwrap();
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|p| json!({"addresses": [p.ip.to_string()], "conditions": {"ready": true}}))
        .collect();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "dp-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "dp"}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": POD_PORT, "protocol": "TCP"}],
    }))
    .unwrap();
    Api::<EndpointSlice>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &slice)
        .await
        .unwrap();
}

fn spawn_ccm(env: &Env, vpc: &str, name: &str, backend_rules: bool) -> Proc {
    let mut cmd = common::ccm::command(env, vpc);
    cmd.args(["--leader-elect=false", "--metrics-bind-address=0"])
        .args(["--aws-write-rate=20/40", "--aws-targets-rate=20/40"])
        .arg(format!("--aws-backend-security-group={backend_rules}"))
        .envs(env.aws().unwrap().env_vars());
    Proc::spawn(name, cmd, &env.dir).unwrap()
}

fn ip_node(vpc: &EmulatedVpc, args: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .args(["-n", vpc.node_ns()])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "ip {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What a distribution does with a hot-plugged NIC, and no more: the
/// link up with the ENI's address (a link without one drops what arrives
/// under rp_filter), no policy routing.
async fn set_secondary_links_up(vpc: &EmulatedVpc, aws: &Clients, instance: &str) {
    let out = aws
        .ec2
        .describe_network_interfaces()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("attachment.instance-id")
                .values(instance)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let links = ip_node(vpc, &["-o", "link", "show"]);
    for eni in out.network_interfaces() {
        if eni.attachment().and_then(|a| a.device_index()) == Some(0) {
            continue;
        }
        let mac = eni.mac_address().unwrap().to_ascii_lowercase();
        let line = links.lines().find(|l| l.contains(&mac)).unwrap();
        let name = line.split(": ").nth(1).unwrap().split('@').next().unwrap();
        let address = format!("{}/32", eni.private_ip_address().unwrap());
        ip_node(vpc, &["addr", "replace", &address, "dev", name]);
        ip_node(vpc, &["link", "set", name, "up"]);
    }
}

#[derive(Debug, Default)]
struct NodeRules {
    to_pod: usize,
    from_pod: usize,
    /// Every Pod address a rule names.
    addresses: BTreeSet<String>,
}

/// The node's rules at the agent's priorities, as `ip rule` lists them.
fn node_rules(vpc: &EmulatedVpc) -> NodeRules {
    let text = ip_node(vpc, &["-4", "rule", "show"]);
    let mut rules = NodeRules::default();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let address = |key: &str| {
            words
                .iter()
                .position(|w| *w == key)
                .and_then(|i| words.get(i + 1))
                .map(|a| a.trim_end_matches("/32").to_string())
        };
        match words.first() {
            Some(&"512:") => {
                rules.to_pod += 1;
                rules.addresses.extend(address("to"));
            }
            Some(&"1536:") => {
                rules.from_pod += 1;
                rules.addresses.extend(address("from"));
            }
            _ => {}
        }
    }
    rules
}
