//! What the HAProxy provider manages, as data: one entry per load balancer
//! (its spec, its frontend address, its registered servers), persisted as
//! JSON beside the HAProxy configuration, which is rendered from it. Pure
//! planning: [`State::ensure`] checks a spec against what HAProxy can do and
//! computes the next state; the provider then writes and applies it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use cnlb_provider_core::{
    IpAddressType, Listener, LoadBalancerKey, LoadBalancerSpec, OwnedLoadBalancer, ProviderError,
    ResourceIds, Result,
};
use serde::{Deserialize, Serialize};

/// `target_group_attributes` key: send the PROXY protocol v2 header to
/// backends (`"true"` / `"false"`), as on AWS.
pub const ATTR_PROXY_PROTOCOL_V2: &str = "proxy_protocol_v2.enabled";
/// `target_group_attributes` key: seconds a deregistered backend may keep
/// its connections before they are cut (default [`DEFAULT_DRAIN_SECONDS`]).
pub const ATTR_DEREGISTRATION_DELAY: &str = "deregistration_delay.timeout_seconds";
/// The AWS default deregistration delay.
pub const DEFAULT_DRAIN_SECONDS: u64 = 300;

/// ID key of the frontend address in [`ResourceIds`].
pub const ID_ADDRESS: &str = "address";

/// Everything the provider manages, keyed by [`LoadBalancerKey::short_name`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub load_balancers: BTreeMap<String, LbState>,
}

/// One load balancer: a frontend per listener, all on `address`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbState {
    pub spec: LoadBalancerSpec,
    pub address: IpAddr,
    /// Registered (not draining) servers per listener port.
    pub servers: BTreeMap<u16, BTreeSet<SocketAddr>>,
}

impl LbState {
    /// Frontend and backend name of the listener on `port`.
    pub fn proxy_name(&self, port: u16) -> String {
        proxy_name(&self.spec.key, port)
    }

    /// The IDs the controller persists: the address and one backend per listener.
    pub fn ids(&self) -> ResourceIds {
        let mut ids = ResourceIds::from([(ID_ADDRESS.to_string(), self.address.to_string())]);
        for l in &self.spec.listeners {
            ids.insert(format!("backend/{}", l.name), self.proxy_name(l.port));
        }
        ids
    }

    /// The listener of the spec that `listener` names (by port, the proxy's
    /// identity).
    pub fn listener(&self, listener: &Listener) -> Option<&Listener> {
        self.spec.listeners.iter().find(|l| l.port == listener.port)
    }

    /// Seconds a draining server keeps its connections.
    pub fn drain_seconds(&self) -> u64 {
        self.spec
            .target_group_attributes
            .get(ATTR_DEREGISTRATION_DELAY)
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_DRAIN_SECONDS)
    }

    pub fn proxy_protocol(&self) -> bool {
        self.spec
            .target_group_attributes
            .get(ATTR_PROXY_PROTOCOL_V2)
            .is_some_and(|v| v == "true")
    }
}

/// Name of the frontend and of its backend for the listener on `port`
/// (HAProxy keeps frontends and backends in separate namespaces).
pub fn proxy_name(key: &LoadBalancerKey, port: u16) -> String {
    format!("{}-{port}", key.short_name())
}

impl State {
    /// The load balancer of `key`, if this provider has it.
    pub fn get(&self, key: &LoadBalancerKey) -> Option<&LbState> {
        self.load_balancers
            .get(&key.short_name())
            .filter(|lb| lb.spec.key == *key)
    }

