//! cnlb's GCE emulator driven through the real `google-cloud-compute-v1`
//! clients (anonymous credentials, `with_endpoint`): asynchronous
//! operations and the library's poller, NEG limits (500 endpoints per call)
//! and paging, alias IP ranges and NIC fingerprints, 403 rateLimitExceeded
//! as the caller sees it, health that follows real probes (TCP and HTTP,
//! 127.0.0.x listeners and a real Pod), requestId deduplication,
//! resources refused deletion while in use, and instances listed page by
//! page, stopped, started and deleted.

#![allow(clippy::unwrap_used)] // test code: a failed call should fail the test

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use cnlb_gce_emulator::{
    Fault, GceEmulator, GceOptions, NamedRange, QuotaGroup, SeedAliasRange, SeedInstance,
};
use cnlb_localstack_tests::{Env, EnvBuilder, NodeConfig, eventually};
use google_cloud_compute_v1::client::{
    Addresses, Firewalls, ForwardingRules, GlobalOperations, Instances, NetworkEndpointGroups,
    RegionBackendServices, RegionHealthChecks, RegionOperations, RegionTargetTcpProxies, Regions,
    Subnetworks, ZoneOperations,
};
use google_cloud_compute_v1::model as m;
use google_cloud_gax::error::Error as GaxError;
use google_cloud_gax::error::rpc::StatusDetails;
use google_cloud_gax::exponential_backoff::{ExponentialBackoff, ExponentialBackoffBuilder};
use google_cloud_lro::Poller;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(20);

fn fast_polling() -> ExponentialBackoff {
    ExponentialBackoffBuilder::new()
        .with_initial_delay(Duration::from_millis(20))
        .with_maximum_delay(Duration::from_millis(100))
        .build()
        .unwrap()
}

macro_rules! client {
    ($ty:ty, $gce:expr) => {
        <$ty>::builder()
            .with_endpoint($gce.endpoint())
            .with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build())
            .with_polling_backoff_policy(fast_polling())
            .build()
            .await
            .unwrap()
    };
}

struct Gce {
    emu: GceEmulator,
    project: String,
    region: String,
    zone: String,
    regions: Regions,
    subnetworks: Subnetworks,
    instances: Instances,
    negs: NetworkEndpointGroups,
    zone_ops: ZoneOperations,
    region_ops: RegionOperations,
    global_ops: GlobalOperations,
    health_checks: RegionHealthChecks,
    backend_services: RegionBackendServices,
    proxies: RegionTargetTcpProxies,
    forwarding_rules: ForwardingRules,
    addresses: Addresses,
    firewalls: Firewalls,
}

impl Gce {
    async fn new(emu: GceEmulator) -> Gce {
        Gce {
            project: emu.project().to_string(),
            region: emu.region().to_string(),
            zone: emu.zones()[0].clone(),
            regions: client!(Regions, emu),
            subnetworks: client!(Subnetworks, emu),
            instances: client!(Instances, emu),
            negs: client!(NetworkEndpointGroups, emu),
            zone_ops: client!(ZoneOperations, emu),
            region_ops: client!(RegionOperations, emu),
            global_ops: client!(GlobalOperations, emu),
            health_checks: client!(RegionHealthChecks, emu),
            backend_services: client!(RegionBackendServices, emu),
            proxies: client!(RegionTargetTcpProxies, emu),
            forwarding_rules: client!(ForwardingRules, emu),
            addresses: client!(Addresses, emu),
            firewalls: client!(Firewalls, emu),
            emu,
        }
    }

    fn link(&self, path: &str) -> String {
        self.emu.link(path)
    }

    /// Creates a GCE_VM_IP_PORT NEG in the first zone and waits for it.
    async fn neg(&self, name: &str) {
        let op = self
            .negs
            .insert()
            .set_project(&self.project)
            .set_zone(&self.zone)
            .set_body(
                m::NetworkEndpointGroup::new()
                    .set_name(name)
                    .set_network_endpoint_type(
                        m::network_endpoint_group::NetworkEndpointType::from("GCE_VM_IP_PORT"),
                    )
                    .set_network(self.link(&format!("global/networks/{}", self.emu.network())))
                    .set_default_port(8080),
            )
            .poller()
            .until_done()
            .await
            .unwrap();
        assert_done_ok(&op);
    }

    async fn attach(
        &self,
        neg: &str,
        eps: Vec<m::NetworkEndpoint>,
    ) -> Result<m::Operation, GaxError> {
        self.negs
            .attach_network_endpoints()
            .set_project(&self.project)
            .set_zone(&self.zone)
            .set_network_endpoint_group(neg)
            .set_body(
                m::NetworkEndpointGroupsAttachEndpointsRequest::new().set_network_endpoints(eps),
            )
            .poller()
            .until_done()
            .await
    }

    async fn detach(
        &self,
        neg: &str,
        eps: Vec<m::NetworkEndpoint>,
    ) -> Result<m::Operation, GaxError> {
        self.negs
            .detach_network_endpoints()
            .set_project(&self.project)
            .set_zone(&self.zone)
            .set_network_endpoint_group(neg)
            .set_body(
                m::NetworkEndpointGroupsDetachEndpointsRequest::new().set_network_endpoints(eps),
            )
            .poller()
            .until_done()
            .await
    }

