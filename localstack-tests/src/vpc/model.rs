//! What EC2 would program for one instance, computed from what moto says:
//! the NICs plugged into the instance, where the fabric delivers each
//! address, and the FORWARD ruleset playing the source/destination check
//! and the security groups. Pure, so that a sync can compare it with what
//! it applied last time.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::Ipv4Addr;

use aws_sdk_ec2::types::{AttachmentStatus, NetworkInterface, SecurityGroup};

/// An IPv4 network, kept normalized (host bits cleared).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub(crate) struct Cidr {
    pub network: Ipv4Addr,
    pub len: u8,
}

impl Cidr {
    pub fn new(addr: Ipv4Addr, len: u8) -> Option<Cidr> {
        (len <= 32).then(|| Cidr {
            network: Ipv4Addr::from(u32::from(addr) & mask(len)),
            len,
        })
    }

    pub fn host(addr: Ipv4Addr) -> Cidr {
        Cidr {
            network: addr,
            len: 32,
        }
    }

    /// `a.b.c.d/n`, or a bare address as a /32; `None` for IPv6 or garbage.
    pub fn parse(s: &str) -> Option<Cidr> {
        match s.split_once('/') {
            Some((addr, len)) => Cidr::new(addr.parse().ok()?, len.parse().ok()?),
            None => Some(Cidr::host(s.parse().ok()?)),
        }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.len) == u32::from(self.network)
    }

    /// The VPC router of a subnet: its first host address, as on EC2.
    pub fn router(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network).wrapping_add(1))
    }

    fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !mask(self.len))
    }

    /// Addresses EC2 never assigns and the emulation cannot give an ENI:
    /// the network, the router (which the VPC side of every link holds) and
    /// the broadcast address.
    pub fn reserved(&self, ip: Ipv4Addr) -> bool {
        self.len < 31 && (ip == self.network || ip == self.router() || ip == self.broadcast())
    }

    /// Every address of a delegated prefix (a /28: 16).
    pub fn addresses(&self) -> impl Iterator<Item = Ipv4Addr> + use<> {
        let first = u32::from(self.network);
        let count = if self.len >= 24 {
            1u32 << (32 - self.len)
        } else {
            0 // not a delegated prefix: nothing to list
        };
        (0..count).map(move |i| Ipv4Addr::from(first + i))
    }
}

fn mask(len: u8) -> u32 {
    if len == 0 { 0 } else { u32::MAX << (32 - len) }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.len)
    }
}

/// What moto says, as read in one sync.
pub(crate) struct Cloud {
    /// Every ENI in the instance's VPC (the instance's own and others, such
    /// as other instances' and load balancers', for group membership).
    pub enis: Vec<NetworkInterface>,
    pub groups: Vec<SecurityGroup>,
    /// Subnet id -> CIDR (a subnet's CIDR never changes, so it is cached).
    pub subnets: HashMap<String, Cidr>,
    pub vpc_cidrs: BTreeSet<Cidr>,
    /// Security groups of the VPC's load balancers: the ones packets from
    /// the LB namespace carry.
    pub lb_groups: BTreeSet<String>,
}

/// Where the VPC side of one ENI link delivers, and for whom it answers ARP.
#[derive(Clone, Default, PartialEq, Eq, Debug)]
pub(crate) struct OnLink {
    /// The ENI's addresses (/32) and delegated prefixes.
    pub routes: BTreeSet<Cidr>,
    /// PERMANENT entries to the ENI's MAC: EC2 delivers to a NIC by MAC
    /// without ARP, so a node need not answer ARP for Pod addresses.
    pub neighbours: BTreeSet<Ipv4Addr>,
    /// Addresses elsewhere in the ENI's subnet (other ENIs, the LB): EC2
    /// answers ARP for them, so on-link traffic works; off-subnet targets
    /// get no answer (the node must use the router).
    pub proxies: BTreeSet<Ipv4Addr>,
}

/// One ENI attached to the instance: a NIC plugged into it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub(crate) struct Link {
    pub eni: String,
    pub device_index: u32,
    pub mac: String,
    pub subnet: Cidr,
    pub primary: Ipv4Addr,
    pub src_dst_check: bool,
    pub on_link: OnLink,
    /// iptables matches, each admitting packets to this ENI.
    pub ingress: BTreeSet<String>,
}

