//! The emulated VPC datapath bites, with no agent: a "Pod" address
//! (a secondary address of a second ENI, on the node's `lo`) is reached
//! from the load balancer only once a security-group rule admits the LB
//! and the node sends the replies out of the ENI holding the address;
//! replies out of eth0 are dropped by the source/destination check. Each
//! drop is counted on the right ENI. The internet sees the node's own
//! address (no SNAT here), and detaching the ENI in moto unplugs eth1.

#![allow(clippy::unwrap_used)] // test code

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::{Duration, Instant};

use cnlb_localstack_tests::ipam;
use cnlb_localstack_tests::range::RangeLease;
use cnlb_localstack_tests::vpc::{self, EmulatedVpc};
use cnlb_localstack_tests::{Env, eventually};
use cnlb_provider_aws::Clients;
use cnlb_provider_aws::ec2::types::{Filter, IpPermission, IpRange};

const POD_CIDR: &str = "100.64.0.0/17";
const POD_ROUTER: &str = "100.64.0.1";
const PORT: u16 = 8080;

/// `ip -n <ns> <args>`, which must succeed; its stdout.
fn ip(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .arg("-n")
        .arg(ns)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip -n {ns} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn link_exists(ns: &str, name: &str) -> bool {
    Command::new("ip")
        .args(["-n", ns, "link", "show", name])
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn emulated_vpc_enforces_security_groups_and_src_dst_check() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let started = Instant::now();
        let env = Env::builder("emulated-vpc")
            .kube()
            .moto()
            .start()
            .await
            .unwrap();
        common::use_endpoints(&env.aws().unwrap());
        let Clients { ec2, elbv2 } = Clients::from_env().await;
        let kube = env.kube().unwrap().admin_client().unwrap();
        // Namespaces named `cnlb-<k>-...` go with a dead run's leftovers.
        let lease_dir = tempfile::tempdir().unwrap();
        let lease = RangeLease::acquire(lease_dir.path()).unwrap();
        let prefix = format!("cnlb-{}-evpc", lease.k());

        let instance = ipam::aws_node(&ec2, &kube, "evpc", POD_CIDR)
            .await
            .unwrap();
        let described = ec2
            .describe_instances()
            .instance_ids(&instance)
            .send()
            .await
            .unwrap();
        let primary: Ipv4Addr = described.reservations()[0].instances()[0]
            .private_ip_address()
            .unwrap()
            .parse()
            .unwrap();
        // An NLB-like address in the node subnet: replies to it are on-link.
        let lb_address = if primary == Ipv4Addr::new(10, 0, 1, 250) {
            Ipv4Addr::new(10, 0, 1, 251)
        } else {
            Ipv4Addr::new(10, 0, 1, 250)
        };

        let vpc_id = ec2
            .describe_instances()
            .instance_ids(&instance)
            .send()
            .await
            .unwrap()
            .reservations()[0]
            .instances()[0]
            .vpc_id()
            .unwrap()
            .to_string();
        let pod_subnet = ec2
            .describe_subnets()
            .filters(Filter::builder().name("vpc-id").values(&vpc_id).build())
            .filters(Filter::builder().name("cidr-block").values(POD_CIDR).build())
            .send()
            .await
            .unwrap()
            .subnets()[0]
            .subnet_id()
            .unwrap()
            .to_string();
        let eni = ec2
            .create_network_interface()
            .subnet_id(&pod_subnet)
            .send()
            .await
            .unwrap()
            .network_interface
            .unwrap();
        let eni_id = eni.network_interface_id().unwrap().to_string();
        let eni_primary = eni.private_ip_address().unwrap().to_string();
        let sg = eni.groups()[0].group_id().unwrap().to_string();
        ec2.assign_private_ip_addresses()
            .network_interface_id(&eni_id)
            .secondary_private_ip_address_count(2)
            .send()
            .await
            .unwrap();
        let attachment = ec2
            .attach_network_interface()
            .network_interface_id(&eni_id)
            .instance_id(&instance)
            .device_index(1)
            .send()
            .await
            .unwrap()
            .attachment_id
            .unwrap();
        let enis = ec2
            .describe_network_interfaces()
            .filters(
                Filter::builder()
                    .name("attachment.instance-id")
                    .values(&instance)
                    .build(),
            )
            .send()
            .await
            .unwrap();
        let primary_eni = enis
            .network_interfaces()
            .iter()
            .find(|e| e.attachment().unwrap().device_index() == Some(0))
            .unwrap()
            .network_interface_id()
            .unwrap()
            .to_string();
        let pod: Ipv4Addr = enis
            .network_interfaces()
            .iter()
            .find(|e| e.network_interface_id() == Some(eni_id.as_str()))
            .unwrap()
            .private_ip_addresses()
            .iter()
            .find(|a| a.primary() == Some(false))
            .unwrap()
            .private_ip_address()
            .unwrap()
            .parse()
            .unwrap();
        eprintln!(
            "node {instance} at {primary} ({primary_eni}); Pod ENI {eni_id} at {eni_primary}, Pod {pod}; LB {lb_address}"
        );

        let net = EmulatedVpc::start(&prefix, ec2.clone(), elbv2, &instance, lb_address)
            .await
            .unwrap();
        let node = net.node_ns().to_string();
        // The hot-plugged NIC, with moto's MAC, down and bare.
        eventually("eth1 plugged", Duration::from_secs(5), || async {
            Ok(link_exists(&node, "eth1"))
        })
        .await
        .unwrap();
        let eth1 = ip(&node, &["link", "show", "eth1"]);
        let mac = enis
            .network_interfaces()
            .iter()
            .find(|e| e.network_interface_id() == Some(eni_id.as_str()))
            .unwrap()
            .mac_address()
            .unwrap()
            .to_string();
        assert!(eth1.contains(&mac) && eth1.contains("mtu 9001"), "{eth1}");
        assert!(eth1.contains("state DOWN"), "{eth1}");
        // The instance's sysctls are pinned, not the host's.
        let rp_filter = Command::new("ip")
            .args(["netns", "exec", &node, "cat", "/proc/sys/net/ipv4/conf/eth1/rp_filter"])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&rp_filter.stdout).trim(), "2");

        // What an agent would do for the ENI; the "Pod" on lo.
        ip(&node, &["addr", "add", &format!("{eni_primary}/17"), "dev", "eth1"]);
        ip(&node, &["link", "set", "eth1", "up"]);
        ip(&node, &["addr", "add", &format!("{pod}/32"), "dev", "lo"]);
        let _server = vpc::serve_peer_address(&node, IpAddr::V4(pod), PORT).unwrap();
        assert_eq!(
            vpc::http_get_in(&node, IpAddr::V4(pod), PORT).await.unwrap(),
            format!("{pod}\n"),
            "the server answers locally"
        );
        let from_lb = || vpc::http_get_in(net.lb_ns(), IpAddr::V4(pod), PORT);

        // 1. No security-group rule admits the LB.
        let before = net.drops().unwrap();
        let err = from_lb().await.expect_err("no rule admits the LB");
        let after1 = net.drops().unwrap();
        eprintln!("1: {err:#}; drops {after1:?}");
        assert!(after1.sg(&eni_id) > before.sg(&eni_id), "{after1:?}");
        assert_eq!(after1.src_dst(&primary_eni), before.src_dst(&primary_eni));

        // 2. Admitted, but the node answers out of eth0 (main table): the
        // source/destination check of the primary ENI drops the replies.
        ec2.authorize_security_group_ingress()
            .group_id(&sg)
            .ip_permissions(
                IpPermission::builder()
                    .ip_protocol("tcp")
                    .from_port(i32::from(PORT))
                    .to_port(i32::from(PORT))
                    .ip_ranges(IpRange::builder().cidr_ip(format!("{lb_address}/32")).build())
                    .build(),
            )
            .send()
            .await
            .unwrap();
        net.sync().await.unwrap();
        let err = from_lb().await.expect_err("replies leave by eth0");
        let after2 = net.drops().unwrap();
        eprintln!("2: {err:#}; drops {after2:?}");
        assert!(
            after2.src_dst(&primary_eni) > after1.src_dst(&primary_eni),
            "{after2:?}"
        );
        assert!(
            after2.sg(&eni_id) >= after1.sg(&eni_id),
            "counters survive rule changes: {after2:?}"
        );

        // 3. Replies from the Pod's address leave by the ENI holding it.
        let pod_s = pod.to_string();
        ip(&node, &["rule", "add", "from", &pod_s, "lookup", "100"]);
        ip(
            &node,
            &[
                "route", "add", "default", "via", POD_ROUTER, "dev", "eth1", "onlink", "table",
                "100",
            ],
        );
        assert_eq!(from_lb().await.unwrap(), format!("{lb_address}\n"));
        let after3 = net.drops().unwrap();
        assert_eq!(after3.sg(&eni_id), after2.sg(&eni_id), "{after3:?}");

        // 4. The internet sees the node's address: nothing SNATs here.
        let internet = IpAddr::V4(net.internet_address());
        let _inet_server = vpc::serve_peer_address(net.inet_ns(), internet, PORT).unwrap();
        assert_eq!(
            vpc::http_get_in(&node, internet, PORT).await.unwrap(),
            format!("{primary}\n")
        );

        // The host's loopback services, from the node (as an agent there
        // reaches moto), and the node's from the host.
        let host = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host_port = host.local_addr().unwrap().port();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Ok((mut s, _)) = host.accept().await {
                let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\nhost\n").await;
            }
        });
        net.expose_to_node(host_port).await.unwrap();
        assert_eq!(
            vpc::http_get_in(&node, IpAddr::V4(Ipv4Addr::LOCALHOST), host_port)
                .await
                .unwrap(),
            "host\n"
        );
        let node_port = cnlb_localstack_tests::process::free_port().unwrap();
        let _in_node =
            vpc::serve_peer_address(&node, IpAddr::V4(Ipv4Addr::LOCALHOST), node_port).unwrap();
        let forward = vpc::forward_from_host(&node, node_port).await.unwrap();
        let body = reqwest::get(format!("http://{}/", forward.addr()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(body, "127.0.0.1\n");

        // Detached in moto: the NIC and its routes are gone.
        ec2.detach_network_interface()
            .attachment_id(&attachment)
            .send()
            .await
            .unwrap();
        net.sync().await.unwrap();
        assert!(!link_exists(&node, "eth1"));
        assert_eq!(ip(net.vpc_ns(), &["route", "show", &format!("{pod}/32")]), "");
        let last = net.drops().unwrap();
        assert_eq!(last.sg(&eni_id), after3.sg(&eni_id), "kept after unplug");

        let vpc_ns = net.vpc_ns().to_string();
        drop(net);
        assert!(!std::path::Path::new(&format!("/run/netns/{vpc_ns}")).exists());
        eprintln!("emulated VPC test took {:?}", started.elapsed());
    });
}
