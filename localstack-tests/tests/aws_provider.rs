//! The AWS provider against moto (or the user's LocalStack Pro): an NLB with
//! TargetType=ip target groups is created once and adopted after a "crash"
//! (lost IDs), targets follow deltas, a port change replaces the target
//! group, garbage collection finds it, and delete leaves nothing behind;
//! the cluster's backend security group lets the NLBs reach their targets.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use cnlb_localstack_tests::Env;
use cnlb_provider_aws::elbv2::types::ProtocolEnum;
use cnlb_provider_aws::plan::LOAD_BALANCER_ID;
use cnlb_provider_aws::{AwsConfig, AwsProvider, Clients};
use cnlb_provider_core::{
    HealthCheckPort, Listener, LoadBalancerKey, LoadBalancerProvider, LoadBalancerSpec, Protocol,
    ProviderError, ResourceIds, Target, TargetDelta,
};

/// The AWS endpoints are process environment (`common::use_endpoints`): one
/// test at a time.
static ENDPOINTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn spec(target_port: u16) -> LoadBalancerSpec {
    let mut spec = LoadBalancerSpec::new(LoadBalancerKey::new("test", "default", "web", "uid-1"));
    spec.listeners = vec![Listener {
        name: "http".into(),
        protocol: Protocol::Tcp,
        port: 80,
        target_port,
    }];
    spec.target_group_attributes =
        BTreeMap::from([("deregistration_delay.timeout_seconds".into(), "30".into())]);
    spec.tags = BTreeMap::from([("team".into(), "web".into())]);
    spec.source_ranges = vec!["10.1.0.0/16".into()];
    spec
}

/// (protocol, port, CIDR) ingress rules of the security group `id`.
async fn sg_rules(clients: &Clients, id: &str) -> BTreeSet<(String, i32, String)> {
    let out = clients
        .ec2
        .describe_security_groups()
        .group_ids(id)
        .send()
        .await
        .unwrap();
    let mut rules = BTreeSet::new();
    for p in out.security_groups()[0].ip_permissions() {
        for r in p.ip_ranges() {
            rules.insert((
                p.ip_protocol().unwrap().to_string(),
                p.from_port().unwrap(),
                r.cidr_ip().unwrap().to_string(),
            ));
        }
    }
    rules
}

fn targets(ips: &[String], port: u16) -> Vec<Target> {
    ips.iter()
        .map(|ip| Target::new(ip.parse().unwrap(), port))
        .collect()
}

async fn registered(p: &AwsProvider, key: &LoadBalancerKey, ids: &ResourceIds) -> Vec<String> {
    let mut v: Vec<String> = p
        .target_health(key, ids)
        .await
        .unwrap()
        .into_iter()
        .filter(|h| h.listener == "http")
        .map(|h| format!("{}:{}", h.ip, h.port))
        .collect();
    v.sort();
    v
}

/// Runs `test` on its own runtime, one test at a time.
fn run(test: impl std::future::Future<Output = ()>) {
    let _endpoints = ENDPOINTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(test);
}

/// moto with the test VPC, its clients, and a provider of the default
/// configuration in that VPC.
async fn moto(name: &str) -> (Env, Clients, common::Network, AwsProvider) {
    let env = Env::builder(name).moto().start().await.unwrap();
    common::use_endpoints(&env.aws().unwrap());
    let clients = Clients::from_env().await;
    let net = common::ec2_network(&clients).await;
    let p = AwsProvider::new(
        clients.clone(),
        AwsConfig::new(net.vpc.clone()),
        &mut Default::default(),
    );
    (env, clients, net, p)
}

