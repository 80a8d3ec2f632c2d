//! The replicated key/value state, in its own redb file.
//!
//! Committed entries are applied in batches: one redb write transaction per
//! batch holding both the changed keys and the id of the last applied entry,
//! so the two never disagree after a crash. Batches are persisted to disk
//! about once a second (see `apply`); snapshots are persisted with
//! `Durability::Immediate`. The current snapshot is kept in the same file, so a restarted node
//! can still serve it to a peer that fell behind a purged log.

use std::io::Cursor;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{
    EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use redb::{Database, Durability, ReadableTable, Table, TableDefinition};

use crate::{CommandResult, Member, NodeId, TypeConfig};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("sm_meta");

/// Bounds redb's page cache: the whole state of a large cluster is a few
/// tens of MiB, and the agent must stay small on the node it manages.
const STATE_CACHE_BYTES: usize = 32 * 1024 * 1024;

const KEY_APPLIED: &str = "applied";
const KEY_MEMBERSHIP: &str = "membership";
const KEY_SNAPSHOT_META: &str = "snapshot_meta";
const KEY_SNAPSHOT_DATA: &str = "snapshot_data";

type StoreResult<T> = Result<T, StorageError<NodeId>>;
/// The last applied log id and the membership in force after it.
type AppliedState = (Option<LogId<NodeId>>, StoredMembership<NodeId, Member>);

/// Failure to open or read the state database.
#[derive(Debug, thiserror::Error)]
pub enum StateMachineError {
    #[error("cannot open the cluster state database {path}")]
    Open {
        path: String,
        #[source]
        source: redb::Error,
    },
    #[error("cannot read the cluster state")]
    Read {
        #[source]
        source: redb::Error,
    },
}

fn sm_read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read_state_machine(&e).into()
}

fn sm_write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(&e).into()
}

fn snapshot_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_snapshot(None, &e).into()
}

/// Read access to the key/value state, the same inside and outside apply.
pub trait KvRead {
    /// The value stored under `key`.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, redb::StorageError>;
    /// All pairs whose key starts with `prefix`, in key order.
    fn scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, redb::StorageError>;
}

/// The key/value state as seen by [`Apply::apply`]: changes land in the
/// batch's transaction and become visible together when it commits.
pub struct KvWrite<'txn> {
    table: Table<'txn, &'static str, &'static [u8]>,
}

impl KvWrite<'_> {
    pub fn put(&mut self, key: &str, value: &[u8]) -> Result<(), redb::StorageError> {
        self.table.insert(key, value).map(|_| ())
    }

    pub fn delete(&mut self, key: &str) -> Result<(), redb::StorageError> {
        self.table.remove(key).map(|_| ())
    }
}

/// Runs `f` on a throwaway in-memory state, for unit tests of the
/// application's apply functions.
#[cfg(feature = "scratch")]
pub fn scratch_kv<R>(f: impl FnOnce(&mut KvWrite<'_>) -> R) -> R {
    let db = Database::builder()
        .create_with_backend(redb::backends::InMemoryBackend::new())
        .expect("an in-memory database");
    let txn = db.begin_write().expect("a write transaction");
    let result = {
        let table = txn.open_table(KV).expect("the state's table");
        f(&mut KvWrite { table })
    };
    txn.commit().expect("an in-memory commit");
    result
}

fn scan_table<T: ReadableTable<&'static str, &'static [u8]>>(
    table: &T,
    prefix: &str,
) -> Result<Vec<(String, Vec<u8>)>, redb::StorageError> {
    let mut out = Vec::new();
    for item in table.range::<&str>(prefix..)? {
        let (key, value) = item?;
        if !key.value().starts_with(prefix) {
            break;
        }
        out.push((key.value().to_string(), value.value().to_vec()));
    }
    Ok(out)
}

impl KvRead for KvWrite<'_> {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, redb::StorageError> {
        Ok(self.table.get(key)?.map(|v| v.value().to_vec()))
    }

    fn scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, redb::StorageError> {
        scan_table(&self.table, prefix)
    }
}

