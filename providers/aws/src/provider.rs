//! `LoadBalancerProvider` for AWS: an NLB whose target groups (TargetType=ip)
//! hold Pod IPs. Resources are found by the IDs the controller persisted,
//! then by their deterministic names checked against ownership tags; they
//! are created with their tags in the create call, so a crash anywhere
//! leaves nothing the next call cannot find. Region-wide listing happens only
//! in `list_owned` (garbage collection).
//!
//! Every SDK request goes through `self.calls.run("<API action>", || ...)`
//! (`calls.rs`): rate limit, retries on throttling and 5xx, metrics. A call
//! that failed here has used up its retries or cannot succeed as sent.
//!
//! This file is the I/O only: it finds and describes, turns what AWS shows
//! into the plan's plain `Actual*` structs, and makes the calls the plan
//! (`plan.rs` and `plan/`) decides on.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_ec2::types::{
    Filter, IpPermission, ResourceType, SecurityGroup, Tag as Ec2Tag, TagSpecification,
};
use aws_sdk_elasticloadbalancingv2::types::{
    IpAddressType as ElbIpAddressType, LoadBalancerAttribute, LoadBalancerSchemeEnum,
    LoadBalancerTypeEnum, ProtocolEnum, Tag, TargetDescription, TargetGroup, TargetGroupAttribute,
    TargetHealthStateEnum, TargetTypeEnum,
};
use backon::{ExponentialBuilder, Retryable};
use cnlb_provider_core::{
    Listener, LoadBalancerIngress, LoadBalancerKey, LoadBalancerProvider, LoadBalancerSpec,
    LoadBalancerStatus, OwnedLoadBalancer, ProviderError, ResourceIds, Result, TAG_CLUSTER, Target,
    TargetDelta, TargetHealth, TargetHealthState, is_owned_by, is_owned_by_cluster,
    key_from_owner_tags,
};
use prometheus_client::registry::Registry;
use tracing::{debug, warn};

use crate::Clients;
use crate::backend::BackendGroup;
use crate::calls::{Calls, RateLimits};
use crate::convert::{
    HealthCheckCall, Tags, actual_listener, actual_load_balancer, actual_target_group, elb_tag,
    elb_tags, forward, permission, rules_of, target, to_map,
};
use crate::nodes::AwsNodes;
use crate::plan::listeners::{self, ActualListener, ListenerAction};
use crate::plan::load_balancer::{self, ActualLoadBalancer, LoadBalancerAction};
use crate::plan::security_group::{ingress_changes, security_group_name};
use crate::plan::target_group::{self, ActualTargetGroup, TargetGroupAction};
use crate::plan::{
    BackendRule, DESCRIBE_TAGS_BATCH, IngressRule, LOAD_BALANCER_ID, SECURITY_GROUP_ID,
    TARGET_BATCH, backend_rules, changed, elb_protocol, ingress_rules, listener_of_id_key,
    target_group_id_key, target_group_name, validate,
};

pub use crate::plan::load_balancer::{ELB_SUBNET_TAG, INTERNAL_ELB_SUBNET_TAG};

#[derive(Clone, Debug, Default)]
pub struct AwsConfig {
    /// The VPC Pods and load balancers live in.
    pub vpc_id: String,
    /// Client-side rate limits of the AWS calls (see [`RateLimits`] for
    /// the defaults and why).
    pub rate_limits: RateLimits,
    /// Attach the cluster's backend security group to every NLB and let it
    /// reach the targets' ENIs (see `backend.rs`); off for users who manage
    /// those rules themselves.
    pub backend_security_group: bool,
}

impl AwsConfig {
    /// The configuration for `vpc_id` with default rate limits.
    pub fn new(vpc_id: impl Into<String>) -> AwsConfig {
        AwsConfig {
            vpc_id: vpc_id.into(),
            rate_limits: RateLimits::default(),
            backend_security_group: true,
        }
    }
}

pub struct AwsProvider {
    clients: Clients,
    config: AwsConfig,
    /// Shared with [`AwsProvider::nodes`]: one set of buckets and metrics.
    calls: Arc<Calls>,
    /// None when [`AwsConfig::backend_security_group`] is off.
    backend: Option<BackendGroup>,
    /// (Service UID, target group ARN) found tagged as that Service's:
    /// target changes go only to those. The IDs come from an annotation
    /// anyone who may edit the Service can write.
    owned_target_groups: Mutex<HashSet<(String, String)>>,
}

impl AwsProvider {
    /// A provider calling AWS through `clients` (their SDK retries are
    /// turned off: the provider retries itself, see
    /// [`Clients::without_sdk_retries`]). The `cnlb_cloud_api_*` metrics
    /// of its calls are registered in `registry`, which must not hold them
    /// yet (one provider per registry).
    pub fn new(clients: Clients, config: AwsConfig, registry: &mut Registry) -> AwsProvider {
        let clients = clients.without_sdk_retries();
        let calls = Arc::new(Calls::new(&config.rate_limits, registry));
        let backend = config
            .backend_security_group
            .then(|| BackendGroup::new(clients.clone(), Arc::clone(&calls), config.vpc_id.clone()));
        AwsProvider {
            clients,
            calls,
            config,
            backend,
            owned_target_groups: Mutex::default(),
        }
    }

    /// The node provider of the same account and region, calling through
    /// this provider's wrapper: the same rate limits (DescribeInstances
    /// draws from the `read` bucket) and `cnlb_cloud_api_*` metrics.
    pub fn nodes(&self) -> AwsNodes {
        AwsNodes::with_calls(&self.clients, Arc::clone(&self.calls))
    }

    #[cfg(test)]
    pub(crate) fn clients(&self) -> &Clients {
        &self.clients
    }

    /// The load balancer of `key`: by persisted ARN, else by name, if its
    /// tags say it is ours. One that is not ours is a conflict.
    async fn find_load_balancer(
        &self,
        key: &LoadBalancerKey,
        known: &ResourceIds,
    ) -> Result<Option<ActualLoadBalancer>> {
        if let Some(arn) = known.get(LOAD_BALANCER_ID)
            && let Some(lb) = self.load_balancer_by_arn(key, arn).await?
        {
            return Ok(Some(lb));
        }
        self.load_balancer_by_name(key).await
    }

