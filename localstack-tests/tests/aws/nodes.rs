//! cnlb-ccm as the cluster's cloud controller manager on AWS: real Nodes
//! whose kubelets run with `--cloud-provider=external`, each with an EC2
//! instance in moto at its address. The Nodes are initialized from their
//! instances (then Pods schedule), follow them when they stop, start and
//! terminate, and a Node without an instance keeps its taint with a
//! Warning Event. Then 200 Node objects are initialized with a handful of
//! DescribeInstances calls.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::net::SocketAddr;
use std::time::Duration;

use cnlb_localstack_tests::process::{Proc, free_port};
use cnlb_localstack_tests::{Env, NodeConfig, eventually};
use cnlb_provider_aws::Clients;
use cnlb_provider_aws::ec2::types::InstanceType;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::json;

use crate::common::nodes::{SHUTDOWN, UNINITIALIZED, addresses, label, tainted};

const WAIT: Duration = Duration::from_secs(120);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A VPC holding `cidr` with one subnet of it in us-east-1a; the VPC's ID
/// and the subnet's.
async fn vpc(aws: &Clients, vpc_cidr: &str, subnet_cidr: &str) -> (String, String) {
    let vpc = aws
        .ec2
        .create_vpc()
        .cidr_block(vpc_cidr)
        .send()
        .await
        .unwrap()
        .vpc
        .unwrap()
        .vpc_id
        .unwrap();
    let subnet = aws
        .ec2
        .create_subnet()
        .vpc_id(&vpc)
        .availability_zone("us-east-1a")
        .cidr_block(subnet_cidr)
        .send()
        .await
        .unwrap()
        .subnet
        .unwrap()
        .subnet_id
        .unwrap();
    (vpc, subnet)
}

async fn image(aws: &Clients) -> String {
    let images = aws.ec2.describe_images().send().await.unwrap();
    images.images()[0].image_id().unwrap().to_string()
}

/// `cnlb-ccm` with every controller, the lifecycle checked every second,
/// metrics on a free port.
fn spawn_ccm(env: &Env, vpc: &str, extra: &[&str]) -> (Proc, SocketAddr) {
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port().unwrap()));
    let mut cmd = common::ccm::command(env, vpc);
    cmd.arg("--leader-elect=false")
        .arg(format!("--metrics-bind-address={metrics}"))
        .args(["--node-monitor-period=1s", "--aws-read-rate=20/40"])
        .args(extra)
        .envs(env.aws().unwrap().env_vars());
    (Proc::spawn("cnlb-ccm", cmd, &env.dir).unwrap(), metrics)
}

#[test]
fn real_nodes_are_initialized_from_their_instances_and_follow_them() {
    runtime().block_on(async {
        let env = Env::builder("aws-nodes")
            .nodes(vec![NodeConfig::numbered(1), NodeConfig::numbered(2)])
            .external_cloud_provider()
            .moto()
            .start()
            .await
            .unwrap();
        let client = env.kube().unwrap().admin_client().unwrap();
        let aws = common::clients_for(&env.aws().unwrap()).await;
        let ips: Vec<String> = env
            .nodes()
            .iter()
            .map(|n| n.config.internal_ip.to_string())
            .collect();
        let octets: Vec<&str> = ips[0].split('.').collect();
        let subnet_cidr = format!("{}.{}.{}.0/24", octets[0], octets[1], octets[2]);
        let (vpc, subnet) = vpc(&aws, "10.127.0.0/16", &subnet_cidr).await;
        let image = image(&aws).await;
        let mut instances = Vec::new();
        for ip in &ips {
            let run = aws
                .ec2
                .run_instances()
                .image_id(&image)
                .instance_type(InstanceType::M5Large)
                .subnet_id(&subnet)
                .private_ip_address(ip)
                .min_count(1)
                .max_count(1)
                .send()
                .await
                .unwrap();
            instances.push(run.instances()[0].instance_id().unwrap().to_string());
        }
        // A Node no instance is behind (registered by hand: no kubelet).
        let orphan: Node = serde_json::from_value(json!({
            "metadata": {
                "name": "orphan",
                "annotations": {"alpha.kubernetes.io/provided-node-ip": format!("{}.{}.{}.99", octets[0], octets[1], octets[2])},
            },
            "spec": {"taints": [{"key": UNINITIALIZED, "value": "true", "effect": "NoSchedule"}]},
        }))
        .unwrap();
        Api::<Node>::all(client.clone())
            .create(&PostParams::default(), &orphan)
            .await
            .unwrap();

        // Tainted, nothing schedules: a Deployment's Pods stay Pending.
        assert!(tainted(&common::nodes::get(&client, "node-1").await.unwrap(), UNINITIALIZED));
        common::ccm::create_web(&client, 2).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            common::ccm::web_pods(&client)
                .await
                .iter()
                .all(|p| p.spec.as_ref().unwrap().node_name.is_none()),
            "Pods scheduled on uninitialized Nodes"
        );

        let (_ccm, metrics) = spawn_ccm(&env, &vpc, &[]);
        for (i, (ip, id)) in ips.iter().zip(&instances).enumerate() {
            let name = format!("node-{}", i + 1);
            let dns = format!("ip-{}.ec2.internal", ip.replace('.', "-"));
            eventually(&format!("{name} is initialized"), WAIT, || async {
                let Some(n) = common::nodes::get(&client, &name).await else {
                    return Ok(false);
                };
                let a = addresses(&n);
                Ok(n.spec.as_ref().and_then(|s| s.provider_id.as_deref())
                    == Some(&format!("aws:///us-east-1a/{id}"))
                    && label(&n, "topology.kubernetes.io/zone") == Some("us-east-1a")
                    && label(&n, "topology.kubernetes.io/region") == Some("us-east-1")
                    && label(&n, "node.kubernetes.io/instance-type") == Some("m5.large")
                    && a.contains(&("InternalIP".into(), ip.clone()))
                    && a.contains(&("InternalDNS".into(), dns.clone()))
                    && !tainted(&n, UNINITIALIZED))
            })
            .await
            .unwrap();
        }
        common::ccm::wait_web_ready(&client, 2, WAIT).await;
        common::nodes::wait_init_warning(&client, "orphan", WAIT).await;
        assert!(tainted(&common::nodes::get(&client, "orphan").await.unwrap(), UNINITIALIZED));

        // Stopped: the machine stops (its kubelet with it), the Node goes
        // NotReady, and is tainted shut down; started again, the taint goes.
        let node_2 = &env.nodes()[1];
        aws.ec2.stop_instances().instance_ids(&instances[1]).send().await.unwrap();
        node_2.stop_kubelet();
        eventually("node-2 is tainted shut down", WAIT, || async {
            Ok(common::nodes::get(&client, "node-2").await.is_some_and(|n| tainted(&n, SHUTDOWN)))
        })
        .await
        .unwrap();
        aws.ec2.start_instances().instance_ids(&instances[1]).send().await.unwrap();
        node_2.start_kubelet().unwrap();
        eventually("node-2 runs again, untainted", WAIT, || async {
            Ok(common::nodes::get(&client, "node-2").await.is_some_and(|n| {
                !tainted(&n, SHUTDOWN) && cnlb_localstack_tests::node::is_ready(&n)
            }))
        })
        .await
        .unwrap();

        // Terminated: the Node goes.
        aws.ec2.terminate_instances().instance_ids(&instances[1]).send().await.unwrap();
        node_2.stop_kubelet();
        eventually("node-2 is deleted", WAIT, || async {
            Ok(common::nodes::get(&client, "node-2").await.is_none())
        })
        .await
        .unwrap();
        assert!(common::nodes::get(&client, "node-1").await.is_some());
        let calls = common::metric(metrics, "cnlb_cloud_api_calls_total", &["DescribeInstances"]).await;
        println!("DescribeInstances calls in all: {calls}");
    });
}