#[test]
fn nlb_lifecycle_with_ip_targets() {
    run(async {
        let (_env, clients, net, p) = moto("aws-provider").await;
        let s = spec(8080);
        let key = s.key.clone();

        // Create; the NLB lands in the subnets tagged for internal load balancers.
        let status = p
            .ensure_load_balancer(&s, &ResourceIds::new())
            .await
            .unwrap();
        let ids = status.ids.clone();
        assert!(status.ingress[0].hostname.is_some(), "{status:?}");
        assert!(
            ids.contains_key(LOAD_BALANCER_ID) && ids.contains_key("target-group/http"),
            "{ids:?}"
        );
        let lbs = clients
            .elbv2
            .describe_load_balancers()
            .names(key.short_name())
            .send()
            .await
            .unwrap();
        let lb = &lbs.load_balancers()[0];
        let mut zones: Vec<&str> = lb
            .availability_zones()
            .iter()
            .filter_map(|z| z.subnet_id())
            .collect();
        zones.sort();
        let mut node_subnets: Vec<&str> =
            net.node_subnets.iter().map(|(s, _)| s.as_str()).collect();
        node_subnets.sort();
        assert_eq!(zones, node_subnets);
        let tg = &clients
            .elbv2
            .describe_target_groups()
            .target_group_arns(&ids["target-group/http"])
            .send()
            .await
            .unwrap()
            .target_groups()[0]
            .clone();
        assert_eq!(tg.target_type().map(|t| t.as_str()), Some("ip"));
        assert_eq!(tg.protocol(), Some(&ProtocolEnum::Tcp));
        assert_eq!(tg.port(), Some(8080));

        // The frontend security group admits the listener port from the
        // Service's source ranges only, and is attached to the NLB.
        let sg = ids["security-group"].clone();
        let from_ranges = BTreeSet::from([("tcp".to_string(), 80, "10.1.0.0/16".to_string())]);
        assert_eq!(sg_rules(&clients, &sg).await, from_ranges);
        assert!(lb.security_groups().contains(&sg));

        // Again, with the IDs and without them (a crash before they were
        // persisted): the same resources, no duplicates.
        assert_eq!(p.ensure_load_balancer(&s, &ids).await.unwrap().ids, ids);
        assert_eq!(
            p.ensure_load_balancer(&s, &ResourceIds::new())
                .await
                .unwrap()
                .ids,
            ids
        );
        let all = clients
            .elbv2
            .describe_load_balancers()
            .send()
            .await
            .unwrap();
        assert_eq!(all.load_balancers().len(), 1);
        let all = clients.elbv2.describe_target_groups().send().await.unwrap();
        assert_eq!(all.target_groups().len(), 1);
        assert_eq!(
            group_ids_named(&clients, &key.resource_name("sg"))
                .await
                .len(),
            1
        );

        // New source ranges: only the difference is authorized and revoked.
        let mut ranged = s.clone();
        ranged.source_ranges = vec!["10.2.0.0/16".into()];
        p.ensure_load_balancer(&ranged, &ids).await.unwrap();
        let moved_ranges = BTreeSet::from([("tcp".to_string(), 80, "10.2.0.0/16".to_string())]);
        assert_eq!(sg_rules(&clients, &sg).await, moved_ranges);
        p.ensure_load_balancer(&s, &ids).await.unwrap();
        assert_eq!(sg_rules(&clients, &sg).await, from_ranges);

        // Targets follow deltas.
        let listener = s.listeners[0].clone();
        let add = TargetDelta {
            register: targets(&net.pod_ips, 8080),
            deregister: vec![],
        };
        p.sync_targets(&key, &listener, &add, &ids).await.unwrap();
        let mut want: Vec<String> = net.pod_ips.iter().map(|ip| format!("{ip}:8080")).collect();
        want.sort();
        assert_eq!(registered(&p, &key, &ids).await, want);
        let drop_one = TargetDelta {
            register: vec![],
            deregister: targets(&net.pod_ips[..1], 8080),
        };
        p.sync_targets(&key, &listener, &drop_one, &ids)
            .await
            .unwrap();
        let gone = format!("{}:8080", net.pod_ips[0]);
        want.retain(|t| t != &gone);
        assert_eq!(registered(&p, &key, &ids).await, want);
        // Idempotent: the same delta again succeeds.
        p.sync_targets(&key, &listener, &drop_one, &ids)
            .await
            .unwrap();

        // A target port change needs a new target group; the listener moves
        // to it and the old one is deleted.
        let moved = spec(9090);
        let new_ids = p.ensure_load_balancer(&moved, &ids).await.unwrap().ids;
        assert_ne!(new_ids["target-group/http"], ids["target-group/http"]);
        assert_eq!(new_ids[LOAD_BALANCER_ID], ids[LOAD_BALANCER_ID]);
        let listeners = clients
            .elbv2
            .describe_listeners()
            .load_balancer_arn(&ids[LOAD_BALANCER_ID])
            .send()
            .await
            .unwrap();
        let forward = listeners.listeners()[0].default_actions()[0].target_group_arn();
        assert_eq!(forward, Some(new_ids["target-group/http"].as_str()));
        let all = clients.elbv2.describe_target_groups().send().await.unwrap();
        assert_eq!(
            all.target_groups().len(),
            1,
            "the old target group is deleted"
        );

        // Garbage collection sees it by its tags.
        let owned = p.list_owned("test").await.unwrap();
        assert_eq!(owned.len(), 1);
        assert_eq!(owned[0].key, key);
        assert!(p.list_owned("other-cluster").await.unwrap().is_empty());

        // Delete removes everything, and is idempotent.
        p.delete_load_balancer(&key, &new_ids).await.unwrap();
        p.delete_load_balancer(&key, &new_ids).await.unwrap();
        assert!(p.list_owned("test").await.unwrap().is_empty());
        let all = clients
            .elbv2
            .describe_load_balancers()
            .send()
            .await
            .unwrap();
        assert!(all.load_balancers().is_empty());
        let all = clients.elbv2.describe_target_groups().send().await.unwrap();
        assert!(all.target_groups().is_empty());
        assert_eq!(
            group_ids_named(&clients, &key.resource_name("sg"))
                .await
                .len(),
            0
        );
        assert!(matches!(
            p.target_health(&key, &new_ids).await,
            Err(ProviderError::NotFound { .. })
        ));

        // A resource with our name but not our tags is never adopted.
        clients
            .elbv2
            .create_target_group()
            .name(cnlb_provider_aws::plan::target_group_name(&key, &s.listeners[0]).unwrap())
            .protocol(ProtocolEnum::Tcp)
            .port(8080)
            .vpc_id(&net.vpc)
            .target_type(cnlb_provider_aws::elbv2::types::TargetTypeEnum::Ip)
            .send()
            .await
            .unwrap();
        let err = p
            .ensure_load_balancer(&s, &ResourceIds::new())
            .await
            .unwrap_err();
        assert!(matches!(err, ProviderError::Conflict { .. }), "{err}");
    });
}

