//! A Service cannot make `cnlb-ccm --provider=aws` touch cloud resources it
//! does not own. cnlb's supported annotations name no resource it changes
//! (`aws-load-balancer-subnets` names subnets the NLB is placed in, which
//! cnlb never modifies; LBC's keys naming security groups, EIPs,
//! certificates or a name are refused as unsupported), but its own
//! `cnlb.dev/resource-ids`, which anyone who may edit the Service can
//! write, names the NLB, target groups and security group it works on, and
//! its resources' names are deterministic, so someone else may hold one.
//! Either way the Service reports a Conflict (Event and condition) and the
//! foreign resource, made here in moto without cnlb's tags, is the same
//! afterwards, also after the Service is deleted.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use crate::common::{self, ccm};
use cnlb_localstack_tests::Env;
use cnlb_provider_aws::Clients;
use cnlb_provider_aws::ec2::types::{IpPermission, IpRange, ResourceType, Tag, TagSpecification};
use cnlb_provider_aws::elbv2::types::{
    Action, ActionTypeEnum, LoadBalancerAttribute, ProtocolEnum, Tag as ElbTag, TargetDescription,
    TargetTypeEnum,
};
use cnlb_provider_aws::plan::security_group::security_group_name;
use cnlb_provider_aws::plan::{LOAD_BALANCER_ID, SECURITY_GROUP_ID, target_group_id_key};
use k8s_openapi::api::core::v1::Service;
use kube::{Api, Client};
use serde_json::json;

/// How cnlb says a resource is not a Service's.
const OWNED_BY: &str = "not tagged as owned by";

/// A team's NLB, target group (with a target) and security group (with a
/// rule), all tagged `team=payments` and none of them cnlb's.
struct Foreign {
    nlb: String,
    target_group: String,
    security_group: String,
}

async fn start(name: &str) -> (Env, Clients, common::Network, Client) {
    let env = Env::builder(name).kube().moto().start().await.unwrap();
    let aws = common::clients_for(&env.aws().unwrap()).await;
    let net = common::ec2_network(&aws).await;
    let client = env.kube().unwrap().admin_client().unwrap();
    (env, aws, net, client)
}

fn team() -> ElbTag {
    ElbTag::builder().key("team").value("payments").build()
}

async fn foreign_target_group(aws: &Clients, net: &common::Network, name: &str) -> String {
    let tg = aws
        .elbv2
        .create_target_group()
        .name(name)
        .protocol(ProtocolEnum::Tcp)
        .port(8080)
        .vpc_id(&net.vpc)
        .target_type(TargetTypeEnum::Ip)
        .tags(team())
        .send()
        .await
        .unwrap();
    let arn = tg.target_groups()[0]
        .target_group_arn()
        .unwrap()
        .to_string();
    aws.elbv2
        .register_targets()
        .target_group_arn(&arn)
        .targets(
            TargetDescription::builder()
                .id(&net.pod_ips[0])
                .port(8080)
                .build(),
        )
        .send()
        .await
        .unwrap();
    arn
}

async fn foreign_nlb(aws: &Clients, net: &common::Network, name: &str, tg: Option<&str>) -> String {
    let mut create = aws
        .elbv2
        .create_load_balancer()
        .name(name)
        .r#type(cnlb_provider_aws::elbv2::types::LoadBalancerTypeEnum::Network)
        .tags(team());
    for (subnet, _) in &net.node_subnets {
        create = create.subnets(subnet);
    }
    let out = create.send().await.unwrap();
    let arn = out.load_balancers()[0]
        .load_balancer_arn()
        .unwrap()
        .to_string();
    aws.elbv2
        .modify_load_balancer_attributes()
        .load_balancer_arn(&arn)
        .attributes(
            LoadBalancerAttribute::builder()
                .key("load_balancing.cross_zone.enabled")
                .value("true")
                .build(),
        )
        .send()
        .await
        .unwrap();
    if let Some(tg) = tg {
        let forward = Action::builder()
            .r#type(ActionTypeEnum::Forward)
            .target_group_arn(tg)
            .build();
        aws.elbv2
            .create_listener()
            .load_balancer_arn(&arn)
            .protocol(ProtocolEnum::Tcp)
            .port(443)
            .default_actions(forward)
            .send()
            .await
            .unwrap();
    }
    arn
}

