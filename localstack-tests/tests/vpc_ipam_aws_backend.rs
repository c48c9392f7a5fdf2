//! vpc-ipam's AWS backend driven through the `Backend` trait against moto
//! and then LocalStack's EC2, with its Node (and providerID) in the real
//! kube-apiserver: Pod ENIs created in the tagged pod subnet of the
//! instance's zone and attached, addresses acquired, released (an emptied
//! ENI is deleted) and seen again after a restart; an ENI a crash left
//! unattached attached by `start`; a gone node's detached ENI collected
//! after the grace period and nothing else; lost addresses reassigned, on
//! a new ENI when theirs is gone; prefix delegation where the emulator has
//! it. AWS is reached through `AWS_ENDPOINT_URL_EC2` only.

#![allow(clippy::unwrap_used)] // test code: a failed call should fail the test

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use clap::Parser;
use cnlb_localstack_tests::Env;
use cnlb_provider_aws::Clients;
use cnlb_provider_aws::ec2::types::{
    Filter, InstanceType, NetworkInterface, ResourceType, Tag, TagSpecification,
};
use cnlb_vpc_ipam::backend::aws::{AwsArgs, AwsBackend, TAG_CREATED, TAG_INSTANCE, TAG_NODE};
use cnlb_vpc_ipam::backend::{Assigned, Backend, BackendError};
use cnlb_vpc_ipam::cidr::Cidr;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;
use serde_json::json;

const CLUSTER: &str = "vpc-ipam-test";
const ZONE: &str = "us-east-1a";
const TAG_CLUSTER: &str = "cnlb.dev/cluster";
const POD_SUBNET_TAG: &str = "cnlb.dev/pods";

#[test]
fn aws_backend_in_moto_and_localstack() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let env = Env::builder("vpc-ipam-aws")
            .kube()
            .moto()
            .localstack()
            .start()
            .await
            .unwrap();
        let kube = env.kube().unwrap();
        use_kubeconfig(&kube.kubeconfig);
        let client = kube.admin_client().unwrap();

        common::use_endpoints(&env.aws().unwrap());
        scenario("moto", &client).await;
        // The backend reads the environment when it is built: the next
        // scenario's backends talk to LocalStack.
        common::use_endpoints(&env.localstack().unwrap());
        scenario("localstack", &client).await;
    });
}

/// Points `kube::Client::try_default` (what the backend uses) at the
/// environment's API server; same conditions as `common::use_endpoints`.
#[allow(unsafe_code)]
fn use_kubeconfig(path: &std::path::Path) {
    // SAFETY: a single-test binary on a current-thread runtime, before any
    // client exists; the only other threads are idle blocking-pool threads.
    unsafe { std::env::set_var("KUBECONFIG", path) };
}

#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    aws: AwsArgs,
}

/// The backend's flags as an operator writes them.
fn flags(extra: &[&str]) -> AwsArgs {
    let argv = ["vpc-ipam-agent"].into_iter().chain(extra.iter().copied());
    Flags::try_parse_from(argv).unwrap().aws
}

async fn backend(args: &AwsArgs, node: &str, registry: &mut Registry) -> AwsBackend {
    AwsBackend::new(args, CLUSTER, node, registry)
        .await
        .unwrap()
}

struct Net {
    /// The largest pod subnet of the zone: the tag chooses it.
    pod_subnet: String,
    pod_cidr: Cidr,
    /// A smaller pod subnet in the same zone.
    small_subnet: String,
    small_cidr: Cidr,
    /// A pod subnet in another zone.
    other_zone_subnet: String,
    security_group: String,
    instance: String,
}