    /// Every endpoint of the NEG (all pages), with health when `show`.
    async fn endpoints(
        &self,
        neg: &str,
        show: bool,
        page: u32,
    ) -> Vec<m::NetworkEndpointWithHealthStatus> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let status = if show { "SHOW" } else { "SKIP" };
            let resp = self
                .negs
                .list_network_endpoints()
                .set_project(&self.project)
                .set_zone(&self.zone)
                .set_network_endpoint_group(neg)
                .set_max_results(page)
                .set_page_token(token.clone())
                .set_body(
                    m::NetworkEndpointGroupsListEndpointsRequest::new().set_health_status(
                        m::network_endpoint_groups_list_endpoints_request::HealthStatus::from(
                            status,
                        ),
                    ),
                )
                .send()
                .await
                .unwrap();
            assert!(resp.items.len() <= page as usize);
            out.extend(resp.items);
            match resp.next_page_token {
                Some(t) if !t.is_empty() => token = t,
                _ => return out,
            }
        }
    }

    async fn instance(&self, name: &str) -> m::Instance {
        self.instances
            .get()
            .set_project(&self.project)
            .set_zone(&self.zone)
            .set_instance(name)
            .send()
            .await
            .unwrap()
    }

    async fn update_nic(
        &self,
        name: &str,
        nic: m::NetworkInterface,
    ) -> Result<m::Operation, GaxError> {
        self.instances
            .update_network_interface()
            .set_project(&self.project)
            .set_zone(&self.zone)
            .set_instance(name)
            .set_network_interface("nic0")
            .set_body(nic)
            .poller()
            .until_done()
            .await
    }

    async fn tcp_health_check(&self, name: &str, healthy: i32) -> String {
        let op = self
            .health_checks
            .insert()
            .set_project(&self.project)
            .set_region(&self.region)
            .set_body(
                m::HealthCheck::new()
                    .set_name(name)
                    .set_type(m::health_check::Type::from("TCP"))
                    .set_check_interval_sec(1)
                    .set_timeout_sec(1)
                    .set_healthy_threshold(healthy)
                    .set_unhealthy_threshold(2)
                    .set_tcp_health_check(m::TCPHealthCheck::new().set_port_specification(
                        m::tcp_health_check::PortSpecification::from("USE_SERVING_PORT"),
                    )),
            )
            .poller()
            .until_done()
            .await
            .unwrap();
        assert_done_ok(&op);
        op.target_link.unwrap()
    }

    async fn backend_service(
        &self,
        name: &str,
        negs: &[&str],
        hc: Option<&str>,
    ) -> Result<m::Operation, GaxError> {
        let backends: Vec<m::Backend> = negs
            .iter()
            .map(|n| {
                m::Backend::new()
                    .set_group(self.link(&format!("zones/{}/networkEndpointGroups/{n}", self.zone)))
                    .set_balancing_mode(m::backend::BalancingMode::from("CONNECTION"))
                    .set_max_connections_per_endpoint(100)
            })
            .collect();
        self.backend_services
            .insert()
            .set_project(&self.project)
            .set_region(&self.region)
            .set_body(
                m::BackendService::new()
                    .set_name(name)
                    .set_load_balancing_scheme(m::backend_service::LoadBalancingScheme::from(
                        "EXTERNAL_MANAGED",
                    ))
                    .set_protocol(m::backend_service::Protocol::from("TCP"))
                    .set_backends(backends)
                    .set_health_checks(hc.map(str::to_string)),
            )
            .poller()
            .until_done()
            .await
    }
}

fn ep(instance: &str, ip: &str, port: i32) -> m::NetworkEndpoint {
    m::NetworkEndpoint::new()
        .set_instance(instance)
        .set_ip_address(ip)
        .set_port(port)
}

fn assert_done_ok(op: &m::Operation) {
    assert_eq!(op.status, Some(m::operation::Status::Done), "{op:?}");
    assert!(op.error.is_none(), "operation failed: {op:?}");
}

/// The HTTP status and `errors[0].reason` of a failed call: how a caller
/// reads them from the client library's error.
fn status_and_reason(e: &GaxError) -> (Option<u16>, Option<String>) {
    let reason = e.status().and_then(|s| {
        s.details.iter().find_map(|d| match d {
            StatusDetails::ErrorInfo(info) => Some(info.reason.clone()),
            _ => None,
        })
    });
    (e.http_status_code(), reason)
}

/// Options of these tests: the environment's defaults plus a `pods`
/// secondary range and a `lo` range on loopback for real listeners.
fn options() -> GceOptions {
    let mut o = EnvBuilder::default_gce_options();
    o.secondary_ranges = vec![
        NamedRange::new("pods", "10.250.0.0/16").unwrap(),
        NamedRange::new("lo", "127.0.0.0/16").unwrap(),
    ];
    o
}

async fn start(name: &str, opts: GceOptions) -> (Env, Gce) {
    let env = Env::builder(name).gce_options(opts).start().await.unwrap();
    let gce = Gce::new(env.gce().unwrap()).await;
    (env, gce)
}

async fn seed(gce: &Gce, name: &str, ip: &str, alias: Option<(&str, &str)>) -> m::Instance {
    gce.emu
        .seed(&SeedInstance {
            zone: gce.zone.clone(),
            name: name.into(),
            network_ip: ip.into(),
            alias_ip_ranges: alias
                .map(|(cidr, range)| SeedAliasRange {
                    ip_cidr_range: cidr.into(),
                    subnetwork_range_name: Some(range.into()),
                })
                .into_iter()
                .collect(),
            ..SeedInstance::default()
        })
        .await
        .unwrap()
}

