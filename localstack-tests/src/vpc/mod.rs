//! An emulated AWS VPC datapath in Linux network namespaces, driven from
//! moto's EC2 and ELBv2 state: the part of EC2 a node agent meets (NICs
//! hot-plugged into the instance, the fabric delivering by MAC, the
//! source/destination check, security groups), so that its routing can be
//! tested against the cloud's rules rather than against a flat host.
//!
//! Four namespaces, `<prefix>-vpc`, `-node`, `-lb` and `-inet`:
//!
//! - **node** is the EC2 instance. Each ENI moto shows attached to it is a
//!   veth whose node end is `eth<DeviceIndex>` with the ENI's MAC and MTU
//!   9001: created when moto shows the attachment (the hypervisor
//!   hot-plugs the NIC), deleted when it no longer does. Device 0 is
//!   configured as EC2's DHCP would (primary address with the subnet's
//!   length, default route via the subnet's router, the first host
//!   address); the others are left down and bare, for the agent under
//!   test to find by MAC and configure. Sysctls are pinned to a systemd
//!   AMI's (rp_filter 2, loose, on links; forwarding off) rather than
//!   inherited from the host.
//! - **vpc** is the fabric and the VPC router. The VPC end `eni<N>` of
//!   each link holds the subnet's router address (/32), so the node can
//!   ARP its gateway on every link. Every address moto lists on the ENI
//!   (and every delegated prefix) is routed to the link with a PERMANENT
//!   neighbour entry to the ENI's MAC: EC2 delivers to a NIC by MAC, and
//!   a node does not answer ARP for its Pods' addresses. ARP is answered
//!   for known addresses elsewhere in the ENI's subnet (other ENIs, the
//!   LB) by proxy entries, as EC2 answers for on-subnet targets, but not
//!   for anything else (no proxy_arp).
//!   The FORWARD chain plays EC2's **source/destination check** (a packet
//!   from an ENI whose source is not one of the ENI's addresses is dropped,
//!   unless moto says the check is off) and the **security groups**
//!   (stateful, ingress only: a packet to an ENI passes if conntrack has
//!   the flow, or if one of the ENI's groups has a matching ingress
//!   permission: a CIDR, or a group meaning every address of every ENI in
//!   the VPC carrying it, plus the LB namespace's address for the groups
//!   of the VPC's load balancers). One DROP per ENI and check, so that
//!   [`EmulatedVpc::drops`] can say which ENI dropped what.
//! - **lb** sends from `lb_address`, as an NLB's nodes do: its packets
//!   carry the load balancers' security groups.
//! - **inet** is the internet ([`EmulatedVpc::internet_address`]), routing
//!   the VPC's CIDRs back through the VPC namespace. Real AWS would drop
//!   private sources at the internet gateway; here the server reports the
//!   source it sees, so a test can tell SNAT from none.
//!
//! A sync reads moto (four describe calls, plus DescribeSubnets for a
//! subnet not seen before), computes the state EC2 would have
//! ([`model`]) and applies only what differs from the last applied state;
//! after a failed step it reads the kernel's state instead. It runs once
//! at start and then every 250 ms until the [`EmulatedVpc`] is dropped,
//! which deletes the namespaces (and with them every link).
//!
//! Namespaces created with a `cnlb-<k>-` prefix (`k` of a
//! [`RangeLease`](crate::range::RangeLease) held for the run) are removed by
//! `cnlb-env down` if the test process dies.

mod kernel;
mod model;
mod netns;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use aws_sdk_ec2::types::{Filter, VpcCidrBlockStateCode};

use kernel::{batch, ip, run, sysctls};
use model::{Cidr, Cloud, Link, OnLink};
pub use netns::{
    Forward, PeerServer, forward_from_host, http_get_in, in_netns, in_netns_async,
    serve_peer_address,
};

const SYNC_EVERY: Duration = Duration::from_millis(250);
/// ENIs' MTU on EC2 (jumbo frames inside a VPC).
const MTU: &str = "9001";
/// The internet namespace's address and the VPC namespace's, on their /24.
const INTERNET: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const INTERNET_GATEWAY: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The VPC namespace's address on the LB link (the LB's next hop).
const LB_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 1);
/// VPC-side names of the LB and internet links.
const LB_LINK: &str = "lb";
const INET_LINK: &str = "inet";