/// Rules (protocol, port) on security group `id` from group `from`.
async fn rules_from(clients: &Clients, id: &str, from: &str) -> BTreeSet<(String, i32)> {
    let out = clients
        .ec2
        .describe_security_groups()
        .group_ids(id)
        .send()
        .await
        .unwrap();
    let mut rules = BTreeSet::new();
    for p in out.security_groups()[0].ip_permissions() {
        if p.user_id_group_pairs()
            .iter()
            .any(|g| g.group_id() == Some(from))
        {
            rules.insert((p.ip_protocol().unwrap().to_string(), p.from_port().unwrap()));
        }
    }
    rules
}

/// The security groups attached to load balancer `arn`.
async fn nlb_groups(clients: &Clients, arn: &str) -> Vec<String> {
    let out = clients
        .elbv2
        .describe_load_balancers()
        .load_balancer_arns(arn)
        .send()
        .await
        .unwrap();
    out.load_balancers()[0].security_groups().to_vec()
}

/// IDs of the security groups named `name`.
async fn group_ids_named(clients: &Clients, name: &str) -> Vec<String> {
    let filter = cnlb_provider_aws::ec2::types::Filter::builder()
        .name("group-name")
        .values(name)
        .build();
    let out = clients
        .ec2
        .describe_security_groups()
        .filters(filter)
        .send()
        .await
        .unwrap();
    out.security_groups()
        .iter()
        .filter_map(|g| g.group_id().map(str::to_string))
        .collect()
}

/// A Pod ENI as vpc-ipam makes it (tagged for cluster `test`) in security
/// group `sg`, with `n` secondary addresses; returns them.
async fn pod_eni(clients: &Clients, subnet: &str, sg: &str, n: i32) -> Vec<String> {
    use cnlb_provider_aws::ec2::types::{ResourceType, Tag, TagSpecification};
    let eni = clients
        .ec2
        .create_network_interface()
        .subnet_id(subnet)
        .groups(sg)
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::NetworkInterface)
                .tags(Tag::builder().key("cnlb.dev/cluster").value("test").build())
                .build(),
        )
        .send()
        .await
        .unwrap();
    let id = eni.network_interface.unwrap().network_interface_id.unwrap();
    let out = clients
        .ec2
        .assign_private_ip_addresses()
        .network_interface_id(&id)
        .secondary_private_ip_address_count(n)
        .send()
        .await
        .unwrap();
    out.assigned_private_ip_addresses()
        .iter()
        .filter_map(|a| a.private_ip_address().map(str::to_string))
        .collect()
}