#[tokio::test]
async fn operations_complete_and_poll() {
    let mut opts = options();
    // Long enough to look at an operation before it completes.
    opts.operation_delay_ms = 600;
    let (_env, gce) = start("gce-ops", opts).await;

    let region = gce
        .regions
        .get()
        .set_project(&gce.project)
        .set_region(&gce.region)
        .send()
        .await
        .unwrap();
    assert_eq!(region.zones.len(), 3);
    assert!(
        region.zones[0].ends_with("/zones/us-central1-a"),
        "{:?}",
        region.zones
    );
    let subnet = gce
        .subnetworks
        .get()
        .set_project(&gce.project)
        .set_region(&gce.region)
        .set_subnetwork("nodes")
        .send()
        .await
        .unwrap();
    assert_eq!(subnet.ip_cidr_range.as_deref(), Some("10.0.0.0/16"));
    let ranges: Vec<_> = subnet
        .secondary_ip_ranges
        .iter()
        .map(|r| {
            (
                r.range_name.clone().unwrap(),
                r.ip_cidr_range.clone().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ranges,
        [
            ("pods".to_string(), "10.250.0.0/16".to_string()),
            ("lo".to_string(), "127.0.0.0/16".to_string())
        ]
    );

    // Sent, not polled: PENDING, and the NEG does not exist until DONE.
    let op = gce
        .negs
        .insert()
        .set_project(&gce.project)
        .set_zone(&gce.zone)
        .set_body(
            m::NetworkEndpointGroup::new()
                .set_name("neg-a")
                .set_default_port(80),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(op.kind.as_deref(), Some("compute#operation"));
    assert_eq!(op.operation_type.as_deref(), Some("insert"));
    assert_eq!(op.status, Some(m::operation::Status::Pending));
    assert!(
        op.zone
            .as_deref()
            .unwrap()
            .ends_with("/zones/us-central1-a")
    );
    assert!(
        op.target_link
            .as_deref()
            .unwrap()
            .ends_with("/zones/us-central1-a/networkEndpointGroups/neg-a")
    );
    assert!(op.insert_time.is_some() && op.id.is_some());
    let missing = gce
        .negs
        .get()
        .set_project(&gce.project)
        .set_zone(&gce.zone)
        .set_network_endpoint_group("neg-a")
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        status_and_reason(&missing),
        (Some(404), Some("notFound".into()))
    );
    // A second insert of the same name while the first runs: 409 at once.
    let dup = gce
        .negs
        .insert()
        .set_project(&gce.project)
        .set_zone(&gce.zone)
        .set_body(m::NetworkEndpointGroup::new().set_name("neg-a"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        status_and_reason(&dup),
        (Some(409), Some("alreadyExists".into()))
    );
    let name = op.name.clone().unwrap();
    let got = gce
        .zone_ops
        .get()
        .set_project(&gce.project)
        .set_zone(&gce.zone)
        .set_operation(&name)
        .send()
        .await
        .unwrap();
    assert_ne!(got.status, Some(m::operation::Status::Done));
    let done = gce
        .zone_ops
        .wait()
        .set_project(&gce.project)
        .set_zone(&gce.zone)
        .set_operation(&name)
        .send()
        .await
        .unwrap();
    assert_done_ok(&done);
    assert!(done.end_time.is_some());
    let neg = gce
        .negs
        .get()
        .set_project(&gce.project)
        .set_zone(&gce.zone)
        .set_network_endpoint_group("neg-a")
        .send()
        .await
        .unwrap();
    assert_eq!(neg.kind.as_deref(), Some("compute#networkEndpointGroup"));
    assert_eq!(
        neg.network_endpoint_type.as_ref().and_then(|t| t.name()),
        Some("GCE_VM_IP_PORT")
    );
    assert_eq!(neg.size, Some(0));
    assert_eq!(
        neg.self_link.as_deref(),
        Some(
            gce.link("zones/us-central1-a/networkEndpointGroups/neg-a")
                .as_str()
        )
    );

    // Only GCE_VM_IP_PORT NEGs.
    let e = gce
        .negs
        .insert()
        .set_project(&gce.project)
        .set_zone(&gce.zone)
        .set_body(
            m::NetworkEndpointGroup::new()
                .set_name("neg-ip")
                .set_network_endpoint_type(m::network_endpoint_group::NetworkEndpointType::from(
                    "GCE_VM_IP",
                )),
        )
        .send()
        .await
        .unwrap_err();
    assert_eq!(e.http_status_code(), Some(400));

    // The library's poller on regional and global operations.
    let hc = gce
        .health_checks
        .insert()
        .set_project(&gce.project)
        .set_region(&gce.region)
        .set_body(
            m::HealthCheck::new()
                .set_name("hc")
                .set_type(m::health_check::Type::from("TCP"))
                .set_tcp_health_check(m::TCPHealthCheck::new().set_port(8080)),
        )
        .poller()
        .until_done()
        .await
        .unwrap();
    assert_done_ok(&hc);
    assert!(
        hc.region
            .as_deref()
            .unwrap()
            .ends_with("/regions/us-central1")
    );
    let got = gce
        .region_ops
        .get()
        .set_project(&gce.project)
        .set_region(&gce.region)
        .set_operation(hc.name.clone().unwrap())
        .send()
        .await
        .unwrap();
    assert_done_ok(&got);
    let hc = gce
        .health_checks
        .get()
        .set_project(&gce.project)
        .set_region(&gce.region)
        .set_health_check("hc")
        .send()
        .await
        .unwrap();
    // GCE's defaults are filled in.
    assert_eq!(
        (
            hc.check_interval_sec,
            hc.timeout_sec,
            hc.healthy_threshold,
            hc.unhealthy_threshold
        ),
        (Some(5), Some(5), Some(2), Some(2))
    );
    let fw = gce
        .firewalls
        .insert()
        .set_project(&gce.project)
        .set_body(
            m::Firewall::new()
                .set_name("allow-hc")
                .set_network(gce.link("global/networks/cnlb-net"))
                .set_source_ranges(["35.191.0.0/16", "130.211.0.0/22"])
                .set_allowed([m::firewall::Allowed::new()
                    .set_ip_protocol("tcp")
                    .set_ports(["8080"])]),
        )
        .poller()
        .until_done()
        .await
        .unwrap();
    assert_done_ok(&fw);
    assert!(fw.zone.is_none() && fw.region.is_none());
    let got = gce
        .global_ops
        .wait()
        .set_project(&gce.project)
        .set_operation(fw.name.clone().unwrap())
        .send()
        .await
        .unwrap();
    assert_done_ok(&got);
    let fw = gce
        .firewalls
        .get()
        .set_project(&gce.project)
        .set_firewall("allow-hc")
        .send()
        .await
        .unwrap();
    assert_eq!(fw.priority, Some(1000));

    // Errors found while the operation runs land in the operation: the
    // poller returns Ok and the caller reads `error`/`httpErrorStatusCode`.
    let mut fault = Fault::error(
        Some("regionHealthChecks.delete"),
        1,
        409,
        "resourceNotReady",
    );
    fault.in_operation = true;
    gce.emu.inject(&fault).await.unwrap();
    let op = gce
        .health_checks
        .delete()
        .set_project(&gce.project)
        .set_region(&gce.region)
        .set_health_check("hc")
        .poller()
        .until_done()
        .await
        .unwrap();
    assert_eq!(op.status, Some(m::operation::Status::Done));
    assert_eq!(op.http_error_status_code, Some(409));
    let errors = &op.error.as_ref().unwrap().errors;
    assert_eq!(errors[0].code.as_deref(), Some("RESOURCE_NOT_READY"));
    // Not applied: the health check is still there.
    gce.health_checks
        .get()
        .set_project(&gce.project)
        .set_region(&gce.region)
        .set_health_check("hc")
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn network_endpoints_limits_and_paging() {
    let (_env, gce) = start("gce-neg", options()).await;
    seed(&gce, "vm-a", "10.0.0.10", Some(("10.250.0.0/23", "pods"))).await;
    seed(&gce, "vm-b", "10.0.0.11", Some(("10.250.2.0/24", "pods"))).await;
    gce.neg("neg-a").await;

    let ip = |i: u32| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 250, 0, 0)) + i).to_string();
    let five_hundred: Vec<_> = (0..500).map(|i| ep("vm-a", &ip(i), 8080)).collect();
    let mut five_hundred_one = five_hundred.clone();
    five_hundred_one.push(ep("vm-a", &ip(500), 8080));

    // 501 in one call: refused at once, nothing attached.
    let e = gce.attach("neg-a", five_hundred_one).await.unwrap_err();
    let (status, reason) = status_and_reason(&e);
    assert_eq!((status, reason.as_deref()), (Some(400), Some("invalid")));
    assert!(e.status().unwrap().message.contains("500"), "{e}");

    gce.emu.reset_calls().await.unwrap();
    let op = gce.attach("neg-a", five_hundred.clone()).await.unwrap();
    assert_done_ok(&op);
    assert_eq!(op.operation_type.as_deref(), Some("attachNetworkEndpoints"));
    let calls = gce.emu.calls().await.unwrap();
    assert_eq!(calls.get("networkEndpointGroups.attachNetworkEndpoints"), 1);
    assert!(calls.get("zoneOperations.get") >= 1, "{calls:?}");

    // Paged by the caller's maxResults, with page tokens.
    let all = gce.endpoints("neg-a", false, 200).await;
    assert_eq!(all.len(), 500);
    assert!(all.iter().all(|e| e.healths.is_empty()));
    let mut ips: Vec<String> = all
        .iter()
        .map(|e| {
            e.network_endpoint
                .as_ref()
                .unwrap()
                .ip_address
                .clone()
                .unwrap()
        })
        .collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 500);

    // The same endpoint again, and an absent one detached: no-ops.
    assert_done_ok(
        &gce.attach("neg-a", vec![ep("vm-a", &ip(0), 8080)])
            .await
            .unwrap(),
    );
    assert_done_ok(
        &gce.detach("neg-a", vec![ep("vm-a", &ip(501), 8080)])
            .await
            .unwrap(),
    );
    assert_done_ok(
        &gce.detach("neg-a", five_hundred[..100].to_vec())
            .await
            .unwrap(),
    );
    let neg = gce
        .negs
        .get()
        .set_project(&gce.project)
        .set_zone(&gce.zone)
        .set_network_endpoint_group("neg-a")
        .send()
        .await
        .unwrap();
    assert_eq!(neg.size, Some(400));

    // An IP that is neither the instance's primary IP nor in its alias
    // ranges (here: vm-b's): 400 naming the IP and the instance.
    let e = gce
        .attach("neg-a", vec![ep("vm-a", "10.250.2.7", 8080)])
        .await
        .unwrap_err();
    assert_eq!(status_and_reason(&e).0, Some(400));
    let msg = e.status().unwrap().message.clone();
    assert!(msg.contains("10.250.2.7") && msg.contains("vm-a"), "{msg}");
    // The primary IP is fine; so is the port default of the NEG.
    assert_done_ok(
        &gce.attach(
            "neg-a",
            vec![
                m::NetworkEndpoint::new()
                    .set_instance("vm-b")
                    .set_ip_address("10.0.0.11"),
            ],
        )
        .await
        .unwrap(),
    );
    // An instance that does not exist in the NEG's zone.
    let e = gce
        .attach("neg-a", vec![ep("vm-gone", "10.250.0.1", 8080)])
        .await
        .unwrap_err();
    assert_eq!(status_and_reason(&e).0, Some(400));
    let e = gce.attach("neg-missing", vec![]).await.unwrap_err();
    assert_eq!(status_and_reason(&e).0, Some(404));

    // A deleted VM's endpoints leave the NEG.
    gce.emu.delete_instance(&gce.zone, "vm-b").await.unwrap();
    let r = gce.emu.resources().await.unwrap();
    assert_eq!(r.neg(&gce.zone, "neg-a").unwrap().endpoints.len(), 400);
}

