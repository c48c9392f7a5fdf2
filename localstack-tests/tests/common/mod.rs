//! AWS scenarios shared by the emulator tests. A binary with a single test
//! points this process's SDK at its emulator through `AWS_ENDPOINT_URL_*`
//! ([`use_endpoints`]) and takes `Clients::from_env()`, the product's own
//! configuration path; binaries with several tests at once build their
//! clients explicitly ([`clients_for`]).

#![allow(clippy::unwrap_used)] // test code: a failed call should fail the test
#![allow(dead_code)] // each test binary uses a part of it

pub mod ccm;
pub mod chaos;
pub mod gcp;
pub mod nodes;

use std::collections::BTreeSet;

use cnlb_localstack_tests::AwsEndpoints;
use cnlb_provider_aws::Clients;
use cnlb_provider_aws::ec2::types::{Filter, ResourceType, Tag, TagSpecification};
use cnlb_provider_aws::elbv2::types::{
    Action, ActionTypeEnum, LoadBalancerSchemeEnum, LoadBalancerTypeEnum, ProtocolEnum,
    TargetDescription, TargetTypeEnum,
};

/// Points this process's AWS SDK at `endpoints` through the standard variables.
///
/// Call only from a test binary's single test, on a current-thread runtime,
/// before any AWS client exists: no other thread reads the environment then.
#[allow(unsafe_code)]
pub fn use_endpoints(endpoints: &AwsEndpoints) {
    for (k, v) in endpoints.env_vars() {
        // SAFETY: see above; the only other threads are idle blocking-pool threads.
        unsafe { std::env::set_var(k, v) };
    }
}

/// Clients of `endpoints` for the test's own calls, configured explicitly:
/// several tests of one binary run at once, each with its own moto, so the
/// process environment ([`use_endpoints`]) cannot name one. (The controller
/// processes still get their endpoints from the standard variables.)
pub async fn clients_for(endpoints: &AwsEndpoints) -> Clients {
    let config = |url: &str| {
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(url)
            .region(aws_config::Region::new(cnlb_localstack_tests::aws::REGION))
            .test_credentials()
            .load()
    };
    Clients {
        ec2: cnlb_provider_aws::ec2::Client::new(&config(&endpoints.ec2).await),
        elbv2: cnlb_provider_aws::elbv2::Client::new(&config(&endpoints.elbv2).await),
    }
}

/// Sum of a counter family in the controller's /metrics whose lines
/// contain every one of `filters`.
pub async fn metric(addr: std::net::SocketAddr, name: &str, filters: &[&str]) -> f64 {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && filters.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub struct Network {
    pub vpc: String,
    /// Node subnets (primary CIDR), one per AZ: where the NLB lives.
    pub node_subnets: Vec<(String, String)>,
    /// Pod subnets in the VPC's secondary CIDR, one per AZ.
    pub pod_subnets: Vec<(String, String)>,
    /// Secondary IPs assigned to an ENI in the first pod subnet.
    pub pod_ips: Vec<String>,
}

fn tags(kind: ResourceType, name: &str) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(kind)
        .tags(Tag::builder().key("Name").value(name).build())
        .tags(
            Tag::builder()
                .key("cnlb.dev/cluster")
                .value("localstack-tests")
                .build(),
        )
        .build()
}