    /// The load balancer of persisted ARN `arn` if it exists; a conflict if
    /// it is not `key`'s.
    async fn load_balancer_by_arn(
        &self,
        key: &LoadBalancerKey,
        arn: &str,
    ) -> Result<Option<ActualLoadBalancer>> {
        let found = self
            .calls
            .run("DescribeLoadBalancers", || {
                self.clients
                    .elbv2
                    .describe_load_balancers()
                    .load_balancer_arns(arn)
                    .send()
            })
            .await;
        let lb = match found {
            Ok(out) => out.load_balancers().first().map(actual_load_balancer),
            Err(ProviderError::NotFound { .. }) => None,
            Err(other) => return Err(other),
        };
        let Some(lb) = lb else { return Ok(None) };
        self.check_owner(key, &lb.arn, &format!("load balancer {arn}"))
            .await?;
        Ok(Some(lb))
    }

    /// The load balancer with `key`'s name if it exists; a conflict if it
    /// is not `key`'s.
    async fn load_balancer_by_name(
        &self,
        key: &LoadBalancerKey,
    ) -> Result<Option<ActualLoadBalancer>> {
        let elbv2 = &self.clients.elbv2;
        let name = key.short_name();
        let found = self
            .calls
            .run("DescribeLoadBalancers", || {
                elbv2.describe_load_balancers().names(&name).send()
            })
            .await;
        let lb = match found {
            Ok(out) => out.load_balancers().first().map(actual_load_balancer),
            Err(ProviderError::NotFound { .. }) => None,
            Err(other) => return Err(other),
        };
        let Some(lb) = lb else { return Ok(None) };
        self.check_owner(key, &lb.arn, &name).await?;
        Ok(Some(lb))
    }