#[tokio::test]
async fn alias_ranges_and_fingerprints() {
    let (_env, gce) = start("gce-alias", options()).await;
    seed(&gce, "vm-a", "10.0.0.10", Some(("10.250.0.0/24", "pods"))).await;
    let b = seed(&gce, "vm-b", "10.0.0.11", None).await;
    let nic = b.network_interfaces[0].clone();
    assert_eq!(nic.name.as_deref(), Some("nic0"));
    assert_eq!(nic.network_ip.as_deref(), Some("10.0.0.11"));
    assert!(
        nic.network
            .as_deref()
            .unwrap()
            .ends_with("/global/networks/cnlb-net")
    );
    assert!(
        nic.subnetwork
            .as_deref()
            .unwrap()
            .ends_with("/regions/us-central1/subnetworks/nodes")
    );
    let fp1 = nic.fingerprint.clone().unwrap();
    let want = |cidr: &str| {
        m::NetworkInterface::new().set_alias_ip_ranges([m::AliasIpRange::new()
            .set_ip_cidr_range(cidr)
            .set_subnetwork_range_name("pods")])
    };

    // No fingerprint, or a stale one: 412 conditionNotMet.
    let e = gce.update_nic("vm-b", want("/24")).await.unwrap_err();
    assert_eq!(
        status_and_reason(&e),
        (Some(412), Some("conditionNotMet".into()))
    );
    let e = gce
        .update_nic("vm-b", want("/24").set_fingerprint(b"stale!".to_vec()))
        .await
        .unwrap_err();
    assert_eq!(
        status_and_reason(&e),
        (Some(412), Some("conditionNotMet".into()))
    );

    // Explicit ranges outside the secondary range, or taken: 400.
    let e = gce
        .update_nic("vm-b", want("10.9.0.0/24").set_fingerprint(fp1.clone()))
        .await
        .unwrap_err();
    assert_eq!(status_and_reason(&e).0, Some(400));
    let e = gce
        .update_nic("vm-b", want("10.250.0.128/25").set_fingerprint(fp1.clone()))
        .await
        .unwrap_err();
    assert_eq!(status_and_reason(&e).0, Some(400));
    assert!(e.status().unwrap().message.contains("vm-a"), "{e}");
    let e = gce
        .update_nic(
            "vm-b",
            m::NetworkInterface::new()
                .set_fingerprint(fp1.clone())
                .set_alias_ip_ranges([m::AliasIpRange::new()
                    .set_ip_cidr_range("/24")
                    .set_subnetwork_range_name("nope")]),
        )
        .await
        .unwrap_err();
    assert_eq!(status_and_reason(&e).0, Some(400));

    // "/24" with the fresh fingerprint: a free /24 of the range, allocated.
    let op = gce
        .update_nic("vm-b", want("/24").set_fingerprint(fp1.clone()))
        .await
        .unwrap();
    assert_done_ok(&op);
    assert_eq!(op.operation_type.as_deref(), Some("updateNetworkInterface"));
    let nic = gce.instance("vm-b").await.network_interfaces[0].clone();
    let fp2 = nic.fingerprint.clone().unwrap();
    assert_ne!(fp1, fp2);
    let range = nic.alias_ip_ranges[0].ip_cidr_range.clone().unwrap();
    assert_eq!(range, "10.250.1.0/24", "first /24 not overlapping vm-a's");
    assert_eq!(
        nic.alias_ip_ranges[0].subnetwork_range_name.as_deref(),
        Some("pods")
    );

    // The old fingerprint is stale now.
    let e = gce
        .update_nic("vm-b", want("/23").set_fingerprint(fp1))
        .await
        .unwrap_err();
    assert_eq!(status_and_reason(&e).0, Some(412));
    // Keeping the range and adding one: fine with the current fingerprint.
    let both = m::NetworkInterface::new()
        .set_fingerprint(fp2)
        .set_alias_ip_ranges([
            m::AliasIpRange::new()
                .set_ip_cidr_range(range.clone())
                .set_subnetwork_range_name("pods"),
            m::AliasIpRange::new()
                .set_ip_cidr_range("/28")
                .set_subnetwork_range_name("pods"),
        ]);
    assert_done_ok(&gce.update_nic("vm-b", both).await.unwrap());
    let nic = gce.instance("vm-b").await.network_interfaces[0].clone();
    let got: Vec<_> = nic
        .alias_ip_ranges
        .iter()
        .map(|r| r.ip_cidr_range.clone().unwrap())
        .collect();
    assert_eq!(got, ["10.250.1.0/24", "10.250.2.0/28"]);
}

