//! A Pod in a zone the controller was not told about (`--gcp-zones` names
//! two of the three): its NEG is created on the spot and added to the
//! backend service, the Pod is attached, a restart adds no second backend,
//! and deleting the Service removes that NEG too.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::{ccm, gcp};
use cnlb_localstack_tests::eventually;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(90);

#[test]
fn the_first_pod_in_a_new_zone_gets_its_neg() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cluster = gcp::cluster("gcp-new-zone", 3).await;
        let (env, gce, client) = (&cluster.env, &cluster.gce, &cluster.client);
        let zones = gce.zones().to_vec();
        let known = format!("--gcp-zones={},{}", zones[0], zones[1]);
        let (first, _) = gcp::spawn(env, "cnlb-ccm-1", &[&known]);
        ccm::create_web(client, 3).await;
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        services
            .create(&PostParams::default(), &ccm::service("web", json!({})))
            .await
            .unwrap();

        let neg_zones = || async {
            gce.resources()
                .await
                .unwrap()
                .network_endpoint_groups
                .iter()
                .filter_map(|n| n.network_endpoint_group.zone.clone())
                .map(|z| z.rsplit('/').next().unwrap().to_string())
                .collect::<BTreeSet<String>>()
        };
        eventually(
            "every Pod is attached, in all three zones",
            WAIT,
            || async {
                let pods = ccm::pod_targets(client).await;
                Ok(pods.len() == 3
                    && gcp::all_endpoints(gce).await == pods
                    && neg_zones().await.len() == 3)
            },
        )
        .await
        .unwrap();
        let r = gce.resources().await.unwrap();
        assert_eq!(r.backend_services[0].backends.len(), 3);

        // After a restart the zone is known from the cloud: nothing doubles.
        first.kill();
        let (_second, _) = gcp::spawn(env, "cnlb-ccm-2", &[&known]);
        ccm::scale(client, 4).await;
        eventually("the fourth Pod is attached", WAIT, || async {
            let pods = ccm::pod_targets(client).await;
            Ok(pods.len() == 4 && gcp::all_endpoints(gce).await == pods)
        })
        .await
        .unwrap();
        let r = gce.resources().await.unwrap();
        assert_eq!(r.backend_services[0].backends.len(), 3);
        assert_eq!(r.network_endpoint_groups.len(), 3);

        services
            .delete("web", &DeleteParams::default())
            .await
            .unwrap();
        eventually("nothing is left in GCE", WAIT, || async {
            Ok(gce.resources().await?.load_balancing_links().is_empty()
                && services.get_opt("web").await?.is_none())
        })
        .await
        .unwrap();
    });
}
