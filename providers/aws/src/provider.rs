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

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_ec2::types::{
    Filter, IpPermission, IpRange, Ipv6Range, ResourceType, SecurityGroup, Tag as Ec2Tag,
    TagSpecification,
};
use aws_sdk_elasticloadbalancingv2::types::{
    Action, ActionTypeEnum, IpAddressType as ElbIpAddressType, Listener as ElbListener,
    LoadBalancer, LoadBalancerAttribute, LoadBalancerSchemeEnum, LoadBalancerTypeEnum, Matcher,
    ProtocolEnum, Tag, TargetDescription, TargetGroup, TargetGroupAttribute, TargetHealthStateEnum,
    TargetTypeEnum,
};
use backon::{ExponentialBuilder, Retryable};
use cnlb_provider_core::{
    HealthCheckPort, HealthCheckProtocol, IpAddressType, Listener, LoadBalancerIngress,
    LoadBalancerKey, LoadBalancerProvider, LoadBalancerSpec, LoadBalancerStatus, OwnedLoadBalancer,
    ProviderError, ResourceIds, Result, Scheme, TAG_CLUSTER, Target, TargetDelta, TargetHealth,
    TargetHealthState, is_owned_by, is_owned_by_cluster, key_from_owner_tags,
};
use prometheus_client::registry::Registry;

use crate::Clients;
use crate::backend::BackendGroup;
use crate::calls::{Calls, RateLimits};
use crate::nodes::AwsNodes;
use crate::plan::{
    BackendRule, DESCRIBE_TAGS_BATCH, IngressRule, LOAD_BALANCER_ID, SECURITY_GROUP_ID,
    TARGET_BATCH, backend_rules, changed, elb_protocol, ingress_rules, listener_of_id_key,
    target_group_id_key, target_group_name,
};

/// Subnet tags through which load balancer subnets are discovered, as in
/// aws-load-balancer-controller and the in-tree AWS cloud provider.
pub const ELB_SUBNET_TAG: &str = "kubernetes.io/role/elb";
pub const INTERNAL_ELB_SUBNET_TAG: &str = "kubernetes.io/role/internal-elb";

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
}