#[tokio::test]
async fn rate_limits_reach_the_caller() {
    let (_env, gce) = start("gce-quota", options()).await;
    seed(&gce, "vm-a", "10.0.0.10", Some(("10.250.0.0/24", "pods"))).await;
    gce.neg("neg-a").await;

    gce.emu
        .fail_next(Some("networkEndpointGroups.attachNetworkEndpoints"), 1)
        .await
        .unwrap();
    let e = gce
        .attach("neg-a", vec![ep("vm-a", "10.250.0.1", 8080)])
        .await
        .unwrap_err();
    assert_eq!(
        status_and_reason(&e),
        (Some(403), Some("rateLimitExceeded".into()))
    );
    let info = e
        .status()
        .unwrap()
        .details
        .iter()
        .find_map(|d| match d {
            StatusDetails::ErrorInfo(i) => Some(i.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(info.domain, "usageLimits");
    // Only that call failed; the retry goes through.
    assert_done_ok(
        &gce.attach("neg-a", vec![ep("vm-a", "10.250.0.1", 8080)])
            .await
            .unwrap(),
    );

    // The API front end's form: status and a google.rpc.ErrorInfo detail.
    let mut fault = Fault::rate_limit(None, 1);
    fault.with_details = true;
    gce.emu.inject(&fault).await.unwrap();
    let e = gce.instance_err("vm-a").await;
    assert_eq!(
        status_and_reason(&e),
        (Some(403), Some("RATE_LIMIT_EXCEEDED".into()))
    );

    // A per-minute quota on reads.
    gce.emu.set_quota(QuotaGroup::Read, Some(3)).await.unwrap();
    for _ in 0..3 {
        gce.instance("vm-a").await;
    }
    let e = gce.instance_err("vm-a").await;
    assert_eq!(
        status_and_reason(&e),
        (Some(403), Some("rateLimitExceeded".into()))
    );
    assert!(e.status().unwrap().message.contains("per minute"), "{e}");
    // Other groups are not affected.
    assert!(gce.endpoints("neg-a", false, 500).await.len() == 1);
    gce.emu.set_quota(QuotaGroup::Read, None).await.unwrap();
    gce.instance("vm-a").await;
    let calls = gce.emu.calls().await.unwrap();
    assert!(calls.get("instances.get") >= 6, "{calls:?}");
    assert_eq!(calls.total, calls.methods.values().sum::<u64>());
}

impl Gce {
    async fn instance_err(&self, name: &str) -> GaxError {
        self.instances
            .get()
            .set_project(&self.project)
            .set_zone(&self.zone)
            .set_instance(name)
            .send()
            .await
            .unwrap_err()
    }

    /// `(ip, port) -> health states` from listNetworkEndpoints with SHOW.
    async fn health(&self, neg: &str) -> Vec<(String, i32, Vec<String>)> {
        self.endpoints(neg, true, 500)
            .await
            .into_iter()
            .map(|e| {
                let ep = e.network_endpoint.unwrap();
                let states = e
                    .healths
                    .iter()
                    .map(|h| {
                        h.health_state
                            .as_ref()
                            .and_then(|s| s.name())
                            .unwrap_or("")
                            .to_string()
                    })
                    .collect();
                (ep.ip_address.unwrap(), ep.port.unwrap(), states)
            })
            .collect()
    }

    async fn state_of(&self, neg: &str, ip: &str) -> Vec<String> {
        self.health(neg)
            .await
            .into_iter()
            .find(|(i, _, _)| i == ip)
            .map(|(_, _, s)| s)
            .unwrap_or_default()
    }
}

async fn wait_state(gce: &Gce, neg: &str, ip: &str, want: &str) {
    eventually(&format!("{ip} is {want}"), WAIT, || async {
        Ok(gce.state_of(neg, ip).await == [want.to_string()])
    })
    .await
    .unwrap();
}

/// Answers `GET /healthz` with 200 and anything else with 503.
async fn http_server(addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let ok = req.starts_with("GET /healthz ");
                let resp = if ok {
                    "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                } else {
                    "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
                };
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    })
}

#[tokio::test]
async fn health_follows_real_probes() {
    let (_env, gce) = start("gce-health", options()).await;
    seed(&gce, "vm-a", "10.0.0.10", Some(("127.0.5.0/24", "lo"))).await;
    gce.neg("neg-a").await;
    gce.neg("neg-b").await;
    // A live listener, and an address where nothing listens.
    let live = tokio::net::TcpListener::bind("127.0.5.10:0").await.unwrap();
    let port = i32::from(live.local_addr().unwrap().port());
    let dead_port = {
        let l = std::net::TcpListener::bind("127.0.5.11:0").unwrap();
        i32::from(l.local_addr().unwrap().port())
    };
    let accept = tokio::spawn(async move {
        loop {
            if live.accept().await.is_err() {
                return;
            }
        }
    });
    assert_done_ok(
        &gce.attach(
            "neg-a",
            vec![
                ep("vm-a", "127.0.5.10", port),
                ep("vm-a", "127.0.5.11", dead_port),
            ],
        )
        .await
        .unwrap(),
    );

    // No backend service, then one without a health check: no `healths`.
    assert!(
        gce.health("neg-a")
            .await
            .iter()
            .all(|(_, _, h)| h.is_empty())
    );
    assert_done_ok(&gce.backend_service("bs-a", &["neg-a"], None).await.unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        gce.health("neg-a")
            .await
            .iter()
            .all(|(_, _, h)| h.is_empty())
    );
    assert!(gce.emu.health().await.unwrap().is_empty());

    // A health check on the backend service: UNKNOWN first, then probed.
    let hc = gce.tcp_health_check("hc-tcp", 3).await;
    let op = gce
        .backend_services
        .patch()
        .set_project(&gce.project)
        .set_region(&gce.region)
        .set_backend_service("bs-a")
        .set_body(m::BackendService::new().set_health_checks([hc.clone()]))
        .poller()
        .until_done()
        .await
        .unwrap();
    assert_done_ok(&op);
    let first = gce.endpoints("neg-a", true, 500).await;
    assert!(first.iter().all(|e| e.healths.len() == 1), "{first:?}");
    let h = &first[0].healths[0];
    assert_eq!(
        h.health_check.as_ref().unwrap().health_check.as_deref(),
        Some(hc.as_str())
    );
    assert!(
        h.backend_service
            .as_ref()
            .unwrap()
            .backend_service
            .as_deref()
            .unwrap()
            .ends_with("/regions/us-central1/backendServices/bs-a")
    );
    assert!(
        first
            .iter()
            .all(|e| e.healths[0].health_state.as_ref().and_then(|s| s.name()) == Some("UNKNOWN")),
        "{first:?}"
    );
    wait_state(&gce, "neg-a", "127.0.5.10", "HEALTHY").await;
    wait_state(&gce, "neg-a", "127.0.5.11", "UNHEALTHY").await;
    // neg-b is in no backend service: still no healths there.
    assert_done_ok(
        &gce.attach("neg-b", vec![ep("vm-a", "127.0.5.10", port)])
            .await
            .unwrap(),
    );
    assert!(
        gce.health("neg-b")
            .await
            .iter()
            .all(|(_, _, h)| h.is_empty())
    );

    // Forced by the admin API, then back to the probes.
    let ip10 = Ipv4Addr::new(127, 0, 5, 10);
    let port16 = u16::try_from(port).unwrap();
    gce.emu
        .force_health(ip10, port16, "UNHEALTHY")
        .await
        .unwrap();
    assert_eq!(gce.state_of("neg-a", "127.0.5.10").await, ["UNHEALTHY"]);
    gce.emu.clear_health(ip10, port16).await.unwrap();
    assert_eq!(gce.state_of("neg-a", "127.0.5.10").await, ["HEALTHY"]);

    // The listener closes: UNHEALTHY after the unhealthy threshold.
    accept.abort();
    let _ = accept.await;
    wait_state(&gce, "neg-a", "127.0.5.10", "UNHEALTHY").await;

    // HTTP: GET requestPath expecting 200.
    let http_addr: SocketAddr = "127.0.5.20:0".parse().unwrap();
    let probe_l = std::net::TcpListener::bind(http_addr).unwrap();
    let http_addr = probe_l.local_addr().unwrap();
    drop(probe_l);
    let server = http_server(http_addr).await;
    let http_port = i32::from(http_addr.port());
    let op = gce
        .health_checks
        .insert()
        .set_project(&gce.project)
        .set_region(&gce.region)
        .set_body(
            m::HealthCheck::new()
                .set_name("hc-http")
                .set_type(m::health_check::Type::from("HTTP"))
                .set_check_interval_sec(1)
                .set_timeout_sec(1)
                .set_http_health_check(
                    m::HTTPHealthCheck::new()
                        .set_port(http_port)
                        .set_request_path("/healthz"),
                ),
        )
        .poller()
        .until_done()
        .await
        .unwrap();
    assert_done_ok(&op);
    // Fixed port: the endpoint's own port does not matter.
    assert_done_ok(
        &gce.attach("neg-b", vec![ep("vm-a", "127.0.5.20", 9)])
            .await
            .unwrap(),
    );
    assert_done_ok(
        &gce.backend_service("bs-b", &["neg-b"], op.target_link.as_deref())
            .await
            .unwrap(),
    );
    wait_state(&gce, "neg-b", "127.0.5.20", "HEALTHY").await;
    let op = gce
        .health_checks
        .patch()
        .set_project(&gce.project)
        .set_region(&gce.region)
        .set_health_check("hc-http")
        .set_body(
            m::HealthCheck::new().set_http_health_check(
                m::HTTPHealthCheck::new()
                    .set_port(http_port)
                    .set_request_path("/broken"),
            ),
        )
        .poller()
        .until_done()
        .await
        .unwrap();
    assert_done_ok(&op);
    wait_state(&gce, "neg-b", "127.0.5.20", "UNHEALTHY").await;
    server.abort();
    let rows = gce.emu.health().await.unwrap();
    assert!(
        rows.iter().any(|r| r.ip == "127.0.5.20" && r.probes > 0),
        "{rows:?}"
    );
}

#[tokio::test]
async fn request_ids_and_in_use_deletes() {
    let (_env, gce) = start("gce-use", options()).await;
    gce.neg("neg-a").await;

    // The same requestId twice: one operation, one health check.
    let rid = "6f1c0b3e-6a53-4d5e-9f0a-2f7b2c9d1e11";
    let insert = |name: &str| {
        gce.health_checks
            .insert()
            .set_project(&gce.project)
            .set_region(&gce.region)
            .set_request_id(rid)
            .set_body(
                m::HealthCheck::new()
                    .set_name(name)
                    .set_type(m::health_check::Type::from("TCP"))
                    .set_tcp_health_check(m::TCPHealthCheck::new().set_port(80)),
            )
    };
    let op1 = insert("hc").send().await.unwrap();
    let op2 = insert("hc").send().await.unwrap();
    assert_eq!(op1.name, op2.name);
    let op3 = insert("hc-other").poller().until_done().await.unwrap();
    assert_eq!(op1.name, op3.name);
    assert_done_ok(&op3);
    let r = gce.emu.resources().await.unwrap();
    let names: Vec<_> = r
        .health_checks
        .iter()
        .map(|h| h.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["hc"]);
    // A request id must be a UUID.
    let e = gce
        .health_checks
        .delete()
        .set_project(&gce.project)
        .set_region(&gce.region)
        .set_health_check("hc")
        .set_request_id("not-a-uuid")
        .send()
        .await
        .unwrap_err();
    assert_eq!(status_and_reason(&e).0, Some(400));

    // References to what does not exist: 400.
    let e = gce
        .backend_service("bs", &["neg-missing"], None)
        .await
        .unwrap_err();
    assert_eq!(status_and_reason(&e).0, Some(400));
    let missing_hc = gce.link("regions/us-central1/healthChecks/nope");
    let e = gce
        .backend_service("bs", &["neg-a"], Some(&missing_hc))
        .await
        .unwrap_err();
    assert_eq!(status_and_reason(&e).0, Some(400));

    let hc = gce.link("regions/us-central1/healthChecks/hc");
    assert_done_ok(
        &gce.backend_service("bs", &["neg-a"], Some(&hc))
            .await
            .unwrap(),
    );
    let bs_link = gce.link("regions/us-central1/backendServices/bs");
    let op = gce
        .proxies
        .insert()
        .set_project(&gce.project)
        .set_region(&gce.region)
        .set_body(
            m::TargetTcpProxy::new()
                .set_name("proxy")
                .set_service(bs_link.clone()),
        )
        .poller()
        .until_done()
        .await
        .unwrap();
    assert_done_ok(&op);
    let addr = gce
        .addresses
        .insert()
        .set_project(&gce.project)
        .set_region(&gce.region)
        .set_body(m::Address::new().set_name("vip"))
        .poller()
        .until_done()
        .await
        .unwrap();
    assert_done_ok(&addr);
    let vip = gce
        .addresses
        .get()
        .set_project(&gce.project)
        .set_region(&gce.region)
        .set_address("vip")
        .send()
        .await
        .unwrap();
    let vip_ip = vip.address.clone().unwrap();
    assert!(vip_ip.starts_with("203.0.113."), "{vip_ip}");
    let fr = |name: &str, ip: Option<String>| {
        gce.forwarding_rules
            .insert()
            .set_project(&gce.project)
            .set_region(&gce.region)
            .set_body(
                m::ForwardingRule::new()
                    .set_name(name)
                    .set_load_balancing_scheme(m::forwarding_rule::LoadBalancingScheme::from(
                        "EXTERNAL_MANAGED",
                    ))
                    .set_port_range("80")
                    .set_target(gce.link("regions/us-central1/targetTcpProxies/proxy"))
                    .set_or_clear_ip_address(ip),
            )
            .poller()
            .until_done()
    };
    assert_done_ok(&fr("fr-vip", addr.target_link.clone()).await.unwrap());
    assert_done_ok(&fr("fr-auto", None).await.unwrap());
    let got = gce
        .forwarding_rules
        .get()
        .set_project(&gce.project)
        .set_region(&gce.region)
        .set_forwarding_rule("fr-vip")
        .send()
        .await
        .unwrap();
    assert_eq!(got.ip_address.as_deref(), Some(vip_ip.as_str()));
    let auto = gce
        .forwarding_rules
        .get()
        .set_project(&gce.project)
        .set_region(&gce.region)
        .set_forwarding_rule("fr-auto")
        .send()
        .await
        .unwrap();
    let auto_ip = auto.ip_address.clone().unwrap();
    assert!(
        auto_ip.starts_with("203.0.113.") && auto_ip != vip_ip,
        "{auto_ip}"
    );
    let vip = gce
        .addresses
        .get()
        .set_project(&gce.project)
        .set_region(&gce.region)
        .set_address("vip")
        .send()
        .await
        .unwrap();
    assert_eq!(vip.users.len(), 1);
    // Labels, with the label fingerprint.
    let op = gce
        .forwarding_rules
        .set_labels()
        .set_project(&gce.project)
        .set_region(&gce.region)
        .set_resource("fr-auto")
        .set_body(
            m::RegionSetLabelsRequest::new()
                .set_label_fingerprint(auto.label_fingerprint.clone().unwrap())
                .set_labels([("cnlb-cluster", "c1")]),
        )
        .poller()
        .until_done()
        .await
        .unwrap();
    assert_done_ok(&op);
    let listed = gce
        .forwarding_rules
        .list()
        .set_project(&gce.project)
        .set_region(&gce.region)
        .set_filter("labels.cnlb-cluster = c1")
        .send()
        .await
        .unwrap();
    let names: Vec<_> = listed
        .items
        .iter()
        .map(|f| f.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["fr-auto"]);

    // In use: each refused with 400 resourceInUseByAnotherResource.
    let in_use = (
        Some(400),
        Some("resourceInUseByAnotherResource".to_string()),
    );
    let e = gce
        .negs
        .delete()
        .set_project(&gce.project)
        .set_zone(&gce.zone)
        .set_network_endpoint_group("neg-a")
        .send()
        .await
        .unwrap_err();
    assert_eq!(status_and_reason(&e), in_use);
    assert!(
        e.status().unwrap().message.contains("backendServices/bs"),
        "{e}"
    );
    let e = gce
        .health_checks
        .delete()
        .set_project(&gce.project)
        .set_region(&gce.region)
        .set_health_check("hc")
        .send()
        .await
        .unwrap_err();
    assert_eq!(status_and_reason(&e), in_use);
    let e = gce
        .backend_services
        .delete()
        .set_project(&gce.project)
        .set_region(&gce.region)
        .set_backend_service("bs")
        .send()
        .await
        .unwrap_err();
    assert_eq!(status_and_reason(&e), in_use);
    let e = gce
        .proxies
        .delete()
        .set_project(&gce.project)
        .set_region(&gce.region)
        .set_target_tcp_proxy("proxy")
        .send()
        .await
        .unwrap_err();
    assert_eq!(status_and_reason(&e), in_use);
    let e = gce
        .addresses
        .delete()
        .set_project(&gce.project)
        .set_region(&gce.region)
        .set_address("vip")
        .send()
        .await
        .unwrap_err();
    assert_eq!(status_and_reason(&e), in_use);

    // Torn down in order, nothing is left.
    for fr in ["fr-vip", "fr-auto"] {
        let op = gce
            .forwarding_rules
            .delete()
            .set_project(&gce.project)
            .set_region(&gce.region)
            .set_forwarding_rule(fr)
            .poller()
            .until_done()
            .await
            .unwrap();
        assert_done_ok(&op);
    }
    let ops = [
        gce.addresses
            .delete()
            .set_project(&gce.project)
            .set_region(&gce.region)
            .set_address("vip")
            .poller()
            .until_done()
            .await,
        gce.proxies
            .delete()
            .set_project(&gce.project)
            .set_region(&gce.region)
            .set_target_tcp_proxy("proxy")
            .poller()
            .until_done()
            .await,
        gce.backend_services
            .delete()
            .set_project(&gce.project)
            .set_region(&gce.region)
            .set_backend_service("bs")
            .poller()
            .until_done()
            .await,
        gce.health_checks
            .delete()
            .set_project(&gce.project)
            .set_region(&gce.region)
            .set_health_check("hc")
            .poller()
            .until_done()
            .await,
        gce.negs
            .delete()
            .set_project(&gce.project)
            .set_zone(&gce.zone)
            .set_network_endpoint_group("neg-a")
            .poller()
            .until_done()
            .await,
    ];
    for op in ops {
        assert_done_ok(&op.unwrap());
    }
    let r = gce.emu.settle(WAIT).await.unwrap();
    assert!(
        r.load_balancing_links().is_empty(),
        "{:?}",
        r.load_balancing_links()
    );
}

impl Gce {
    async fn try_instance(&self, name: &str) -> Result<m::Instance, GaxError> {
        self.instances
            .get()
            .set_project(&self.project)
            .set_zone(&self.zone)
            .set_instance(name)
            .send()
            .await
    }

    async fn status(&self, name: &str) -> String {
        let i = self.try_instance(name).await.unwrap();
        i.status.unwrap().name().unwrap().to_string()
    }

    async fn wait_zone_op(&self, op: &m::Operation) -> m::Operation {
        self.zone_ops
            .wait()
            .set_project(&self.project)
            .set_zone(&self.zone)
            .set_operation(op.name.clone().unwrap())
            .send()
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn instances_list_in_pages_stop_start_and_delete() {
    let mut opts = options();
    // Long enough to see an instance between states.
    opts.operation_delay_ms = 600;
    let (_env, gce) = start("gce-instances", opts).await;
    gce.emu
        .seed(&SeedInstance {
            zone: gce.zone.clone(),
            name: "vm-1".into(),
            network_ip: "10.0.0.21".into(),
            machine_type: Some("n2-standard-4".into()),
            nat_ip: Some("34.118.0.21".into()),
            ..SeedInstance::default()
        })
        .await
        .unwrap();
    seed(&gce, "vm-2", "10.0.0.22", None).await;
    seed(&gce, "vm-3", "10.0.0.23", None).await;

    // Paged: 2, then 1; the fields a node controller reads.
    let page = gce
        .instances
        .list()
        .set_project(&gce.project)
        .set_zone(&gce.zone)
        .set_max_results(2u32)
        .send()
        .await
        .unwrap();
    assert_eq!(page.items.len(), 2);
    let token = page.next_page_token.clone().unwrap();
    let rest = gce
        .instances
        .list()
        .set_project(&gce.project)
        .set_zone(&gce.zone)
        .set_max_results(2u32)
        .set_page_token(token)
        .send()
        .await
        .unwrap();
    assert_eq!(rest.items.len(), 1);
    assert_eq!(rest.next_page_token, None);
    let vm1 = &page.items[0];
    assert_eq!(vm1.name.as_deref(), Some("vm-1"));
    assert!(
        vm1.machine_type
            .as_deref()
            .unwrap()
            .ends_with("/zones/us-central1-a/machineTypes/n2-standard-4")
    );
    assert!(
        vm1.zone
            .as_deref()
            .unwrap()
            .ends_with("/zones/us-central1-a")
    );
    assert_eq!(vm1.status, Some(m::instance::Status::Running));
    let nat = &vm1.network_interfaces[0].access_configs[0];
    assert_eq!(nat.nat_ip.as_deref(), Some("34.118.0.21"));
    assert_eq!(nat.name.as_deref(), Some("External NAT"));
    assert!(
        page.items[1].network_interfaces[0]
            .access_configs
            .is_empty()
    );

    // stop: a zonal operation; STOPPING until it completes, then TERMINATED.
    let op = gce
        .instances
        .stop()
        .set_project(&gce.project)
        .set_zone(&gce.zone)
        .set_instance("vm-1")
        .send()
        .await
        .unwrap();
    assert_eq!(op.operation_type.as_deref(), Some("stop"));
    assert!(
        op.target_link
            .as_deref()
            .unwrap()
            .ends_with("/zones/us-central1-a/instances/vm-1")
    );
    assert!(
        op.zone
            .as_deref()
            .unwrap()
            .ends_with("/zones/us-central1-a")
    );
    assert_eq!(gce.status("vm-1").await, "STOPPING");
    assert_done_ok(&gce.wait_zone_op(&op).await);
    assert_eq!(gce.status("vm-1").await, "TERMINATED");
    // Stopping a stopped instance succeeds and changes nothing.
    let again = gce
        .instances
        .stop()
        .set_project(&gce.project)
        .set_zone(&gce.zone)
        .set_instance("vm-1")
        .poller()
        .until_done()
        .await
        .unwrap();
    assert_done_ok(&again);
    assert_eq!(gce.status("vm-1").await, "TERMINATED");

    // start: STAGING, then RUNNING.
    let op = gce
        .instances
        .start()
        .set_project(&gce.project)
        .set_zone(&gce.zone)
        .set_instance("vm-1")
        .send()
        .await
        .unwrap();
    assert_eq!(op.operation_type.as_deref(), Some("start"));
    assert_eq!(gce.status("vm-1").await, "STAGING");
    assert_done_ok(&gce.wait_zone_op(&op).await);
    assert_eq!(gce.status("vm-1").await, "RUNNING");

    // delete: STOPPING, then gone from get and list.
    let op = gce
        .instances
        .delete()
        .set_project(&gce.project)
        .set_zone(&gce.zone)
        .set_instance("vm-2")
        .send()
        .await
        .unwrap();
    assert_eq!(op.operation_type.as_deref(), Some("delete"));
    assert_eq!(gce.status("vm-2").await, "STOPPING");
    assert_done_ok(&gce.wait_zone_op(&op).await);
    let gone = gce.try_instance("vm-2").await.unwrap_err();
    assert_eq!(
        status_and_reason(&gone),
        (Some(404), Some("notFound".into()))
    );
    let names: Vec<String> = gce
        .instances
        .list()
        .set_project(&gce.project)
        .set_zone(&gce.zone)
        .send()
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|i| i.name)
        .collect();
    assert_eq!(names, ["vm-1", "vm-3"]);

    // What does not exist: 404 at once, no operation.
    let missing = gce
        .instances
        .stop()
        .set_project(&gce.project)
        .set_zone(&gce.zone)
        .set_instance("vm-2")
        .send()
        .await
        .unwrap_err();
    assert_eq!(status_and_reason(&missing).0, Some(404));
    let missing = gce
        .instances
        .delete()
        .set_project(&gce.project)
        .set_zone(&gce.zone)
        .set_instance("vm-9")
        .send()
        .await
        .unwrap_err();
    assert_eq!(status_and_reason(&missing).0, Some(404));

    let calls = gce.emu.calls().await.unwrap();
    assert_eq!(calls.get("instances.stop"), 3);
    assert_eq!(calls.get("instances.start"), 1);
    assert_eq!(calls.get("instances.delete"), 2);
    assert_eq!(calls.get("notServed"), 0);
}

/// With real Nodes, the emulator's `pods` range is the environment's Pod
/// CIDR: each Node is a GCE instance whose alias range is its pod range,
/// and a real Pod (a container of `cnlb-pod-server`) is probed over HTTP at
/// its IP.
#[tokio::test]
async fn pod_ips_are_probed_in_the_pod_network() {
    use k8s_openapi::api::core::v1::Pod;
    use kube::Api;
    use kube::api::{DeleteParams, PostParams};

    let env = Env::builder("gce-pods")
        .nodes(vec![NodeConfig::numbered(1)])
        .gce()
        .agent_backend(cnlb_localstack_tests::AgentBackend::Gcp)
        .start()
        .await
        .unwrap();
    let emu = env.gce().unwrap();
    let pod_cidr = env.pod_cidr().unwrap();
    assert_eq!(emu.secondary_range("pods").unwrap().to_string(), pod_cidr);
    let config = emu.config().await.unwrap();
    assert!(
        config
            .secondary_ranges
            .iter()
            .any(|r| r.name == "pods" && r.cidr.to_string() == pod_cidr)
    );
    let gce = Gce::new(emu).await;
    let node = &env.nodes()[0].config;
    assert_eq!(node.zone, gce.zone, "the first Node is in the first zone");

    let client = env.kube().unwrap().admin_client().unwrap();
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web"},
        "spec": {"containers": [cnlb_localstack_tests::sample_app::container("web", &[8080])]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    eventually("the Pod has an IP", Duration::from_secs(60), || async {
        Ok(pods
            .get("web")
            .await?
            .status
            .and_then(|s| s.pod_ip)
            .is_some())
    })
    .await
    .unwrap();
    let ip = pods
        .get("web")
        .await
        .unwrap()
        .status
        .and_then(|s| s.pod_ip)
        .unwrap();
    assert!(
        ip.starts_with(env.pod_range(0).unwrap().trim_end_matches("0/24")),
        "{ip} from the Node's alias range"
    );

    gce.neg("neg-pods").await;
    assert_done_ok(
        &gce.attach("neg-pods", vec![ep(&node.name, &ip, 8080)])
            .await
            .unwrap(),
    );
    let op = gce
        .health_checks
        .insert()
        .set_project(&gce.project)
        .set_region(&gce.region)
        .set_body(
            m::HealthCheck::new()
                .set_name("hc-pods")
                .set_type(m::health_check::Type::from("HTTP"))
                .set_check_interval_sec(1)
                .set_timeout_sec(1)
                .set_http_health_check(m::HTTPHealthCheck::new().set_port_specification(
                    m::http_health_check::PortSpecification::from("USE_SERVING_PORT"),
                )),
        )
        .poller()
        .until_done()
        .await
        .unwrap();
    assert_done_ok(&op);
    assert_done_ok(
        &gce.backend_service("bs-pods", &["neg-pods"], op.target_link.as_deref())
            .await
            .unwrap(),
    );
    wait_state(&gce, "neg-pods", &ip, "HEALTHY").await;
    pods.delete("web", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    wait_state(&gce, "neg-pods", &ip, "UNHEALTHY").await;
}