impl Link {
    /// The end in the node namespace, as the instance's OS names it.
    pub fn node_end(&self) -> String {
        format!("eth{}", self.device_index)
    }

    /// The end in the VPC namespace.
    pub fn vpc_end(&self) -> String {
        format!("eni{}", self.device_index)
    }

    /// Whether `other` is the same NIC (otherwise: unplug, plug anew).
    pub fn same_nic(&self, other: &Link) -> bool {
        self.eni == other.eni
            && self.mac == other.mac
            && self.subnet == other.subnet
            && self.primary == other.primary
    }
}

pub(crate) struct Desired {
    /// By device index.
    pub links: BTreeMap<u32, Link>,
    pub vpc_cidrs: BTreeSet<Cidr>,
    /// The filter table of the VPC namespace, for `iptables-restore`.
    pub ruleset: String,
}

/// Chain counting what the source/destination check dropped from an ENI.
pub(crate) fn src_dst_chain(eni: &str) -> String {
    format!("SD-{eni}")
}

/// Chain counting what security groups dropped to an ENI.
pub(crate) fn sg_chain(eni: &str) -> String {
    format!("SG-{eni}")
}

fn attached_to<'a>(eni: &'a NetworkInterface, instance: &str) -> Option<&'a str> {
    let a = eni.attachment()?;
    let live = !matches!(
        a.status(),
        Some(AttachmentStatus::Detached | AttachmentStatus::Detaching)
    );
    (a.instance_id() == Some(instance) && live).then_some(eni.network_interface_id()?)
}

/// Every IPv4 address and prefix moto lists on an ENI.
fn eni_addresses(eni: &NetworkInterface) -> (Vec<Ipv4Addr>, Vec<Cidr>) {
    let mut addresses: Vec<Ipv4Addr> = eni
        .private_ip_address()
        .and_then(|a| a.parse().ok())
        .into_iter()
        .collect();
    for a in eni.private_ip_addresses() {
        if let Some(ip) = a.private_ip_address().and_then(|a| a.parse().ok())
            && !addresses.contains(&ip)
        {
            addresses.push(ip);
        }
    }
    let prefixes = eni
        .ipv4_prefixes()
        .iter()
        .filter_map(|p| Cidr::parse(p.ipv4_prefix()?))
        .collect();
    (addresses, prefixes)
}

/// A MAC the node end can take: moto's, or one derived from the ENI id if
/// moto's is missing or unusable (never multicast, locally administered).
fn usable_mac(eni: &NetworkInterface, id: &str) -> String {
    if let Some(mac) = eni.mac_address() {
        let bytes: Vec<u8> = mac
            .split(':')
            .filter_map(|b| u8::from_str_radix(b, 16).ok())
            .collect();
        if bytes.len() == 6 && bytes[0] & 1 == 0 {
            return mac.to_ascii_lowercase();
        }
    }
    let h = id
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
        .to_be_bytes();
    format!("02:00:01:{:02x}:{:02x}:{:02x}", h[0], h[1], h[2])
}