async fn network(c: &Clients, tag: &str) -> Net {
    let vpc = c
        .ec2
        .create_vpc()
        .cidr_block("10.0.0.0/16")
        .send()
        .await
        .unwrap();
    let vpc = vpc.vpc.unwrap().vpc_id.unwrap();
    c.ec2
        .associate_vpc_cidr_block()
        .vpc_id(&vpc)
        .cidr_block("100.64.0.0/16")
        .send()
        .await
        .unwrap();
    let subnet = |cidr: &'static str, zone: &'static str, tagged: bool| {
        let vpc = vpc.clone();
        async move {
            let mut create = c
                .ec2
                .create_subnet()
                .vpc_id(&vpc)
                .availability_zone(zone)
                .cidr_block(cidr);
            if tagged {
                create = create.tag_specifications(
                    TagSpecification::builder()
                        .resource_type(ResourceType::Subnet)
                        .tags(Tag::builder().key(POD_SUBNET_TAG).value(tag).build())
                        .build(),
                );
            }
            let out = create.send().await.unwrap();
            out.subnet.unwrap().subnet_id.unwrap()
        }
    };
    let node_subnet = subnet("10.0.1.0/24", ZONE, false).await;
    let pod_subnet = subnet("100.64.0.0/19", ZONE, true).await;
    let small_subnet = subnet("100.64.32.0/20", ZONE, true).await;
    let other_zone_subnet = subnet("100.64.64.0/19", "us-east-1b", true).await;

    let sg = c
        .ec2
        .create_security_group()
        .group_name(format!("pods-{tag}"))
        .description("Pod ENIs")
        .vpc_id(&vpc)
        .send()
        .await
        .unwrap();
    let images = c.ec2.describe_images().send().await.unwrap();
    let image = images.images()[0].image_id().unwrap().to_string();
    let run = c
        .ec2
        .run_instances()
        .image_id(image)
        .instance_type(InstanceType::M5Large)
        .subnet_id(&node_subnet)
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .unwrap();
    Net {
        pod_subnet,
        pod_cidr: "100.64.0.0/19".parse().unwrap(),
        small_subnet,
        small_cidr: "100.64.32.0/20".parse().unwrap(),
        other_zone_subnet,
        security_group: sg.group_id.unwrap(),
        instance: run.instances()[0].instance_id().unwrap().to_string(),
    }
}

async fn create_node(kube: &kube::Client, name: &str, provider_id: Option<String>) {
    let mut node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}});
    if let Some(id) = provider_id {
        node["spec"] = json!({"providerID": id});
    }
    let nodes: Api<Node> = Api::all(kube.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(node).unwrap(),
        )
        .await
        .unwrap();
}

async fn enis(c: &Clients, filters: &[(&str, &str)]) -> Vec<NetworkInterface> {
    let mut describe = c.ec2.describe_network_interfaces();
    for (name, value) in filters {
        describe = describe.filters(Filter::builder().name(*name).values(*value).build());
    }
    describe.send().await.unwrap().network_interfaces().to_vec()
}

async fn eni(c: &Clients, id: &str) -> Option<NetworkInterface> {
    enis(c, &[("network-interface-id", id)]).await.pop()
}

fn tags_of(eni: &NetworkInterface) -> BTreeMap<String, String> {
    eni.tag_set()
        .iter()
        .map(|t| {
            (
                t.key().unwrap().into(),
                t.value().unwrap_or_default().into(),
            )
        })
        .collect()
}

fn secondary_ips(eni: &NetworkInterface) -> BTreeSet<IpAddr> {
    eni.private_ip_addresses()
        .iter()
        .filter(|a| a.primary() != Some(true))
        .map(|a| a.private_ip_address().unwrap().parse().unwrap())
        .collect()
}

/// An ENI made by hand in `subnet` with `tags` and `secondary` addresses,
/// not attached: what a crash between create and attach leaves.
async fn unattached_eni(
    c: &Clients,
    subnet: &str,
    tags: &[(&str, &str)],
    secondary: i32,
) -> String {
    let mut spec = TagSpecification::builder().resource_type(ResourceType::NetworkInterface);
    for (k, v) in tags {
        spec = spec.tags(Tag::builder().key(*k).value(*v).build());
    }
    let mut create = c
        .ec2
        .create_network_interface()
        .subnet_id(subnet)
        .tag_specifications(spec.build());
    if secondary > 0 {
        create = create.secondary_private_ip_address_count(secondary);
    }
    let out = create.send().await.unwrap();
    out.network_interface.unwrap().network_interface_id.unwrap()
}

fn ips_of(assigned: &[Assigned]) -> BTreeSet<IpAddr> {
    assigned.iter().map(|a| a.ip).collect()
}

fn by_holder(assigned: &[Assigned]) -> BTreeMap<String, Vec<IpAddr>> {
    let mut out: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for a in assigned {
        out.entry(a.holder.clone()).or_default().push(a.ip);
    }
    out
}

fn metric(registry: &Registry, operation: &str) -> u64 {
    let mut text = String::new();
    encode(&mut text, registry).unwrap();
    let prefix =
        format!(r#"cnlb_cloud_api_calls_total{{provider="aws",operation="{operation}"}} "#);
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |n| n.parse().unwrap())
}

