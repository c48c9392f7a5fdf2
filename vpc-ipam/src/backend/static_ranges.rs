//! On-prem: fixed per-node ranges, from configuration or from the Node's
//! `spec.podCIDRs` (which kube-controller-manager assigns with
//! `--allocate-node-cidrs`, as host-local's `usePodCidr` reads them).
//! Nothing to ask a cloud for, so the pool is every usable address of the
//! ranges.

use std::sync::OnceLock;

use async_trait::async_trait;

use super::{Assigned, Backend, BackendError, BackendResult, read_node};
use crate::cidr::Cidr;

/// Ranges larger than this are refused: the agent keeps every address in
/// memory, and a node never runs anywhere near this many Pods.
pub const MAX_RANGE_ADDRESSES: u128 = 1 << 16;

pub struct StaticRanges {
    /// Without addresses yet: read from this Node in `start`.
    node: Option<(kube::Client, String)>,
    addresses: OnceLock<Vec<Assigned>>,
}

impl StaticRanges {
    /// Each range gives its [`usable_addresses`].
    pub fn new(ranges: &[Cidr]) -> BackendResult<StaticRanges> {
        let addresses = ranges_addresses(ranges, |r| format!("--static-range {r}"))?;
        Ok(StaticRanges {
            node: None,
            addresses: OnceLock::from(addresses),
        })
    }

    /// The ranges of Node `node_name`'s `spec.podCIDRs`, read when the
    /// agent starts (and again on each start until the Node has them).
    pub fn from_node(kube: kube::Client, node_name: &str) -> StaticRanges {
        StaticRanges {
            node: Some((kube, node_name.to_string())),
            addresses: OnceLock::new(),
        }
    }
}

fn ranges_addresses(
    ranges: &[Cidr],
    what: impl Fn(&Cidr) -> String,
) -> BackendResult<Vec<Assigned>> {
    let mut addresses = Vec::new();
    for range in ranges {
        addresses.extend(usable_addresses(range, "static", &what(range))?);
    }
    Ok(addresses)
}

/// The Node's `spec.podCIDRs` (or `spec.podCIDR`); transient while it has
/// none yet, permanent when one is not a CIDR.
async fn node_pod_cidrs(kube: &kube::Client, node_name: &str) -> BackendResult<Vec<Cidr>> {
    let node = read_node(kube, node_name).await?;
    let spec = node.spec.unwrap_or_default();
    let texts = match spec.pod_cidrs {
        Some(cidrs) if !cidrs.is_empty() => cidrs,
        _ => spec.pod_cidr.into_iter().collect(),
    };
    if texts.is_empty() {
        return Err(BackendError::Transient(format!(
            "Node {node_name} has no spec.podCIDRs yet (kube-controller-manager \
             --allocate-node-cidrs assigns them)"
        )));
    }
    texts
        .iter()
        .map(|t| {
            t.parse::<Cidr>().map_err(|e| {
                BackendError::Permanent(format!("Node {node_name} spec.podCIDRs {t:?}: {e}"))
            })
        })
        .collect()
}

/// The addresses of `range` a pool hands out, held by `holder`: all but
/// the network address, the first host (the Pods' [gateway](super::gateway))
/// and, for IPv4, the broadcast address. `what` names the range in errors.
pub fn usable_addresses(range: &Cidr, holder: &str, what: &str) -> BackendResult<Vec<Assigned>> {
    let size = range.size();
    if size > MAX_RANGE_ADDRESSES {
        return Err(BackendError::Permanent(format!(
            "{what} has {size} addresses; at most {MAX_RANGE_ADDRESSES} \
             are supported (use a longer prefix)"
        )));
    }
    let last = if range.addr().is_ipv4() {
        size - 1
    } else {
        size
    };
    if last <= 2 {
        return Err(BackendError::Permanent(format!(
            "{what} has no usable address besides the gateway"
        )));
    }
    Ok((2..last)
        .filter_map(|i| range.nth(i))
        .map(|ip| Assigned {
            ip,
            subnet: *range,
            holder: holder.to_string(),
        })
        .collect())
}

#[async_trait]
impl Backend for StaticRanges {
    fn name(&self) -> &'static str {
        "static"
    }

    fn elastic(&self) -> bool {
        false
    }

    async fn start(&self) -> BackendResult<()> {
        if let Some((kube, node_name)) = &self.node
            && self.addresses.get().is_none()
        {
            let ranges = node_pod_cidrs(kube, node_name).await?;
            let addresses =
                ranges_addresses(&ranges, |r| format!("Node {node_name} spec.podCIDRs {r}"))?;
            let _ = self.addresses.set(addresses);
        }
        Ok(())
    }

    async fn assigned(&self) -> BackendResult<Vec<Assigned>> {
        self.addresses
            .get()
            .cloned()
            .ok_or_else(|| BackendError::Transient("the Node's ranges are not read yet".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::gateway;

    #[test]
    fn usable_addresses_skip_network_gateway_and_broadcast() {
        let b = StaticRanges::new(&["10.1.0.0/29".parse().unwrap()]).unwrap();
        let ips: Vec<String> = b
            .addresses
            .get()
            .unwrap()
            .iter()
            .map(|a| a.ip.to_string())
            .collect();
        assert_eq!(
            ips,
            ["10.1.0.2", "10.1.0.3", "10.1.0.4", "10.1.0.5", "10.1.0.6"]
        );
        assert_eq!(
            gateway(&"10.1.0.0/29".parse().unwrap())
                .unwrap()
                .to_string(),
            "10.1.0.1"
        );
    }

    #[test]
    fn refuses_ranges_too_small_or_too_large() {
        for range in ["10.1.0.0/31", "10.0.0.0/15", "fd00::/64"] {
            let err = StaticRanges::new(&[range.parse().unwrap()]).err().unwrap();
            assert!(err.to_string().contains(range), "{err}");
        }
        let v6 = StaticRanges::new(&["fd00::/120".parse().unwrap()]).unwrap();
        assert_eq!(v6.addresses.get().unwrap().len(), 254);
    }
}