    /// The state after making `spec` real: the load balancer keeps its
    /// address (or gets the lowest free one of `pool`) and the servers of
    /// listeners whose port it keeps.
    pub fn ensure(&self, spec: &LoadBalancerSpec, pool: &AddressPool) -> Result<State> {
        check_spec(spec)?;
        let name = spec.key.short_name();
        let current = self.load_balancers.get(&name);
        if let Some(lb) = current
            && lb.spec.key != spec.key
        {
            return Err(ProviderError::Conflict {
                resource: name,
                reason: format!("the name belongs to {}", lb.spec.key),
            });
        }
        let address = match current {
            Some(lb) => lb.address,
            None => {
                let used: BTreeSet<IpAddr> =
                    self.load_balancers.values().map(|lb| lb.address).collect();
                pool.first_free(&used)
                    .ok_or_else(|| ProviderError::QuotaExceeded {
                        resource: format!("frontend addresses in {pool}"),
                    })?
            }
        };
        let servers = spec
            .listeners
            .iter()
            .map(|l| {
                let kept = current
                    .and_then(|lb| lb.servers.get(&l.port))
                    .cloned()
                    .unwrap_or_default();
                (l.port, kept)
            })
            .collect();
        let mut next = self.clone();
        next.load_balancers.insert(
            name,
            LbState {
                spec: spec.clone(),
                address,
                servers,
            },
        );
        Ok(next)
    }

    /// The state without the load balancer of `key` (unchanged if absent).
    pub fn without(&self, key: &LoadBalancerKey) -> State {
        let mut next = self.clone();
        if self.get(key).is_some() {
            next.load_balancers.remove(&key.short_name());
        }
        next
    }

    /// Load balancers of `cluster`, for garbage collection.
    pub fn owned(&self, cluster: &str) -> Vec<OwnedLoadBalancer> {
        self.load_balancers
            .values()
            .filter(|lb| lb.spec.key.cluster == cluster)
            .map(|lb| OwnedLoadBalancer {
                key: lb.spec.key.clone(),
                ids: lb.ids(),
            })
            .collect()
    }
}

/// What HAProxy (community edition, TCP mode) cannot build, as user errors.
fn check_spec(spec: &LoadBalancerSpec) -> Result<()> {
    spec.validate()?;
    spec.require_tcp("by the HAProxy provider (TCP only)")?;
    if spec.ip_address_type == IpAddressType::DualStack {
        return Err(ProviderError::invalid(
            "ip_address_type",
            "dual-stack is not supported by the HAProxy provider (one address per load balancer)",
        ));
    }
    if spec.subnets.is_some() {
        return Err(ProviderError::invalid(
            "subnets",
            "the HAProxy provider places frontends on its address pool, not in subnets",
        ));
    }
    if let Some(key) = spec.attributes.keys().next() {
        return Err(ProviderError::invalid(
            format!("attributes[{key}]"),
            "the HAProxy provider supports no load balancer attributes",
        ));
    }
    for (key, value) in &spec.target_group_attributes {
        let field = || format!("target_group_attributes[{key}]");
        match key.as_str() {
            ATTR_PROXY_PROTOCOL_V2 if value != "true" && value != "false" => {
                return Err(ProviderError::invalid(field(), "must be true or false"));
            }
            ATTR_DEREGISTRATION_DELAY if value.parse::<u32>().is_err() => {
                return Err(ProviderError::invalid(
                    field(),
                    "must be a number of seconds",
                ));
            }
            ATTR_PROXY_PROTOCOL_V2 | ATTR_DEREGISTRATION_DELAY => {}
            _ => {
                return Err(ProviderError::invalid(
                    field(),
                    format!(
                        "unknown; the HAProxy provider supports {ATTR_PROXY_PROTOCOL_V2} and {ATTR_DEREGISTRATION_DELAY}"
                    ),
                ));
            }
        }
    }
    // The path goes into the configuration file as one word.
    if let Some(path) = &spec.health_check.path
        && !path
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'\'' | b'#' | b'\\'))
    {
        return Err(ProviderError::invalid(
            "health_check.path",
            format!("{path:?} may not contain spaces, quotes, '#' or '\\'"),
        ));
    }
    Ok(())
}

/// Frontend addresses: CIDRs and single addresses, handed out lowest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressPool {
    ranges: Vec<(IpAddr, u8)>,
}