/// The cluster's backend security group is attached to every NLB and lets
/// it reach the security groups of the ENIs that hold targets, on the
/// target ports and fixed health-check ports; a rule goes once no NLB needs
/// its port, the group once no NLB is left; the flag turns it all off.
/// (moto has no /28 prefixes on ENIs: the prefix match is unit-tested.)
#[test]
fn backend_security_group_lets_the_nlbs_reach_their_targets() {
    run(async {
        let (_env, clients, net, p) = moto("aws-backend-sg").await;
        let pods_sg = clients
            .ec2
            .create_security_group()
            .group_name("pods")
            .description("Pod ENIs")
            .vpc_id(&net.vpc)
            .send()
            .await
            .unwrap()
            .group_id
            .unwrap();
        let pod_ips = pod_eni(&clients, &net.pod_subnets[0].0, &pods_sg, 3).await;

        // web: 80 -> 8080, health checks on the traffic port.
        let web = spec(8080);
        let web_ids = p
            .ensure_load_balancer(&web, &ResourceIds::new())
            .await
            .unwrap()
            .ids;
        let backend = group_ids_named(&clients, "cnlb-test-backend").await;
        assert_eq!(backend.len(), 1, "one backend group");
        let backend = backend[0].clone();
        let groups = nlb_groups(&clients, &web_ids[LOAD_BALANCER_ID]).await;
        assert_eq!(
            groups.iter().collect::<BTreeSet<_>>(),
            BTreeSet::from([&web_ids["security-group"], &backend])
        );
        let register = |ips: &[String], port| TargetDelta {
            register: targets(ips, port),
            deregister: vec![],
        };
        p.sync_targets(
            &web.key,
            &web.listeners[0],
            &register(&pod_ips[..2], 8080),
            &web_ids,
        )
        .await
        .unwrap();
        let tcp = |port| ("tcp".to_string(), port);
        assert_eq!(
            rules_from(&clients, &pods_sg, &backend).await,
            BTreeSet::from([tcp(8080)])
        );

        // admin: 81 -> 9090 with health checks on 10254, same Pods' ENI.
        let mut admin = spec(9090);
        admin.key = LoadBalancerKey::new("test", "default", "admin", "uid-2");
        admin.listeners[0].port = 81;
        admin.health_check.port = HealthCheckPort::Port(10254);
        let admin_ids = p
            .ensure_load_balancer(&admin, &ResourceIds::new())
            .await
            .unwrap()
            .ids;
        assert!(
            nlb_groups(&clients, &admin_ids[LOAD_BALANCER_ID])
                .await
                .contains(&backend)
        );
        p.sync_targets(
            &admin.key,
            &admin.listeners[0],
            &register(&pod_ips, 9090),
            &admin_ids,
        )
        .await
        .unwrap();
        assert_eq!(
            rules_from(&clients, &pods_sg, &backend).await,
            BTreeSet::from([tcp(8080), tcp(9090), tcp(10254)])
        );
        // Pruning with both load balancers there changes nothing.
        p.prune_shared("test").await.unwrap();
        assert_eq!(rules_from(&clients, &pods_sg, &backend).await.len(), 3);

        // admin goes: its ports go, web's stays.
        p.delete_load_balancer(&admin.key, &admin_ids)
            .await
            .unwrap();
        p.prune_shared("test").await.unwrap();
        assert_eq!(
            rules_from(&clients, &pods_sg, &backend).await,
            BTreeSet::from([tcp(8080)])
        );

        // web goes too: no rule, no backend group.
        p.delete_load_balancer(&web.key, &web_ids).await.unwrap();
        p.prune_shared("test").await.unwrap();
        assert!(rules_from(&clients, &pods_sg, &backend).await.is_empty());
        assert!(
            group_ids_named(&clients, "cnlb-test-backend")
                .await
                .is_empty()
        );

        // Turned off: the NLB has its frontend group only and no rule is
        // made. Turned on again, the existing NLB gets the backend group.
        let mut config = AwsConfig::new(net.vpc.clone());
        config.backend_security_group = false;
        let off = AwsProvider::new(clients.clone(), config, &mut Default::default());
        let ids = off
            .ensure_load_balancer(&web, &ResourceIds::new())
            .await
            .unwrap()
            .ids;
        assert_eq!(
            nlb_groups(&clients, &ids[LOAD_BALANCER_ID]).await,
            [ids["security-group"].clone()]
        );
        off.sync_targets(&web.key, &web.listeners[0], &register(&pod_ips, 8080), &ids)
            .await
            .unwrap();
        assert!(
            group_ids_named(&clients, "cnlb-test-backend")
                .await
                .is_empty()
        );
        let on = AwsProvider::new(
            clients.clone(),
            AwsConfig::new(net.vpc.clone()),
            &mut Default::default(),
        );
        on.ensure_load_balancer(&web, &ids).await.unwrap();
        let backend = group_ids_named(&clients, "cnlb-test-backend").await;
        assert_eq!(backend.len(), 1);
        assert!(
            nlb_groups(&clients, &ids[LOAD_BALANCER_ID])
                .await
                .contains(&backend[0])
        );
    });
}
