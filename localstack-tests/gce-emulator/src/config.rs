//! The emulator's flags: the world it models (project, region, zones,
//! network, one subnetwork with its secondary ranges) and its timing. The
//! same struct renders itself back into flags, so the test environment and
//! the binary cannot disagree.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Parser;

use super::cidr::Cidr;

/// `cnlb-gce-emulator`: Google Compute Engine's `/compute/v1` REST API for
/// the calls cnlb makes, on loopback. See localstack-tests/gce-emulator/GCE_EMULATOR.md.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "cnlb-gce-emulator",
    about = "A Google Compute Engine API emulator for cnlb's tests (see localstack-tests/gce-emulator/GCE_EMULATOR.md)"
)]
pub struct GceOptions {
    /// Address to serve on.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// The only project that exists.
    #[arg(long, default_value = "cnlb-test")]
    pub project: String,
    /// The only region that exists.
    #[arg(long, default_value = "us-central1")]
    pub region: String,
    /// The region's zones, full names, comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "us-central1-a,us-central1-b,us-central1-c"
    )]
    pub zones: Vec<String>,
    /// The VPC network (global).
    #[arg(long, default_value = "cnlb-net")]
    pub network: String,
    /// The subnetwork in the region and its primary range, NAME=CIDR.
    #[arg(long, default_value = "nodes=10.128.0.0/20", value_parser = parse_named_range)]
    pub subnetwork: NamedRange,
    /// A secondary range of the subnetwork, NAME=CIDR (repeatable).
    #[arg(long = "secondary-range", value_parser = parse_named_range)]
    pub secondary_ranges: Vec<NamedRange>,
    /// How long every operation stays PENDING/RUNNING before it is DONE
    /// (and its change takes effect).
    #[arg(long, default_value_t = 100)]
    pub operation_delay_ms: u64,
    /// Endpoints are never probed more often than this, whatever the
    /// health check's interval.
    #[arg(long, default_value_t = 1000)]
    pub health_check_min_interval_ms: u64,
    /// Multiplies every health check's checkIntervalSec and timeoutSec
    /// (0.1 makes a 1 s check probe every 100 ms, within the floor above).
    #[arg(long, default_value_t = 1.0)]
    pub health_check_time_scale: f64,
    /// A per-minute rate quota, GROUP=N with GROUP read (get, list,
    /// operation polls), endpoints (attach, detach, listNetworkEndpoints)
    /// or write (every other call); repeatable. Unlimited when absent.
    #[arg(long = "quota", value_parser = parse_quota)]
    pub quotas: Vec<(QuotaGroup, u32)>,
}

impl Default for GceOptions {
    fn default() -> GceOptions {
        // Cannot fail: the defaults above parse.
        GceOptions::try_parse_from(["cnlb-gce-emulator"]).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// A named IPv4 range (`pods=10.4.0.0/16`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NamedRange {
    pub name: String,
    pub cidr: Cidr,
}

impl NamedRange {
    pub fn new(name: &str, cidr: &str) -> Result<NamedRange, String> {
        parse_named_range(&format!("{name}={cidr}"))
    }
}

impl std::fmt::Display for NamedRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.name, self.cidr)
    }
}

fn parse_named_range(s: &str) -> Result<NamedRange, String> {
    let (name, cidr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=CIDR"))?;
    if !valid_name(name) {
        return Err(format!(
            "{name:?} is not a valid GCE name ([a-z]([-a-z0-9]*[a-z0-9])?, at most 63 characters)"
        ));
    }
    Ok(NamedRange {
        name: name.to_string(),
        cidr: cidr.parse()?,
    })
}

/// GCE resource names: RFC 1035 labels, lower case.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[b.len() - 1] != b'-'
}

/// GCE's per-minute API rate quotas, by kind of call.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum QuotaGroup {
    /// get and list calls, operation polls and waits.
    Read,
    /// attachNetworkEndpoints, detachNetworkEndpoints, listNetworkEndpoints.
    Endpoints,
    /// Every other call (inserts, deletes, patches, ...).
    Write,
}

impl QuotaGroup {
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaGroup::Read => "read",
            QuotaGroup::Endpoints => "endpoints",
            QuotaGroup::Write => "write",
        }
    }
}

impl std::str::FromStr for QuotaGroup {
    type Err = String;

    fn from_str(s: &str) -> Result<QuotaGroup, String> {
        match s {
            "read" => Ok(QuotaGroup::Read),
            "endpoints" => Ok(QuotaGroup::Endpoints),
            "write" => Ok(QuotaGroup::Write),
            _ => Err(format!(
                "{s:?} is not a quota group (read, endpoints, write)"
            )),
        }
    }
}