impl AddressPool {
    /// The lowest address of the pool not in `used`. In IPv4 ranges of
    /// more than two addresses, the network and broadcast addresses are
    /// skipped.
    pub fn first_free(&self, used: &BTreeSet<IpAddr>) -> Option<IpAddr> {
        self.ranges.iter().find_map(|&(base, prefix)| match base {
            IpAddr::V4(base) => {
                let size = 1u64 << (32 - u32::from(prefix));
                let (first, last) = if size > 2 {
                    (1, size - 2)
                } else {
                    (0, size - 1)
                };
                (first..=last)
                    .map(|i| IpAddr::V4(Ipv4Addr::from(u32::from(base).wrapping_add(i as u32))))
                    .find(|ip| !used.contains(ip))
            }
            IpAddr::V6(base) => {
                let host_bits = 128 - u32::from(prefix);
                let last = if host_bits >= 64 {
                    u64::MAX
                } else {
                    (1u64 << host_bits) - 1
                };
                (0..=last)
                    .map(|i| IpAddr::V6(Ipv6Addr::from(u128::from(base) + u128::from(i))))
                    .find(|ip| !used.contains(ip))
            }
        })
    }
}

/// `127.0.0.0/24`, `10.0.0.5`, or several separated by commas.
impl FromStr for AddressPool {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let ranges = s
            .split(',')
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(parse_range)
            .collect::<std::result::Result<Vec<_>, _>>()?;
        if ranges.is_empty() {
            return Err("the address pool is empty".into());
        }
        Ok(AddressPool { ranges })
    }
}

fn parse_range(s: &str) -> std::result::Result<(IpAddr, u8), String> {
    let bad = || format!("{s:?} is not an address or a CIDR");
    let (ip, prefix) = match s.split_once('/') {
        Some((ip, prefix)) => (
            ip.parse::<IpAddr>().map_err(|_| bad())?,
            prefix.parse::<u8>().map_err(|_| bad())?,
        ),
        None => {
            let ip = s.parse::<IpAddr>().map_err(|_| bad())?;
            (ip, if ip.is_ipv4() { 32 } else { 128 })
        }
    };
    let base = match ip {
        IpAddr::V4(v4) if prefix <= 32 => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
        }
        IpAddr::V6(v6) if prefix <= 128 => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
        _ => return Err(bad()),
    };
    if base != ip {
        return Err(format!(
            "{s:?} has host bits set (did you mean {base}/{prefix}?)"
        ));
    }
    Ok((base, prefix))
}

