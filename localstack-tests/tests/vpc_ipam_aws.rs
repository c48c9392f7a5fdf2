//! vpc-ipam end to end with the AWS backend: the real agent process and
//! CNI plugin, the Node (with its providerID) in the real kube-apiserver,
//! EC2 in moto and then in LocalStack. ADDs on an empty pool wait for the
//! cloud; a Pod in a real netns (ptp + our plugin) serves at an address
//! the cloud assigned; 200 concurrent ADDs get 200 distinct addresses, each assigned to
//! one of the node's Pod ENIs; kill -9 during churn leaves no duplicate and
//! no leak, in the agent and in the cloud; surplus addresses go back; and
//! nothing calls EC2 at rest.

#![allow(clippy::unwrap_used)] // test code

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;
use std::time::Duration;

use cnlb_localstack_tests::ipam::{
    self, Churn, CniCall, IpamAgent, Netns, PTP_CNI_VERSION, ipam_add, ipam_del,
};
use cnlb_localstack_tests::{AwsEndpoints, Env, eventually};
use cnlb_provider_aws::Clients;
use serde_json::Value;

/// Large, because moto (and LocalStack, built on it) picks secondary
/// addresses at random per ENI without looking at the subnet's other ENIs
/// (real EC2 never gives one address to two ENIs).
const POD_CIDR: &str = "100.64.0.0/17";

#[test]
fn aws_agent_in_moto_and_localstack() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let env = Env::builder("vpc-ipam-agent-aws")
            .kube()
            .moto()
            .localstack()
            .start()
            .await
            .unwrap();
        let kube = env.kube().unwrap();
        let client = kube.admin_client().unwrap();
        for (name, endpoints) in [
            ("moto", env.aws().unwrap()),
            ("localstack", env.localstack().unwrap()),
        ] {
            eprintln!("--- {name}");
            scenario(name, &endpoints, &kube.kubeconfig, &client).await;
        }
    });
}

struct Cloud {
    clients: Clients,
    instance: String,
}

async fn cloud(endpoints: &AwsEndpoints, node: &str, kube: &kube::Client) -> Cloud {
    common::use_endpoints(endpoints);
    let clients = Clients::from_env().await;
    let instance = ipam::aws_node(&clients.ec2, kube, node, POD_CIDR)
        .await
        .unwrap();
    Cloud { clients, instance }
}

async fn cloud_addresses(cloud: &Cloud) -> BTreeMap<IpAddr, String> {
    ipam::pod_eni_addresses(&cloud.clients.ec2, &cloud.instance)
        .await
        .unwrap()
}

async fn add(conf: &Value, id: &str) -> Option<String> {
    let run = ipam_add(conf, id).await.unwrap();
    run.ok().then(|| run.ip().unwrap())
}

async fn del(conf: &Value, id: &str) {
    let run = ipam_del(conf, id).await.unwrap();
    assert!(run.ok(), "DEL must succeed: {run:?}");
}