/// The state EC2 would have for `instance`, and what the emulation had to
/// leave out (for the log).
pub(crate) fn desired(
    cloud: &Cloud,
    instance: &str,
    lb_address: Ipv4Addr,
) -> (Desired, BTreeSet<String>) {
    let mut warnings = BTreeSet::new();
    let mut attached: Vec<(u32, &NetworkInterface, &str)> = cloud
        .enis
        .iter()
        .filter_map(|e| {
            let id = attached_to(e, instance)?;
            let index = e.attachment()?.device_index()?;
            Some((u32::try_from(index).ok()?, e, id))
        })
        .collect();
    attached.sort_by_key(|(index, _, id)| (*index, *id));

    // Who holds each address; moto may hand one address to two ENIs.
    let mut owner: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    let mut links: BTreeMap<u32, Link> = BTreeMap::new();
    for (index, eni, id) in attached {
        if let Some(first) = links.get(&index) {
            warnings.insert(format!(
                "{id} and {} both at device index {index}; {id} not plugged",
                first.eni
            ));
            continue;
        }
        let Some(subnet) = eni.subnet_id().and_then(|s| cloud.subnets.get(s)) else {
            warnings.insert(format!("{id}: subnet unknown; not plugged"));
            continue;
        };
        let (addresses, prefixes) = eni_addresses(eni);
        let Some(primary) = eni
            .private_ip_address()
            .and_then(|a| a.parse().ok())
            .or_else(|| addresses.first().copied())
        else {
            warnings.insert(format!("{id}: no primary address; not plugged"));
            continue;
        };
        if subnet.reserved(primary) {
            warnings.insert(format!(
                "{id}: moto gave it {primary}, reserved in {subnet} (EC2 never does); its traffic will not work"
            ));
        }
        let mut on_link = OnLink::default();
        for ip in addresses {
            if subnet.reserved(ip) {
                warnings.insert(format!(
                    "{id}: {ip} is reserved in {subnet} (EC2 never assigns it); not routed"
                ));
            } else if ip == lb_address {
                warnings.insert(format!(
                    "{id}: {ip} is the load balancer's address; not routed"
                ));
            } else if let Some(other) = owner.get(&ip) {
                warnings.insert(format!(
                    "moto assigned {ip} to both {other} and {id} (EC2 never does); routed to {other} only"
                ));
            } else {
                owner.insert(ip, id.to_string());
                on_link.routes.insert(Cidr::host(ip));
                on_link.neighbours.insert(ip);
            }
        }
        for p in prefixes {
            on_link.routes.insert(p);
            on_link.neighbours.extend(p.addresses());
        }
        links.insert(
            index,
            Link {
                eni: id.to_string(),
                device_index: index,
                mac: usable_mac(eni, id),
                subnet: *subnet,
                primary,
                src_dst_check: eni.source_dest_check() != Some(false),
                on_link,
                ingress: BTreeSet::new(),
            },
        );
    }

    // Proxy ARP for on-subnet targets the fabric knows elsewhere.
    let mut known = owner.clone();
    known.insert(lb_address, "the load balancer".into());
    for link in links.values_mut() {
        link.on_link.proxies = known
            .iter()
            .filter(|(ip, holder)| link.subnet.contains(**ip) && **holder != link.eni)
            .map(|(ip, _)| *ip)
            .filter(|ip| !link.subnet.reserved(*ip))
            .collect();
    }

    // Security-group membership: every address of every ENI in the VPC
    // that carries the group, and the LB's address for the LBs' groups.
    let mut members: BTreeMap<&str, BTreeSet<Cidr>> = BTreeMap::new();
    for eni in &cloud.enis {
        let (addresses, prefixes) = eni_addresses(eni);
        for g in eni.groups().iter().filter_map(|g| g.group_id()) {
            let m = members.entry(g).or_default();
            m.extend(addresses.iter().copied().map(Cidr::host));
            m.extend(prefixes.iter().copied());
        }
    }
    for g in &cloud.lb_groups {
        members
            .entry(g.as_str())
            .or_default()
            .insert(Cidr::host(lb_address));
    }
    let groups: BTreeMap<&str, &SecurityGroup> = cloud
        .groups
        .iter()
        .filter_map(|g| Some((g.group_id()?, g)))
        .collect();
    for link in links.values_mut() {
        let eni = cloud
            .enis
            .iter()
            .find(|e| e.network_interface_id() == Some(link.eni.as_str()));
        let ids: BTreeSet<&str> = eni
            .map(|e| e.groups().iter().filter_map(|g| g.group_id()).collect())
            .unwrap_or_default();
        for id in ids {
            let Some(group) = groups.get(id) else {
                warnings.insert(format!("{}: security group {id} not found", link.eni));
                continue;
            };
            for p in group.ip_permissions() {
                let Some(matcher) =
                    protocol_match(p.ip_protocol().unwrap_or("-1"), p.from_port(), p.to_port())
                else {
                    warnings.insert(format!("{id}: protocol {:?} not emulated", p.ip_protocol()));
                    continue;
                };
                let mut sources: BTreeSet<Cidr> = p
                    .ip_ranges()
                    .iter()
                    .filter_map(|r| Cidr::parse(r.cidr_ip()?))
                    .collect();
                for pair in p.user_id_group_pairs() {
                    if let Some(m) = pair.group_id().and_then(|g| members.get(g)) {
                        sources.extend(m.iter().copied());
                    }
                }
                if !p.prefix_list_ids().is_empty() {
                    warnings.insert(format!("{id}: prefix lists not emulated"));
                }
                for s in sources {
                    let source = if s.len == 0 {
                        String::new()
                    } else {
                        format!("-s {s} ")
                    };
                    link.ingress
                        .insert(format!("{source}{matcher}").trim().into());
                }
            }
        }
    }

    let ruleset = ruleset(&links);
    (
        Desired {
            links,
            vpc_cidrs: cloud.vpc_cidrs.clone(),
            ruleset,
        },
        warnings,
    )
}

