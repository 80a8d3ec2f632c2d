//! The Raft log and vote, in their own redb file.
//!
//! Every append, truncation, purge and vote is one redb write transaction
//! committed with `Durability::Immediate`: openraft is told an append is
//! flushed only after that commit returned, so an acknowledged entry survives
//! a crash or power loss.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    Entry, LogId, LogState, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote,
};
use redb::{Database, Durability, ReadableTable, TableDefinition};

use crate::{NodeId, TypeConfig};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("log_meta");

/// The log is read mostly at its tail; a small cache keeps the agent lean.
const LOG_CACHE_BYTES: usize = 8 * 1024 * 1024;

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_LAST_PURGED: &str = "last_purged";

/// Failure to open the log database.
#[derive(Debug, thiserror::Error)]
pub enum LogStoreError {
    #[error("cannot open the Raft log database {path}")]
    Open {
        path: String,
        #[source]
        source: redb::Error,
    },
}

/// The durable Raft log. Cloning shares the same database.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

type StoreResult<T> = Result<T, StorageError<NodeId>>;

fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read_logs(&e).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_logs(&e).into()
}

fn vote_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_vote(&e).into()
}

impl LogStore {
    /// Opens (or creates) the log database at `path`.
    pub fn open(path: &Path) -> Result<Self, LogStoreError> {
        let open = || -> Result<Database, redb::Error> {
            let db = Database::builder().set_cache_size(LOG_CACHE_BYTES).create(path)?;
            let txn = db.begin_write()?;
            txn.open_table(LOG)?;
            txn.open_table(META)?;
            txn.commit()?;
            Ok(db)
        };
        let db = open().map_err(|source| LogStoreError::Open { path: path.display().to_string(), source })?;
        Ok(Self { db: Arc::new(db) })
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> StoreResult<Option<T>> {
        let txn = self.db.begin_read().map_err(read_err)?;
        let table = txn.open_table(META).map_err(read_err)?;
        match table.get(key).map_err(read_err)? {
            Some(value) => Ok(Some(serde_json::from_slice(value.value()).map_err(read_err)?)),
            None => Ok(None),
        }
    }

    /// Writes one metadata value in its own transaction.
    fn put_meta<T: serde::Serialize>(&self, key: &str, value: &T, durability: Durability) -> StoreResult<()> {
        let bytes = serde_json::to_vec(value).map_err(write_err)?;
        let mut txn = self.db.begin_write().map_err(write_err)?;
        txn.set_durability(durability);
        {
            let mut table = txn.open_table(META).map_err(write_err)?;
            table.insert(key, bytes.as_slice()).map_err(write_err)?;
        }
        txn.commit().map_err(write_err)
    }

    fn blocking<T, F>(&self, f: F) -> impl std::future::Future<Output = StoreResult<T>>
    where
        T: Send + 'static,
        F: FnOnce(LogStore) -> StoreResult<T> + Send + 'static,
    {
        let this = self.clone();
        async move {
            tokio::task::spawn_blocking(move || f(this))
                .await
                .map_err(|e| StorageError::from(StorageIOError::write_logs(&e)))?
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StoreResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(i) => Bound::Included(*i),
            Bound::Excluded(i) => Bound::Excluded(*i),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included(*i),
            Bound::Excluded(i) => Bound::Excluded(*i),
            Bound::Unbounded => Bound::Unbounded,
        };
        self.blocking(move |this| {
            let txn = this.db.begin_read().map_err(read_err)?;
            let table = txn.open_table(LOG).map_err(read_err)?;
            let mut entries = Vec::new();
            for item in table.range::<u64>((start, end)).map_err(read_err)? {
                let (_, value) = item.map_err(read_err)?;
                entries.push(serde_json::from_slice(value.value()).map_err(read_err)?);
            }
            Ok(entries)
        })
        .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StoreResult<LogState<TypeConfig>> {
        self.blocking(|this| {
            let last_purged_log_id: Option<LogId<NodeId>> = this.get_meta(KEY_LAST_PURGED)?;
            let txn = this.db.begin_read().map_err(read_err)?;
            let table = txn.open_table(LOG).map_err(read_err)?;
            let last = match table.last().map_err(read_err)? {
                Some((_, value)) => {
                    let entry: Entry<TypeConfig> = serde_json::from_slice(value.value()).map_err(read_err)?;
                    Some(entry.log_id)
                }
                None => None,
            };
            Ok(LogState { last_purged_log_id, last_log_id: last.or(last_purged_log_id) })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StoreResult<()> {
        let vote = *vote;
        self.blocking(move |this| {
            let bytes = serde_json::to_vec(&vote).map_err(vote_err)?;
            let mut txn = this.db.begin_write().map_err(vote_err)?;
            txn.set_durability(Durability::Immediate);
            {
                let mut table = txn.open_table(META).map_err(vote_err)?;
                table.insert(KEY_VOTE, bytes.as_slice()).map_err(vote_err)?;
            }
            txn.commit().map_err(vote_err)
        })
        .await
    }

    async fn read_vote(&mut self) -> StoreResult<Option<Vote<NodeId>>> {
        self.blocking(|this| this.get_meta(KEY_VOTE)).await
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StoreResult<()> {
        // The committed index is a restart hint: losing the latest value only
        // means re-learning it from the leader, so it needs no fsync of its own.
        // It becomes durable with the next durable commit.
        self.blocking(move |this| this.put_meta(KEY_COMMITTED, &committed, Durability::None)).await
    }

    async fn read_committed(&mut self) -> StoreResult<Option<LogId<NodeId>>> {
        self.blocking(|this| Ok(this.get_meta::<Option<LogId<NodeId>>>(KEY_COMMITTED)?.flatten())).await
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StoreResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        for entry in entries {
            encoded.push((entry.log_id.index, serde_json::to_vec(&entry).map_err(write_err)?));
        }
        let result = self
            .blocking(move |this| {
                let mut txn = this.db.begin_write().map_err(write_err)?;
                txn.set_durability(Durability::Immediate);
                {
                    let mut table = txn.open_table(LOG).map_err(write_err)?;
                    for (index, bytes) in &encoded {
                        table.insert(*index, bytes.as_slice()).map_err(write_err)?;
                    }
                }
                txn.commit().map_err(write_err)
            })
            .await;
        match &result {
            Ok(()) => callback.log_io_completed(Ok(())),
            Err(e) => callback.log_io_completed(Err(std::io::Error::other(e.to_string()))),
        }
        result
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StoreResult<()> {
        self.blocking(move |this| {
            let mut txn = this.db.begin_write().map_err(write_err)?;
            txn.set_durability(Durability::Immediate);
            {
                let mut table = txn.open_table(LOG).map_err(write_err)?;
                let doomed: Vec<u64> = table
                    .range(log_id.index..)
                    .map_err(write_err)?
                    .map(|item| item.map(|(k, _)| k.value()))
                    .collect::<Result<_, _>>()
                    .map_err(write_err)?;
                for index in doomed {
                    table.remove(index).map_err(write_err)?;
                }
            }
            txn.commit().map_err(write_err)
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StoreResult<()> {
        self.blocking(move |this| {
            let bytes = serde_json::to_vec(&log_id).map_err(write_err)?;
            let mut txn = this.db.begin_write().map_err(write_err)?;
            txn.set_durability(Durability::Immediate);
            {
                let mut meta = txn.open_table(META).map_err(write_err)?;
                meta.insert(KEY_LAST_PURGED, bytes.as_slice()).map_err(write_err)?;
                let mut table = txn.open_table(LOG).map_err(write_err)?;
                let doomed: Vec<u64> = table
                    .range(..=log_id.index)
                    .map_err(write_err)?
                    .map(|item| item.map(|(k, _)| k.value()))
                    .collect::<Result<_, _>>()
                    .map_err(write_err)?;
                for index in doomed {
                    table.remove(index).map_err(write_err)?;
                }
            }
            txn.commit().map_err(write_err)
        })
        .await
    }
}