    /// A target group by ARN; None if it is gone.
    async fn target_group_by_arn(&self, arn: &str) -> Result<Option<TargetGroup>> {
        match self
            .calls
            .run("DescribeTargetGroups", || {
                self.clients
                    .elbv2
                    .describe_target_groups()
                    .target_group_arns(arn)
                    .send()
            })
            .await
        {
            Ok(out) => Ok(out.target_groups().first().cloned()),
            Err(ProviderError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The target group named `name`: by persisted ARN (if it still has
    /// that name, else it is being replaced), else by name with our tags.
    async fn find_target_group(
        &self,
        key: &LoadBalancerKey,
        name: &str,
        known_arn: Option<&String>,
    ) -> Result<Option<ActualTargetGroup>> {
        let elbv2 = &self.clients.elbv2;
        if let Some(arn) = known_arn {
            match self
                .calls
                .run("DescribeTargetGroups", || {
                    elbv2.describe_target_groups().target_group_arns(arn).send()
                })
                .await
            {
                Ok(out) => {
                    if let Some(tg) = out.target_groups().first().map(actual_target_group) {
                        self.check_owner(key, &tg.arn, &format!("target group {arn}"))
                            .await?;
                        self.owned_target_groups()
                            .insert((key.uid.clone(), tg.arn.clone()));
                        // Another name: it is being replaced.
                        if target_group::is_named(&tg, name) {
                            return Ok(Some(tg));
                        }
                    }
                }
                Err(ProviderError::NotFound { .. }) => {}
                Err(other) => return Err(other),
            }
        }
        let tg = match self
            .calls
            .run("DescribeTargetGroups", || {
                elbv2.describe_target_groups().names(name).send()
            })
            .await
        {
            Ok(out) => out.target_groups().first().map(actual_target_group),
            Err(ProviderError::NotFound { .. }) => None,
            Err(other) => return Err(other),
        };
        let Some(tg) = tg else { return Ok(None) };
        self.check_owner(key, &tg.arn, name).await?;
        self.owned_target_groups()
            .insert((key.uid.clone(), tg.arn.clone()));
        Ok(Some(tg))
    }

    fn owned_target_groups(&self) -> MutexGuard<'_, HashSet<(String, String)>> {
        self.owned_target_groups
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Fails with a conflict unless every target group `known` names is
    /// tagged as `key`'s: target changes and health reads go to those
    /// ARNs. One DescribeTags per 20 not yet seen tagged since the start.
    async fn check_target_groups(&self, key: &LoadBalancerKey, known: &ResourceIds) -> Result<()> {
        let unchecked: Vec<String> = {
            let owned = self.owned_target_groups();
            known
                .iter()
                .filter(|(k, _)| listener_of_id_key(k).is_some())
                .map(|(_, arn)| arn.clone())
                .filter(|arn| !owned.contains(&(key.uid.clone(), arn.clone())))
                .collect()
        };
        if unchecked.is_empty() {
            return Ok(());
        }
        let tags = match self.tags_of(&unchecked).await {
            Ok(tags) => tags,
            // One is gone (the calls that use it find out): the others one
            // by one.
            Err(ProviderError::NotFound { .. }) => {
                let mut tags = BTreeMap::new();
                for arn in &unchecked {
                    match self.tags_of(std::slice::from_ref(arn)).await {
                        Ok(mut one) => tags.append(&mut one),
                        Err(ProviderError::NotFound { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                tags
            }
            Err(e) => return Err(e),
        };
        for (arn, tags) in tags {
            if !is_owned_by(&tags, key) {
                return Err(not_owned(&format!("target group {arn}"), key));
            }
            self.owned_target_groups().insert((key.uid.clone(), arn));
        }
        Ok(())
    }

    async fn check_owner(&self, key: &LoadBalancerKey, arn: &str, name: &str) -> Result<()> {
        let tags = self.tags_of(&[arn.to_string()]).await?;
        if tags.get(arn).is_some_and(|t| is_owned_by(t, key)) {
            Ok(())
        } else {
            Err(not_owned(name, key))
        }
    }

    /// Tags of up to any number of ELBv2 resources, 20 ARNs per call.
    async fn tags_of(&self, arns: &[String]) -> Result<BTreeMap<String, Tags>> {
        let mut all = BTreeMap::new();
        for chunk in arns.chunks(DESCRIBE_TAGS_BATCH) {
            let out = self
                .calls
                .run("DescribeTags", || {
                    self.clients
                        .elbv2
                        .describe_tags()
                        .set_resource_arns(Some(chunk.to_vec()))
                        .send()
                })
                .await?;
            for d in out.tag_descriptions() {
                let tags = to_map(d.tags().iter().map(|t| (t.key(), t.value())));
                all.insert(d.resource_arn().unwrap_or_default().to_string(), tags);
            }
        }
        Ok(all)
    }

    async fn add_missing_tags(&self, arn: &str, want: &Tags) -> Result<()> {
        let have = self
            .tags_of(&[arn.to_string()])
            .await?
            .remove(arn)
            .unwrap_or_default();
        let missing = changed(want, &have);
        if missing.is_empty() {
            return Ok(());
        }
        let tags: Vec<Tag> = missing.iter().map(|(k, v)| elb_tag(k, v)).collect();
        self.calls
            .run("AddTags", || {
                self.clients
                    .elbv2
                    .add_tags()
                    .resource_arns(arn)
                    .set_tags(Some(tags.clone()))
                    .send()
            })
            .await?;
        Ok(())
    }

    /// Subnets named by the spec (IDs, or Name tags), else one per AZ among
    /// those tagged for this scheme's load balancers.
    async fn subnets(&self, spec: &LoadBalancerSpec) -> Result<Vec<String>> {
        let vpc = Filter::builder()
            .name("vpc-id")
            .values(&self.config.vpc_id)
            .build();
        if let Some(named) = &spec.subnets {
            let (ids, names): (Vec<&String>, Vec<&String>) =
                named.iter().partition(|s| s.starts_with("subnet-"));
            let mut found: Vec<String> = ids.into_iter().cloned().collect();
            if !names.is_empty() {
                let by_name = Filter::builder()
                    .name("tag:Name")
                    .set_values(Some(names.iter().map(|n| n.to_string()).collect()))
                    .build();
                let out = self
                    .calls
                    .run("DescribeSubnets", || {
                        self.clients
                            .ec2
                            .describe_subnets()
                            .filters(vpc.clone())
                            .filters(by_name.clone())
                            .send()
                    })
                    .await?;
                let resolved: Vec<String> = out
                    .subnets()
                    .iter()
                    .filter_map(|s| s.subnet_id().map(str::to_string))
                    .collect();
                if resolved.len() < names.len() {
                    return Err(ProviderError::invalid(
                        "subnets",
                        format!(
                            "not every subnet name in {names:?} names a subnet of {}",
                            self.config.vpc_id
                        ),
                    ));
                }
                found.extend(resolved);
            }
            found.sort();
            return Ok(found);
        }
        let role = load_balancer::subnet_role(spec.scheme);
        let tagged = Filter::builder().name("tag-key").values(role).build();
        let out = self
            .calls
            .run("DescribeSubnets", || {
                self.clients
                    .ec2
                    .describe_subnets()
                    .filters(vpc.clone())
                    .filters(tagged.clone())
                    .send()
            })
            .await?;
        let per_az = load_balancer::one_subnet_per_zone(
            out.subnets()
                .iter()
                .filter_map(|s| Some((s.availability_zone()?, s.subnet_id()?))),
        );
        if per_az.is_empty() {
            return Err(ProviderError::invalid(
                "subnets",
                format!(
                    "no subnet of {} is tagged {role}; tag one per zone or name them in the subnets annotation",
                    self.config.vpc_id
                ),
            ));
        }
        Ok(per_az)
    }

    async fn ensure_target_group(
        &self,
        spec: &LoadBalancerSpec,
        listener: &Listener,
        known: &ResourceIds,
    ) -> Result<String> {
        let desired = target_group::desired(spec, listener)?;
        let known_arn = known.get(&target_group_id_key(listener));
        let found = self
            .find_target_group(&spec.key, &desired.name, known_arn)
            .await?;
        let arn = match target_group::plan(&desired, found.as_ref()) {
            TargetGroupAction::Update { arn, drifted } => {
                if !drifted.is_empty() {
                    debug!(target_group = %arn, ?drifted, "health check drifted");
                    let hc = HealthCheckCall::of(&desired);
                    let modify = self
                        .clients
                        .elbv2
                        .modify_target_group()
                        .target_group_arn(&arn)
                        .health_check_protocol(hc.protocol)
                        .health_check_port(hc.port)
                        .set_health_check_path(hc.path)
                        .health_check_interval_seconds(hc.interval)
                        .health_check_timeout_seconds(hc.timeout)
                        .healthy_threshold_count(hc.healthy_threshold)
                        .unhealthy_threshold_count(hc.unhealthy_threshold)
                        .set_matcher(hc.matcher);
                    self.calls
                        .run("ModifyTargetGroup", || modify.clone().send())
                        .await?;
                }
                self.add_missing_tags(&arn, &spec.resource_tags()).await?;
                arn
            }
            TargetGroupAction::Create => {
                let hc = HealthCheckCall::of(&desired);
                let create = self
                    .clients
                    .elbv2
                    .create_target_group()
                    .name(&desired.name)
                    .protocol(ProtocolEnum::from(desired.protocol))
                    .port(i32::from(desired.port))
                    .vpc_id(&self.config.vpc_id)
                    .target_type(TargetTypeEnum::Ip)
                    .health_check_protocol(hc.protocol)
                    .health_check_port(hc.port)
                    .set_health_check_path(hc.path)
                    .health_check_interval_seconds(hc.interval)
                    .health_check_timeout_seconds(hc.timeout)
                    .healthy_threshold_count(hc.healthy_threshold)
                    .unhealthy_threshold_count(hc.unhealthy_threshold)
                    .set_matcher(hc.matcher)
                    .set_tags(Some(elb_tags(&spec.resource_tags())));
                self.calls
                    .run_unrepeatable(
                        "CreateTargetGroup",
                        || async {
                            create.clone().send().await.map(|out| {
                                let tg = out.target_groups().first();
                                tg.and_then(|tg| tg.target_group_arn()).map(str::to_string)
                            })
                        },
                        || async {
                            let found = self.find_target_group(&spec.key, &desired.name, None);
                            Ok(found.await?.map(|tg| Some(tg.arn)))
                        },
                    )
                    .await?
                    .ok_or_else(|| cloud("CreateTargetGroup", "no target group in the answer"))?
            }
        };
        self.owned_target_groups()
            .insert((spec.key.uid.clone(), arn.clone()));

        if let Some(backend) = &self.backend {
            backend.remember_health_check(&arn, &desired.health_check.port);
        }
        if !spec.target_group_attributes.is_empty() {
            let out = self
                .calls
                .run("DescribeTargetGroupAttributes", || {
                    self.clients
                        .elbv2
                        .describe_target_group_attributes()
                        .target_group_arn(&arn)
                        .send()
                })
                .await?;
            let actual: Tags = to_map(out.attributes().iter().map(|a| (a.key(), a.value())));
            let updates = changed(&spec.target_group_attributes, &actual);
            if !updates.is_empty() {
                let attributes: Vec<TargetGroupAttribute> = updates
                    .into_iter()
                    .map(|(k, v)| TargetGroupAttribute::builder().key(k).value(v).build())
                    .collect();
                self.calls
                    .run("ModifyTargetGroupAttributes", || {
                        self.clients
                            .elbv2
                            .modify_target_group_attributes()
                            .target_group_arn(&arn)
                            .set_attributes(Some(attributes.clone()))
                            .send()
                    })
                    .await?;
            }
        }
        Ok(arn)
    }

    async fn ensure_nlb(
        &self,
        spec: &LoadBalancerSpec,
        known: &ResourceIds,
        security_groups: &[String],
    ) -> Result<ActualLoadBalancer> {
        let found = self.find_load_balancer(&spec.key, known).await?;
        let lb = match load_balancer::plan(spec, security_groups, found)? {
            LoadBalancerAction::Update {
                lb,
                security_groups,
            } => {
                self.add_missing_tags(&lb.arn, &spec.resource_tags())
                    .await?;
                if let Some(groups) = security_groups {
                    self.calls
                        .run("SetSecurityGroups", || {
                            self.clients
                                .elbv2
                                .set_security_groups()
                                .load_balancer_arn(&lb.arn)
                                .set_security_groups(Some(groups.clone()))
                                .send()
                        })
                        .await?;
                }
                lb
            }
            LoadBalancerAction::Create => {
                let subnets = self.subnets(spec).await?;
                let create = self
                    .clients
                    .elbv2
                    .create_load_balancer()
                    .name(spec.key.short_name())
                    .r#type(LoadBalancerTypeEnum::Network)
                    .scheme(LoadBalancerSchemeEnum::from(load_balancer::scheme(
                        spec.scheme,
                    )))
                    .ip_address_type(ElbIpAddressType::from(load_balancer::ip_address_type(
                        spec.ip_address_type,
                    )))
                    .set_subnets(Some(subnets))
                    // An NLB created without security groups can never get any.
                    .set_security_groups(Some(security_groups.to_vec()))
                    .set_tags(Some(elb_tags(&spec.resource_tags())));
                self.calls
                    .run_unrepeatable(
                        "CreateLoadBalancer",
                        || async {
                            let out = create.clone().send().await;
                            out.map(|out| out.load_balancers().first().map(actual_load_balancer))
                        },
                        || async {
                            let none = ResourceIds::new();
                            Ok(self.find_load_balancer(&spec.key, &none).await?.map(Some))
                        },
                    )
                    .await?
                    .ok_or_else(|| cloud("CreateLoadBalancer", "no load balancer in the answer"))?
            }
        };
        let arn = &lb.arn;
        if !spec.attributes.is_empty() {
            let out = self
                .calls
                .run("DescribeLoadBalancerAttributes", || {
                    self.clients
                        .elbv2
                        .describe_load_balancer_attributes()
                        .load_balancer_arn(arn)
                        .send()
                })
                .await?;
            let actual: Tags = to_map(out.attributes().iter().map(|a| (a.key(), a.value())));
            let updates = changed(&spec.attributes, &actual);
            if !updates.is_empty() {
                let attributes: Vec<LoadBalancerAttribute> = updates
                    .into_iter()
                    .map(|(k, v)| LoadBalancerAttribute::builder().key(k).value(v).build())
                    .collect();
                self.calls
                    .run("ModifyLoadBalancerAttributes", || {
                        self.clients
                            .elbv2
                            .modify_load_balancer_attributes()
                            .load_balancer_arn(arn)
                            .set_attributes(Some(attributes.clone()))
                            .send()
                    })
                    .await?;
            }
        }
        Ok(lb)
    }

    async fn listeners_of(&self, lb_arn: &str) -> Result<Vec<ActualListener>> {
        let out = self
            .calls
            .run("DescribeListeners", || {
                self.clients
                    .elbv2
                    .describe_listeners()
                    .load_balancer_arn(lb_arn)
                    .send()
            })
            .await?;
        Ok(out.listeners().iter().map(actual_listener).collect())
    }

    /// One listener per spec listener, forwarding to its target group;
    /// listeners the spec no longer has are deleted.
    async fn ensure_listeners(
        &self,
        spec: &LoadBalancerSpec,
        lb_arn: &str,
        target_groups: &BTreeMap<u16, String>,
    ) -> Result<()> {
        let existing = self.listeners_of(lb_arn).await?;
        for action in listeners::plan(spec, target_groups, &existing)? {
            match action {
                ListenerAction::Create {
                    port,
                    protocol,
                    target_group,
                } => {
                    let create = self
                        .clients
                        .elbv2
                        .create_listener()
                        .load_balancer_arn(lb_arn)
                        .protocol(ProtocolEnum::from(protocol))
                        .port(i32::from(port))
                        .default_actions(forward(&target_group))
                        .set_tags(Some(elb_tags(&spec.resource_tags())));
                    self.calls
                        .run_unrepeatable(
                            "CreateListener",
                            || async { create.clone().send().await.map(|_| ()) },
                            || async {
                                let listeners = self.listeners_of(lb_arn).await?;
                                let port = Some(i32::from(port));
                                Ok(listeners.iter().any(|l| l.port == port).then_some(()))
                            },
                        )
                        .await?;
                }
                ListenerAction::Modify {
                    arn,
                    protocol,
                    target_group,
                } => {
                    let modify = self
                        .clients
                        .elbv2
                        .modify_listener()
                        .listener_arn(arn)
                        .protocol(ProtocolEnum::from(protocol))
                        .default_actions(forward(&target_group));
                    self.calls
                        .run("ModifyListener", || modify.clone().send())
                        .await?;
                }
                ListenerAction::Delete { arn } => {
                    let deleted = self
                        .calls
                        .run("DeleteListener", || {
                            self.clients
                                .elbv2
                                .delete_listener()
                                .listener_arn(&arn)
                                .send()
                        })
                        .await;
                    match deleted {
                        Ok(_) | Err(ProviderError::NotFound { .. }) => {}
                        Err(other) => return Err(other),
                    }
                }
            }
        }
        Ok(())
    }

    /// Deletes target groups that carry `key`'s tags, retrying while a
    /// load balancer being deleted still holds them.
    async fn delete_target_groups(
        &self,
        key: &LoadBalancerKey,
        arns: &BTreeSet<String>,
    ) -> Result<()> {
        let arns: Vec<String> = arns.iter().cloned().collect();
        let tags = match self.tags_of(&arns).await {
            Ok(t) => t,
            Err(ProviderError::NotFound { .. }) => {
                // One of them is gone already: look them up one by one.
                let mut t = BTreeMap::new();
                for arn in &arns {
                    if let Ok(mut one) = self.tags_of(std::slice::from_ref(arn)).await {
                        t.append(&mut one);
                    }
                }
                t
            }
            Err(e) => return Err(e),
        };
        for arn in arns
            .iter()
            .filter(|a| tags.get(*a).is_some_and(|t| is_owned_by(t, key)))
        {
            // Each attempt is one rate-limited, metered call with its
            // own retries on throttling; this loop is only for "in use".
            let delete = || async {
                let deleted = self
                    .calls
                    .run("DeleteTargetGroup", || {
                        self.clients
                            .elbv2
                            .delete_target_group()
                            .target_group_arn(arn)
                            .send()
                    })
                    .await;
                match deleted {
                    Ok(_) | Err(ProviderError::NotFound { .. }) => Ok(()),
                    Err(other) => Err(other),
                }
            };
            delete
                .retry(in_use_backoff())
                .when(|e| matches!(e, ProviderError::Conflict { .. }))
                .await?;
        }
        Ok(())
    }

    async fn target_group_arn(
        &self,
        key: &LoadBalancerKey,
        listener: &Listener,
        known: &ResourceIds,
    ) -> Result<String> {
        if let Some(arn) = known.get(&target_group_id_key(listener)) {
            return Ok(arn.clone());
        }
        let name = target_group_name(key, listener)?;
        self.find_target_group(key, &name, None)
            .await?
            .map(|tg| tg.arn)
            .filter(|arn| !arn.is_empty())
            .ok_or(ProviderError::NotFound {
                resource: format!("target group {name}"),
            })
    }

    async fn deregister(&self, arn: &str, targets: Vec<TargetDescription>) -> Result<()> {
        self.calls
            .run("DeregisterTargets", || {
                self.clients
                    .elbv2
                    .deregister_targets()
                    .target_group_arn(arn)
                    .set_targets(Some(targets.clone()))
                    .send()
            })
            .await?;
        Ok(())
    }

    /// (ip, port) of every target registered in a target group, draining included.
    async fn registered(&self, arn: &str) -> Result<BTreeSet<(String, i32)>> {
        let out = self
            .calls
            .run("DescribeTargetHealth", || {
                self.clients
                    .elbv2
                    .describe_target_health()
                    .target_group_arn(arn)
                    .send()
            })
            .await?;
        Ok(out
            .target_health_descriptions()
            .iter()
            .filter_map(|d| d.target())
            .filter_map(|t| Some((t.id()?.to_string(), t.port()?)))
            .collect())
    }

    /// The backend rules for targets registered before the backend group
    /// was turned on (or by an older cnlb): `sync_targets` only sees new
    /// ones. One DescribeTargetHealth per listener, on an ensure only.
    async fn allow_registered(
        &self,
        spec: &LoadBalancerSpec,
        by_port: &BTreeMap<u16, String>,
    ) -> Result<()> {
        let Some(backend) = &self.backend else {
            return Ok(());
        };
        for l in &spec.listeners {
            let Some(arn) = by_port.get(&l.port) else {
                continue;
            };
            let targets: Vec<Target> = self
                .registered(arn)
                .await?
                .into_iter()
                .filter_map(|(ip, port)| {
                    Some(Target::new(ip.parse().ok()?, u16::try_from(port).ok()?))
                })
                .collect();
            if targets.is_empty() {
                continue;
            }
            let hc_port = backend.health_check_port(arn).await?;
            let rules = backend_rules(
                elb_protocol(l.protocol)?,
                targets.iter().map(|t| t.port),
                &hc_port,
            );
            backend.allow(&spec.key.cluster, &targets, &rules).await?;
        }
        Ok(())
    }

    /// The NLB's frontend security group, with ingress rules brought to
    /// [`ingress_rules`]: only the differences are authorized or revoked.
    async fn ensure_security_group(
        &self,
        spec: &LoadBalancerSpec,
        known: &ResourceIds,
    ) -> Result<String> {
        let name = security_group_name(&spec.key);
        let found = self
            .find_security_group(&spec.key, &name, known.get(SECURITY_GROUP_ID))
            .await?;
        let (id, existing) = match found {
            Some(sg) => (sg.group_id().unwrap_or_default().to_string(), rules_of(&sg)),
            None => {
                let tags = TagSpecification::builder()
                    .resource_type(ResourceType::SecurityGroup)
                    .set_tags(Some(
                        spec.resource_tags()
                            .iter()
                            .map(|(k, v)| Ec2Tag::builder().key(k).value(v).build())
                            .collect(),
                    ))
                    .build();
                let create = self
                    .clients
                    .ec2
                    .create_security_group()
                    .group_name(&name)
                    .description(format!("cnlb frontend of {}", spec.key.service()))
                    .vpc_id(&self.config.vpc_id)
                    .tag_specifications(tags);
                let id = self
                    .calls
                    .run_unrepeatable(
                        "CreateSecurityGroup",
                        || async {
                            let out = create.clone().send().await;
                            out.map(|out| out.group_id().map(str::to_string))
                        },
                        || async {
                            let found = self.find_security_group(&spec.key, &name, None);
                            Ok(found.await?.map(|sg| sg.group_id().map(str::to_string)))
                        },
                    )
                    .await?;
                (
                    id.ok_or_else(|| cloud("CreateSecurityGroup", "no group id in the answer"))?,
                    BTreeSet::new(),
                )
            }
        };
        let changes = ingress_changes(&ingress_rules(spec), &existing);
        let add: Vec<IpPermission> = changes.authorize.iter().map(permission).collect();
        let remove: Vec<IpPermission> = changes.revoke.iter().map(permission).collect();
        // After a lost answer: whether the group already has (`present`)
        // or lacks each of `rules`, as the lost call would have left it.
        let (group_name, group_id) = (&name, &id);
        let done_already = |rules: Vec<IngressRule>, present: bool| async move {
            let sg = self
                .find_security_group(&spec.key, group_name, Some(group_id))
                .await?;
            let have = sg.as_ref().map(rules_of).unwrap_or_default();
            Ok(rules
                .iter()
                .all(|r| have.contains(r) == present)
                .then_some(()))
        };
        if !add.is_empty() {
            // EC2 refuses a rule that exists: after a lost answer, look.
            self.calls
                .run_unrepeatable(
                    "AuthorizeSecurityGroupIngress",
                    || async {
                        let authorize = self.clients.ec2.authorize_security_group_ingress();
                        let authorize = authorize
                            .group_id(&id)
                            .set_ip_permissions(Some(add.clone()));
                        authorize.send().await.map(|_| ())
                    },
                    || done_already(changes.authorize.clone(), true),
                )
                .await?;
        }
        if !remove.is_empty() {
            // EC2 refuses to revoke a rule that is gone: after a lost
            // answer, look.
            self.calls
                .run_unrepeatable(
                    "RevokeSecurityGroupIngress",
                    || async {
                        let revoke = self.clients.ec2.revoke_security_group_ingress();
                        let revoke = revoke
                            .group_id(&id)
                            .set_ip_permissions(Some(remove.clone()));
                        revoke.send().await.map(|_| ())
                    },
                    || done_already(changes.revoke.clone(), false),
                )
                .await?;
        }
        Ok(id)
    }

    /// By persisted ID, else by name in the VPC if its tags say it is ours.
    async fn find_security_group(
        &self,
        key: &LoadBalancerKey,
        name: &str,
        known_id: Option<&String>,
    ) -> Result<Option<SecurityGroup>> {
        if let Some(id) = known_id {
            let found = self
                .calls
                .run("DescribeSecurityGroups", || {
                    self.clients
                        .ec2
                        .describe_security_groups()
                        .group_ids(id)
                        .send()
                })
                .await;
            match found {
                Ok(out) => {
                    if let Some(sg) = out.security_groups().first() {
                        let tags = to_map(sg.tags().iter().map(|t| (t.key(), t.value())));
                        if !is_owned_by(&tags, key) {
                            return Err(not_owned(&format!("security group {id}"), key));
                        }
                        return Ok(Some(sg.clone()));
                    }
                }
                Err(ProviderError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let vpc = Filter::builder()
            .name("vpc-id")
            .values(&self.config.vpc_id)
            .build();
        let named = Filter::builder().name("group-name").values(name).build();
        let out = self
            .calls
            .run("DescribeSecurityGroups", || {
                self.clients
                    .ec2
                    .describe_security_groups()
                    .filters(vpc.clone())
                    .filters(named.clone())
                    .send()
            })
            .await?;
        let Some(sg) = out.security_groups().first() else {
            return Ok(None);
        };
        let tags = to_map(sg.tags().iter().map(|t| (t.key(), t.value())));
        if !is_owned_by(&tags, key) {
            return Err(not_owned(&format!("security group {name}"), key));
        }
        Ok(Some(sg.clone()))
    }

    /// Deletes `key`'s security group, retrying while the load balancer's
    /// network interfaces still use it.
    async fn delete_security_group(
        &self,
        key: &LoadBalancerKey,
        known: &ResourceIds,
    ) -> Result<()> {
        let name = security_group_name(key);
        // A foreign group the ID names is skipped, ours by name still goes.
        let by_id = match known.get(SECURITY_GROUP_ID) {
            Some(id) => skip_foreign(self.find_security_group(key, &name, Some(id)).await)?,
            None => None,
        };
        let sg = match by_id {
            Some(sg) => sg,
            None => match skip_foreign(self.find_security_group(key, &name, None).await)? {
                Some(sg) => sg,
                None => return Ok(()),
            },
        };
        let id = sg.group_id().unwrap_or_default().to_string();
        let delete = || async {
            match self
                .calls
                .run("DeleteSecurityGroup", || {
                    self.clients
                        .ec2
                        .delete_security_group()
                        .group_id(&id)
                        .send()
                })
                .await
            {
                Ok(_) | Err(ProviderError::NotFound { .. }) => Ok(()),
                Err(other) => Err(other),
            }
        };
        delete
            .retry(in_use_backoff())
            .when(|e| matches!(e, ProviderError::Conflict { .. }))
            .await
    }
}

#[async_trait]
impl LoadBalancerProvider for AwsProvider {
    fn name(&self) -> &str {
        "aws"
    }

    /// Turning the backend group on must attach it to the existing NLBs.
    fn settings(&self) -> String {
        if self.backend.is_some() {
            "backend-security-group".into()
        } else {
            String::new()
        }
    }

    async fn ensure_load_balancer(
        &self,
        spec: &LoadBalancerSpec,
        known: &ResourceIds,
    ) -> Result<LoadBalancerStatus> {
        validate(spec)?;
        // Target groups first: a listener needs one to forward to.
        let mut ids = ResourceIds::new();
        let mut by_port = BTreeMap::new();
        for l in &spec.listeners {
            let arn = self.ensure_target_group(spec, l, known).await?;
            ids.insert(target_group_id_key(l), arn.clone());
            by_port.insert(l.port, arn);
        }
        let security_group = self.ensure_security_group(spec, known).await?;
        ids.insert(SECURITY_GROUP_ID.to_string(), security_group.clone());
        let mut security_groups = vec![security_group];
        if let Some(backend) = &self.backend {
            security_groups.push(backend.id(&spec.key.cluster).await?);
        }
        let lb = self.ensure_nlb(spec, known, &security_groups).await?;
        ids.insert(LOAD_BALANCER_ID.to_string(), lb.arn.clone());
        self.ensure_listeners(spec, &lb.arn, &by_port).await?;
        if !known.is_empty() {
            self.allow_registered(spec, &by_port).await?;
        }

        // Target groups of listeners the spec dropped (or changed protocol
        // or port): no listener forwards to them any more.
        let stale = target_group::stale(known, &ids);
        if !stale.is_empty() {
            self.delete_target_groups(&spec.key, &stale).await?;
        }

        let ingress = lb
            .dns_name
            .map(|h| LoadBalancerIngress {
                hostname: Some(h),
                ip: None,
                ip_mode: None,
            })
            .into_iter()
            .collect();
        Ok(LoadBalancerStatus {
            ingress,
            ids,
            annotations: Default::default(),
        })
    }

    async fn sync_targets(
        &self,
        key: &LoadBalancerKey,
        listener: &Listener,
        delta: &TargetDelta,
        known: &ResourceIds,
    ) -> Result<()> {
        if delta.is_empty() {
            return Ok(());
        }
        self.check_target_groups(key, known).await?;
        let arn = self.target_group_arn(key, listener, known).await?;
        // Draining first: a terminating Pod stops getting new connections
        // before anything else happens.
        for chunk in delta.deregister.chunks(TARGET_BATCH) {
            match self
                .deregister(&arn, chunk.iter().map(target).collect())
                .await
            {
                // A target that is not registered fails the whole batch: drop
                // the absent ones (deregistering them is done already) and retry.
                Err(ProviderError::InvalidSpec { .. }) => {
                    let present = self.registered(&arn).await?;
                    let rest: Vec<TargetDescription> = chunk
                        .iter()
                        .filter(|t| present.contains(&(t.ip.to_string(), i32::from(t.port))))
                        .map(target)
                        .collect();
                    if !rest.is_empty() {
                        self.deregister(&arn, rest).await?;
                    }
                }
                other => other?,
            }
        }
        // The targets' ENIs let the NLB in before their registration, so
        // the first health checks pass.
        if let Some(backend) = &self.backend {
            backend.forget(&delta.deregister);
            if !delta.register.is_empty() {
                let hc_port = backend.health_check_port(&arn).await?;
                let ports = delta.register.iter().map(|t| t.port);
                let rules = backend_rules(elb_protocol(listener.protocol)?, ports, &hc_port);
                backend.allow(&key.cluster, &delta.register, &rules).await?;
            }
        }
        for chunk in delta.register.chunks(TARGET_BATCH) {
            self.calls
                .run("RegisterTargets", || {
                    self.clients
                        .elbv2
                        .register_targets()
                        .target_group_arn(&arn)
                        .set_targets(Some(chunk.iter().map(target).collect()))
                        .send()
                })
                .await?;
        }
        Ok(())
    }

    async fn target_health(
        &self,
        key: &LoadBalancerKey,
        known: &ResourceIds,
    ) -> Result<Vec<TargetHealth>> {
        // One call per target group; a deleted one answers TargetGroupNotFound
        // (NotFound). Only without any target group ID is the load balancer
        // itself looked up, so "gone" is still reported as NotFound.
        let has_target_groups = known.keys().any(|k| listener_of_id_key(k).is_some());
        if !has_target_groups && self.find_load_balancer(key, known).await?.is_none() {
            return Err(ProviderError::NotFound {
                resource: format!("load balancer of {key}"),
            });
        }
        self.check_target_groups(key, known).await?;
        let mut health = Vec::new();
        for (id_key, arn) in known {
            let Some(listener) = listener_of_id_key(id_key) else {
                continue;
            };
            let out = self
                .calls
                .run("DescribeTargetHealth", || {
                    self.clients
                        .elbv2
                        .describe_target_health()
                        .target_group_arn(arn)
                        .send()
                })
                .await?;
            for d in out.target_health_descriptions() {
                let Some(t) = d.target() else { continue };
                let (Some(ip), Some(port)) = (t.id().and_then(|i| i.parse().ok()), t.port()) else {
                    continue;
                };
                let th = d.target_health();
                let state = match th.and_then(|h| h.state()) {
                    Some(TargetHealthStateEnum::Healthy) => TargetHealthState::Healthy,
                    Some(TargetHealthStateEnum::Unhealthy) => TargetHealthState::Unhealthy,
                    Some(TargetHealthStateEnum::Initial) => TargetHealthState::Initial,
                    Some(TargetHealthStateEnum::Draining) => TargetHealthState::Draining,
                    _ => TargetHealthState::Unavailable,
                };
                health.push(TargetHealth {
                    listener: listener.to_string(),
                    ip,
                    port: u16::try_from(port).unwrap_or_default(),
                    state,
                    reason: th.and_then(|h| h.reason()).map(|r| r.as_str().to_string()),
                });
            }
        }
        Ok(health)
    }

    async fn delete_load_balancer(&self, key: &LoadBalancerKey, known: &ResourceIds) -> Result<()> {
        // Only what is tagged as `key`'s: a foreign load balancer the ID or
        // the name points at is left alone, and ours by name still goes.
        let by_arn = match known.get(LOAD_BALANCER_ID) {
            Some(arn) => skip_foreign(self.load_balancer_by_arn(key, arn).await)?,
            None => None,
        };
        let lb = match by_arn {
            Some(lb) => Some(lb),
            None => skip_foreign(self.load_balancer_by_name(key).await)?,
        };
        let mut existing = Vec::new();
        if let Some(lb) = lb {
            existing = self.listeners_of(&lb.arn).await?;
            let deleted = self
                .calls
                .run("DeleteLoadBalancer", || {
                    self.clients
                        .elbv2
                        .delete_load_balancer()
                        .load_balancer_arn(&lb.arn)
                        .send()
                })
                .await;
            match deleted {
                Ok(_) | Err(ProviderError::NotFound { .. }) => {}
                Err(other) => return Err(other),
            }
        }
        let target_groups = listeners::target_groups_to_delete(known, &existing);
        self.delete_target_groups(key, &target_groups).await?;
        self.delete_security_group(key, known).await?;
        self.owned_target_groups()
            .retain(|(uid, _)| *uid != key.uid);
        Ok(())
    }

    async fn list_owned(&self, cluster: &str) -> Result<Vec<OwnedLoadBalancer>> {
        let mut owned: BTreeMap<LoadBalancerKey, ResourceIds> = BTreeMap::new();
        let mut marker = None;
        loop {
            let out = self
                .calls
                .run("DescribeLoadBalancers", || {
                    self.clients
                        .elbv2
                        .describe_load_balancers()
                        .set_marker(marker.clone())
                        .send()
                })
                .await?;
            let arns: Vec<String> = out
                .load_balancers()
                .iter()
                .filter_map(|l| l.load_balancer_arn().map(str::to_string))
                .collect();
            for (arn, tags) in self.tags_of(&arns).await? {
                if is_owned_by_cluster(&tags, cluster)
                    && let Some(key) = key_from_owner_tags(&tags)
                {
                    owned
                        .entry(key)
                        .or_default()
                        .insert(LOAD_BALANCER_ID.to_string(), arn);
                }
            }
            marker = out.next_marker().map(str::to_string);
            if marker.is_none() {
                break;
            }
        }
        // Target groups too: a crash between creating one and the load
        // balancer leaves a target group with no load balancer.
        let mut marker = None;
        loop {
            let out = self
                .calls
                .run("DescribeTargetGroups", || {
                    self.clients
                        .elbv2
                        .describe_target_groups()
                        .set_marker(marker.clone())
                        .send()
                })
                .await?;
            let named: BTreeMap<String, String> = out
                .target_groups()
                .iter()
                .filter_map(|t| {
                    Some((
                        t.target_group_arn()?.to_string(),
                        t.target_group_name()?.to_string(),
                    ))
                })
                .collect();
            let arns: Vec<String> = named.keys().cloned().collect();
            for (arn, tags) in self.tags_of(&arns).await? {
                if is_owned_by_cluster(&tags, cluster)
                    && let Some(key) = key_from_owner_tags(&tags)
                {
                    let name = named.get(&arn).cloned().unwrap_or_default();
                    owned
                        .entry(key)
                        .or_default()
                        .insert(format!("target-group/{name}"), arn);
                }
            }
            marker = out.next_marker().map(str::to_string);
            if marker.is_none() {
                break;
            }
        }
        let tagged = Filter::builder()
            .name(format!("tag:{TAG_CLUSTER}"))
            .values(cluster)
            .build();
        let out = self
            .calls
            .run("DescribeSecurityGroups", || {
                self.clients
                    .ec2
                    .describe_security_groups()
                    .filters(tagged.clone())
                    .send()
            })
            .await?;
        for sg in out.security_groups() {
            let tags = to_map(sg.tags().iter().map(|t| (t.key(), t.value())));
            if let (Some(key), Some(id)) = (key_from_owner_tags(&tags), sg.group_id()) {
                owned
                    .entry(key)
                    .or_default()
                    .insert(SECURITY_GROUP_ID.to_string(), id.to_string());
            }
        }
        Ok(owned
            .into_iter()
            .map(|(key, ids)| OwnedLoadBalancer { key, ids })
            .collect())
    }

    async fn prune_shared(&self, cluster: &str) -> Result<()> {
        let Some(backend) = &self.backend else {
            return Ok(());
        };
        let started = Instant::now();
        let owned = self.list_owned(cluster).await?;
        // What the remaining target groups need: their protocol on each
        // registered target's port, and a fixed health-check port.
        let arns: Vec<String> = owned
            .iter()
            .flat_map(|lb| lb.ids.iter())
            .filter(|(k, _)| listener_of_id_key(k).is_some())
            .map(|(_, arn)| arn.clone())
            .collect();
        let mut needed: BTreeSet<BackendRule> = BTreeSet::new();
        for chunk in arns.chunks(DESCRIBE_TAGS_BATCH) {
            let groups = match self
                .calls
                .run("DescribeTargetGroups", || {
                    self.clients
                        .elbv2
                        .describe_target_groups()
                        .set_target_group_arns(Some(chunk.to_vec()))
                        .send()
                })
                .await
            {
                Ok(out) => out.target_groups().to_vec(),
                // One of them went meanwhile: ask one by one.
                Err(ProviderError::NotFound { .. }) => {
                    let mut found = Vec::new();
                    for arn in chunk {
                        if let Some(tg) = self.target_group_by_arn(arn).await? {
                            found.push(tg);
                        }
                    }
                    found
                }
                Err(e) => return Err(e),
            };
            for tg in groups {
                let arn = tg.target_group_arn().unwrap_or_default();
                let registered = match self.registered(arn).await {
                    Ok(registered) => registered,
                    Err(ProviderError::NotFound { .. }) => continue,
                    Err(e) => return Err(e),
                };
                let ports = registered
                    .into_iter()
                    .filter_map(|(_, port)| u16::try_from(port).ok());
                let protocol = tg.protocol().map(|p| p.as_str()).unwrap_or("TCP");
                let hc_port = tg.health_check_port().unwrap_or("traffic-port");
                needed.extend(backend_rules(protocol, ports, hc_port));
            }
        }
        backend
            .prune(cluster, &needed, started, !owned.is_empty())
            .await?;
        Ok(())
    }
}

fn cloud(operation: &str, message: &str) -> ProviderError {
    ProviderError::cloud(operation, message, true)
}

/// `what` exists but is not `key`'s: cnlb neither adopts, changes nor
/// deletes it.
fn not_owned(what: &str, key: &LoadBalancerKey) -> ProviderError {
    ProviderError::Conflict {
        resource: what.to_string(),
        reason: format!("it exists but is not tagged as owned by {key}"),
    }
}

/// A lookup for a deletion: what is not ours counts as absent.
fn skip_foreign<T>(found: Result<Option<T>>) -> Result<Option<T>> {
    match found {
        Err(ProviderError::Conflict { resource, reason }) => {
            warn!("not deleting {resource}: {reason}");
            Ok(None)
        }
        other => other,
    }
}

/// A target group stays "in use" for a few seconds after its load balancer
/// or listener is deleted.
fn in_use_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(5))
        .with_max_times(8)
        .with_jitter()
}