/// The application's deterministic command interpreter.
///
/// `apply` must depend only on the key/value state and the command (never on
/// the clock or the local node), so that every replica computes the same
/// state. Domain errors belong in the returned value; an `Err` means the
/// storage itself failed and stops this Raft node.
pub trait Apply: Send + Sync + 'static {
    fn apply(
        &self,
        kv: &mut KvWrite<'_>,
        log_id: &LogId<NodeId>,
        command: &[u8],
    ) -> Result<serde_json::Value, redb::StorageError>;

    /// Called after the changes of applied entries became visible to
    /// readers (their transaction committed); `replaced_all` when the whole
    /// state was replaced by an installed snapshot.
    fn committed(&self, replaced_all: bool) {
        let _ = replaced_all;
    }
}

/// The state machine handed to openraft.
#[derive(Clone)]
pub struct StateMachineStore {
    db: Arc<Database>,
    app: Arc<dyn Apply>,
    snapshot_counter: Arc<AtomicU64>,
    /// Milliseconds since `opened` of the last batch committed to disk.
    last_durable_ms: Arc<AtomicU64>,
    opened: std::time::Instant,
}

/// How long applied batches may stay in memory only (they are safe in the
/// log meanwhile) before one is committed to disk, which also lets redb
/// reuse the pages the in-memory commits left behind.
const DURABLE_EVERY_MS: u64 = 1_000;

/// A cheap, cloneable handle for reading the applied state from outside Raft.
#[derive(Clone)]
pub struct StateReader {
    db: Arc<Database>,
}

impl StateReader {
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StateMachineError> {
        let read = || -> Result<Option<Vec<u8>>, redb::Error> {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(KV)?;
            Ok(table.get(key)?.map(|v| v.value().to_vec()))
        };
        read().map_err(|source| StateMachineError::Read { source })
    }

    pub fn scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StateMachineError> {
        let read = || -> Result<Vec<(String, Vec<u8>)>, redb::Error> {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(KV)?;
            Ok(scan_table(&table, prefix)?)
        };
        read().map_err(|source| StateMachineError::Read { source })
    }
}

impl StateMachineStore {
    /// Opens (or creates) the state database at `path`.
    pub fn open(path: &Path, app: Arc<dyn Apply>) -> Result<Self, StateMachineError> {
        let open = || -> Result<Database, redb::Error> {
            let db = Database::builder()
                .set_cache_size(STATE_CACHE_BYTES)
                .create(path)?;
            let txn = db.begin_write()?;
            txn.open_table(KV)?;
            txn.open_table(META)?;
            txn.commit()?;
            Ok(db)
        };
        let db = open().map_err(|source| StateMachineError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self {
            db: Arc::new(db),
            app,
            snapshot_counter: Arc::new(AtomicU64::new(0)),
            last_durable_ms: Arc::new(AtomicU64::new(0)),
            opened: std::time::Instant::now(),
        })
    }

    pub fn reader(&self) -> StateReader {
        StateReader {
            db: self.db.clone(),
        }
    }

    fn meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> StoreResult<Option<T>> {
        let txn = self.db.begin_read().map_err(sm_read_err)?;
        let table = txn.open_table(META).map_err(sm_read_err)?;
        match table.get(key).map_err(sm_read_err)? {
            Some(v) => Ok(Some(
                serde_json::from_slice(v.value()).map_err(sm_read_err)?,
            )),
            None => Ok(None),
        }
    }

    fn applied_state_blocking(&self) -> StoreResult<AppliedState> {
        let applied = self.meta(KEY_APPLIED)?;
        let membership = self.meta(KEY_MEMBERSHIP)?.unwrap_or_default();
        Ok((applied, membership))
    }

    async fn blocking<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(StateMachineStore) -> StoreResult<T> + Send + 'static,
    {
        let this = self.clone();
        crate::io::blocking(move || f(this))
            .await
            .map_err(sm_write_err)?
    }

