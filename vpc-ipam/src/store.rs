//! The agent's crash-safe state, in one redb file: allocations, cooldowns
//! and in-flight cloud operations. Every change is one transaction that is
//! durable before the agent answers, so a kill -9 at any point leaves
//! either the state before a request or the state after it.
//!
//! The addresses the cloud has assigned to the node are not stored: the
//! cloud is their source of truth, read again on every start.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::cidr::Cidr;
use crate::protocol::{AttachmentKey, PodRef};

/// `<container id>/<ifname>` → [`Allocation`] as JSON.
const ALLOCATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("allocations");
/// Address → when it may be handed out again (Unix milliseconds).
const COOLDOWNS: TableDefinition<&str, u64> = TableDefinition::new("cooldowns");
/// Operation id → [`Operation`] as JSON.
const OPERATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("operations");

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Allocation {
    pub ip: IpAddr,
    pub subnet: Cidr,
    pub pod: PodRef,
    /// Unix milliseconds.
    pub allocated_at: u64,
}

/// A cloud call that was started and not known to have finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Operation {
    Acquire { count: usize, started_at: u64 },
    Release { ips: Vec<IpAddr>, started_at: u64 },
}

/// Everything stored, as read on start.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub allocations: BTreeMap<AttachmentKey, Allocation>,
    pub cooldowns: BTreeMap<IpAddr, u64>,
    pub operations: BTreeMap<String, Operation>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store: {0}")]
    Db(#[from] redb::Error),
    #[error("state store: corrupt record {key:?}: {reason}")]
    Corrupt { key: String, reason: String },
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

pub type StoreResult<T> = Result<T, StoreError>;

/// One change to apply atomically.
#[derive(Debug, Clone)]
pub enum Change {
    Allocate(AttachmentKey, Allocation),
    /// Drop an allocation; with `Some(until)`, its address cools down.
    Free(AttachmentKey, IpAddr, Option<u64>),
    ForgetCooldown(IpAddr),
    BeginOperation(String, Operation),
    EndOperation(String),
}

pub struct Store {
    db: Database,
}

fn key_text(key: &AttachmentKey) -> String {
    format!("{}/{}", key.container_id, key.ifname)
}

fn parse_key(text: &str) -> StoreResult<AttachmentKey> {
    // Container ids and interface names cannot contain '/', so the last
    // '/' separates them.
    let (container_id, ifname) = text.rsplit_once('/').ok_or_else(|| StoreError::Corrupt {
        key: text.into(),
        reason: "expected <container id>/<ifname>".into(),
    })?;
    Ok(AttachmentKey {
        container_id: container_id.into(),
        ifname: ifname.into(),
    })
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> StoreResult<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.into(),
        reason: e.to_string(),
    })
}

fn encode<T: Serialize>(key: &str, value: &T) -> StoreResult<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| StoreError::Corrupt {
        key: key.into(),
        reason: e.to_string(),
    })
}

impl Store {
    /// Opens (or creates) the store. redb locks the file, so a second
    /// agent on the same state directory fails here instead of sharing it.
    pub fn open(path: &Path) -> StoreResult<Store> {
        let db = Database::create(path)?;
        // Create the tables so that reads of a new store find them.
        let txn = db.begin_write()?;
        txn.open_table(ALLOCATIONS)?;
        txn.open_table(COOLDOWNS)?;
        txn.open_table(OPERATIONS)?;
        txn.commit()?;
        Ok(Store { db })
    }

    pub fn load(&self) -> StoreResult<Snapshot> {
        let txn = self.db.begin_read()?;
        let mut snapshot = Snapshot::default();
        for entry in txn.open_table(ALLOCATIONS)?.iter()? {
            let (key, value) = entry?;
            let key = key.value();
            snapshot
                .allocations
                .insert(parse_key(key)?, decode(key, value.value())?);
        }
        for entry in txn.open_table(COOLDOWNS)?.iter()? {
            let (ip, until) = entry?;
            let ip_text = ip.value();
            let ip = ip_text.parse().map_err(|_| StoreError::Corrupt {
                key: ip_text.into(),
                reason: "not an IP address".into(),
            })?;
            snapshot.cooldowns.insert(ip, until.value());
        }
        for entry in txn.open_table(OPERATIONS)?.iter()? {
            let (id, value) = entry?;
            let id = id.value();
            snapshot
                .operations
                .insert(id.into(), decode(id, value.value())?);
        }
        Ok(snapshot)
    }

