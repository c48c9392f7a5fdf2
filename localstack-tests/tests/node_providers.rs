//! The node providers against the emulators: `AwsNodes` on moto (instances
//! run in a VPC subnet, found by provider ID, private DNS name and IP;
//! stopped is Shutdown, terminated is gone; DescribeInstances counted
//! through the call wrapper's `cnlb_cloud_api_calls_total` for 250 Nodes)
//! and `GcpNodes` on cnlb's GCE emulator (seeded instances in three zones,
//! one `instances.list` per zone and page as the emulator counts them,
//! stopped through `instances.stop` is Shutdown, deleted through
//! `instances.delete` is gone).

#![allow(clippy::unwrap_used)] // test code: a failed call should fail the test

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;

use cnlb_localstack_tests::Env;
use cnlb_localstack_tests::gce::{Fault, SeedInstance};
use cnlb_provider_aws::ec2::types::{InstanceNetworkInterfaceSpecification, InstanceType};
use cnlb_provider_aws::{AwsConfig, AwsProvider, Clients, RateLimit, RateLimits};
use cnlb_provider_core::{
    Instance, InstanceState, NodeAddress, NodeAddressKind, NodeProvider, NodeRef,
};
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;

/// Fast enough that the test does not wait on its own client-side limits.
fn unlimited() -> RateLimits {
    let many = RateLimit::new(1000, 1000);
    RateLimits {
        read: many,
        targets: many,
        write: many,
        operations: many,
        per_window: None,
    }
}

fn calls(registry: &Registry, provider: &str, operation: &str) -> u64 {
    let mut text = String::new();
    encode(&mut text, registry).unwrap();
    let prefix =
        format!(r#"cnlb_cloud_api_calls_total{{provider="{provider}",operation="{operation}"}} "#);
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |n| n.parse().unwrap())
}

fn by_id(provider_id: &str) -> NodeRef {
    NodeRef {
        name: "some-node".into(),
        provider_id: Some(provider_id.into()),
        internal_ips: Vec::new(),
    }
}

fn by_ip(name: &str, ip: &str) -> NodeRef {
    NodeRef {
        name: name.into(),
        provider_id: None,
        internal_ips: vec![ip.parse().unwrap()],
    }
}

fn address(i: &Instance, kind: NodeAddressKind) -> Vec<&str> {
    i.metadata
        .addresses
        .iter()
        .filter(|a| a.kind == kind)
        .map(|a| a.address.as_str())
        .collect()
}

fn provider_ids(found: &[Option<Instance>]) -> Vec<Option<String>> {
    found
        .iter()
        .map(|i| i.as_ref().map(|i| i.metadata.provider_id.clone()))
        .collect()
}

// ---------------------------------------------------------------- AWS

/// An EC2 instance as the test started it.
struct Vm {
    id: String,
    zone: String,
    ip: String,
    dns: String,
}

fn vms(out: &cnlb_provider_aws::ec2::operation::run_instances::RunInstancesOutput) -> Vec<Vm> {
    out.instances()
        .iter()
        .map(|i| Vm {
            id: i.instance_id().unwrap().to_string(),
            zone: i
                .placement()
                .unwrap()
                .availability_zone()
                .unwrap()
                .to_string(),
            ip: i.private_ip_address().unwrap().to_string(),
            dns: i.private_dns_name().unwrap().to_string(),
        })
        .collect()
}

#[test]
fn aws_nodes_in_moto() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let env = Env::builder("node-providers-aws")
            .moto()
            .start()
            .await
            .unwrap();
        common::use_endpoints(&env.aws().unwrap());
        aws_scenario().await;
    });
}

