//! IPv4 ranges: parsing, containment, overlap and first-fit allocation, the
//! arithmetic behind subnetworks, alias IP ranges and address reservation.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 CIDR block whose host bits are zero (`10.0.0.0/24`, not `10.0.0.1/24`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    base: u32,
    len: u8,
}

const fn mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - len as u32)
    }
}

impl Cidr {
    /// `a.b.c.d/len`, host bits cleared.
    pub const fn v4(octets: [u8; 4], len: u8) -> Cidr {
        let len = if len > 32 { 32 } else { len };
        Cidr {
            base: u32::from_be_bytes(octets) & mask(len),
            len,
        }
    }

    pub fn new(addr: Ipv4Addr, len: u8) -> Option<Cidr> {
        if len > 32 {
            return None;
        }
        let base = u32::from(addr);
        (base & !mask(len) == 0).then_some(Cidr { base, len })
    }

    /// A single address, `/32`.
    pub fn host(addr: Ipv4Addr) -> Cidr {
        Cidr {
            base: u32::from(addr),
            len: 32,
        }
    }

    /// `a.b.c.d/n` with zero host bits, or a bare address (a `/32`).
    pub fn parse_or_host(s: &str) -> Option<Cidr> {
        match s.split_once('/') {
            Some(_) => s.parse().ok(),
            None => s.parse::<Ipv4Addr>().ok().map(Cidr::host),
        }
    }

    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base)
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    fn last(&self) -> u32 {
        self.base | !mask(self.len)
    }

    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.len))
    }

    pub fn contains_ip(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.len) == self.base
    }

    pub fn contains(&self, other: &Cidr) -> bool {
        other.len >= self.len && other.base & mask(self.len) == self.base
    }

    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.contains(other) || other.contains(self)
    }

    /// The first block of `/len` inside `self` that overlaps nothing in
    /// `used` and no address in `reserved` (first fit, aligned blocks).
    pub fn first_free(&self, len: u8, used: &[Cidr], reserved: &[Ipv4Addr]) -> Option<Cidr> {
        if len < self.len || len > 32 {
            return None;
        }
        let step = 1u64 << (32 - u32::from(len));
        let mut at = u64::from(self.base);
        let end = u64::from(self.last());
        while at <= end {
            let block = Cidr {
                base: u32::try_from(at).ok()?,
                len,
            };
            let clash = used.iter().any(|u| u.overlaps(&block))
                || reserved.iter().any(|r| block.contains_ip(*r));
            if !clash {
                return Some(block);
            }
            at += step;
        }
        None
    }

    /// Addresses GCE keeps for itself in a subnetwork's primary range: the
    /// network, the gateway, the second-to-last and the broadcast address.
    pub fn gce_reserved(&self) -> Vec<Ipv4Addr> {
        if self.len > 29 {
            return Vec::new();
        }
        vec![
            Ipv4Addr::from(self.base),
            Ipv4Addr::from(self.base + 1),
            Ipv4Addr::from(self.last() - 1),
            Ipv4Addr::from(self.last()),
        ]
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR range (a.b.c.d/n)"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{s:?}: {addr:?} is not an IPv4 address"))?;
        let len: u8 = len
            .parse()
            .map_err(|_| format!("{s:?}: {len:?} is not a prefix length"))?;
        if len > 32 {
            return Err(format!("{s:?}: prefix length above 32"));
        }
        Cidr::new(addr, len).ok_or_else(|| format!("{s:?} has host bits set"))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network(), self.len)
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn parse_and_display() {
        assert_eq!(c("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert!("10.0.0.1/8".parse::<Cidr>().is_err());
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("10.0.0.0".parse::<Cidr>().is_err());
        assert_eq!(
            Cidr::parse_or_host("10.1.2.3").unwrap().to_string(),
            "10.1.2.3/32"
        );
    }

    #[test]
    fn containment_and_overlap() {
        let r = c("10.4.0.0/16");
        assert!(r.contains(&c("10.4.7.0/24")));
        assert!(!r.contains(&c("10.5.0.0/24")));
        assert!(!c("10.4.7.0/24").contains(&r));
        assert!(r.overlaps(&c("10.0.0.0/8")));
        assert!(!r.overlaps(&c("10.5.0.0/16")));
        assert!(r.contains_ip("10.4.255.255".parse().unwrap()));
        assert_eq!(c("0.0.0.0/0").size(), 1 << 32);
    }

    #[test]
    fn first_fit() {
        let r = c("10.4.0.0/16");
        let used = [c("10.4.0.0/24"), c("10.4.2.0/23")];
        assert_eq!(r.first_free(24, &used, &[]), Some(c("10.4.1.0/24")));
        assert_eq!(r.first_free(23, &used, &[]), Some(c("10.4.4.0/23")));
        assert_eq!(r.first_free(8, &used, &[]), None);
        let p = c("10.0.0.0/29");
        let got = p.first_free(32, &[], &p.gce_reserved());
        assert_eq!(got, Some(c("10.0.0.2/32")));
        let full = c("10.9.0.0/24");
        assert_eq!(full.first_free(24, &[full], &[]), None);
    }
}