async fn scenario(
    name: &str,
    endpoints: &AwsEndpoints,
    kubeconfig: &std::path::Path,
    kube: &kube::Client,
) {
    let node = format!("ipam-{name}");
    let cloud = cloud(endpoints, &node, kube).await;
    let dir = tempfile::tempdir().unwrap();
    let mut envs: Vec<(String, String)> = endpoints
        .env_vars()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    envs.push(("KUBECONFIG".into(), kubeconfig.display().to_string()));
    let tag = format!("cnlb.dev/pods={node}");
    let mut agent = IpamAgent::start(
        dir.path(),
        &node,
        &[
            "--cluster-name",
            "ipam-test",
            "--backend",
            "aws",
            "--aws-pod-subnet-tag",
            &tag,
            // The host has no ENI links: the emulated VPC tests route.
            "--aws-node-routing=false",
            // The emulators do not enforce instance limits; these are
            // m5.large's own would be 3 ENIs x 10: raised for 200 Pods.
            "--aws-max-enis",
            "8",
            "--aws-ips-per-eni",
            "50",
            "--aws-write-rate",
            "20/40",
            "--aws-read-rate",
            "40/80",
            "--min-target",
            "2",
            "--warm-target",
            "8",
            "--max-target",
            "16",
            "--cooldown",
            "0s",
        ],
        &envs,
    )
    .await
    .unwrap();
    let conf = agent.netconf("1.1.0", "vpc-ipam");

    // The pool fills to the warm target from the cloud.
    eventually("warm pool", Duration::from_secs(60), || async {
        let free = agent.metric("vpc_ipam_addresses{state=\"free\"}").await?;
        Ok(free >= 8.0)
    })
    .await
    .unwrap();

    // A Pod as kubelet makes it: a netns, CNI ADD through Debian's ptp
    // delegating to our plugin, a server inside answering at its address,
    // which is one the cloud assigned to the node.
    let netns = Netns::create(&format!("cnlb-ipam-aws-{name}")).unwrap();
    let ptp = agent.netconf(PTP_CNI_VERSION, "ptp");
    let pod_add = CniCall::new("ptp", "ADD", "pod-in-netns")
        .netns(&netns.path())
        .run(&ptp)
        .await
        .unwrap();
    let pod_ip = pod_add.ip().unwrap();
    assert!(
        cloud_addresses(&cloud)
            .await
            .contains_key(&pod_ip.parse::<IpAddr>().unwrap()),
        "{pod_ip} is not assigned in the cloud"
    );
    let server = netns
        .serve("default/pod", &pod_ip, 8080, dir.path())
        .unwrap();
    assert_eq!(
        ipam::http_get(&pod_ip, 8080).await.unwrap(),
        format!("default/pod {pod_ip}\n")
    );
    let mut with_prev = ptp.clone();
    with_prev["prevResult"] = pod_add.json().unwrap();
    let check = CniCall::new("ptp", "CHECK", "pod-in-netns")
        .netns(&netns.path())
        .run(&with_prev)
        .await
        .unwrap();
    assert!(check.ok(), "{check:?}");
    drop(server);
    let pod_del = CniCall::new("ptp", "DEL", "pod-in-netns")
        .netns(&netns.path())
        .run(&ptp)
        .await
        .unwrap();
    assert!(pod_del.ok(), "{pod_del:?}");
    drop(netns);

    // 200 ADDs at once: most find the pool empty and wait for the cloud.
    let ids: Vec<String> = (0..200).map(|i| format!("{name}-{i}")).collect();
    let ips: Vec<String> = futures::future::join_all(ids.iter().map(|id| add(&conf, id)))
        .await
        .into_iter()
        .map(|ip| ip.expect("ADD waits for the cloud instead of failing"))
        .collect();
    let unique: HashSet<&String> = ips.iter().collect();
    assert_eq!(unique.len(), 200, "duplicates: {ips:?}");
    let in_cloud = cloud_addresses(&cloud).await;
    for ip in &ips {
        let ip: IpAddr = ip.parse().unwrap();
        assert!(
            in_cloud.contains_key(&ip),
            "{ip} is not assigned in the cloud"
        );
        assert!(
            ip.to_string().starts_with("100.64."),
            "{ip} not in the pod subnet"
        );
    }
    assert!(agent.metric("vpc_ipam_add_waits_total").await.unwrap() > 0.0);

    // Churn with three kill -9s; a failed ADD is followed by DEL, as
    // kubelet does.
    let churn = Churn::start(&conf, name, 4);
    agent
        .crash_repeatedly(3, Duration::from_millis(1500))
        .await
        .unwrap();
    let mut live: BTreeMap<String, String> = ids.iter().cloned().zip(ips.iter().cloned()).collect();
    live.extend(churn.stop().await.unwrap().live);
    agent.restart().await.unwrap();
    agent.check_holds_exactly(&live).await.unwrap();

    // The agent's pool is exactly what the cloud has assigned, once the
    // agent has given back the surplus it may find on start.
    eventually("pool and cloud agree", Duration::from_secs(30), || async {
        let pool = pool_size(&agent).await?;
        let releasing = agent
            .metric("vpc_ipam_addresses{state=\"releasing\"}")
            .await?;
        let cloud = cloud_addresses(&cloud).await.len();
        anyhow::ensure!(
            releasing == 0.0 && pool == cloud as f64,
            "pool {pool} ({releasing} releasing), cloud {cloud}"
        );
        Ok(true)
    })
    .await
    .unwrap();
    let in_cloud = cloud_addresses(&cloud).await;
    for ip in live.values() {
        assert!(
            in_cloud.contains_key(&ip.parse::<IpAddr>().unwrap()),
            "{ip} lost in the cloud"
        );
    }

    // Everything released: the surplus goes back to the cloud.
    let keys: BTreeSet<String> = live.keys().cloned().collect();
    futures::future::join_all(keys.iter().map(|id| del(&conf, id))).await;
    eventually("surplus released", Duration::from_secs(60), || async {
        Ok(cloud_addresses(&cloud).await.len() <= 16)
    })
    .await
    .unwrap();

    // At rest, no EC2 call.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let calls = total_calls(&agent).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(total_calls(&agent).await, calls, "EC2 calls at rest");
    agent.kill9();
}

/// Addresses the agent holds: free, allocated or cooling down.
async fn pool_size(agent: &IpamAgent) -> anyhow::Result<f64> {
    let mut sum = 0.0;
    for state in ["free", "allocated", "cooling"] {
        sum += agent
            .metric(&format!("vpc_ipam_addresses{{state=\"{state}\"}}"))
            .await?;
    }
    Ok(sum)
}

async fn total_calls(agent: &IpamAgent) -> f64 {
    agent
        .metrics()
        .await
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("cnlb_cloud_api_calls_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
