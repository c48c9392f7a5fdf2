//! The backend security group, as aws-load-balancer-controller's
//! `manage-backend-security-group-rules`: one tagged group per cluster,
//! attached to every NLB beside its frontend group, and ingress rules from
//! it on the security groups of the ENIs that hold targets, for the target
//! ports and fixed health-check ports. Rules are shared by every NLB of the
//! cluster: registering targets adds what is missing; [`BackendGroup::prune`]
//! (garbage collection) revokes a rule once no NLB needs its port.
//!
//! What is known to exist is cached (the group, which ENI security groups
//! hold a target IP, the rules each group has), so registering targets
//! calls EC2 only for a new IP or a missing rule.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use aws_sdk_ec2::types::{
    Filter, IpPermission, NetworkInterface, ResourceType, SecurityGroup, Tag as Ec2Tag,
    TagSpecification, UserIdGroupPair,
};
use cnlb_provider_core::{ProviderError, Result, TAG_CLUSTER, Target};
use ipnet::IpNet;
use tracing::{info, warn};

use crate::Clients;
use crate::calls::Calls;
use crate::plan::{BackendRule, unneeded_rules};

/// Tag that marks the backend group (value `backend`), beside the cluster tag.
pub const TAG_RESOURCE: &str = "cnlb.dev/resource";
/// EC2 filters take at most 200 values.
const FILTER_VALUES: usize = 200;

pub(crate) struct BackendGroup {
    clients: Clients,
    calls: Arc<Calls>,
    vpc_id: String,
    cache: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    /// The backend group's ID, once found or created.
    id: Option<String>,
    /// Security groups of the ENI that holds each target IP seen.
    groups_of: HashMap<IpAddr, Vec<String>>,
    /// Rules from the backend group per security group, once read.
    rules: Option<BTreeMap<String, BTreeSet<BackendRule>>>,
    /// Health-check port per target group ARN.
    health_check_ports: HashMap<String, String>,
    /// When each rule was last asked for, and the group last used: a prune
    /// that listed the load balancers before then keeps them.
    asked: HashMap<BackendRule, Instant>,
    used: Option<Instant>,
}

impl BackendGroup {
    pub fn new(clients: Clients, calls: Arc<Calls>, vpc_id: String) -> BackendGroup {
        BackendGroup {
            clients,
            calls,
            vpc_id,
            cache: Mutex::new(Cache::default()),
        }
    }