/// Packets the emulation dropped, per ENI id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Drops {
    /// Sent from the ENI with a source address it does not hold (EC2's
    /// source/destination check).
    pub src_dst_check: BTreeMap<String, u64>,
    /// Sent to the ENI, admitted by none of its security groups.
    pub security_group: BTreeMap<String, u64>,
}

impl Drops {
    pub fn src_dst(&self, eni: &str) -> u64 {
        self.src_dst_check.get(eni).copied().unwrap_or(0)
    }

    pub fn sg(&self, eni: &str) -> u64 {
        self.security_group.get(eni).copied().unwrap_or(0)
    }

    fn add(&mut self, other: &Drops) {
        for (eni, n) in &other.src_dst_check {
            *self.src_dst_check.entry(eni.clone()).or_default() += n;
        }
        for (eni, n) in &other.security_group {
            *self.security_group.entry(eni.clone()).or_default() += n;
        }
    }
}

/// The VPC datapath of one instance; see the module docs.
pub struct EmulatedVpc {
    inner: Arc<Inner>,
    task: Option<tokio::task::JoinHandle<()>>,
    forwards: Mutex<Vec<Forward>>,
}

struct Inner {
    prefix: String,
    vpc_ns: String,
    node_ns: String,
    lb_ns: String,
    inet_ns: String,
    ec2: aws_sdk_ec2::Client,
    elbv2: aws_sdk_elasticloadbalancingv2::Client,
    instance: String,
    vpc_id: String,
    lb_address: Ipv4Addr,
    applied: tokio::sync::Mutex<Applied>,
    /// Drop counters of ENIs whose chains are gone (unplugged).
    retired: Mutex<Drops>,
}

/// What the namespaces hold, as far as the emulation knows.
#[derive(Default)]
struct Applied {
    links: BTreeMap<u32, AppliedLink>,
    ruleset: Option<String>,
    inet_routes: BTreeSet<Cidr>,
    subnets: HashMap<String, Cidr>,
    warnings: BTreeSet<String>,
}

struct AppliedLink {
    link: Link,
    on_link: OnLink,
}

impl EmulatedVpc {
    /// Creates namespaces `<prefix>-vpc`, `-node`, `-lb` and `-inet` for
    /// moto instance `instance` (replacing leftovers of the same names),
    /// syncs once, then keeps syncing every 250 ms in a background task
    /// until dropped. `lb_address` is an address in the VPC's CIDRs that
    /// moto does not use: the LB namespace sends from it.
    pub async fn start(
        prefix: &str,
        ec2: aws_sdk_ec2::Client,
        elbv2: aws_sdk_elasticloadbalancingv2::Client,
        instance: &str,
        lb_address: Ipv4Addr,
    ) -> Result<EmulatedVpc> {
        let described = ec2
            .describe_instances()
            .instance_ids(instance)
            .send()
            .await
            .context("DescribeInstances")?;
        let vpc_id = described
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find_map(|i| i.vpc_id())
            .with_context(|| format!("instance {instance} has no VPC"))?
            .to_string();
        let inner = Arc::new(Inner {
            prefix: prefix.to_string(),
            vpc_ns: format!("{prefix}-vpc"),
            node_ns: format!("{prefix}-node"),
            lb_ns: format!("{prefix}-lb"),
            inet_ns: format!("{prefix}-inet"),
            ec2,
            elbv2,
            instance: instance.to_string(),
            vpc_id,
            lb_address,
            applied: tokio::sync::Mutex::new(Applied::default()),
            retired: Mutex::new(Drops::default()),
        });
        let mut vpc = EmulatedVpc {
            inner: inner.clone(),
            task: None,
            forwards: Mutex::new(Vec::new()),
        };
        // From here on, dropping `vpc` removes what was made.
        inner.create_namespaces().await?;
        inner.sync().await?;
        vpc.task = Some(tokio::spawn(async move {
            let mut last_error: Option<String> = None;
            loop {
                tokio::time::sleep(SYNC_EVERY).await;
                match inner.sync().await {
                    Ok(()) => {
                        if last_error.take().is_some() {
                            inner.log("sync works again");
                        }
                    }
                    Err(e) => {
                        let e = format!("{e:#}");
                        if last_error.as_ref() != Some(&e) {
                            inner.log(&format!("sync failed: {e}"));
                            last_error = Some(e);
                        }
                    }
                }
            }
        }));
        Ok(vpc)
    }

    /// One sync now (tests call it rather than wait for the next tick).
    pub async fn sync(&self) -> Result<()> {
        self.inner.sync().await
    }