async fn aws_scenario() {
    let c = Clients::from_env().await;
    let vpc = c
        .ec2
        .create_vpc()
        .cidr_block("10.0.0.0/16")
        .send()
        .await
        .unwrap()
        .vpc
        .unwrap()
        .vpc_id
        .unwrap();
    let mut subnets = Vec::new();
    for (zone, cidr) in [
        ("us-east-1a", "10.0.0.0/20"),
        ("us-east-1b", "10.0.16.0/20"),
    ] {
        let subnet = c
            .ec2
            .create_subnet()
            .vpc_id(&vpc)
            .availability_zone(zone)
            .cidr_block(cidr)
            .send()
            .await
            .unwrap();
        subnets.push(subnet.subnet.unwrap().subnet_id.unwrap());
    }
    let images = c.ec2.describe_images().send().await.unwrap();
    let image = images.images()[0].image_id().unwrap().to_string();
    let run = |subnet: &str, count: i32, instance_type: InstanceType| {
        c.ec2
            .run_instances()
            .image_id(&image)
            .instance_type(instance_type)
            .subnet_id(subnet)
            .min_count(count)
            .max_count(count)
            .send()
    };
    let a = vms(&run(&subnets[0], 3, InstanceType::M5Large).await.unwrap());
    // A public instance in the other zone.
    let public = c
        .ec2
        .run_instances()
        .image_id(&image)
        .instance_type(InstanceType::T3Micro)
        .network_interfaces(
            InstanceNetworkInterfaceSpecification::builder()
                .device_index(0)
                .subnet_id(&subnets[1])
                .associate_public_ip_address(true)
                .build(),
        )
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .unwrap();
    let b = vms(&public);

    let mut registry = Registry::default();
    let mut config = AwsConfig::new(&vpc);
    config.rate_limits = unlimited();
    let provider = AwsProvider::new(c.clone(), config, &mut registry);
    let nodes = provider.nodes();
    let describes = |registry: &Registry| calls(registry, "aws", "DescribeInstances");

    // By provider ID (both forms), by private DNS name, by IP; absent.
    let asked = [
        by_id(&format!("aws:///{}/{}", a[0].zone, a[0].id)),
        NodeRef::named(&a[1].dns),
        by_ip("node-by-ip", &a[2].ip),
        by_id(&format!("aws:///{}", b[0].id)),
        by_id("aws:///us-east-1a/i-0123456789abcdef0"),
        NodeRef::named("ip-10-0-9-9.ec2.internal"),
    ];
    let found = nodes.instances(&asked).await.unwrap();
    let want = |vm: &Vm| Some(format!("aws:///{}/{}", vm.zone, vm.id));
    assert_eq!(
        provider_ids(&found),
        [
            want(&a[0]),
            want(&a[1]),
            want(&a[2]),
            want(&b[0]),
            None,
            None
        ]
    );
    let first = found[0].as_ref().unwrap();
    assert_eq!(first.state, InstanceState::Running);
    assert_eq!(first.metadata.instance_type, "m5.large");
    assert_eq!(first.metadata.zone, "us-east-1a");
    assert_eq!(first.metadata.region, "us-east-1");
    assert_eq!(
        first.metadata.addresses[..1],
        [NodeAddress {
            kind: NodeAddressKind::InternalIP,
            address: a[0].ip.clone()
        }]
    );
    assert_eq!(
        address(first, NodeAddressKind::InternalDNS),
        [a[0].dns.as_str()]
    );
    assert_eq!(
        address(first, NodeAddressKind::Hostname),
        [a[0].dns.as_str()]
    );
    assert!(address(first, NodeAddressKind::ExternalIP).is_empty());
    let public = found[3].as_ref().unwrap();
    assert_eq!(public.metadata.instance_type, "t3.micro");
    assert_eq!(public.metadata.zone, "us-east-1b");
    assert_eq!(
        address(public, NodeAddressKind::ExternalIP).len(),
        1,
        "{public:?}"
    );
    assert_eq!(
        address(public, NodeAddressKind::ExternalDNS).len(),
        1,
        "{public:?}"
    );
    println!("moto instance as a Node: {first:#?}\npublic: {public:#?}");

    // Stopped: Shutdown. Terminated: gone, by ID, by name and by IP.
    c.ec2
        .stop_instances()
        .instance_ids(&a[1].id)
        .send()
        .await
        .unwrap();
    c.ec2
        .terminate_instances()
        .instance_ids(&a[2].id)
        .send()
        .await
        .unwrap();
    let asked = [
        by_id(&format!("aws:///{}/{}", a[1].zone, a[1].id)),
        NodeRef::named(&a[1].dns),
        by_id(&format!("aws:///{}/{}", a[2].zone, a[2].id)),
        NodeRef::named(&a[2].dns),
        by_ip("node-by-ip", &a[2].ip),
    ];
    let found = nodes.instances(&asked).await.unwrap();
    let states: Vec<Option<InstanceState>> =
        found.iter().map(|i| i.as_ref().map(|i| i.state)).collect();
    assert_eq!(
        states,
        [
            Some(InstanceState::Shutdown),
            Some(InstanceState::Shutdown),
            None,
            None,
            None
        ]
    );
    // Started again: Running.
    c.ec2
        .start_instances()
        .instance_ids(&a[1].id)
        .send()
        .await
        .unwrap();
    let found = nodes.instances(&asked[..1]).await.unwrap();
    assert_eq!(found[0].as_ref().unwrap().state, InstanceState::Running);

    // 250 Nodes: two DescribeInstances per kind of lookup (200 filter
    // values per call), not 250. By IP comes after the names found none.
    let many = vms(&run(&subnets[0], 250, InstanceType::M5Large).await.unwrap());
    assert_eq!(many.len(), 250);
    let lookups: [(&str, Vec<NodeRef>, u64); 3] = [
        (
            "provider ID",
            many.iter()
                .map(|vm| by_id(&format!("aws:///{}/{}", vm.zone, vm.id)))
                .collect(),
            2,
        ),
        (
            "private DNS name",
            many.iter().map(|vm| NodeRef::named(&vm.dns)).collect(),
            2,
        ),
        (
            "IP (after the name)",
            many.iter()
                .enumerate()
                .map(|(i, vm)| by_ip(&format!("node-{i}"), &vm.ip))
                .collect(),
            4,
        ),
    ];
    for (kind, asked, want) in lookups {
        let before = describes(&registry);
        let found = nodes.instances(&asked).await.unwrap();
        let made = describes(&registry) - before;
        let ids: Vec<String> = provider_ids(&found)
            .into_iter()
            .map(Option::unwrap)
            .collect();
        let expected: Vec<String> = many
            .iter()
            .map(|vm| format!("aws:///{}/{}", vm.zone, vm.id))
            .collect();
        assert_eq!(ids, expected, "by {kind}: every Node, in order");
        println!("250 Nodes by {kind}: {made} DescribeInstances calls");
        assert_eq!(
            made, want,
            "DescribeInstances calls for 250 Nodes by {kind}"
        );
    }
}