fn parse_quota(s: &str) -> Result<(QuotaGroup, u32), String> {
    let (group, n) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected GROUP=N"))?;
    let n = n
        .parse()
        .map_err(|_| format!("{s:?}: {n:?} is not a number"))?;
    Ok((group.parse()?, n))
}

impl GceOptions {
    /// Checks what clap cannot: names, zones in the region, ranges that do
    /// not overlap (GCE refuses overlapping ranges in one network).
    pub fn validate(&self) -> Result<(), String> {
        for (what, name) in [
            ("--project", &self.project),
            ("--region", &self.region),
            ("--network", &self.network),
        ] {
            if !valid_name(name) {
                return Err(format!("{what} {name:?} is not a valid GCE name"));
            }
        }
        if self.zones.is_empty() {
            return Err("--zones: at least one zone".into());
        }
        for z in &self.zones {
            if !valid_name(z) || !z.starts_with(&format!("{}-", self.region)) {
                return Err(format!(
                    "--zones: {z:?} is not a zone of region {:?} (full names, e.g. {}-a)",
                    self.region, self.region
                ));
            }
        }
        let mut ranges = vec![&self.subnetwork];
        for r in &self.secondary_ranges {
            if ranges.iter().any(|o| o.name == r.name) {
                return Err(format!("--secondary-range: name {:?} used twice", r.name));
            }
            if let Some(o) = ranges.iter().find(|o| o.cidr.overlaps(&r.cidr)) {
                return Err(format!(
                    "--secondary-range {r} overlaps {o}: ranges of a network must not overlap"
                ));
            }
            ranges.push(r);
        }
        if self.subnetwork.cidr.prefix_len() > 29 {
            return Err("--subnetwork: the primary range must be /29 or larger".into());
        }
        if self.health_check_time_scale.is_nan() || self.health_check_time_scale <= 0.0 {
            return Err("--health-check-time-scale must be above 0".into());
        }
        Ok(())
    }

    pub fn operation_delay(&self) -> Duration {
        Duration::from_millis(self.operation_delay_ms)
    }

    pub fn quota_map(&self) -> BTreeMap<QuotaGroup, u32> {
        self.quotas.iter().copied().collect()
    }

    /// The flags that make the binary model this world (without `--listen`).
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            "--project".to_string(),
            self.project.clone(),
            "--region".into(),
            self.region.clone(),
            "--zones".into(),
            self.zones.join(","),
            "--network".into(),
            self.network.clone(),
            "--subnetwork".into(),
            self.subnetwork.to_string(),
            "--operation-delay-ms".into(),
            self.operation_delay_ms.to_string(),
            "--health-check-min-interval-ms".into(),
            self.health_check_min_interval_ms.to_string(),
            "--health-check-time-scale".into(),
            self.health_check_time_scale.to_string(),
        ];
        for r in &self.secondary_ranges {
            a.push("--secondary-range".into());
            a.push(r.to_string());
        }
        for (g, n) in &self.quotas {
            a.push("--quota".into());
            a.push(format!("{}={n}", g.as_str()));
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_round_trip() {
        let d = GceOptions::default();
        assert_eq!(d.project, "cnlb-test");
        assert_eq!(d.zones.len(), 3);
        assert_eq!(d.subnetwork.to_string(), "nodes=10.128.0.0/20");
        d.validate().unwrap();
        let mut o = d.clone();
        o.secondary_ranges
            .push(NamedRange::new("pods", "10.200.0.0/16").unwrap());
        o.quotas.push((QuotaGroup::Endpoints, 7));
        let mut args = vec!["x".to_string()];
        args.extend(o.to_args());
        let back = GceOptions::try_parse_from(args).unwrap();
        assert_eq!(back.secondary_ranges, o.secondary_ranges);
        assert_eq!(back.quotas, o.quotas);
        assert_eq!(back.zones, o.zones);
    }

    #[test]
    fn overlapping_ranges_refused() {
        let mut o = GceOptions::default();
        o.secondary_ranges
            .push(NamedRange::new("pods", "10.128.0.0/16").unwrap());
        assert!(o.validate().unwrap_err().contains("overlaps"));
        let o = GceOptions {
            zones: vec!["europe-west1-b".into()],
            ..GceOptions::default()
        };
        assert!(o.validate().is_err());
    }
}