/// iptables protocol and port match of an ingress permission; `None` for
/// what IPv4 iptables cannot express (ICMPv6).
fn protocol_match(protocol: &str, from: Option<i32>, to: Option<i32>) -> Option<String> {
    let ports = |name: &str| {
        let range = match (from, to) {
            (None | Some(-1), _) => None,
            (Some(0), Some(65535)) => None,
            (Some(f), Some(t)) if t != f && t >= 0 => Some(format!("{f}:{t}")),
            (Some(f), _) => Some(f.to_string()),
        };
        match range {
            Some(r) => format!("-p {name} --dport {r}"),
            None => format!("-p {name}"),
        }
    };
    Some(match protocol.to_ascii_lowercase().as_str() {
        "-1" | "all" => String::new(),
        "tcp" | "6" => ports("tcp"),
        "udp" | "17" => ports("udp"),
        "icmp" | "1" => match (from, to) {
            (None | Some(-1), _) => "-p icmp".into(),
            (Some(t), None | Some(-1)) => format!("-p icmp --icmp-type {t}"),
            (Some(t), Some(c)) => format!("-p icmp --icmp-type {t}/{c}"),
        },
        "icmpv6" | "58" => return None,
        other => {
            let n: u8 = other.parse().ok()?;
            format!("-p {n}")
        }
    })
}