// ---------------------------------------------------------------- GCP

/// Instances in zone b beyond one page (500) of `instances.list`.
const MANY: usize = 520;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcp_nodes_in_the_gce_emulator() {
    let env = Env::builder("node-providers-gcp")
        .gce()
        .start()
        .await
        .unwrap();
    let gce = env.gce().unwrap();
    let zones = gce.zones().to_vec();
    let (za, zb, zc) = (&zones[0], &zones[1], &zones[2]);
    gce.seed(&SeedInstance {
        zone: za.clone(),
        name: "node-a".into(),
        network_ip: "10.0.1.1".into(),
        machine_type: Some("n2-standard-8".into()),
        nat_ip: Some("34.118.7.1".into()),
        ..SeedInstance::default()
    })
    .await
    .unwrap();
    gce.seed_instance(zc, "node-c", "10.0.3.1".parse().unwrap())
        .await
        .unwrap();
    gce.seed_instance(zc, "node-c2", "10.0.3.2".parse().unwrap())
        .await
        .unwrap();
    for i in 0..MANY {
        let ip = format!("10.0.{}.{}", 100 + i / 250, 1 + i % 250);
        gce.seed_instance(zb, &format!("node-b-{i}"), ip.parse().unwrap())
            .await
            .unwrap();
    }

    let connection = cnlb_provider_gcp::Connection {
        endpoint: Some(gce.endpoint().to_string()),
    };
    let compute = cnlb_provider_gcp::Compute::connect(&connection)
        .await
        .unwrap();
    let mut registry = Registry::default();
    let calls =
        cnlb_provider_gcp::Calls::new(compute.clone(), gce.project(), &unlimited(), &mut registry);
    let provider = cnlb_provider_gcp::GcpProvider::new(
        calls,
        cnlb_provider_gcp::GcpConfig {
            project: gce.project().to_string(),
            region: gce.region().to_string(),
            network: gce.network().to_string(),
            subnetwork: gce.subnetwork().to_string(),
            // The cluster's zones; Nodes without provider ID are looked
            // for in every zone of the region all the same.
            zones: vec![za.clone()],
            proxy_source_ranges: Vec::new(),
        },
    )
    .await
    .unwrap();
    let nodes = provider.nodes();
    let project = gce.project();
    let id = |zone: &str, name: &str| format!("gce://{project}/{zone}/{name}");

    // By provider ID in one zone: one list of that zone.
    gce.reset_calls().await.unwrap();
    let found = nodes.instances(&[by_id(&id(za, "node-a"))]).await.unwrap();
    assert_eq!(gce.calls().await.unwrap().get("instances.list"), 1);
    let a = found[0].as_ref().unwrap();
    assert_eq!(a.metadata.provider_id, id(za, "node-a"));
    assert_eq!(a.metadata.instance_type, "n2-standard-8");
    assert_eq!(
        (a.metadata.zone.as_str(), a.metadata.region.as_str()),
        (za.as_str(), gce.region())
    );
    assert_eq!(a.state, InstanceState::Running);
    let dns = format!("node-a.{za}.c.{project}.internal");
    assert_eq!(
        a.metadata.addresses,
        [
            NodeAddress {
                kind: NodeAddressKind::InternalIP,
                address: "10.0.1.1".into()
            },
            NodeAddress {
                kind: NodeAddressKind::ExternalIP,
                address: "34.118.7.1".into()
            },
            NodeAddress {
                kind: NodeAddressKind::Hostname,
                address: "node-a".into()
            },
            NodeAddress {
                kind: NodeAddressKind::InternalDNS,
                address: dns
            },
        ]
    );

    // Every kind of lookup at once, over the 520 instances of zone b too:
    // each zone listed once, zone b in two pages.
    let mut asked: Vec<NodeRef> = (0..MANY)
        .map(|i| by_id(&id(zb, &format!("node-b-{i}"))))
        .collect();
    asked.extend([
        NodeRef::named("node-c"),
        NodeRef::named(format!("node-c2.{zc}.c.{project}.internal")),
        by_ip("renamed-a", "10.0.1.1"),
        by_id(&id(za, "no-such-node")),
        NodeRef::named("no-such-node"),
    ]);
    gce.reset_calls().await.unwrap();
    let before = calls_of(&registry);
    let found = nodes.instances(&asked).await.unwrap();
    let counted = gce.calls().await.unwrap();
    println!(
        "{} Nodes in 3 zones: {} instances.list calls ({:?})",
        asked.len(),
        counted.get("instances.list"),
        counted.methods
    );
    assert_eq!(counted.get("instances.list"), 4, "a, b (2 pages), c");
    assert_eq!(counted.total, 4, "nothing but lists: {counted:?}");
    assert_eq!(
        calls_of(&registry) - before,
        4,
        "the wrapper counts the same"
    );
    let mut want: Vec<Option<String>> = (0..MANY)
        .map(|i| Some(id(zb, &format!("node-b-{i}"))))
        .collect();
    want.extend([
        Some(id(zc, "node-c")),
        Some(id(zc, "node-c2")),
        Some(id(za, "node-a")),
        None,
        None,
    ]);
    assert_eq!(provider_ids(&found), want);
    let ips: BTreeSet<IpAddr> = found
        .iter()
        .take(MANY)
        .flat_map(|i| address(i.as_ref().unwrap(), NodeAddressKind::InternalIP))
        .map(|ip| ip.parse().unwrap())
        .collect();
    assert_eq!(ips.len(), MANY, "each Node its own instance");

    // Stopped through the API: Shutdown (GCE's TERMINATED). Deleted: gone.
    let instances = compute.instances.clone();
    let wait = |op: google_cloud_compute_v1::model::Operation| {
        let ops = compute.zone_operations.clone();
        async move {
            ops.wait()
                .set_project(project)
                .set_zone(zc)
                .set_operation(op.name.unwrap())
                .send()
                .await
                .unwrap()
        }
    };
    let op = instances
        .stop()
        .set_project(project)
        .set_zone(zc)
        .set_instance("node-c")
        .send()
        .await
        .unwrap();
    // Stopping is already Shutdown.
    let asked = [by_id(&id(zc, "node-c")), by_id(&id(zc, "node-c2"))];
    let found = nodes.instances(&asked).await.unwrap();
    assert_eq!(found[0].as_ref().unwrap().state, InstanceState::Shutdown);
    let done = wait(op).await;
    assert!(done.error.is_none(), "{done:?}");
    let op = instances
        .delete()
        .set_project(project)
        .set_zone(zc)
        .set_instance("node-c2")
        .send()
        .await
        .unwrap();
    let done = wait(op).await;
    assert!(done.error.is_none(), "{done:?}");
    gce.reset_calls().await.unwrap();
    let found = nodes.instances(&asked).await.unwrap();
    assert_eq!(gce.calls().await.unwrap().get("instances.list"), 1);
    let stopped = found[0].as_ref().unwrap();
    assert_eq!(stopped.state, InstanceState::Shutdown);
    assert_eq!(stopped.metadata.provider_id, id(zc, "node-c"));
    assert_eq!(found[1], None, "deleted");
    let found = nodes
        .instances(&[NodeRef::named("node-c2"), by_ip("x", "10.0.3.2")])
        .await
        .unwrap();
    assert_eq!(found, [None, None]);

    // A failure of the cloud is an error, never "not found". (Throttles
    // are only waited out: the call wrapper slows down and sends again.)
    let unavailable = Fault::error(Some("instances.list"), 10, 503, "backendError");
    gce.inject(&unavailable).await.unwrap();
    let err = nodes.instances(&asked).await.unwrap_err();
    println!("while GCE fails: {err}");
    gce.clear_faults().await.unwrap();
}

fn calls_of(registry: &Registry) -> u64 {
    calls(registry, "gcp", "instances.list")
}