/// A VPC with a secondary CIDR (100.64.0.0/16), node and pod subnets in two
/// AZs, and an ENI with secondary IPs in a pod subnet, as vpc-ipam will make.
pub async fn ec2_network(c: &Clients) -> Network {
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

    let described = c.ec2.describe_vpcs().vpc_ids(&vpc).send().await.unwrap();
    let cidrs: BTreeSet<String> = described.vpcs()[0]
        .cidr_block_association_set()
        .iter()
        .filter_map(|a| a.cidr_block.clone())
        .collect();
    assert_eq!(
        cidrs,
        BTreeSet::from(["10.0.0.0/16".into(), "100.64.0.0/16".into()])
    );

    let mut node_subnets = Vec::new();
    let mut pod_subnets = Vec::new();
    for (i, az) in ["us-east-1a", "us-east-1b"].iter().enumerate() {
        let node = c
            .ec2
            .create_subnet()
            .vpc_id(&vpc)
            .availability_zone(*az)
            .cidr_block(format!("10.0.{}.0/24", i + 1))
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Subnet)
                    .tags(
                        Tag::builder()
                            .key("Name")
                            .value(format!("nodes-{az}"))
                            .build(),
                    )
                    // Where load balancers go, found by tag as on EKS.
                    .tags(
                        Tag::builder()
                            .key("kubernetes.io/role/internal-elb")
                            .value("1")
                            .build(),
                    )
                    .tags(
                        Tag::builder()
                            .key("kubernetes.io/role/elb")
                            .value("1")
                            .build(),
                    )
                    .build(),
            )
            .send()
            .await
            .unwrap();
        node_subnets.push((node.subnet.unwrap().subnet_id.unwrap(), az.to_string()));
        let pod = c
            .ec2
            .create_subnet()
            .vpc_id(&vpc)
            .availability_zone(*az)
            .cidr_block(format!("100.64.{}.0/19", i * 32))
            .tag_specifications(tags(ResourceType::Subnet, &format!("pods-{az}")))
            .send()
            .await
            .unwrap();
        pod_subnets.push((pod.subnet.unwrap().subnet_id.unwrap(), az.to_string()));
    }

    let eni = c
        .ec2
        .create_network_interface()
        .subnet_id(&pod_subnets[0].0)
        .description("cnlb pod ENI")
        .tag_specifications(tags(ResourceType::NetworkInterface, "pods"))
        .send()
        .await
        .unwrap();
    let eni = eni.network_interface.unwrap().network_interface_id.unwrap();
    c.ec2
        .assign_private_ip_addresses()
        .network_interface_id(&eni)
        .secondary_private_ip_address_count(4)
        .send()
        .await
        .unwrap();

    let described = c
        .ec2
        .describe_network_interfaces()
        .filters(
            Filter::builder()
                .name("network-interface-id")
                .values(&eni)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let addrs = described.network_interfaces()[0].private_ip_addresses();
    let pod_ips: Vec<String> = addrs
        .iter()
        .filter(|a| a.primary != Some(true))
        .filter_map(|a| a.private_ip_address.clone())
        .collect();
    assert_eq!(pod_ips.len(), 4, "secondary IPs on the ENI: {addrs:?}");
    assert!(
        pod_ips.iter().all(|ip| ip.starts_with("100.64.")),
        "IPs from the secondary CIDR: {pod_ips:?}"
    );

    Network {
        vpc,
        node_subnets,
        pod_subnets,
        pod_ips,
    }
}

/// An internal NLB in the node subnets, a TargetType=ip target group, a TCP
/// listener forwarding to it, and the ENI's IPs registered as targets.
pub async fn nlb_with_ip_targets(c: &Clients, net: &Network) {
    let tg = c
        .elbv2
        .create_target_group()
        .name("cnlb-test-tg")
        .protocol(ProtocolEnum::Tcp)
        .port(8080)
        .vpc_id(&net.vpc)
        .target_type(TargetTypeEnum::Ip)
        .health_check_protocol(ProtocolEnum::Tcp)
        .send()
        .await
        .unwrap();
    let tg = tg.target_groups()[0].target_group_arn.clone().unwrap();

    let mut create = c
        .elbv2
        .create_load_balancer()
        .name("cnlb-test")
        .r#type(LoadBalancerTypeEnum::Network)
        .scheme(LoadBalancerSchemeEnum::Internal);
    for (subnet, _) in &net.node_subnets {
        create = create.subnets(subnet);
    }
    let lb = create.send().await.unwrap();
    let lb = lb.load_balancers()[0].clone();
    assert_eq!(lb.r#type, Some(LoadBalancerTypeEnum::Network));
    assert!(
        lb.dns_name.is_some(),
        "an NLB has a DNS name for status.loadBalancer"
    );
    let lb_arn = lb.load_balancer_arn.unwrap();

    let forward = Action::builder()
        .r#type(ActionTypeEnum::Forward)
        .target_group_arn(&tg)
        .build();
    c.elbv2
        .create_listener()
        .load_balancer_arn(&lb_arn)
        .protocol(ProtocolEnum::Tcp)
        .port(80)
        .default_actions(forward)
        .send()
        .await
        .unwrap();
    let listeners = c
        .elbv2
        .describe_listeners()
        .load_balancer_arn(&lb_arn)
        .send()
        .await
        .unwrap();
    assert_eq!(listeners.listeners().len(), 1);

    let az = &net.pod_subnets[0].1;
    let mut register = c.elbv2.register_targets().target_group_arn(&tg);
    for ip in &net.pod_ips {
        register = register.targets(
            TargetDescription::builder()
                .id(ip)
                .port(8080)
                .availability_zone(az)
                .build(),
        );
    }
    register.send().await.unwrap();

    let health = c
        .elbv2
        .describe_target_health()
        .target_group_arn(&tg)
        .send()
        .await
        .unwrap();
    let registered: BTreeSet<String> = health
        .target_health_descriptions()
        .iter()
        .filter_map(|d| d.target.as_ref()?.id.clone())
        .collect();
    assert_eq!(registered, net.pod_ips.iter().cloned().collect());
}