async fn foreign_security_group(aws: &Clients, net: &common::Network, name: &str) -> String {
    let sg = aws
        .ec2
        .create_security_group()
        .group_name(name)
        .description("payments")
        .vpc_id(&net.vpc)
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::SecurityGroup)
                .tags(Tag::builder().key("team").value("payments").build())
                .build(),
        )
        .send()
        .await
        .unwrap();
    let id = sg.group_id().unwrap().to_string();
    aws.ec2
        .authorize_security_group_ingress()
        .group_id(&id)
        .ip_permissions(
            IpPermission::builder()
                .ip_protocol("tcp")
                .from_port(443)
                .to_port(443)
                .ip_ranges(IpRange::builder().cidr_ip("10.0.0.0/8").build())
                .build(),
        )
        .send()
        .await
        .unwrap();
    id
}

/// Everything moto says about the foreign resources: the NLB, its tags,
/// attributes and listeners; the target group, its tags, attributes and
/// targets; the security group with its tags and rules.
async fn describe(aws: &Clients, f: &Foreign) -> BTreeMap<&'static str, String> {
    let e = &aws.elbv2;
    let nlb = e
        .describe_load_balancers()
        .load_balancer_arns(&f.nlb)
        .send()
        .await
        .unwrap();
    let tags = e
        .describe_tags()
        .resource_arns(&f.nlb)
        .resource_arns(&f.target_group)
        .send()
        .await
        .unwrap();
    let nlb_attributes = e
        .describe_load_balancer_attributes()
        .load_balancer_arn(&f.nlb)
        .send()
        .await
        .unwrap();
    let listeners = e
        .describe_listeners()
        .load_balancer_arn(&f.nlb)
        .send()
        .await
        .unwrap();
    let tg = e
        .describe_target_groups()
        .target_group_arns(&f.target_group)
        .send()
        .await
        .unwrap();
    let tg_attributes = e
        .describe_target_group_attributes()
        .target_group_arn(&f.target_group)
        .send()
        .await
        .unwrap();
    let sg = aws
        .ec2
        .describe_security_groups()
        .group_ids(&f.security_group)
        .send()
        .await
        .unwrap();
    BTreeMap::from([
        ("nlb", format!("{:?}", nlb.load_balancers())),
        ("tags", format!("{:?}", tags.tag_descriptions())),
        (
            "nlb attributes",
            format!("{:?}", nlb_attributes.attributes()),
        ),
        ("listeners", format!("{:?}", listeners.listeners())),
        ("target group", format!("{:?}", tg.target_groups())),
        ("tg attributes", format!("{:?}", tg_attributes.attributes())),
        (
            "targets",
            format!("{:?}", ccm::targets_of(aws, &f.target_group).await),
        ),
        ("security group", format!("{:?}", sg.security_groups())),
    ])
}