impl fmt::Display for AddressPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (ip, prefix)) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{ip}/{prefix}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use cnlb_provider_core::{HealthCheckProtocol, Protocol};

    use super::*;

    fn spec(name: &str, ports: &[u16]) -> LoadBalancerSpec {
        let mut spec = LoadBalancerSpec::new(LoadBalancerKey::new("c1", "default", name, "uid-1"));
        spec.listeners = ports
            .iter()
            .map(|&port| Listener {
                name: format!("p{port}"),
                protocol: Protocol::Tcp,
                port,
                target_port: 8080,
            })
            .collect();
        spec
    }

    fn pool(s: &str) -> AddressPool {
        s.parse().unwrap()
    }

    #[test]
    fn pool_parsing_and_allocation() {
        let p = pool("127.0.0.0/30, 10.0.0.7");
        assert_eq!(p.to_string(), "127.0.0.0/30,10.0.0.7/32");
        let mut used = BTreeSet::new();
        let mut got = Vec::new();
        while let Some(ip) = p.first_free(&used) {
            used.insert(ip);
            got.push(ip.to_string());
        }
        // Network and broadcast of the /30 are skipped.
        assert_eq!(got, ["127.0.0.1", "127.0.0.2", "10.0.0.7"]);
        assert_eq!(
            pool("127.0.0.8/31").first_free(&BTreeSet::new()),
            Some("127.0.0.8".parse().unwrap())
        );
        assert_eq!(
            pool("fd00::/120").first_free(&BTreeSet::new()),
            Some("fd00::".parse().unwrap())
        );
        assert!("127.0.0.1/24".parse::<AddressPool>().is_err());
        assert!("127.0.0.0/33".parse::<AddressPool>().is_err());
        assert!("".parse::<AddressPool>().is_err());
        assert!("pool".parse::<AddressPool>().is_err());
    }

    #[test]
    fn ensure_allocates_keeps_and_drops() {
        let p = pool("127.0.0.0/29");
        let web = spec("web", &[80, 443]);
        let state = State::default().ensure(&web, &p).unwrap();
        let lb = state.get(&web.key).unwrap();
        assert_eq!(lb.address, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(lb.ids()[ID_ADDRESS], "127.0.0.1");
        assert_eq!(lb.ids()["backend/p80"], proxy_name(&web.key, 80));

        let api = spec("api", &[80]);
        let state = state.ensure(&api, &p).unwrap();
        assert_eq!(
            state.get(&api.key).unwrap().address,
            "127.0.0.2".parse::<IpAddr>().unwrap()
        );

        // Servers of a kept port stay; a dropped port takes its servers along.
        let mut with_servers = state.clone();
        let lb = with_servers
            .load_balancers
            .get_mut(&web.key.short_name())
            .unwrap();
        for port in [80, 443] {
            lb.servers
                .get_mut(&port)
                .unwrap()
                .insert("10.0.0.1:8080".parse().unwrap());
        }
        let next = with_servers.ensure(&spec("web", &[80, 8443]), &p).unwrap();
        let lb = next.get(&web.key).unwrap();
        assert_eq!(lb.address, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(lb.servers[&80].len(), 1);
        assert!(lb.servers[&8443].is_empty());
        assert!(!lb.servers.contains_key(&443));
        // Same spec again: same state.
        assert_eq!(next.ensure(&spec("web", &[80, 8443]), &p).unwrap(), next);

        // A recreated Service (new UID) does not take the old one's place.
        let mut recreated = web.clone();
        recreated.key.uid = "uid-2".into();
        assert!(state.get(&recreated.key).is_none());
        assert_eq!(state.without(&recreated.key), state);
        let gone = state.without(&web.key);
        assert!(gone.get(&web.key).is_none());
        assert_eq!(gone.owned("c1").len(), 1);
        assert!(gone.owned("c2").is_empty());
    }

    #[test]
    fn pool_exhaustion_is_a_quota() {
        let p = pool("127.0.0.9");
        let state = State::default().ensure(&spec("a", &[80]), &p).unwrap();
        assert!(matches!(
            state.ensure(&spec("b", &[80]), &p),
            Err(ProviderError::QuotaExceeded { .. })
        ));
    }

    #[test]
    fn what_haproxy_cannot_build_is_a_user_error() {
        let p = pool("127.0.0.0/29");
        let field = |spec: &LoadBalancerSpec| match State::default().ensure(spec, &p) {
            Err(ProviderError::InvalidSpec { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let mut s = spec("web", &[80]);
        s.listeners[0].protocol = Protocol::Udp;
        assert_eq!(field(&s), "listeners[0].protocol");
        let mut s = spec("web", &[80]);
        s.ip_address_type = IpAddressType::DualStack;
        assert_eq!(field(&s), "ip_address_type");
        let mut s = spec("web", &[80]);
        s.attributes.insert("idle_timeout".into(), "60".into());
        assert_eq!(field(&s), "attributes[idle_timeout]");
        let mut s = spec("web", &[80]);
        s.target_group_attributes
            .insert(ATTR_PROXY_PROTOCOL_V2.into(), "yes".into());
        assert_eq!(
            field(&s),
            "target_group_attributes[proxy_protocol_v2.enabled]"
        );
        let mut s = spec("web", &[80]);
        s.target_group_attributes
            .insert("stickiness.enabled".into(), "true".into());
        assert_eq!(field(&s), "target_group_attributes[stickiness.enabled]");
        let mut s = spec("web", &[80]);
        s.health_check.protocol = HealthCheckProtocol::Http;
        s.health_check.path = Some("/a b".into());
        assert_eq!(field(&s), "health_check.path");
        assert_eq!(field(&spec("web", &[])), "listeners");

        let mut ok = spec("web", &[80]);
        ok.target_group_attributes
            .insert(ATTR_DEREGISTRATION_DELAY.into(), "5".into());
        ok.target_group_attributes
            .insert(ATTR_PROXY_PROTOCOL_V2.into(), "true".into());
        let state = State::default().ensure(&ok, &p).unwrap();
        let lb = state.get(&ok.key).unwrap();
        assert_eq!(lb.drain_seconds(), 5);
        assert!(lb.proxy_protocol());
    }
}
