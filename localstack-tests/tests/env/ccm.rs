//! The `cnlb-ccm` binary runs against the real API server: it becomes ready
//! once the API answers, serves metrics, and stops cleanly on SIGTERM.

use crate::common;

use std::time::Duration;

use cnlb_localstack_tests::process::{Proc, free_port};
use cnlb_localstack_tests::{Env, eventually};

#[tokio::test]
async fn ccm_is_ready_against_the_real_api_server_and_stops_on_sigterm() {
    let env = Env::builder("ccm").kube().start().await.unwrap();
    let port = free_port().unwrap();
    let mut cmd = common::ccm::command(&env, "vpc-0123");
    cmd.arg("--leader-elect=false")
        .arg(format!("--metrics-bind-address=127.0.0.1:{port}"));
    let ccm = Proc::spawn("cnlb-ccm", cmd, &env.dir).unwrap();

    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    ccm.wait_ready(Duration::from_secs(30), || async {
        let r = http.get(format!("{base}/readyz")).send().await?;
        anyhow::ensure!(r.status().is_success(), "readyz: {}", r.status());
        Ok(())
    })
    .await
    .unwrap();
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("cnlb_kube_api_reachable 1"), "{metrics}");
    assert!(metrics.contains("cnlb_build_info"), "{metrics}");

    ccm.terminate();
    eventually(
        "cnlb-ccm exits after SIGTERM",
        Duration::from_secs(15),
        || async { Ok(ccm.try_status()?.is_some()) },
    )
    .await
    .unwrap();
    assert!(
        ccm.try_status().unwrap().unwrap().success(),
        "{}",
        ccm.log().display()
    );
}