    /// Applies `changes` in one durable transaction.
    pub fn apply(&self, changes: &[Change]) -> StoreResult<()> {
        let txn = self.db.begin_write()?;
        {
            let mut allocations = txn.open_table(ALLOCATIONS)?;
            let mut cooldowns = txn.open_table(COOLDOWNS)?;
            let mut operations = txn.open_table(OPERATIONS)?;
            for change in changes {
                match change {
                    Change::Allocate(key, allocation) => {
                        let key = key_text(key);
                        allocations.insert(key.as_str(), encode(&key, allocation)?.as_slice())?;
                        cooldowns.remove(allocation.ip.to_string().as_str())?;
                    }
                    Change::Free(key, ip, cooldown) => {
                        allocations.remove(key_text(key).as_str())?;
                        if let Some(until) = cooldown {
                            cooldowns.insert(ip.to_string().as_str(), *until)?;
                        }
                    }
                    Change::ForgetCooldown(ip) => {
                        cooldowns.remove(ip.to_string().as_str())?;
                    }
                    Change::BeginOperation(id, op) => {
                        operations.insert(id.as_str(), encode(id, op)?.as_slice())?;
                    }
                    Change::EndOperation(id) => {
                        operations.remove(id.as_str())?;
                    }
                }
            }
        }
        txn.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> AttachmentKey {
        AttachmentKey {
            container_id: id.into(),
            ifname: "eth0".into(),
        }
    }

    fn allocation(ip: &str) -> Allocation {
        Allocation {
            ip: ip.parse().unwrap(),
            subnet: "10.0.0.0/24".parse().unwrap(),
            pod: PodRef {
                namespace: "default".into(),
                name: "web".into(),
            },
            allocated_at: 1,
        }
    }

    #[test]
    fn changes_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let store = Store::open(&path).unwrap();
            store
                .apply(&[
                    Change::Allocate(key("a"), allocation("10.0.0.5")),
                    Change::Allocate(key("b"), allocation("10.0.0.6")),
                    Change::BeginOperation(
                        "op1".into(),
                        Operation::Acquire {
                            count: 4,
                            started_at: 7,
                        },
                    ),
                ])
                .unwrap();
            store
                .apply(&[Change::Free(
                    key("a"),
                    "10.0.0.5".parse().unwrap(),
                    Some(99),
                )])
                .unwrap();
        }
        let snapshot = Store::open(&path).unwrap().load().unwrap();
        assert_eq!(
            snapshot.allocations.keys().collect::<Vec<_>>(),
            vec![&key("b")]
        );
        assert_eq!(
            snapshot.cooldowns.get(&"10.0.0.5".parse().unwrap()),
            Some(&99)
        );
        assert_eq!(snapshot.operations.len(), 1);
    }

    #[test]
    fn allocating_an_address_ends_its_cooldown() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s")).unwrap();
        let ip: IpAddr = "10.0.0.5".parse().unwrap();
        store.apply(&[Change::Free(key("a"), ip, Some(5))]).unwrap();
        store
            .apply(&[Change::Allocate(key("b"), allocation("10.0.0.5"))])
            .unwrap();
        assert!(store.load().unwrap().cooldowns.is_empty());
    }

    #[test]
    fn a_second_agent_cannot_open_the_same_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let _first = Store::open(&path).unwrap();
        assert!(Store::open(&path).is_err());
    }

    #[test]
    fn keys_with_slashes_in_container_ids_round_trip() {
        let k = AttachmentKey {
            container_id: "a/b".into(),
            ifname: "eth0".into(),
        };
        assert_eq!(parse_key(&key_text(&k)).unwrap(), k);
    }
}