    fn cache(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The backend group's ID: cached, else found by name and tags, else
    /// created with its tags (a crash after the create leaves a group the
    /// next call finds; two creates meet in a conflict and look again).
    pub async fn id(&self, cluster: &str) -> Result<String> {
        self.cache().used = Some(Instant::now());
        if let Some(id) = self.existing(cluster).await? {
            return Ok(id);
        }
        let name = group_name(cluster);
        let tags = TagSpecification::builder()
            .resource_type(ResourceType::SecurityGroup)
            .tags(ec2_tag(TAG_CLUSTER, cluster))
            .tags(ec2_tag(TAG_RESOURCE, "backend"))
            .build();
        let create = self
            .clients
            .ec2
            .create_security_group()
            .group_name(&name)
            .description(format!("cnlb: NLBs of cluster {cluster} to their targets"))
            .vpc_id(&self.vpc_id)
            .tag_specifications(tags);
        let id = match self
            .calls
            .run("CreateSecurityGroup", || create.clone().send())
            .await
        {
            Ok(out) => out.group_id().unwrap_or_default().to_string(),
            Err(ProviderError::Conflict { .. }) => {
                self.find(cluster, &name).await?.ok_or_else(|| {
                    ProviderError::cloud(
                        "CreateSecurityGroup",
                        "the group exists but cannot be found",
                        true,
                    )
                })?
            }
            Err(e) => return Err(e),
        };
        info!(group = %id, "backend security group created");
        self.cache().id = Some(id.clone());
        Ok(id)
    }

    /// The backend group's ID if it exists; never creates it.
    async fn existing(&self, cluster: &str) -> Result<Option<String>> {
        if let Some(id) = self.cache().id.clone() {
            return Ok(Some(id));
        }
        let found = self.find(cluster, &group_name(cluster)).await?;
        self.cache().id.clone_from(&found);
        Ok(found)
    }

    async fn find(&self, cluster: &str, name: &str) -> Result<Option<String>> {
        let out = self
            .calls
            .run("DescribeSecurityGroups", || {
                self.clients
                    .ec2
                    .describe_security_groups()
                    .filters(filter("vpc-id", [self.vpc_id.as_str()]))
                    .filters(filter("group-name", [name]))
                    .send()
            })
            .await?;
        let Some(sg) = out.security_groups().first() else {
            return Ok(None);
        };
        let ours = sg
            .tags()
            .iter()
            .any(|t| t.key() == Some(TAG_CLUSTER) && t.value() == Some(cluster));
        if !ours {
            return Err(ProviderError::Conflict {
                resource: name.to_string(),
                reason: format!(
                    "security group {name} exists but is not tagged {TAG_CLUSTER}={cluster}"
                ),
            });
        }
        Ok(sg.group_id().map(str::to_string))
    }

    /// Lets the backend group reach `targets` on `rules`: on each security
    /// group of the ENIs holding them, the rules it lacks are authorized.
    pub async fn allow(
        &self,
        cluster: &str,
        targets: &[Target],
        rules: &BTreeSet<BackendRule>,
    ) -> Result<()> {
        if targets.is_empty() || rules.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        self.cache()
            .asked
            .extend(rules.iter().map(|r| (r.clone(), now)));
        let backend = self.id(cluster).await?;
        let groups = self.groups_of(cluster, targets).await?;
        let have = self.rules(&backend).await?;
        for sg in groups {
            let missing: BTreeSet<BackendRule> = match have.get(&sg) {
                Some(present) => rules - present,
                None => rules.clone(),
            };
            if missing.is_empty() {
                continue;
            }
            let permissions: Vec<IpPermission> =
                missing.iter().map(|r| permission(r, &backend)).collect();
            let authorize = || async {
                let call = self.clients.ec2.authorize_security_group_ingress();
                let call = call
                    .group_id(&sg)
                    .set_ip_permissions(Some(permissions.clone()));
                call.send().await.map(|_| ())
            };
            // After a lost answer, look before asking again: EC2 refuses
            // rules that exist.
            let done_already = || async {
                self.cache().rules = None;
                let have = self.rules(&backend).await?;
                let done = have.get(&sg).is_some_and(|p| missing.is_subset(p));
                Ok(done.then_some(()))
            };
            match self
                .calls
                .run_unrepeatable("AuthorizeSecurityGroupIngress", authorize, done_already)
                .await
            {
                // Some were there already: read again next time.
                Err(ProviderError::Conflict { .. }) => {
                    self.cache().rules = None;
                    return Err(ProviderError::cloud(
                        "AuthorizeSecurityGroupIngress",
                        "a backend rule exists already; reading the rules again",
                        true,
                    ));
                }
                // The group went (deleted by hand, or by a collection that
                // raced this): look it up again next time.
                Err(e @ ProviderError::NotFound { .. }) => {
                    *self.cache() = Cache::default();
                    return Err(e);
                }
                Err(e) => return Err(e),
                Ok(_) => {}
            }
            info!(group = %sg, rules = ?missing, "backend security group allowed to the targets");
            if let Some(cached) = self.cache().rules.as_mut() {
                cached.entry(sg).or_default().extend(missing);
            }
        }
        Ok(())
    }

    /// Remembers the health-check port of a target group (`"traffic-port"`
    /// or a number), as set by the provider.
    pub fn remember_health_check(&self, target_group_arn: &str, port: &str) {
        self.cache()
            .health_check_ports
            .insert(target_group_arn.to_string(), port.to_string());
    }

    /// The health-check port of a target group: remembered, else read.
    pub async fn health_check_port(&self, target_group_arn: &str) -> Result<String> {
        if let Some(port) = self.cache().health_check_ports.get(target_group_arn) {
            return Ok(port.clone());
        }
        let out = self
            .calls
            .run("DescribeTargetGroups", || {
                self.clients
                    .elbv2
                    .describe_target_groups()
                    .target_group_arns(target_group_arn)
                    .send()
            })
            .await?;
        let port = out
            .target_groups()
            .first()
            .and_then(|tg| tg.health_check_port())
            .unwrap_or("traffic-port")
            .to_string();
        self.remember_health_check(target_group_arn, &port);
        Ok(port)
    }

    /// Forgets which ENI holds these IPs: a Pod's address can come back on
    /// another ENI.
    pub fn forget(&self, targets: &[Target]) {
        let mut cache = self.cache();
        for t in targets {
            cache.groups_of.remove(&t.ip);
        }
    }

    /// Revokes every backend rule whose (protocol, port) is not in `needed`,
    /// as EC2 has them (not the cache), unless asked for since `listed`
    /// (when the load balancers `needed` comes from were listed); returns
    /// how many. With no load balancer `left` and the group not used since,
    /// the group goes too.
    pub async fn prune(
        &self,
        cluster: &str,
        needed: &BTreeSet<BackendRule>,
        listed: Instant,
        left: bool,
    ) -> Result<usize> {
        let Some(backend) = self.existing(cluster).await? else {
            return Ok(0);
        };
        let needed: BTreeSet<BackendRule> = {
            let cache = self.cache();
            let recent = cache.asked.iter().filter(|(_, at)| **at >= listed);
            needed
                .iter()
                .cloned()
                .chain(recent.map(|(r, _)| r.clone()))
                .collect()
        };
        let needed = &needed;
        self.cache().rules = None;
        let have = self.rules(&backend).await?;
        let mut revoked = 0;
        for (sg, rules) in unneeded_rules(&have, needed) {
            let permissions: Vec<IpPermission> =
                rules.iter().map(|r| permission(r, &backend)).collect();
            let revoke = || async {
                let call = self.clients.ec2.revoke_security_group_ingress();
                let call = call
                    .group_id(&sg)
                    .set_ip_permissions(Some(permissions.clone()));
                call.send().await.map(|_| ())
            };
            // After a lost answer, look before asking again: EC2 refuses
            // to revoke rules that are gone.
            let done_already = || async {
                self.cache().rules = None;
                let now = self.rules(&backend).await?;
                let done = now.get(&sg).is_none_or(|p| p.is_disjoint(&rules));
                Ok(done.then_some(()))
            };
            self.calls
                .run_unrepeatable("RevokeSecurityGroupIngress", revoke, done_already)
                .await?;
            info!(group = %sg, rules = ?rules, "backend rules no load balancer needs revoked");
            revoked += rules.len();
        }
        let used_since = self.cache().used.is_some_and(|at| at >= listed);
        self.cache().rules = None;
        if !left && !used_since {
            // A deleted NLB's interfaces hold it for a while: the error
            // makes the next collection try again.
            match self
                .calls
                .run("DeleteSecurityGroup", || {
                    self.clients
                        .ec2
                        .delete_security_group()
                        .group_id(&backend)
                        .send()
                })
                .await
            {
                Ok(_) | Err(ProviderError::NotFound { .. }) => {
                    info!(group = %backend, "backend security group deleted: no load balancer left");
                    self.cache().id = None;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(revoked)
    }

    /// The backend rules of every security group that has one (one call,
    /// then cached).
    async fn rules(&self, backend: &str) -> Result<BTreeMap<String, BTreeSet<BackendRule>>> {
        if let Some(rules) = self.cache().rules.clone() {
            return Ok(rules);
        }
        let out = self
            .calls
            .run("DescribeSecurityGroups", || {
                self.clients
                    .ec2
                    .describe_security_groups()
                    .filters(filter("ip-permission.group-id", [backend]))
                    .send()
            })
            .await?;
        let rules: BTreeMap<String, BTreeSet<BackendRule>> = out
            .security_groups()
            .iter()
            .filter_map(|sg| Some((sg.group_id()?.to_string(), rules_from(sg, backend))))
            .collect();
        self.cache().rules = Some(rules.clone());
        Ok(rules)
    }

    /// The security groups of the ENIs holding `targets`. IPs not cached
    /// are looked up by address (EC2 matches secondary addresses too), then
    /// among the cluster's tagged ENIs (vpc-ipam's, whose /28 prefixes no
    /// address filter matches). An IP no ENI holds is logged and skipped.
    async fn groups_of(&self, cluster: &str, targets: &[Target]) -> Result<BTreeSet<String>> {
        let mut unknown: Vec<IpAddr> = {
            let cache = self.cache();
            targets
                .iter()
                .map(|t| t.ip)
                .filter(|ip| !cache.groups_of.contains_key(ip))
                .collect()
        };
        unknown.sort();
        unknown.dedup();
        for chunk in unknown.chunks(FILTER_VALUES) {
            let ips: Vec<String> = chunk.iter().map(IpAddr::to_string).collect();
            let enis = self
                .enis(filter(
                    "addresses.private-ip-address",
                    ips.iter().map(String::as_str),
                ))
                .await?;
            self.learn(chunk, &enis);
        }
        let still: Vec<IpAddr> = {
            let cache = self.cache();
            unknown
                .into_iter()
                .filter(|ip| !cache.groups_of.contains_key(ip))
                .collect()
        };
        if !still.is_empty() {
            let enis = self
                .enis(filter(&format!("tag:{TAG_CLUSTER}"), [cluster]))
                .await?;
            self.learn(&still, &enis);
            // Remembered as held by no ENI until deregistered: asked once.
            let mut cache = self.cache();
            let missing: Vec<IpAddr> = still
                .into_iter()
                .filter(|ip| !cache.groups_of.contains_key(ip))
                .collect();
            if !missing.is_empty() {
                warn!(ips = ?missing, "no ENI of the VPC holds these targets; no backend rule for them");
            }
            for ip in missing {
                cache.groups_of.insert(ip, Vec::new());
            }
        }
        let cache = self.cache();
        Ok(targets
            .iter()
            .filter_map(|t| cache.groups_of.get(&t.ip))
            .flatten()
            .cloned()
            .collect())
    }

    /// The VPC's ENIs matching `by` (every page).
    async fn enis(&self, by: Filter) -> Result<Vec<NetworkInterface>> {
        let mut enis = Vec::new();
        let mut token = None;
        loop {
            let out = self
                .calls
                .run("DescribeNetworkInterfaces", || {
                    self.clients
                        .ec2
                        .describe_network_interfaces()
                        .filters(filter("vpc-id", [self.vpc_id.as_str()]))
                        .filters(by.clone())
                        .set_next_token(token.clone())
                        .send()
                })
                .await?;
            enis.extend(out.network_interfaces().iter().cloned());
            token = out.next_token().map(str::to_string);
            if token.is_none() {
                return Ok(enis);
            }
        }
    }

    fn learn(&self, ips: &[IpAddr], enis: &[NetworkInterface]) {
        let mut cache = self.cache();
        for eni in enis {
            let groups: Vec<String> = eni
                .groups()
                .iter()
                .filter_map(|g| g.group_id().map(str::to_string))
                .collect();
            for ip in ips.iter().filter(|ip| holds(eni, **ip)) {
                cache.groups_of.insert(*ip, groups.clone());
            }
        }
    }
}

/// True if `eni` has `ip` as one of its addresses or in one of its prefixes.
fn holds(eni: &NetworkInterface, ip: IpAddr) -> bool {
    let text = ip.to_string();
    let addresses = eni
        .private_ip_addresses()
        .iter()
        .filter_map(|a| a.private_ip_address())
        .chain(eni.ipv6_addresses().iter().filter_map(|a| a.ipv6_address()));
    let prefixes = eni
        .ipv4_prefixes()
        .iter()
        .filter_map(|p| p.ipv4_prefix())
        .chain(eni.ipv6_prefixes().iter().filter_map(|p| p.ipv6_prefix()));
    addresses.into_iter().any(|a| a == text)
        || prefixes
            .filter_map(|p| p.parse::<IpNet>().ok())
            .any(|net| net.contains(&ip))
}

/// The rules `sg` has from `backend`, as (protocol, port) for each port.
fn rules_from(sg: &SecurityGroup, backend: &str) -> BTreeSet<BackendRule> {
    let mut rules = BTreeSet::new();
    for p in sg.ip_permissions() {
        let from_backend = p
            .user_id_group_pairs()
            .iter()
            .any(|pair| pair.group_id() == Some(backend));
        let (Some(proto), Some(from), Some(to)) = (p.ip_protocol(), p.from_port(), p.to_port())
        else {
            continue;
        };
        if !from_backend {
            continue;
        }
        for port in from.max(0)..=to.min(i32::from(u16::MAX)) {
            if let Ok(port) = u16::try_from(port) {
                rules.insert((proto.to_string(), port));
            }
        }
    }
    rules
}

fn permission((proto, port): &BackendRule, backend: &str) -> IpPermission {
    IpPermission::builder()
        .ip_protocol(proto)
        .from_port(i32::from(*port))
        .to_port(i32::from(*port))
        .user_id_group_pairs(
            UserIdGroupPair::builder()
                .group_id(backend)
                .description("cnlb: backend of the cluster's NLBs")
                .build(),
        )
        .build()
}

fn group_name(cluster: &str) -> String {
    format!("cnlb-{cluster}-backend")
}

fn filter<'a>(name: &str, values: impl IntoIterator<Item = &'a str>) -> Filter {
    Filter::builder()
        .name(name)
        .set_values(Some(values.into_iter().map(str::to_string).collect()))
        .build()
}

fn ec2_tag(k: &str, v: &str) -> Ec2Tag {
    Ec2Tag::builder().key(k).value(v).build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_ec2::types::{Ipv4PrefixSpecification, NetworkInterfacePrivateIpAddress};

    #[test]
    fn an_eni_holds_its_addresses_and_the_addresses_of_its_prefixes() {
        let eni = NetworkInterface::builder()
            .private_ip_addresses(
                NetworkInterfacePrivateIpAddress::builder()
                    .private_ip_address("10.0.1.5")
                    .build(),
            )
            .ipv4_prefixes(
                Ipv4PrefixSpecification::builder()
                    .ipv4_prefix("10.0.2.16/28")
                    .build(),
            )
            .build();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(holds(&eni, ip("10.0.1.5")));
        assert!(holds(&eni, ip("10.0.2.31")));
        assert!(!holds(&eni, ip("10.0.2.32")));
        assert!(!holds(&eni, ip("10.0.1.6")));
    }

    #[test]
    fn rules_from_the_backend_group_only() {
        let sg = SecurityGroup::builder()
            .ip_permissions(permission(&("tcp".into(), 8080), "sg-backend"))
            .ip_permissions(permission(&("udp".into(), 53), "sg-other"))
            .ip_permissions(
                IpPermission::builder()
                    .ip_protocol("tcp")
                    .from_port(9000)
                    .to_port(9001)
                    .user_id_group_pairs(UserIdGroupPair::builder().group_id("sg-backend").build())
                    .build(),
            )
            .build();
        let want: BTreeSet<BackendRule> = [
            ("tcp".into(), 8080),
            ("tcp".into(), 9000),
            ("tcp".into(), 9001),
        ]
        .into();
        assert_eq!(rules_from(&sg, "sg-backend"), want);
    }
}
