//! An environment's share of the host. Environments run at once on one
//! host (the tests of one binary run in parallel), and what they put on it
//! must not collide: Pod routes, Node addresses on `lo`, cgroups, network
//! namespaces. Each takes a number `k` (128..=254) by holding an exclusive
//! flock on `<tmp>/cnlb-env-pod-ranges/10.<k>.lock` for its lifetime (the
//! lock dies with its process), and derives every such name from it:
//!
//! - Pods: `10.<k>.0.0/16`, a /24 per Node;
//! - Node addresses: `10.127.<k>.<10 + i>`, each a /32 on `lo`;
//! - cgroups `cnlb-<k>-<node>` and network namespaces `cnlb-<k>-...`;
//! - HAProxy frontends: `127.<k>.0.0/28`.
//!
//! A lock that can be taken therefore means that whatever carries its `k`
//! belongs to a dead owner and may be removed; nothing of a live
//! environment is ever touched.
//!
//! Pod networking turns on IP forwarding (the ptp plugin does); the first
//! environment records the host's setting, and `cnlb-env down` puts it back
//! once no environment runs.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// `k`s handed out: 10.128.0.0/9 for Pods, clear of the Service CIDR
/// (10.96.0.0/16) and of the 10.0.0.0/16 the AWS tests' VPC uses.
const FIRST: u8 = 128;
const LAST: u8 = 254;

/// This environment's `k`, held while the lock file stays locked.
pub struct RangeLease {
    k: u8,
    _lock: File,
}

fn locks_dir() -> PathBuf {
    std::env::temp_dir().join("cnlb-env-pod-ranges")
}

/// Opens (creating) the lock file of `k` and tries to lock it; `None` when a
/// live process holds it.
fn try_lock(k: u8) -> Result<Option<File>> {
    std::fs::create_dir_all(locks_dir())?;
    let path = locks_dir().join(format!("10.{k}.lock"));
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// The directory of the environment that last held a lock (written in it).
fn owner(lock: &mut File) -> Option<PathBuf> {
    let mut owner = String::new();
    lock.rewind().ok()?;
    lock.read_to_string(&mut owner).ok()?;
    (!owner.is_empty()).then(|| PathBuf::from(owner))
}

impl RangeLease {
    /// Takes the first free `k`, removes what a dead former owner left
    /// under it, and records `env_dir` as its owner.
    pub fn acquire(env_dir: &Path) -> Result<RangeLease> {
        record_ip_forward()?;
        for k in FIRST..=LAST {
            let Some(mut file) = try_lock(k)? else {
                continue;
            };
            let former = owner(&mut file);
            clean(k, former.as_deref());
            file.set_len(0)?;
            file.rewind()?;
            file.write_all(env_dir.as_os_str().as_encoded_bytes())?;
            return Ok(RangeLease { k, _lock: file });
        }
        bail!("every range 10.{FIRST}.0.0/16 .. 10.{LAST}.0.0/16 is held by a running environment")
    }

    pub fn k(&self) -> u8 {
        self.k
    }

    /// `10.<k>.0.0/16`.
    pub fn pod_cidr(&self) -> String {
        format!("10.{}.0.0/16", self.k)
    }

    /// The address of the `i`-th Node (from 0).
    pub fn node_ip(&self, i: usize) -> Result<Ipv4Addr> {
        let host = u8::try_from(10 + i).context("at most 245 Nodes")?;
        Ok(Ipv4Addr::new(10, 127, self.k, host))
    }
}

/// Removes what the dead owner of `k` left: real Nodes (their processes,
/// cgroups and addresses) and Pod network namespaces (with CNI DEL from the
/// records in `owner`'s directory, while its agents may still answer).
/// The caller holds `k`'s lock. Returns what was removed, for people.
fn clean(k: u8, owner: Option<&Path>) -> Vec<String> {
    let mut removed = crate::node::clean_range(k);
    removed.extend(crate::podnet::clean_range(k, owner));
    removed
}

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

fn ip_forward_record() -> PathBuf {
    locks_dir().join("ip_forward.before")
}

/// Writes down the host's IP forwarding setting unless it is already.
fn record_ip_forward() -> Result<()> {
    std::fs::create_dir_all(locks_dir())?;
    let record = ip_forward_record();
    if !record.exists() {
        let value = std::fs::read_to_string(IP_FORWARD).context("reading ip_forward")?;
        std::fs::write(&record, value.trim())?;
    }
    Ok(())
}

/// Puts back the recorded IP forwarding setting if no environment holds a
/// range; returns what was done.
fn restore_ip_forward() -> Result<Option<String>> {
    let record = ip_forward_record();
    let Ok(value) = std::fs::read_to_string(&record) else {
        return Ok(None);
    };
    for k in FIRST..=LAST {
        if locks_dir().join(format!("10.{k}.lock")).exists() && try_lock(k)?.is_none() {
            return Ok(None); // a live environment still needs it
        }
    }
    std::fs::write(IP_FORWARD, value.trim()).context("restoring ip_forward")?;
    std::fs::remove_file(&record)?;
    Ok(Some(format!(
        "net.ipv4.ip_forward set back to {}",
        value.trim()
    )))
}

/// Cleans every `k` that has leftovers on this host and whose lock is free
/// (its owner is dead), then restores IP forwarding if no environment runs;
/// returns what was done.
pub fn clean_stale() -> Result<Vec<String>> {
    let mut ks: Vec<u8> = crate::node::ranges_in_use();
    ks.extend(crate::podnet::ranges_in_use());
    ks.retain(|k| (FIRST..=LAST).contains(k));
    ks.sort_unstable();
    ks.dedup();
    let mut removed = Vec::new();
    for k in ks {
        if let Some(mut file) = try_lock(k)? {
            let former = owner(&mut file);
            removed.extend(clean(k, former.as_deref()));
        }
    }
    removed.extend(restore_ip_forward()?);
    Ok(removed)
}