    pub fn vpc_ns(&self) -> &str {
        &self.inner.vpc_ns
    }

    pub fn node_ns(&self) -> &str {
        &self.inner.node_ns
    }

    pub fn lb_ns(&self) -> &str {
        &self.inner.lb_ns
    }

    pub fn inet_ns(&self) -> &str {
        &self.inner.inet_ns
    }

    pub fn lb_address(&self) -> Ipv4Addr {
        self.inner.lb_address
    }

    /// The internet namespace's address (203.0.113.10).
    pub fn internet_address(&self) -> Ipv4Addr {
        INTERNET
    }

    /// Makes host `127.0.0.1:port` reachable as `127.0.0.1:port` inside the
    /// node namespace (an agent there reaches moto and kube-apiserver,
    /// which listen on the host's loopback), until dropped.
    pub async fn expose_to_node(&self, port: u16) -> Result<()> {
        let forward = netns::forward(Some(&self.inner.node_ns), None, port).await?;
        self.forwards
            .lock()
            .map_err(|_| anyhow!("poisoned"))?
            .push(forward);
        Ok(())
    }

    /// What the source/destination check and the security groups dropped,
    /// per ENI id, since start (counters survive rule changes).
    pub fn drops(&self) -> Result<Drops> {
        let mut drops = self.inner.current_drops()?.0;
        drops.add(&*self.inner.retired.lock().map_err(|_| anyhow!("poisoned"))?);
        Ok(drops)
    }
}

impl Drop for EmulatedVpc {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        if let Ok(mut f) = self.forwards.lock() {
            f.clear();
        }
        for ns in [
            &self.inner.node_ns,
            &self.inner.lb_ns,
            &self.inner.inet_ns,
            &self.inner.vpc_ns,
        ] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .output();
        }
    }
}

impl Inner {
    fn log(&self, message: &str) {
        eprintln!("emulated-vpc {}: {message}", self.prefix);
    }

    async fn create_namespaces(&self) -> Result<()> {
        for ns in [&self.vpc_ns, &self.node_ns, &self.lb_ns, &self.inet_ns] {
            let _ = run("ip", &["netns", "del", ns], None).await;
            run("ip", &["netns", "add", ns], None).await?;
            ip(ns, &["link", "set", "lo", "up"]).await?;
        }
        // Before any link exists, so that links take the `default` values.
        sysctls(
            &self.vpc_ns,
            &[
                ("ipv4/ip_forward", "1"),
                ("ipv4/conf/all/rp_filter", "0"),
                ("ipv4/conf/default/rp_filter", "0"),
                // A router that redirected the node would teach it
                // shortcuts the fabric does not have.
                ("ipv4/conf/all/send_redirects", "0"),
                ("ipv4/conf/default/send_redirects", "0"),
            ],
        )
        .await?;
        // As on a systemd-based AMI (50-default.conf): loose reverse-path
        // filtering on links, and no forwarding until something enables it.
        sysctls(
            &self.node_ns,
            &[
                ("ipv4/ip_forward", "0"),
                ("ipv4/conf/all/rp_filter", "0"),
                ("ipv4/conf/default/rp_filter", "2"),
            ],
        )
        .await?;
        for ns in [&self.lb_ns, &self.inet_ns] {
            sysctls(
                ns,
                &[
                    ("ipv4/conf/all/rp_filter", "0"),
                    ("ipv4/conf/default/rp_filter", "0"),
                ],
            )
            .await?;
        }
        let lb = self.lb_address;
        batch(
            &self.vpc_ns,
            &[
                format!(
                    "link add {LB_LINK} type veth peer name eth0 netns {}",
                    self.lb_ns
                ),
                format!(
                    "link add {INET_LINK} type veth peer name eth0 netns {}",
                    self.inet_ns
                ),
                format!("addr add {LB_GATEWAY}/32 dev {LB_LINK}"),
                format!("link set {LB_LINK} up"),
                format!("route add {lb}/32 dev {LB_LINK}"),
                format!("addr add {INTERNET_GATEWAY}/24 dev {INET_LINK}"),
                format!("link set {INET_LINK} up"),
            ],
            false,
        )
        .await?;
        batch(
            &self.lb_ns,
            &[
                format!("addr add {lb}/32 dev eth0"),
                "link set eth0 up".into(),
                format!("route add {LB_GATEWAY} dev eth0 scope link"),
                format!("route add default via {LB_GATEWAY} dev eth0"),
            ],
            false,
        )
        .await?;
        batch(
            &self.inet_ns,
            &[
                format!("addr add {INTERNET}/24 dev eth0"),
                "link set eth0 up".into(),
            ],
            false,
        )
        .await
    }