/// 200 Nodes (objects, as 200 kubelets would register them, named by their
/// instances' private DNS names) are initialized with a few DescribeInstances
/// calls; then each sync period costs one call per 200 Nodes.
#[test]
fn two_hundred_nodes_are_initialized_with_few_calls() {
    runtime().block_on(async {
        let env = Env::builder("aws-200-nodes").kube().moto().start().await.unwrap();
        let client = env.kube().unwrap().admin_client().unwrap();
        let aws = common::clients_for(&env.aws().unwrap()).await;
        let (vpc, subnet) = vpc(&aws, "10.1.0.0/16", "10.1.0.0/20").await;
        let image = image(&aws).await;
        let run = aws
            .ec2
            .run_instances()
            .image_id(&image)
            .instance_type(InstanceType::T3Micro)
            .subnet_id(&subnet)
            .min_count(200)
            .max_count(200)
            .send()
            .await
            .unwrap();
        let (_ccm, metrics) = spawn_ccm(&env, &vpc, &["--node-status-update-frequency=5s"]);
        let nodes: Api<Node> = Api::all(client.clone());
        for i in run.instances() {
            let node: Node = serde_json::from_value(json!({
                "metadata": {"name": i.private_dns_name().unwrap()},
                "spec": {"taints": [{"key": UNINITIALIZED, "value": "true", "effect": "NoSchedule"}]},
            }))
            .unwrap();
            nodes.create(&PostParams::default(), &node).await.unwrap();
        }
        let describes = || async {
            common::metric(metrics, "cnlb_cloud_api_calls_total", &["DescribeInstances"]).await
        };
        eventually("200 Nodes initialized", WAIT, || async {
            let list = nodes.list(&ListParams::default()).await?;
            Ok(list.items.len() == 200
                && list.items.iter().all(|n| {
                    !tainted(n, UNINITIALIZED)
                        && n.spec.as_ref().and_then(|s| s.provider_id.as_ref()).is_some()
                }))
        })
        .await
        .unwrap();
        let init = describes().await;
        println!("200 Nodes initialized with {init} DescribeInstances calls");
        assert!(init <= 40.0, "{init} calls for 200 Nodes");
        // The next 10 s: two address syncs (every 5 s) and ten lifecycle
        // checks (every 1 s) of these Nodes, which report no Ready: one
        // call per 200 Nodes each.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let per_period = describes().await - init;
        println!("then {per_period} calls in 10 s: 2 address syncs and 10 lifecycle checks of 200 Nodes");
        assert!(per_period <= 14.0, "{per_period} calls in 10 s");
    });
}