    /// Serialises the whole key/value state with its metadata and keeps it as
    /// the current snapshot.
    fn build_snapshot_blocking(&self) -> StoreResult<Snapshot<TypeConfig>> {
        let txn = self.db.begin_read().map_err(sm_read_err)?;
        let meta_table = txn.open_table(META).map_err(sm_read_err)?;
        let read_meta = |key: &str| -> StoreResult<Option<Vec<u8>>> {
            Ok(meta_table
                .get(key)
                .map_err(sm_read_err)?
                .map(|v| v.value().to_vec()))
        };
        let applied: Option<LogId<NodeId>> = match read_meta(KEY_APPLIED)? {
            Some(b) => serde_json::from_slice(&b).map_err(sm_read_err)?,
            None => None,
        };
        let membership: StoredMembership<NodeId, Member> = match read_meta(KEY_MEMBERSHIP)? {
            Some(b) => serde_json::from_slice(&b).map_err(sm_read_err)?,
            None => StoredMembership::default(),
        };
        let kv = txn.open_table(KV).map_err(sm_read_err)?;
        let data = encode_pairs(&scan_table(&kv, "").map_err(sm_read_err)?);
        drop(kv);
        drop(meta_table);
        drop(txn);

        let counter = self.snapshot_counter.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match applied {
            Some(id) => format!("{}-{}-{}", id.leader_id, id.index, counter),
            None => format!("empty-{counter}"),
        };
        let meta = SnapshotMeta {
            last_log_id: applied,
            last_membership: membership,
            snapshot_id,
        };
        self.save_current_snapshot(&meta, &data)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }

    /// Keeps a freshly built snapshot as the current one, unless a newer
    /// one (installed from the leader while this one was being built) is
    /// already there: the log before that one may be purged, so it must not
    /// be replaced by an older snapshot.
    fn save_current_snapshot(
        &self,
        meta: &SnapshotMeta<NodeId, Member>,
        data: &[u8],
    ) -> StoreResult<()> {
        let meta_bytes = serde_json::to_vec(meta).map_err(snapshot_err)?;
        let mut txn = self.db.begin_write().map_err(snapshot_err)?;
        txn.set_durability(Durability::Immediate);
        {
            let mut table = txn.open_table(META).map_err(snapshot_err)?;
            let stored: Option<SnapshotMeta<NodeId, Member>> =
                match table.get(KEY_SNAPSHOT_META).map_err(snapshot_err)? {
                    Some(bytes) => serde_json::from_slice(bytes.value()).ok(),
                    None => None,
                };
            if stored.is_none_or(|stored| stored.last_log_id <= meta.last_log_id) {
                table
                    .insert(KEY_SNAPSHOT_META, meta_bytes.as_slice())
                    .map_err(snapshot_err)?;
                table
                    .insert(KEY_SNAPSHOT_DATA, data)
                    .map_err(snapshot_err)?;
            }
        }
        txn.commit().map_err(snapshot_err)
    }
}

/// Snapshot data: a sequence of (u32 key length, key, u32 value length, value), big-endian.
fn encode_pairs(pairs: &[(String, Vec<u8>)]) -> Vec<u8> {
    let total: usize = pairs.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
    let mut out = Vec::with_capacity(total);
    for (key, value) in pairs {
        out.extend_from_slice(&(key.len() as u32).to_be_bytes());
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(&(value.len() as u32).to_be_bytes());
        out.extend_from_slice(value);
    }
    out
}

#[derive(Debug, thiserror::Error)]
#[error("snapshot data is corrupt at byte {offset}: {reason}")]
struct CorruptSnapshot {
    offset: usize,
    reason: &'static str,
}

