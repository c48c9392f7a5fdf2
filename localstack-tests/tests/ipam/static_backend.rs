//! vpc-ipam end to end with the static backend: the real agent process,
//! our CNI plugin run as a runtime runs it, Debian's ptp plugin in real
//! network namespaces. Each test has its own agent, socket, state and
//! range (10.24x.0.0/24), so they run in parallel.

#![allow(clippy::unwrap_used)] // test code

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::{Duration, Instant};

use cnlb_localstack_tests::ipam::{
    Churn, ChurnResult, CniCall, IpamAgent, Netns, PTP_CNI_VERSION, http_get, ipam_add, ipam_del,
};
use serde_json::json;
use tempfile::TempDir;

async fn agent(range: &str, extra: &[&str]) -> (TempDir, IpamAgent) {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec![
        "--cluster-name",
        "test",
        "--backend",
        "static",
        "--static-range",
        range,
    ];
    args.extend_from_slice(extra);
    let agent = IpamAgent::start(dir.path(), "node-1", &args, &[])
        .await
        .unwrap();
    (dir, agent)
}

fn allocated_metric() -> &'static str {
    "vpc_ipam_addresses{state=\"allocated\"}"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_adds_and_dels_never_share_an_address() {
    let (_dir, agent) = agent("10.240.0.0/24", &["--cooldown", "0s"]).await;
    let conf = agent.netconf("1.1.0", "vpc-ipam");

    // 200 ADDs at once.
    let ids: Vec<String> = (0..200).map(|i| format!("c{i}")).collect();
    let adds = ids.iter().map(|id| {
        let conf = conf.clone();
        async move { ipam_add(&conf, id).await }
    });
    let ips: Vec<String> = futures::future::join_all(adds)
        .await
        .into_iter()
        .map(|r| r.unwrap().ip().unwrap())
        .collect();
    let unique: HashSet<&String> = ips.iter().collect();
    assert_eq!(unique.len(), 200, "duplicate addresses: {ips:?}");
    assert_eq!(agent.metric(allocated_metric()).await.unwrap(), 200.0);

    // Churn: 100 DELs and 50 new ADDs at once.
    let dels = ids[..100].iter().map(|id| {
        let conf = conf.clone();
        async move { ipam_del(&conf, id).await.map(|r| (None::<String>, r)) }
    });
    let new_ids: Vec<String> = (200..250).map(|i| format!("c{i}")).collect();
    let adds = new_ids.iter().map(|id| {
        let conf = conf.clone();
        async move {
            let r = ipam_add(&conf, id).await;
            r.map(|r| (Some(id.clone()), r))
        }
    });
    let (del_results, add_results) = futures::future::join(
        futures::future::join_all(dels),
        futures::future::join_all(adds),
    )
    .await;
    for r in del_results {
        let (_, run) = r.unwrap();
        assert!(run.ok(), "{run:?}");
    }
    let mut live: BTreeMap<String, String> = ids[100..]
        .iter()
        .cloned()
        .zip(ips[100..].iter().cloned())
        .collect();
    for r in add_results {
        let (id, run) = r.unwrap();
        live.insert(id.unwrap(), run.ip().unwrap());
    }
    let unique: HashSet<&String> = live.values().collect();
    assert_eq!(
        unique.len(),
        150,
        "duplicate addresses among live containers"
    );
    assert_eq!(agent.metric(allocated_metric()).await.unwrap(), 150.0);

    // A retried ADD gets the address it already has.
    let again = ipam_add(&conf, "c150").await.unwrap();
    assert_eq!(again.ip().unwrap(), live["c150"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_churn_leaves_no_duplicate_and_no_leak() {
    let (_dir, mut agent) = agent("10.241.0.0/24", &["--cooldown", "0s"]).await;
    let conf = agent.netconf("1.0.0", "vpc-ipam");

    // 8 workers each run ADD then DEL on fresh containers, as a runtime
    // does; a failed ADD is followed by DEL, as kubelet does.
    let churn = Churn::start(&conf, "churn", 8);
    agent
        .crash_repeatedly(3, Duration::from_millis(700))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ChurnResult {
        live,
        adds,
        failed_adds: failed,
    } = churn.stop().await.unwrap();
    // The crashes really hit the churn: some ADDs found no agent.
    assert!(adds > 100 && failed > 0, "{adds} ADDs, {failed} failed");
    eprintln!("{adds} ADDs, {failed} failed while the agent was down");
    // One more crash with everything quiet, to read the state from disk.
    agent.restart().await.unwrap();

    assert!(!live.is_empty());
    // No duplicate, no leak: the agent holds exactly the live containers'
    // addresses.
    agent.check_holds_exactly(&live).await.unwrap();
    for (id, ip) in &live {
        let again = ipam_add(&conf, id).await.unwrap();
        assert_eq!(
            &again.ip().unwrap(),
            ip,
            "{id} changed address across crashes"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn del_while_the_agent_is_down_is_delivered_when_it_is_back() {
    let (_dir, mut agent) = agent("10.242.0.0/24", &["--cooldown", "0s"]).await;
    let conf = agent.netconf("1.0.0", "vpc-ipam");
    for id in ["a", "b"] {
        ipam_add(&conf, id).await.unwrap().ip().unwrap();
    }
    agent.kill9();

    let del = ipam_del(&conf, "a").await.unwrap();
    assert!(del.ok(), "{del:?}");
    assert!(del.stdout.is_empty(), "{del:?}");
    assert!(del.stderr.contains("queued"), "{del:?}");
    // DEL of something never allocated succeeds too.
    let del = ipam_del(&conf, "never").await.unwrap();
    assert!(del.ok(), "{del:?}");
    // ADD while down asks the runtime to retry.
    let add = ipam_add(&conf, "c").await.unwrap();
    assert_eq!(add.json().unwrap()["code"], 11, "{add:?}");

    agent.restart().await.unwrap();
    assert_eq!(agent.metric(allocated_metric()).await.unwrap(), 1.0);
    let check = CniCall::new("vpc-ipam", "CHECK", "a")
        .netns("/var/run/netns/x")
        .run(&conf)
        .await
        .unwrap();
    assert_eq!(check.json().unwrap()["code"], 3, "{check:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_through_ptp_detects_a_missing_address() {
    let (_dir, agent) = agent("10.243.0.0/24", &[]).await;
    let netns = Netns::create("cnlb-ipam-check").unwrap();
    let conf = agent.netconf(PTP_CNI_VERSION, "ptp");
    let add = CniCall::new("ptp", "ADD", "chk")
        .netns(&netns.path())
        .run(&conf)
        .await
        .unwrap();
    let ip = add.ip().unwrap();
    let mut with_prev = conf.clone();
    with_prev["prevResult"] = add.json().unwrap();

    let check = CniCall::new("ptp", "CHECK", "chk")
        .netns(&netns.path())
        .run(&with_prev)
        .await
        .unwrap();
    assert!(check.ok(), "{check:?}");

    // The address vanishes from the Pod's interface: ptp's CHECK sees it.
    netns
        .exec(&["ip", "addr", "del", &format!("{ip}/24"), "dev", "eth0"])
        .unwrap();
    let check = CniCall::new("ptp", "CHECK", "chk")
        .netns(&netns.path())
        .run(&with_prev)
        .await
        .unwrap();
    assert!(!check.ok(), "{check:?}");

    // The allocation vanishes from the agent: our CHECK sees it.
    let mut ipam_prev = agent.netconf(PTP_CNI_VERSION, "vpc-ipam");
    ipam_prev["prevResult"] = add.json().unwrap();
    let del = ipam_del(&ipam_prev, "chk").await.unwrap();
    assert!(del.ok(), "{del:?}");
    let check = CniCall::new("vpc-ipam", "CHECK", "chk")
        .netns(&netns.path())
        .run(&ipam_prev)
        .await
        .unwrap();
    assert_eq!(check.json().unwrap()["code"], 3, "{check:?}");
    assert!(
        check.json().unwrap()["msg"]
            .as_str()
            .unwrap()
            .contains("no address is allocated"),
        "{check:?}"
    );

    // A previous result naming another address is a mismatch.
    let add = CniCall::new("vpc-ipam", "ADD", "chk")
        .netns(&netns.path())
        .run(&ipam_prev)
        .await
        .unwrap();
    let mut wrong = ipam_prev.clone();
    wrong["prevResult"]["ips"][0]["address"] = json!("10.243.0.250/24");
    let check = CniCall::new("vpc-ipam", "CHECK", "chk")
        .netns(&netns.path())
        .run(&wrong)
        .await
        .unwrap();
    assert_eq!(check.json().unwrap()["code"], 3, "{check:?} after {add:?}");
    CniCall::new("ptp", "DEL", "chk")
        .netns(&netns.path())
        .run(&conf)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_frees_the_allocations_of_containers_that_are_gone() {
    let (_dir, agent) = agent("10.244.0.0/24", &[]).await;
    let conf = agent.netconf("1.1.0", "vpc-ipam");
    for id in ["keep", "gone-1", "gone-2"] {
        ipam_add(&conf, id).await.unwrap().ip().unwrap();
    }
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "keep", "ifname": "eth0"}]);
    let run = CniCall::new("vpc-ipam", "GC", "").run(&gc).await.unwrap();
    assert!(run.ok(), "{run:?}");
    assert_eq!(agent.metric(allocated_metric()).await.unwrap(), 1.0);
    for (id, ok) in [("keep", true), ("gone-1", false), ("gone-2", false)] {
        let check = CniCall::new("vpc-ipam", "CHECK", id)
            .netns("/var/run/netns/x")
            .run(&conf)
            .await
            .unwrap();
        assert_eq!(check.ok(), ok, "{id}: {check:?}");
    }
    // GC without the list would take everything for stale: refused.
    let run = CniCall::new("vpc-ipam", "GC", "").run(&conf).await.unwrap();
    assert_eq!(run.json().unwrap()["code"], 7, "{run:?}");
    assert_eq!(agent.metric(allocated_metric()).await.unwrap(), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_gets_clear_cni_errors() {
    let (_dir, agent) = agent("10.245.0.0/24", &[]).await;
    let good = agent.netconf("1.0.0", "vpc-ipam");
    let add = || CniCall::new("vpc-ipam", "ADD", "m").netns("/var/run/netns/x");

    let cases: Vec<(Vec<u8>, u64, &str)> = vec![
        (b"{not json".to_vec(), 6, "cannot decode"),
        (json!({"cniVersion": "9.9.9", "name": "n", "type": "ptp", "ipam": {"type": "vpc-ipam"}}).to_string().into_bytes(), 1, "9.9.9"),
        (json!({"cniVersion": "1.0.0", "name": "n", "type": "ptp"}).to_string().into_bytes(), 7, "ipam"),
        (json!({"cniVersion": "1.0.0", "name": "n", "type": "ptp", "ipam": {"type": "vpc-ipam", "subnet": "10.0.0.0/8"}}).to_string().into_bytes(), 2, "ipam.subnet"),
        (json!({"cniVersion": "1.0.0", "name": "n", "type": "ptp", "ipam": {"type": "vpc-ipam", "agentSocket": "relative.sock"}}).to_string().into_bytes(), 7, "agentSocket"),
    ];
    for (stdin, code, needle) in cases {
        let run = add().run_raw(&stdin).await.unwrap();
        assert_eq!(run.code, Some(1), "{run:?}");
        let err = run.json().unwrap();
        assert_eq!(err["code"], code, "{run:?}");
        assert!(err.to_string().contains(needle), "{needle}: {run:?}");
    }
    // A missing CNI variable is named.
    let mut no_ifname = add();
    no_ifname.ifname = "";
    let run = no_ifname.run(&good).await.unwrap();
    assert_eq!(run.json().unwrap()["code"], 4, "{run:?}");
    assert!(run.stdout.contains("CNI_IFNAME"), "{run:?}");
    // Nothing was allocated by any of it.
    assert_eq!(agent.metric(allocated_metric()).await.unwrap(), 0.0);

    // The agent names a bad flag and exits 2.
    let out = std::process::Command::new(
        cnlb_localstack_tests::paths::workspace_bin("vpc-ipam-agent").unwrap(),
    )
    .args([
        "--node-name",
        "n",
        "--cluster-name",
        "c",
        "--backend",
        "static",
        "--static-range",
        "10.1.0.7/24",
    ])
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--static-range") && stderr.contains("10.1.0.0/24"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_address_cools_down_and_an_empty_pool_makes_add_wait() {
    // A /29 has 5 usable addresses.
    let (_dir, agent) = agent(
        "10.246.0.0/29",
        &["--cooldown", "3s", "--add-timeout", "20s"],
    )
    .await;
    let conf = agent.netconf("1.0.0", "vpc-ipam");
    let mut ips = BTreeSet::new();
    for i in 0..5 {
        let ip = CniCall::new("vpc-ipam", "ADD", &format!("p{i}"))
            .netns("/var/run/netns/x")
            .run(&conf)
            .await
            .unwrap()
            .ip()
            .unwrap();
        ips.insert(ip);
    }
    assert_eq!(ips.len(), 5);
    let released = ipam_add(&conf, "p0").await.unwrap().ip().unwrap();
    assert!(ipam_del(&conf, "p0").await.unwrap().ok());

    // The only address left is cooling: ADD waits for the cooldown instead
    // of failing, then gets it.
    let started = Instant::now();
    let add = ipam_add(&conf, "late").await.unwrap();
    let waited = started.elapsed();
    assert_eq!(add.ip().unwrap(), released);
    assert!(
        waited >= Duration::from_millis(2500),
        "reused after {waited:?}"
    );
    assert!(agent.metric("vpc_ipam_add_waits_total").await.unwrap() >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_pool_fails_add_with_try_again_later_after_the_timeout() {
    let (_dir, agent) = agent(
        "10.247.0.0/30",
        &["--cooldown", "10m", "--add-timeout", "1s"],
    )
    .await;
    let conf = agent.netconf("1.0.0", "vpc-ipam");
    ipam_add(&conf, "only").await.unwrap().ip().unwrap();
    let add = ipam_add(&conf, "more").await.unwrap();
    let err = add.json().unwrap();
    assert_eq!(err["code"], 11, "{add:?}");
    assert!(
        err["details"].as_str().unwrap().contains("1 allocated"),
        "{add:?}"
    );
    let status = CniCall::new("vpc-ipam", "STATUS", "")
        .run(&conf)
        .await
        .unwrap();
    assert_eq!(status.json().unwrap()["code"], 50, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_in_the_pods_netns_answers_at_its_address() {
    let (dir, agent) = agent("10.248.0.0/24", &[]).await;
    let netns = Netns::create("cnlb-ipam-serve").unwrap();
    let conf = agent.netconf(PTP_CNI_VERSION, "ptp");
    let add = CniCall::new("ptp", "ADD", "srv")
        .netns(&netns.path())
        .run(&conf)
        .await
        .unwrap();
    let ip = add.ip().unwrap();
    assert!(ip.starts_with("10.248.0."), "{ip}");

    // A server inside the namespace, reached from the host at the Pod's
    // address through the veth and the host route ptp installed.
    let _server = netns.serve("default/srv", &ip, 8080, dir.path()).unwrap();
    assert_eq!(
        http_get(&ip, 8080).await.unwrap(),
        format!("default/srv {ip}\n")
    );
    let del = CniCall::new("ptp", "DEL", "srv")
        .netns(&netns.path())
        .run(&conf)
        .await
        .unwrap();
    assert!(del.ok(), "{del:?}");
    assert_eq!(agent.metric(allocated_metric()).await.unwrap(), 0.0);
}
