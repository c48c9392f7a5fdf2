//! An IP address with a prefix length ("10.0.0.5/24", "fd00::/64"), the form
//! CNI results and address ranges use.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix_len: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{0:?} is not in ADDRESS/PREFIX form")]
    MissingPrefix(String),
    #[error("{0:?} is not an IPv4 or IPv6 address")]
    BadAddress(String),
    #[error("prefix length {0:?} is not a number")]
    BadPrefix(String),
    #[error("prefix length {len} is longer than {max} bits")]
    PrefixTooLong { len: u8, max: u8 },
}

impl Cidr {
    pub fn new(addr: IpAddr, prefix_len: u8) -> Result<Self, CidrError> {
        let max = max_prefix_len(addr);
        if prefix_len > max {
            return Err(CidrError::PrefixTooLong {
                len: prefix_len,
                max,
            });
        }
        Ok(Self { addr, prefix_len })
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// The same prefix with the host bits cleared.
    pub fn network(&self) -> Self {
        let host_bits = u32::from(max_prefix_len(self.addr) - self.prefix_len);
        // checked_shl: shifting by the full width (a /0) clears every bit.
        let addr = match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(host_bits).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(host_bits).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        Self {
            addr,
            prefix_len: self.prefix_len,
        }
    }

    /// How many addresses the prefix spans (saturating at u128::MAX).
    pub fn size(&self) -> u128 {
        let host_bits = u32::from(max_prefix_len(self.addr) - self.prefix_len);
        1u128.checked_shl(host_bits).unwrap_or(u128::MAX)
    }

    /// The `offset`-th address of the prefix, if it is inside.
    pub fn nth(&self, offset: u128) -> Option<IpAddr> {
        if offset >= self.size() {
            return None;
        }
        Some(match self.network().addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(
                u32::from(a).checked_add(u32::try_from(offset).ok()?)?,
            )),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a).checked_add(offset)?)),
        })
    }

    pub fn contains(&self, ip: &IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4()
            && Cidr::new(*ip, self.prefix_len).map(|c| c.network()) == Ok(self.network())
    }

    /// True when no host bits are set, as a range ("10.1.0.0/16") must be.
    pub fn is_network(&self) -> bool {
        self.network() == *self
    }
}

fn max_prefix_len(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| CidrError::MissingPrefix(s.into()))?;
        let addr = addr
            .parse()
            .map_err(|_| CidrError::BadAddress(addr.into()))?;
        // Only plain decimal digits: u8::from_str would also accept "+8".
        if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CidrError::BadPrefix(len.into()));
        }
        let len = len.parse().map_err(|_| CidrError::BadPrefix(len.into()))?;
        Self::new(addr, len)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for text in [
            "10.0.0.5/24",
            "0.0.0.0/0",
            "fd00::1/64",
            "::/0",
            "192.168.1.1/32",
        ] {
            assert_eq!(text.parse::<Cidr>().unwrap().to_string(), text);
        }
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(
            "10.0.0.1".parse::<Cidr>(),
            Err(CidrError::MissingPrefix("10.0.0.1".into()))
        );
        assert_eq!(
            "10.0.0/8".parse::<Cidr>(),
            Err(CidrError::BadAddress("10.0.0".into()))
        );
        assert_eq!(
            "10.0.0.0/+8".parse::<Cidr>(),
            Err(CidrError::BadPrefix("+8".into()))
        );
        assert_eq!(
            "10.0.0.0/".parse::<Cidr>(),
            Err(CidrError::BadPrefix("".into()))
        );
        assert_eq!(
            "10.0.0.0/33".parse::<Cidr>(),
            Err(CidrError::PrefixTooLong { len: 33, max: 32 })
        );
        assert_eq!(
            "fd00::/129".parse::<Cidr>(),
            Err(CidrError::PrefixTooLong { len: 129, max: 128 })
        );
    }

    #[test]
    fn network_clears_host_bits() {
        let cidr: Cidr = "10.1.2.3/16".parse().unwrap();
        assert_eq!(cidr.network().to_string(), "10.1.0.0/16");
        assert!(!cidr.is_network());
        assert!("10.1.0.0/16".parse::<Cidr>().unwrap().is_network());
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().is_network());
        assert_eq!(
            "fd00::1:2/112"
                .parse::<Cidr>()
                .unwrap()
                .network()
                .to_string(),
            "fd00::1:0/112"
        );
    }

    #[test]
    fn serde_as_string() {
        let cidr: Cidr = serde_json::from_str("\"10.0.0.5/24\"").unwrap();
        assert_eq!(serde_json::to_string(&cidr).unwrap(), "\"10.0.0.5/24\"");
        assert!(serde_json::from_str::<Cidr>("\"10.0.0.5\"").is_err());
    }
}