fn decode_pairs(mut data: &[u8]) -> Result<Vec<(String, Vec<u8>)>, CorruptSnapshot> {
    let total = data.len();
    let mut out = Vec::new();
    let take = |data: &mut &[u8]| -> Result<Vec<u8>, CorruptSnapshot> {
        let offset = total - data.len();
        if data.len() < 4 {
            return Err(CorruptSnapshot {
                offset,
                reason: "truncated length",
            });
        }
        let len = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if data.len() < 4 + len {
            return Err(CorruptSnapshot {
                offset,
                reason: "truncated field",
            });
        }
        let field = data[4..4 + len].to_vec();
        *data = &data[4 + len..];
        Ok(field)
    };
    while !data.is_empty() {
        let offset = total - data.len();
        let key = String::from_utf8(take(&mut data)?).map_err(|_| CorruptSnapshot {
            offset,
            reason: "key is not UTF-8",
        })?;
        let value = take(&mut data)?;
        out.push((key, value));
    }
    Ok(out)
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> StoreResult<Snapshot<TypeConfig>> {
        self.blocking(|this| this.build_snapshot_blocking()).await
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> StoreResult<AppliedState> {
        self.blocking(|this| this.applied_state_blocking()).await
    }

    async fn apply<I>(&mut self, entries: I) -> StoreResult<Vec<CommandResult>>
    where
        I: IntoIterator<Item = openraft::Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let count = entries.len();
        let started = std::time::Instant::now();
        let applied = self
            .blocking(move |this| {
                let queued_us = started.elapsed().as_micros() as u64;
                let mut txn = this.db.begin_write().map_err(sm_write_err)?;
                // The log, not the state machine, is what makes a write durable:
                // every applied entry is already fsynced in the log of a quorum.
                // So applying does not wait for its own fsync: batches commit in
                // memory, and about once a second one is committed to disk,
                // which persists all before it. After a crash the state resumes
                // at its last persisted batch (batch and applied id are one
                // transaction, so they agree) and openraft re-applies the rest
                // from the log, which is purged only up to a snapshot; snapshots
                // are committed with `Immediate`.
                let now_ms = this.opened.elapsed().as_millis() as u64;
                let durable = now_ms.saturating_sub(this.last_durable_ms.load(Ordering::Relaxed))
                    >= DURABLE_EVERY_MS;
                txn.set_durability(if durable {
                    Durability::Immediate
                } else {
                    Durability::None
                });
                let mut results = Vec::with_capacity(entries.len());
                {
                    let mut meta = txn.open_table(META).map_err(sm_write_err)?;
                    let mut kv = KvWrite {
                        table: txn.open_table(KV).map_err(sm_write_err)?,
                    };
                    let mut last = None;
                    for entry in &entries {
                        last = Some(entry.log_id);
                        match &entry.payload {
                            EntryPayload::Blank => results.push(CommandResult::default()),
                            EntryPayload::Normal(command) => {
                                let value = this
                                    .app
                                    .apply(&mut kv, &entry.log_id, &command.0)
                                    .map_err(sm_write_err)?;
                                results.push(CommandResult(value));
                            }
                            EntryPayload::Membership(membership) => {
                                let stored =
                                    StoredMembership::new(Some(entry.log_id), membership.clone());
                                let bytes = serde_json::to_vec(&stored).map_err(sm_write_err)?;
                                meta.insert(KEY_MEMBERSHIP, bytes.as_slice())
                                    .map_err(sm_write_err)?;
                                results.push(CommandResult::default());
                            }
                        }
                    }
                    let bytes = serde_json::to_vec(&last).map_err(sm_write_err)?;
                    meta.insert(KEY_APPLIED, bytes.as_slice())
                        .map_err(sm_write_err)?;
                }
                let applied_us = started.elapsed().as_micros() as u64;
                txn.commit().map_err(sm_write_err)?;
                tracing::trace!(
                    queued_us,
                    applied_us,
                    committed_us = started.elapsed().as_micros() as u64,
                    durable,
                    "state machine transaction"
                );
                this.app.committed(false);
                if durable {
                    this.last_durable_ms.store(now_ms, Ordering::Relaxed);
                }
                Ok(results)
            })
            .await;
        tracing::trace!(
            entries = count,
            elapsed_us = started.elapsed().as_micros() as u64,
            "applied committed entries"
        );
        applied
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StoreResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StoreResult<()> {
        let meta = meta.clone();
        self.blocking(move |this| {
            let data = snapshot.into_inner();
            let pairs = decode_pairs(&data).map_err(|e| {
                StorageError::from(StorageIOError::read_snapshot(Some(meta.signature()), &e))
            })?;
            let mut txn = this.db.begin_write().map_err(snapshot_err)?;
            txn.set_durability(Durability::Immediate);
            {
                // Replace the whole state: delete the table and refill it.
                txn.delete_table(KV).map_err(snapshot_err)?;
                let mut kv = txn.open_table(KV).map_err(snapshot_err)?;
                for (key, value) in &pairs {
                    kv.insert(key.as_str(), value.as_slice())
                        .map_err(snapshot_err)?;
                }
                let mut table = txn.open_table(META).map_err(snapshot_err)?;
                let applied = serde_json::to_vec(&meta.last_log_id).map_err(snapshot_err)?;
                let membership = serde_json::to_vec(&meta.last_membership).map_err(snapshot_err)?;
                let meta_bytes = serde_json::to_vec(&meta).map_err(snapshot_err)?;
                table
                    .insert(KEY_APPLIED, applied.as_slice())
                    .map_err(snapshot_err)?;
                table
                    .insert(KEY_MEMBERSHIP, membership.as_slice())
                    .map_err(snapshot_err)?;
                table
                    .insert(KEY_SNAPSHOT_META, meta_bytes.as_slice())
                    .map_err(snapshot_err)?;
                table
                    .insert(KEY_SNAPSHOT_DATA, data.as_slice())
                    .map_err(snapshot_err)?;
            }
            txn.commit().map_err(snapshot_err)?;
            this.app.committed(true);
            Ok(())
        })
        .await
    }

    async fn get_current_snapshot(&mut self) -> StoreResult<Option<Snapshot<TypeConfig>>> {
        self.blocking(|this| {
            // Metadata and data from one read transaction, so a snapshot
            // saved meanwhile cannot pair one's label with the other's data.
            let txn = this.db.begin_read().map_err(sm_read_err)?;
            let table = txn.open_table(META).map_err(sm_read_err)?;
            let Some(meta_bytes) = table
                .get(KEY_SNAPSHOT_META)
                .map_err(sm_read_err)?
                .map(|v| v.value().to_vec())
            else {
                return Ok(None);
            };
            let meta: SnapshotMeta<NodeId, Member> =
                serde_json::from_slice(&meta_bytes).map_err(sm_read_err)?;
            let data = table
                .get(KEY_SNAPSHOT_DATA)
                .map_err(sm_read_err)?
                .map(|v| v.value().to_vec())
                .unwrap_or_default();
            Ok(Some(Snapshot {
                meta,
                snapshot: Box::new(Cursor::new(data)),
            }))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nothing;

    impl Apply for Nothing {
        fn apply(
            &self,
            _: &mut KvWrite<'_>,
            _: &LogId<NodeId>,
            _: &[u8],
        ) -> Result<serde_json::Value, redb::StorageError> {
            Ok(serde_json::Value::Null)
        }
    }

    fn meta_at(index: u64) -> SnapshotMeta<NodeId, Member> {
        SnapshotMeta {
            last_log_id: Some(LogId::new(openraft::CommittedLeaderId::new(1, 1), index)),
            last_membership: StoredMembership::default(),
            snapshot_id: format!("s{index}"),
        }
    }

    #[test]
    fn an_older_build_never_replaces_a_newer_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            StateMachineStore::open(&dir.path().join("state.redb"), Arc::new(Nothing)).unwrap();
        store.save_current_snapshot(&meta_at(500), b"new").unwrap();
        store.save_current_snapshot(&meta_at(100), b"old").unwrap();
        let kept: SnapshotMeta<NodeId, Member> = store.meta(KEY_SNAPSHOT_META).unwrap().unwrap();
        assert_eq!(kept.snapshot_id, "s500");
        store
            .save_current_snapshot(&meta_at(600), b"newer")
            .unwrap();
        let kept: SnapshotMeta<NodeId, Member> = store.meta(KEY_SNAPSHOT_META).unwrap().unwrap();
        assert_eq!(kept.snapshot_id, "s600");
    }

    #[test]
    fn snapshot_encoding_round_trips_and_rejects_truncation() {
        let pairs = vec![
            ("a".to_string(), b"1".to_vec()),
            ("projects/x".to_string(), vec![0; 300]),
        ];
        let data = encode_pairs(&pairs);
        assert_eq!(decode_pairs(&data).unwrap(), pairs);
        let err = decode_pairs(&data[..data.len() - 1]).unwrap_err();
        assert_eq!(err.reason, "truncated field");
        assert!(decode_pairs(&data[..2]).is_err());
    }
}