async fn scenario(name: &str, kube: &kube::Client) {
    let c = Clients::from_env().await;
    let net = network(&c, name).await;
    let instance = net.instance.as_str();
    let node = format!("vpc-ipam-{name}");
    create_node(kube, &node, Some(format!("aws:///{ZONE}/{instance}"))).await;
    let tag_flag = format!("--aws-pod-subnet-tag={POD_SUBNET_TAG}={name}");
    let sg_flag = format!("--aws-pod-security-group={}", net.security_group);
    // Faster than the defaults, so the test does not wait on its own limits.
    let base = [
        tag_flag.as_str(),
        sg_flag.as_str(),
        "--aws-write-rate=50/50",
        "--aws-read-rate=50/50",
    ];

    // Bad configuration is refused by start(), naming what is wrong.
    let unregistered = format!("vpc-ipam-{name}-no-provider-id");
    create_node(kube, &unregistered, None).await;
    let b = backend(&flags(&base), &unregistered, &mut Registry::default()).await;
    let err = b.start().await.unwrap_err();
    assert!(
        matches!(&err, BackendError::Transient(m) if m.contains("providerID")),
        "{err}"
    );
    let wrong_zone = format!("--aws-pod-subnet={ZONE}={}", net.other_zone_subnet);
    let b = backend(&flags(&[&wrong_zone]), &node, &mut Registry::default()).await;
    let err = b.start().await.unwrap_err();
    assert!(
        matches!(&err, BackendError::Permanent(m) if m.contains("--aws-pod-subnet") && m.contains("us-east-1b")),
        "{err}"
    );
    let fixed = format!("--aws-pod-subnet={ZONE}={}", net.small_subnet);
    let b = backend(&flags(&[&fixed]), &node, &mut Registry::default()).await;
    b.start().await.unwrap();
    assert!(b.assigned().await.unwrap().is_empty());

    // Prefix delegation, where the emulator implements it.
    let mut prefixed = base.to_vec();
    prefixed.push("--aws-prefix-delegation");
    let b = backend(&flags(&prefixed), &node, &mut Registry::default()).await;
    b.start().await.unwrap();
    match b.acquire(10, "op-prefix").await {
        Ok(got) => {
            assert_eq!(got.len(), 16, "one /28: {got:?}");
            let prefix = Cidr::new(got[0].ip, 28).unwrap().network();
            assert!(
                got.iter()
                    .all(|a| prefix.contains(&a.ip) && a.subnet == net.pod_cidr)
            );
            b.release(&ips_of(&got).into_iter().collect::<Vec<_>>())
                .await
                .unwrap();
            assert!(b.assigned().await.unwrap().is_empty());
            eprintln!("{name}: prefix delegation works");
        }
        Err(BackendError::Permanent(msg)) if msg.contains("--aws-prefix-delegation") => {
            eprintln!("{name}: no prefix delegation in this emulator: {msg}");
        }
        Err(e) => panic!("{name}: prefix delegation: {e}"),
    }
    // Either way nothing is left behind for the instance.
    assert!(
        enis(&c, &[(&format!("tag:{TAG_INSTANCE}"), instance)])
            .await
            .is_empty()
    );

    // Addresses: m5.large takes 3 ENIs of 10 addresses (DescribeInstanceTypes),
    // so 10 addresses need two Pod ENIs (9 + 1) besides the primary one.
    let mut registry = Registry::default();
    let b = backend(&flags(&base), &node, &mut registry).await;
    b.start().await.unwrap();
    assert!(b.assigned().await.unwrap().is_empty());
    let got = b.acquire(10, "op-1").await.unwrap();
    assert_eq!(got.len(), 10, "{got:?}");
    assert_eq!(ips_of(&got).len(), 10);
    assert!(
        got.iter()
            .all(|a| a.subnet == net.pod_cidr && net.pod_cidr.contains(&a.ip))
    );
    let holders = by_holder(&got);
    let sizes: BTreeSet<usize> = holders.values().map(Vec::len).collect();
    assert_eq!(sizes, BTreeSet::from([1, 9]), "{holders:?}");
    let first = holders
        .iter()
        .find(|(_, v)| v.len() == 9)
        .unwrap()
        .0
        .clone();
    let second = holders
        .iter()
        .find(|(_, v)| v.len() == 1)
        .unwrap()
        .0
        .clone();
    for (id, ips) in &holders {
        let e = eni(&c, id).await.unwrap();
        let a = e.attachment().unwrap();
        assert_eq!(a.instance_id(), Some(instance));
        assert_ne!(a.device_index(), Some(0));
        assert_eq!(e.subnet_id(), Some(net.pod_subnet.as_str()));
        assert!(
            e.groups()
                .iter()
                .any(|g| g.group_id() == Some(&net.security_group))
        );
        let tags = tags_of(&e);
        assert_eq!(tags[TAG_CLUSTER], CLUSTER);
        assert_eq!(tags[TAG_NODE], node);
        assert_eq!(tags[TAG_INSTANCE], instance);
        assert!(tags[TAG_CREATED].parse::<Timestamp>().is_ok(), "{tags:?}");
        assert_eq!(secondary_ips(&e), ips.iter().copied().collect());
        if a.delete_on_termination() != Some(true) {
            eprintln!(
                "{name}: {id}: DeleteOnTermination was set but the emulator does not keep it"
            );
        }
    }
    assert_eq!(metric(&registry, "CreateNetworkInterface"), 2);
    assert_eq!(metric(&registry, "AttachNetworkInterface"), 2);
    assert!(metric(&registry, "ModifyNetworkInterfaceAttribute") >= 2);
    assert_eq!(ips_of(&b.assigned().await.unwrap()), ips_of(&got));

    // Release two of the first ENI and the second ENI's only address: the
    // second ENI is detached and deleted.
    let mut release: Vec<IpAddr> = holders[&first][..2].to_vec();
    release.push(holders[&second][0]);
    b.release(&release).await.unwrap();
    let now = b.assigned().await.unwrap();
    assert_eq!(now.len(), 7);
    assert!(now.iter().all(|a| a.holder == first));
    let released: BTreeSet<IpAddr> = release.iter().copied().collect();
    let kept: BTreeSet<IpAddr> = ips_of(&got).difference(&released).copied().collect();
    assert_eq!(ips_of(&now), kept);
    assert_eq!(secondary_ips(&eni(&c, &first).await.unwrap()), kept);
    assert!(
        eni(&c, &second).await.is_none(),
        "the emptied ENI is deleted"
    );
    // Released addresses already gone count as released.
    b.release(&release).await.unwrap();
    drop(b);

    // A restart sees the same, and attaches an ENI a crash left unattached.
    let created = Timestamp::now().to_string();
    let leftover = unattached_eni(
        &c,
        &net.pod_subnet,
        &[
            (TAG_CLUSTER, CLUSTER),
            (TAG_NODE, &node),
            (TAG_INSTANCE, instance),
            (TAG_CREATED, &created),
        ],
        2,
    )
    .await;
    let leftover_ips = secondary_ips(&eni(&c, &leftover).await.unwrap());
    let b = backend(&flags(&base), &node, &mut Registry::default()).await;
    b.start().await.unwrap();
    let e = eni(&c, &leftover).await.unwrap();
    assert_eq!(e.attachment().unwrap().instance_id(), Some(instance));
    let now = b.assigned().await.unwrap();
    assert_eq!(
        ips_of(&now),
        kept.union(&leftover_ips).copied().collect::<BTreeSet<_>>()
    );

    // Garbage: only the detached ENI of a gone node older than the grace
    // period (default 5 minutes) goes.
    let old = "2020-01-01T00:00:00Z";
    let gone = |created: &'static str, cluster: &'static str| {
        [
            (TAG_CLUSTER, cluster),
            (TAG_NODE, "gone-node"),
            (TAG_INSTANCE, "i-0000dead"),
            (TAG_CREATED, created),
        ]
    };
    let orphan = unattached_eni(&c, &net.pod_subnet, &gone(old, CLUSTER), 0).await;
    let fresh = unattached_eni(
        &c,
        &net.pod_subnet,
        &gone("2999-01-01T00:00:00Z", CLUSTER),
        0,
    )
    .await;
    let foreign = unattached_eni(&c, &net.pod_subnet, &gone(old, "another-cluster"), 0).await;
    let not_vpc_ipam = unattached_eni(
        &c,
        &net.pod_subnet,
        &[(TAG_CLUSTER, CLUSTER), (TAG_CREATED, old)],
        0,
    )
    .await;
    assert_eq!(b.collect_garbage().await.unwrap(), 1);
    assert!(eni(&c, &orphan).await.is_none());
    for kept_eni in [&fresh, &foreign, &not_vpc_ipam, &leftover, &first] {
        assert!(eni(&c, kept_eni).await.is_some(), "{kept_eni} was deleted");
    }
    assert_eq!(b.collect_garbage().await.unwrap(), 0);

    // Reassign: two addresses unassigned by hand come back on their ENI...
    let lost: Vec<Assigned> = now
        .iter()
        .filter(|a| a.holder == first)
        .take(2)
        .cloned()
        .collect();
    c.ec2
        .unassign_private_ip_addresses()
        .network_interface_id(&first)
        .set_private_ip_addresses(Some(lost.iter().map(|a| a.ip.to_string()).collect()))
        .send()
        .await
        .unwrap();
    assert_eq!(b.assigned().await.unwrap().len(), now.len() - 2);
    let held = now.iter().find(|a| a.holder == leftover).unwrap().clone();
    let mut again = lost.clone();
    again.push(held);
    assert_eq!(b.reassign(&again).await.unwrap(), Vec::<IpAddr>::new());
    assert_eq!(ips_of(&b.assigned().await.unwrap()), ips_of(&now));
    let on_first = secondary_ips(&eni(&c, &first).await.unwrap());
    assert!(lost.iter().all(|a| on_first.contains(&a.ip)));

    // ...and, once the first ENI is full, those of an ENI deleted by hand
    // come back on a new ENI.
    let filled = b.acquire(2, "op-2").await.unwrap();
    assert_eq!(filled.len(), 2);
    assert!(filled.iter().all(|a| a.holder == first), "{filled:?}");
    let attachment = eni(&c, &leftover)
        .await
        .unwrap()
        .attachment()
        .unwrap()
        .attachment_id()
        .unwrap()
        .to_string();
    c.ec2
        .detach_network_interface()
        .attachment_id(attachment)
        .send()
        .await
        .unwrap();
    c.ec2
        .delete_network_interface()
        .network_interface_id(&leftover)
        .send()
        .await
        .unwrap();
    let orphaned: Vec<Assigned> = now
        .iter()
        .filter(|a| a.holder == leftover)
        .cloned()
        .collect();
    assert_eq!(orphaned.len(), 2);
    assert_eq!(b.reassign(&orphaned).await.unwrap(), Vec::<IpAddr>::new());
    let after = b.assigned().await.unwrap();
    assert_eq!(after.len(), 11);
    assert_eq!(
        ips_of(&after),
        ips_of(&now).union(&ips_of(&filled)).copied().collect()
    );
    let new_holder = after
        .iter()
        .find(|a| a.ip == orphaned[0].ip)
        .unwrap()
        .holder
        .clone();
    assert!(
        new_holder != leftover && new_holder != first,
        "{new_holder}"
    );
    let new_eni = eni(&c, &new_holder).await.unwrap();
    assert_eq!(tags_of(&new_eni)[TAG_NODE], node);
    assert_eq!(new_eni.attachment().unwrap().instance_id(), Some(instance));

    // The instance takes no more ENIs (3), and a node subnet is no pod
    // subnet: these addresses cannot come back.
    let small = Assigned {
        ip: "100.64.32.10".parse().unwrap(),
        subnet: net.small_cidr,
        holder: "eni-0000gone".into(),
    };
    let node_side = Assigned {
        ip: "10.0.1.50".parse().unwrap(),
        subnet: "10.0.1.0/24".parse().unwrap(),
        holder: "eni-0000gone".into(),
    };
    let failed = b
        .reassign(&[small.clone(), node_side.clone()])
        .await
        .unwrap();
    assert_eq!(
        failed.into_iter().collect::<BTreeSet<_>>(),
        BTreeSet::from([small.ip, node_side.ip])
    );

    // Asked for more than there is room for, the backend fills the new
    // ENI (9 slots, 2 taken) and stops; then the node is full.
    let more = b.acquire(30, "op-3").await.unwrap();
    assert_eq!(more.len(), 7, "{more:?}");
    assert!(more.iter().all(|a| a.holder == new_holder));
    let err = b.acquire(1, "op-4").await.unwrap_err();
    assert!(
        matches!(&err, BackendError::Transient(m) if m.contains("full")),
        "{err}"
    );
}