    async fn sync(&self) -> Result<()> {
        let mut applied = self.applied.lock().await;
        let cloud = self.read_cloud(&mut applied.subnets).await?;
        let (desired, warnings) = model::desired(&cloud, &self.instance, self.lb_address);
        for w in warnings.difference(&applied.warnings) {
            self.log(w);
        }
        applied.warnings = warnings;
        let mut errors = Vec::new();
        self.apply_links(&mut applied, &desired, &mut errors).await;
        if applied.ruleset.as_ref() != Some(&desired.ruleset) {
            let old = applied.ruleset.take();
            match self.apply_ruleset(old.as_deref(), &desired.ruleset) {
                Ok(()) => applied.ruleset = Some(desired.ruleset.clone()),
                Err(e) => errors.push(e.context("rewriting the FORWARD rules")),
            }
        }
        if applied.inet_routes != desired.vpc_cidrs
            && let Err(e) = self.apply_inet_routes(&mut applied, &desired).await
        {
            errors.push(e.context("routing the VPC's CIDRs from the internet"));
        }
        match errors.len() {
            0 => Ok(()),
            _ => Err(anyhow!(
                "{}",
                errors
                    .iter()
                    .map(|e| format!("{e:#}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            )),
        }
    }

    /// moto's view: ENIs, security groups and CIDRs of the VPC, and the
    /// groups of its load balancers.
    async fn read_cloud(&self, subnets: &mut HashMap<String, Cidr>) -> Result<Cloud> {
        let in_vpc = || {
            Filter::builder()
                .name("vpc-id")
                .values(&self.vpc_id)
                .build()
        };
        let (enis, groups, vpcs, lbs) = tokio::try_join!(
            async {
                self.ec2
                    .describe_network_interfaces()
                    .filters(in_vpc())
                    .send()
                    .await
                    .context("DescribeNetworkInterfaces")
            },
            async {
                self.ec2
                    .describe_security_groups()
                    .filters(in_vpc())
                    .send()
                    .await
                    .context("DescribeSecurityGroups")
            },
            async {
                self.ec2
                    .describe_vpcs()
                    .vpc_ids(&self.vpc_id)
                    .send()
                    .await
                    .context("DescribeVpcs")
            },
            async {
                self.elbv2
                    .describe_load_balancers()
                    .send()
                    .await
                    .context("DescribeLoadBalancers")
            },
        )?;
        let enis = enis.network_interfaces;
        let unknown: BTreeSet<String> = enis
            .as_deref()
            .unwrap_or_default()
            .iter()
            .filter_map(|e| e.subnet_id())
            .filter(|s| !subnets.contains_key(*s))
            .map(str::to_owned)
            .collect();
        if !unknown.is_empty() {
            let out = self
                .ec2
                .describe_subnets()
                .set_subnet_ids(Some(unknown.into_iter().collect()))
                .send()
                .await
                .context("DescribeSubnets")?;
            for s in out.subnets() {
                if let (Some(id), Some(cidr)) =
                    (s.subnet_id(), s.cidr_block().and_then(Cidr::parse))
                {
                    subnets.insert(id.to_string(), cidr);
                }
            }
        }
        let mut vpc_cidrs = BTreeSet::new();
        for v in vpcs.vpcs() {
            vpc_cidrs.extend(v.cidr_block().and_then(Cidr::parse));
            for a in v.cidr_block_association_set() {
                let live = !matches!(
                    a.cidr_block_state().and_then(|s| s.state()),
                    Some(
                        VpcCidrBlockStateCode::Disassociated
                            | VpcCidrBlockStateCode::Disassociating
                            | VpcCidrBlockStateCode::Failed
                    )
                );
                if live {
                    vpc_cidrs.extend(a.cidr_block().and_then(Cidr::parse));
                }
            }
        }
        let lb_groups = lbs
            .load_balancers()
            .iter()
            .filter(|lb| lb.vpc_id() == Some(self.vpc_id.as_str()))
            .flat_map(|lb| lb.security_groups().iter().cloned())
            .collect();
        Ok(Cloud {
            enis: enis.unwrap_or_default(),
            groups: groups.security_groups.unwrap_or_default(),
            subnets: subnets.clone(),
            vpc_cidrs,
            lb_groups,
        })
    }
}