#[test]
fn resource_ids_naming_foreign_resources_are_refused_and_left_alone() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (env, aws, net, client) = start("aws-foreign-ids").await;
        let target_group = foreign_target_group(&aws, &net, "payments").await;
        let foreign = Foreign {
            nlb: foreign_nlb(&aws, &net, "payments", Some(&target_group)).await,
            target_group,
            security_group: foreign_security_group(&aws, &net, "payments").await,
        };
        let before = describe(&aws, &foreign).await;
        let _ccm = ccm::spawn(&env, &net.vpc, "cnlb-ccm");
        let services: Api<Service> = Api::namespaced(client.clone(), "default");

        // Each of cnlb's IDs pointing at the team's resource: the target
        // group would get health check and tags, the security group its
        // rules replaced, the NLB tags, groups and listeners, and each would
        // be deleted with the Service.
        let ids =
            |key: &str, id: &str| json!({"cnlb.dev/resource-ids": json!({key: id}).to_string()});
        let spec = ccm::cluster_ip_service(&services, "by-target-group").await;
        let tg_key = target_group_id_key(&spec.listeners[0]);
        ccm::make_load_balancer(
            &services,
            "by-target-group",
            ids(&tg_key, &foreign.target_group),
        )
        .await;
        ccm::cluster_ip_service(&services, "by-security-group").await;
        ccm::make_load_balancer(
            &services,
            "by-security-group",
            ids(SECURITY_GROUP_ID, &foreign.security_group),
        )
        .await;
        ccm::cluster_ip_service(&services, "by-nlb").await;
        ccm::make_load_balancer(&services, "by-nlb", ids(LOAD_BALANCER_ID, &foreign.nlb)).await;
        // With the spec it was "last applied" and a bad annotation, cnlb
        // skips the ensure and brings the target group's targets to the
        // Service's endpoints (none): the team's target would go.
        let spec = ccm::cluster_ip_service(&services, "by-target-group-sync").await;
        let mut annotations = ids(&tg_key, &foreign.target_group);
        annotations["cnlb.dev/applied-spec"] = json!(serde_json::to_string(&spec).unwrap());
        annotations["service.beta.kubernetes.io/aws-load-balancer-scheme"] = json!("public");
        ccm::make_load_balancer(&services, "by-target-group-sync", annotations).await;

        ccm::wait_conflict(&client, "by-target-group", &foreign.target_group, OWNED_BY).await;
        ccm::wait_conflict(
            &client,
            "by-security-group",
            &foreign.security_group,
            OWNED_BY,
        )
        .await;
        ccm::wait_conflict(&client, "by-nlb", &foreign.nlb, OWNED_BY).await;
        ccm::wait_conflict(
            &client,
            "by-target-group-sync",
            &foreign.target_group,
            OWNED_BY,
        )
        .await;
        assert_eq!(describe(&aws, &foreign).await, before);

        ccm::delete_services(
            &services,
            &[
                "by-target-group",
                "by-security-group",
                "by-nlb",
                "by-target-group-sync",
            ],
        )
        .await;
        assert_eq!(describe(&aws, &foreign).await, before);
    });
}

#[test]
fn a_foreign_resource_with_cnlbs_name_is_a_conflict_and_survives_the_service() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (env, aws, net, client) = start("aws-foreign-names").await;
        let services: Api<Service> = Api::namespaced(client.clone(), "default");

        // Before cnlb sees the Services as LoadBalancers, someone else
        // takes the name cnlb would give each one's target group, security
        // group and NLB.
        let tg_spec = ccm::cluster_ip_service(&services, "tg-taken").await;
        let tg_name =
            cnlb_provider_aws::plan::target_group_name(&tg_spec.key, &tg_spec.listeners[0])
                .unwrap();
        let target_group = foreign_target_group(&aws, &net, &tg_name).await;
        let sg_name =
            security_group_name(&ccm::cluster_ip_service(&services, "sg-taken").await.key);
        let security_group = foreign_security_group(&aws, &net, &sg_name).await;
        let nlb_name = ccm::cluster_ip_service(&services, "nlb-taken")
            .await
            .key
            .short_name();
        let foreign = Foreign {
            nlb: foreign_nlb(&aws, &net, &nlb_name, None).await,
            target_group,
            security_group,
        };
        let before = describe(&aws, &foreign).await;
        let _ccm = ccm::spawn(&env, &net.vpc, "cnlb-ccm");
        for name in ["tg-taken", "sg-taken", "nlb-taken"] {
            ccm::make_load_balancer(&services, name, json!({})).await;
        }

        ccm::wait_conflict(&client, "tg-taken", &tg_name, OWNED_BY).await;
        ccm::wait_conflict(&client, "sg-taken", &sg_name, OWNED_BY).await;
        ccm::wait_conflict(&client, "nlb-taken", &nlb_name, OWNED_BY).await;
        assert_eq!(describe(&aws, &foreign).await, before);

        ccm::delete_services(&services, &["tg-taken", "sg-taken", "nlb-taken"]).await;
        assert_eq!(describe(&aws, &foreign).await, before);
    });
}