type Tags = BTreeMap<String, String>;

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

    /// The load balancer of `key`: by persisted ARN, else by name if its
    /// tags say it is ours. A name taken by someone else is a conflict.
    async fn find_load_balancer(
        &self,
        key: &LoadBalancerKey,
        known: &ResourceIds,
    ) -> Result<Option<LoadBalancer>> {
        let elbv2 = &self.clients.elbv2;
        if let Some(arn) = known.get(LOAD_BALANCER_ID) {
            let found = self
                .calls
                .run("DescribeLoadBalancers", || {
                    elbv2
                        .describe_load_balancers()
                        .load_balancer_arns(arn)
                        .send()
                })
                .await;
            match found {
                Ok(out) => {
                    if let Some(lb) = out.load_balancers().first() {
                        return Ok(Some(lb.clone()));
                    }
                }
                Err(ProviderError::NotFound { .. }) => {}
                Err(other) => return Err(other),
            }
        }
        let name = key.short_name();
        let found = self
            .calls
            .run("DescribeLoadBalancers", || {
                elbv2.describe_load_balancers().names(&name).send()
            })
            .await;
        let lb = match found {
            Ok(out) => out.load_balancers().first().cloned(),
            Err(ProviderError::NotFound { .. }) => None,
            Err(other) => return Err(other),
        };
        let Some(lb) = lb else { return Ok(None) };
        let arn = lb.load_balancer_arn().unwrap_or_default().to_string();
        self.check_owner(key, &arn, &name).await?;
        Ok(Some(lb))
    }

    /// The target group named `name`: by persisted ARN (if it still has
    /// that name), else by name with our tags.
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

    async fn find_target_group(
        &self,
        key: &LoadBalancerKey,
        name: &str,
        known_arn: Option<&String>,
    ) -> Result<Option<TargetGroup>> {
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
                    if let Some(tg) = out.target_groups().first()
                        && tg.target_group_name() == Some(name)
                    {
                        return Ok(Some(tg.clone()));
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
            Ok(out) => out.target_groups().first().cloned(),
            Err(ProviderError::NotFound { .. }) => None,
            Err(other) => return Err(other),
        };
        let Some(tg) = tg else { return Ok(None) };
        self.check_owner(key, tg.target_group_arn().unwrap_or_default(), name)
            .await?;
        Ok(Some(tg))
    }

    async fn check_owner(&self, key: &LoadBalancerKey, arn: &str, name: &str) -> Result<()> {
        let tags = self.tags_of(&[arn.to_string()]).await?;
        if tags.get(arn).is_some_and(|t| is_owned_by(t, key)) {
            Ok(())
        } else {
            Err(ProviderError::Conflict {
                resource: name.to_string(),
                reason: format!("{name} exists but is not tagged as owned by {key}"),
            })
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
        let role = match spec.scheme {
            Scheme::Internal => INTERNAL_ELB_SUBNET_TAG,
            Scheme::InternetFacing => ELB_SUBNET_TAG,
        };
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
        // One subnet per AZ (the lowest ID, so the choice is stable).
        let mut per_az: BTreeMap<String, String> = BTreeMap::new();
        for s in out.subnets() {
            let (Some(az), Some(id)) = (s.availability_zone(), s.subnet_id()) else {
                continue;
            };
            let entry = per_az
                .entry(az.to_string())
                .or_insert_with(|| id.to_string());
            if id < entry.as_str() {
                *entry = id.to_string();
            }
        }
        if per_az.is_empty() {
            return Err(ProviderError::invalid(
                "subnets",
                format!(
                    "no subnet of {} is tagged {role}; tag one per zone or name them in the subnets annotation",
                    self.config.vpc_id
                ),
            ));
        }
        Ok(per_az.into_values().collect())
    }

    async fn ensure_target_group(
        &self,
        spec: &LoadBalancerSpec,
        listener: &Listener,
        known: &ResourceIds,
    ) -> Result<String> {
        let name = target_group_name(&spec.key, listener)?;
        let protocol = ProtocolEnum::from(elb_protocol(listener.protocol)?);
        let hc = &spec.health_check;
        let hc_protocol = match hc.protocol {
            HealthCheckProtocol::Tcp => ProtocolEnum::Tcp,
            HealthCheckProtocol::Http => ProtocolEnum::Http,
            HealthCheckProtocol::Https => ProtocolEnum::Https,
        };
        let hc_port = match hc.port {
            HealthCheckPort::TrafficPort => "traffic-port".to_string(),
            HealthCheckPort::Port(p) => p.to_string(),
        };
        let http = hc.protocol != HealthCheckProtocol::Tcp;
        let path = if http {
            Some(hc.path.clone().unwrap_or_else(|| "/".to_string()))
        } else {
            None
        };
        let matcher = http.then(|| Matcher::builder().http_code(&hc.success_codes).build());
        let interval = secs(hc.interval);
        let timeout = secs(hc.timeout);

        let known_arn = known.get(&target_group_id_key(listener));
        let arn = match self.find_target_group(&spec.key, &name, known_arn).await? {
            Some(tg) => {
                let arn = tg.target_group_arn().unwrap_or_default().to_string();
                let drifted = tg.health_check_protocol() != Some(&hc_protocol)
                    || tg.health_check_port() != Some(hc_port.as_str())
                    || tg.health_check_interval_seconds() != Some(interval)
                    || tg.health_check_timeout_seconds() != Some(timeout)
                    || tg.healthy_threshold_count() != Some(hc.healthy_threshold as i32)
                    || tg.unhealthy_threshold_count() != Some(hc.unhealthy_threshold as i32)
                    || (http && tg.health_check_path() != path.as_deref())
                    || (http
                        && tg.matcher().and_then(|m| m.http_code())
                            != Some(hc.success_codes.as_str()));
                if drifted {
                    let modify = self
                        .clients
                        .elbv2
                        .modify_target_group()
                        .target_group_arn(&arn)
                        .health_check_protocol(hc_protocol.clone())
                        .health_check_port(&hc_port)
                        .set_health_check_path(path.clone())
                        .health_check_interval_seconds(interval)
                        .health_check_timeout_seconds(timeout)
                        .healthy_threshold_count(hc.healthy_threshold as i32)
                        .unhealthy_threshold_count(hc.unhealthy_threshold as i32)
                        .set_matcher(matcher.clone());
                    self.calls
                        .run("ModifyTargetGroup", || modify.clone().send())
                        .await?;
                }
                self.add_missing_tags(&arn, &spec.resource_tags()).await?;
                arn
            }
            None => {
                let create = self
                    .clients
                    .elbv2
                    .create_target_group()
                    .name(&name)
                    .protocol(protocol)
                    .port(i32::from(listener.target_port))
                    .vpc_id(&self.config.vpc_id)
                    .target_type(TargetTypeEnum::Ip)
                    .health_check_protocol(hc_protocol)
                    .health_check_port(&hc_port)
                    .set_health_check_path(path)
                    .health_check_interval_seconds(interval)
                    .health_check_timeout_seconds(timeout)
                    .healthy_threshold_count(hc.healthy_threshold as i32)
                    .unhealthy_threshold_count(hc.unhealthy_threshold as i32)
                    .set_matcher(matcher)
                    .set_tags(Some(elb_tags(&spec.resource_tags())));
                let out = self
                    .calls
                    .run("CreateTargetGroup", || create.clone().send())
                    .await?;
                out.target_groups()
                    .first()
                    .and_then(|tg| tg.target_group_arn())
                    .map(str::to_string)
                    .ok_or_else(|| cloud("CreateTargetGroup", "no target group in the answer"))?
            }
        };

        if let Some(backend) = &self.backend {
            backend.remember_health_check(&arn, &hc_port);
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
    ) -> Result<LoadBalancer> {
        let scheme = match spec.scheme {
            Scheme::Internal => LoadBalancerSchemeEnum::Internal,
            Scheme::InternetFacing => LoadBalancerSchemeEnum::InternetFacing,
        };
        let lb = match self.find_load_balancer(&spec.key, known).await? {
            Some(lb) => {
                // Changing the scheme means a new NLB (and a new address):
                // never done behind the user's back.
                if lb.scheme() != Some(&scheme) {
                    return Err(ProviderError::invalid(
                        "scheme",
                        format!(
                            "the load balancer exists as {}; the scheme cannot change in place (recreate the Service)",
                            lb.scheme().map(|s| s.as_str()).unwrap_or("unknown")
                        ),
                    ));
                }
                let arn = lb.load_balancer_arn().unwrap_or_default();
                self.add_missing_tags(arn, &spec.resource_tags()).await?;
                let have: BTreeSet<&String> = lb.security_groups().iter().collect();
                if have != security_groups.iter().collect() {
                    self.calls
                        .run("SetSecurityGroups", || {
                            self.clients
                                .elbv2
                                .set_security_groups()
                                .load_balancer_arn(arn)
                                .set_security_groups(Some(security_groups.to_vec()))
                                .send()
                        })
                        .await?;
                }
                lb
            }
            None => {
                let subnets = self.subnets(spec).await?;
                let ip_type = match spec.ip_address_type {
                    IpAddressType::Ipv4 => ElbIpAddressType::Ipv4,
                    IpAddressType::DualStack => ElbIpAddressType::Dualstack,
                };
                let create = self
                    .clients
                    .elbv2
                    .create_load_balancer()
                    .name(spec.key.short_name())
                    .r#type(LoadBalancerTypeEnum::Network)
                    .scheme(scheme)
                    .ip_address_type(ip_type)
                    .set_subnets(Some(subnets))
                    // An NLB created without security groups can never get any.
                    .set_security_groups(Some(security_groups.to_vec()))
                    .set_tags(Some(elb_tags(&spec.resource_tags())));
                let out = self
                    .calls
                    .run("CreateLoadBalancer", || create.clone().send())
                    .await?;
                out.load_balancers()
                    .first()
                    .cloned()
                    .ok_or_else(|| cloud("CreateLoadBalancer", "no load balancer in the answer"))?
            }
        };
        let arn = lb.load_balancer_arn().unwrap_or_default();
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

    async fn listeners_of(&self, lb_arn: &str) -> Result<Vec<ElbListener>> {
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
        Ok(out.listeners().to_vec())
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
        for l in &spec.listeners {
            let Some(tg) = target_groups.get(&l.port) else {
                continue;
            };
            let protocol = ProtocolEnum::from(elb_protocol(l.protocol)?);
            let forward = Action::builder()
                .r#type(ActionTypeEnum::Forward)
                .target_group_arn(tg)
                .build();
            match existing
                .iter()
                .find(|x| x.port() == Some(i32::from(l.port)))
            {
                Some(x)
                    if x.protocol() == Some(&protocol) && forwards_to(x) == Some(tg.as_str()) => {}
                Some(x) => {
                    let modify = self
                        .clients
                        .elbv2
                        .modify_listener()
                        .listener_arn(x.listener_arn().unwrap_or_default())
                        .protocol(protocol)
                        .default_actions(forward);
                    self.calls
                        .run("ModifyListener", || modify.clone().send())
                        .await?;
                }
                None => {
                    let create = self
                        .clients
                        .elbv2
                        .create_listener()
                        .load_balancer_arn(lb_arn)
                        .protocol(protocol)
                        .port(i32::from(l.port))
                        .default_actions(forward)
                        .set_tags(Some(elb_tags(&spec.resource_tags())));
                    self.calls
                        .run("CreateListener", || create.clone().send())
                        .await?;
                }
            }
        }
        let wanted: BTreeSet<i32> = spec.listeners.iter().map(|l| i32::from(l.port)).collect();
        for x in existing
            .iter()
            .filter(|x| x.port().is_some_and(|p| !wanted.contains(&p)))
        {
            let deleted = self
                .calls
                .run("DeleteListener", || {
                    self.clients
                        .elbv2
                        .delete_listener()
                        .listener_arn(x.listener_arn().unwrap_or_default())
                        .send()
                })
                .await;
            match deleted {
                Ok(_) | Err(ProviderError::NotFound { .. }) => {}
                Err(other) => return Err(other),
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
            .and_then(|tg| tg.target_group_arn().map(str::to_string))
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
        let name = spec.key.resource_name("sg");
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
                let out = self
                    .calls
                    .run("CreateSecurityGroup", || create.clone().send())
                    .await?;
                let id = out.group_id().map(str::to_string);
                (
                    id.ok_or_else(|| cloud("CreateSecurityGroup", "no group id in the answer"))?,
                    BTreeSet::new(),
                )
            }
        };
        let desired = ingress_rules(spec);
        let add: Vec<IpPermission> = desired.difference(&existing).map(permission).collect();
        let remove: Vec<IpPermission> = existing.difference(&desired).map(permission).collect();
        if !add.is_empty() {
            self.calls
                .run("AuthorizeSecurityGroupIngress", || {
                    self.clients
                        .ec2
                        .authorize_security_group_ingress()
                        .group_id(&id)
                        .set_ip_permissions(Some(add.clone()))
                        .send()
                })
                .await?;
        }
        if !remove.is_empty() {
            self.calls
                .run("RevokeSecurityGroupIngress", || {
                    self.clients
                        .ec2
                        .revoke_security_group_ingress()
                        .group_id(&id)
                        .set_ip_permissions(Some(remove.clone()))
                        .send()
                })
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
            return Err(ProviderError::Conflict {
                resource: name.to_string(),
                reason: format!("security group {name} exists but is not tagged as owned by {key}"),
            });
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
        let name = key.resource_name("sg");
        let Some(sg) = self
            .find_security_group(key, &name, known.get(SECURITY_GROUP_ID))
            .await?
        else {
            return Ok(());
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
        spec.validate()?;
        for l in &spec.listeners {
            elb_protocol(l.protocol)?;
        }
        if let Some(listener) = spec.target_group_names.keys().next() {
            return Err(ProviderError::invalid(
                format!("target_group_names[{listener}]"),
                "target group names derive from the Service on AWS; they cannot be chosen",
            ));
        }
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
        let lb_arn = lb.load_balancer_arn().unwrap_or_default().to_string();
        ids.insert(LOAD_BALANCER_ID.to_string(), lb_arn.clone());
        self.ensure_listeners(spec, &lb_arn, &by_port).await?;
        if !known.is_empty() {
            self.allow_registered(spec, &by_port).await?;
        }

        // Target groups of listeners the spec dropped (or changed protocol
        // or port): no listener forwards to them any more.
        let current: BTreeSet<&String> = ids.values().collect();
        let stale: BTreeSet<String> = known
            .iter()
            .filter(|(k, arn)| listener_of_id_key(k).is_some() && !current.contains(arn))
            .map(|(_, arn)| arn.clone())
            .collect();
        if !stale.is_empty() {
            self.delete_target_groups(&spec.key, &stale).await?;
        }

        let ingress = lb
            .dns_name()
            .map(|h| LoadBalancerIngress {
                hostname: Some(h.to_string()),
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
        let mut target_groups: BTreeSet<String> = known
            .iter()
            .filter(|(k, _)| listener_of_id_key(k).is_some())
            .map(|(_, arn)| arn.clone())
            .collect();
        if let Some(lb) = self.find_load_balancer(key, known).await? {
            let arn = lb.load_balancer_arn().unwrap_or_default();
            // Target groups its listeners use, even if their IDs were never persisted.
            for l in self.listeners_of(arn).await? {
                target_groups.extend(forwards_to(&l).map(str::to_string));
            }
            let deleted = self
                .calls
                .run("DeleteLoadBalancer", || {
                    self.clients
                        .elbv2
                        .delete_load_balancer()
                        .load_balancer_arn(arn)
                        .send()
                })
                .await;
            match deleted {
                Ok(_) | Err(ProviderError::NotFound { .. }) => {}
                Err(other) => return Err(other),
            }
        }
        self.delete_target_groups(key, &target_groups).await?;
        self.delete_security_group(key, known).await
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

fn forwards_to(listener: &ElbListener) -> Option<&str> {
    listener
        .default_actions()
        .iter()
        .find(|a| a.r#type() == Some(&ActionTypeEnum::Forward))
        .and_then(|a| a.target_group_arn())
}

fn target(t: &Target) -> TargetDescription {
    TargetDescription::builder()
        .id(t.ip.to_string())
        .port(i32::from(t.port))
        .build()
}

/// The ingress rules a security group has, in [`ingress_rules`]' shape.
fn rules_of(sg: &SecurityGroup) -> BTreeSet<IngressRule> {
    let mut rules = BTreeSet::new();
    for p in sg.ip_permissions() {
        let (Some(proto), Some(port)) = (
            p.ip_protocol(),
            p.from_port().and_then(|f| u16::try_from(f).ok()),
        ) else {
            continue;
        };
        let cidrs = p
            .ip_ranges()
            .iter()
            .filter_map(|r| r.cidr_ip())
            .chain(p.ipv6_ranges().iter().filter_map(|r| r.cidr_ipv6()));
        for cidr in cidrs {
            rules.insert((proto.to_string(), port, cidr.to_string()));
        }
    }
    rules
}

fn permission((proto, port, cidr): &IngressRule) -> IpPermission {
    let b = IpPermission::builder()
        .ip_protocol(proto)
        .from_port(i32::from(*port))
        .to_port(i32::from(*port));
    if cidr.contains(':') {
        b.ipv6_ranges(Ipv6Range::builder().cidr_ipv6(cidr).build())
            .build()
    } else {
        b.ip_ranges(IpRange::builder().cidr_ip(cidr).build())
            .build()
    }
}

/// Key/value pairs (tags, attributes) of an SDK answer as a map.
fn to_map<'a>(pairs: impl Iterator<Item = (Option<&'a str>, Option<&'a str>)>) -> Tags {
    pairs
        .map(|(k, v)| {
            (
                k.unwrap_or_default().to_string(),
                v.unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn elb_tag(k: &str, v: &str) -> Tag {
    Tag::builder().key(k).value(v).build()
}

fn elb_tags(tags: &Tags) -> Vec<Tag> {
    tags.iter().map(|(k, v)| elb_tag(k, v)).collect()
}

fn secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX)
}

fn cloud(operation: &str, message: &str) -> ProviderError {
    ProviderError::cloud(operation, message, true)
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