/// The VPC namespace's filter table: per ENI, a chain for the
/// source/destination check of what it sends and one for the security
/// groups of what it receives, each ending in a DROP whose counter is
/// that ENI's drops.
fn ruleset(links: &BTreeMap<u32, Link>) -> String {
    let mut out =
        String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    for l in links.values() {
        out += &format!(
            ":{} - [0:0]\n:{} - [0:0]\n",
            src_dst_chain(&l.eni),
            sg_chain(&l.eni)
        );
    }
    for l in links.values() {
        if l.src_dst_check {
            out += &format!(
                "-A FORWARD -i {} -j {}\n",
                l.vpc_end(),
                src_dst_chain(&l.eni)
            );
        }
        out += &format!("-A FORWARD -o {} -j {}\n", l.vpc_end(), sg_chain(&l.eni));
    }
    for l in links.values() {
        let sd = src_dst_chain(&l.eni);
        for r in &l.on_link.routes {
            out += &format!("-A {sd} -s {r} -j RETURN\n");
        }
        out += &format!("-A {sd} -j DROP\n");
        let sg = sg_chain(&l.eni);
        // Security groups are stateful: replies to what the ENI sent, and
        // the rest of a flow a rule admitted, pass.
        out += &format!("-A {sg} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
        for m in &l.ingress {
            let m = if m.is_empty() {
                String::new()
            } else {
                format!(" {m}")
            };
            out += &format!("-A {sg}{m} -j ACCEPT\n");
        }
        out += &format!("-A {sg} -j DROP\n");
    }
    out + "COMMIT\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_ec2::types::{
        GroupIdentifier, IpPermission, IpRange, NetworkInterfaceAttachment,
        NetworkInterfacePrivateIpAddress, UserIdGroupPair,
    };

    fn eni(id: &str, index: i32, subnet: &str, ips: &[&str], group: &str) -> NetworkInterface {
        let mut b = NetworkInterface::builder()
            .network_interface_id(id)
            .subnet_id(subnet)
            .mac_address(format!("02:00:00:00:00:0{index}"))
            .private_ip_address(ips[0])
            .groups(GroupIdentifier::builder().group_id(group).build())
            .attachment(
                NetworkInterfaceAttachment::builder()
                    .instance_id("i-1")
                    .device_index(index)
                    .status(AttachmentStatus::Attached)
                    .build(),
            );
        for (i, ip) in ips.iter().enumerate() {
            b = b.private_ip_addresses(
                NetworkInterfacePrivateIpAddress::builder()
                    .private_ip_address(*ip)
                    .primary(i == 0)
                    .build(),
            );
        }
        b.build()
    }

    #[test]
    fn cidr() {
        let c = Cidr::parse("100.64.3.7/17").unwrap();
        assert_eq!(c.to_string(), "100.64.0.0/17");
        assert_eq!(c.router(), Ipv4Addr::new(100, 64, 0, 1));
        assert!(c.reserved(Ipv4Addr::new(100, 64, 127, 255)));
        assert!(!c.reserved(Ipv4Addr::new(100, 64, 0, 2)));
        assert!(c.contains(Ipv4Addr::new(100, 64, 127, 1)));
        assert!(!c.contains(Ipv4Addr::new(100, 64, 128, 1)));
        assert_eq!(Cidr::parse("10.0.0.16/28").unwrap().addresses().count(), 16);
        assert_eq!(Cidr::parse("::1/128"), None);
    }

    #[test]
    fn links_rules_duplicates_and_proxies() {
        let lb = Ipv4Addr::new(10, 0, 1, 250);
        let cloud = Cloud {
            enis: vec![
                eni("eni-a", 0, "s-node", &["10.0.1.5"], "sg-node"),
                eni(
                    "eni-b",
                    1,
                    "s-pod",
                    &["100.64.0.9", "100.64.1.1", "10.0.1.5", "100.64.0.1"],
                    "sg-pod",
                ),
            ],
            groups: vec![
                SecurityGroup::builder()
                    .group_id("sg-pod")
                    .ip_permissions(
                        IpPermission::builder()
                            .ip_protocol("tcp")
                            .from_port(8080)
                            .to_port(8080)
                            .user_id_group_pairs(
                                UserIdGroupPair::builder().group_id("sg-lb").build(),
                            )
                            .build(),
                    )
                    .ip_permissions(
                        IpPermission::builder()
                            .ip_protocol("-1")
                            .ip_ranges(IpRange::builder().cidr_ip("0.0.0.0/0").build())
                            .build(),
                    )
                    .build(),
                SecurityGroup::builder().group_id("sg-node").build(),
            ],
            subnets: HashMap::from([
                ("s-node".into(), Cidr::parse("10.0.1.0/24").unwrap()),
                ("s-pod".into(), Cidr::parse("100.64.0.0/17").unwrap()),
            ]),
            vpc_cidrs: BTreeSet::new(),
            lb_groups: BTreeSet::from(["sg-lb".into()]),
        };
        let (d, warnings) = desired(&cloud, "i-1", lb);
        assert_eq!(d.links.len(), 2);
        let pod = &d.links[&1];
        assert_eq!(pod.node_end(), "eth1");
        // 10.0.1.5 is eni-a's; 100.64.0.1 is the pod subnet's router.
        let routes: Vec<String> = pod.on_link.routes.iter().map(ToString::to_string).collect();
        assert_eq!(routes, ["100.64.0.9/32", "100.64.1.1/32"]);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        // The LB is on the node subnet: ARP answered on eth0 only.
        assert_eq!(d.links[&0].on_link.proxies, BTreeSet::from([lb]));
        assert!(pod.on_link.proxies.is_empty());
        assert_eq!(
            pod.ingress,
            BTreeSet::from([
                "".to_string(),
                "-s 10.0.1.250/32 -p tcp --dport 8080".into()
            ])
        );
        assert!(d.ruleset.contains("-A FORWARD -i eni1 -j SD-eni-b\n"));
        assert!(
            d.ruleset
                .contains("-A SD-eni-b -s 100.64.0.9/32 -j RETURN\n")
        );
        assert!(d.ruleset.contains("-A SG-eni-b -j ACCEPT\n"));
        assert!(d.ruleset.ends_with("-A SG-eni-b -j DROP\nCOMMIT\n"));
    }

    #[test]
    fn protocols() {
        assert_eq!(
            protocol_match("tcp", Some(0), Some(65535)).unwrap(),
            "-p tcp"
        );
        assert_eq!(
            protocol_match("udp", Some(53), Some(54)).unwrap(),
            "-p udp --dport 53:54"
        );
        assert_eq!(
            protocol_match("icmp", Some(8), Some(-1)).unwrap(),
            "-p icmp --icmp-type 8"
        );
        assert_eq!(protocol_match("icmpv6", None, None), None);
        assert_eq!(protocol_match("47", None, None).unwrap(), "-p 47");
    }
}
