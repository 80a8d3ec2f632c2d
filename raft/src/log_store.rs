//! The Raft log and vote, in their own redb file.
//!
//! One writer thread owns every change to the log. `append` hands it the
//! entries and returns at once (the entries are readable from then on,
//! from an in-memory tail); the thread commits everything that queued up
//! meanwhile as one redb transaction with `Durability::Immediate` and only
//! then tells openraft the entries are flushed. Truncations and purges go
//! through the same queue, so they happen in order with the appends around
//! them. The tail also keeps the newest flushed entries (a few hundred, a
//! few MiB), so that replication and apply, which read what was just
//! appended, read it from memory rather than from redb on a storage thread.
//!
//! openraft 0.9 waits for each append's flush before its next log operation,
//! so today the queue never holds more than one append (batching happens a
//! level up, in the agent's proposer). The code does not rely on that for
//! ordering, but two shortcuts do: trimming the tail's flushed entries by
//! index after a commit, and `truncate` clearing the tail before the queue reaches it,
//! assume no append of the same indexes is still queued. A pipelining
//! openraft would need a generation per tail entry here.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};

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

/// Work for the writer thread, in submission order.
enum LogOp {
    Append {
        entries: Vec<(u64, Vec<u8>)>,
        callback: LogFlushed<TypeConfig>,
    },
    Truncate {
        from_index: u64,
        done: tokio::sync::oneshot::Sender<StoreResult<()>>,
    },
    Purge {
        log_id: LogId<NodeId>,
        done: tokio::sync::oneshot::Sender<StoreResult<()>>,
    },
}

/// Appends the writer commits together, each with its flush callback.
type AppendBatch = [(Vec<(u64, Vec<u8>)>, LogFlushed<TypeConfig>)];

struct Shared {
    db: Database,
    /// Entries handed to `append` whose transaction has not committed yet,
    /// and the newest ones that have (see [`trim_tail`]), encoded.
    tail: Mutex<BTreeMap<u64, Arc<Vec<u8>>>>,
    /// The latest committed log id openraft reported, written to disk with
    /// the next batch of appends. `None` once written.
    pending_committed: Mutex<Option<Option<LogId<NodeId>>>>,
}

/// The durable Raft log. Cloning shares the same database and writer.
#[derive(Clone)]
pub struct LogStore {
    shared: Arc<Shared>,
    ops: mpsc::Sender<LogOp>,
}

impl LogStore {
    /// Opens (or creates) the log database at `path` and starts its writer.
    pub fn open(path: &Path) -> Result<Self, LogStoreError> {
        let open = || -> Result<Database, redb::Error> {
            let db = Database::builder()
                .set_cache_size(LOG_CACHE_BYTES)
                .create(path)?;
            let txn = db.begin_write()?;
            txn.open_table(LOG)?;
            txn.open_table(META)?;
            txn.commit()?;
            Ok(db)
        };
        let db = open().map_err(|source| LogStoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let shared = Arc::new(Shared {
            db,
            tail: Mutex::new(BTreeMap::new()),
            pending_committed: Mutex::new(None),
        });
        let (ops, queue) = mpsc::channel();
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || writer_loop(writer, queue))
            .expect("spawn the Raft log writer thread");
        Ok(Self { shared, ops })
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> StoreResult<Option<T>> {
        let txn = self.shared.db.begin_read().map_err(read_err)?;
        let table = txn.open_table(META).map_err(read_err)?;
        match table.get(key).map_err(read_err)? {
            Some(value) => Ok(Some(
                serde_json::from_slice(value.value()).map_err(read_err)?,
            )),
            None => Ok(None),
        }
    }

    async fn blocking<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(LogStore) -> StoreResult<T> + Send + 'static,
    {
        let this = self.clone();
        crate::io::blocking(move || f(this))
            .await
            .map_err(write_err)?
    }

    async fn submit(
        &self,
        op: impl FnOnce(tokio::sync::oneshot::Sender<StoreResult<()>>) -> LogOp,
    ) -> StoreResult<()> {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.ops
            .send(op(done))
            .map_err(|_| write_err(std::io::Error::other("the Raft log writer has stopped")))?;
        wait.await
            .map_err(|_| write_err(std::io::Error::other("the Raft log writer has stopped")))?
    }
}

fn writer_loop(shared: Arc<Shared>, queue: mpsc::Receiver<LogOp>) {
    let mut next = None;
    let mut committed_written = None;
    loop {
        let op = match next.take() {
            Some(op) => op,
            None => match queue.recv() {
                Ok(op) => op,
                // Every LogStore is gone: the node shut down.
                Err(_) => return,
            },
        };
        match op {
            LogOp::Append { entries, callback } => {
                // Take every append already waiting into the same commit.
                let mut batch = vec![(entries, callback)];
                loop {
                    match queue.try_recv() {
                        Ok(LogOp::Append { entries, callback }) => batch.push((entries, callback)),
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let started = std::time::Instant::now();
                let result = commit_appends(&shared, &batch, &mut committed_written);
                let count: usize = batch.iter().map(|(e, _)| e.len()).sum();
                tracing::trace!(
                    appends = batch.len(),
                    entries = count,
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "committed to the Raft log"
                );
                {
                    let mut tail = shared.tail.lock().expect("log tail");
                    match &result {
                        Ok(()) => {
                            let flushed_upto = batch
                                .iter()
                                .flat_map(|(entries, _)| entries.iter().map(|(i, _)| *i))
                                .max();
                            if let Some(flushed_upto) = flushed_upto {
                                trim_tail(&mut tail, flushed_upto);
                            }
                        }
                        // Not in the database: gone (openraft stops on the error).
                        Err(_) => {
                            for (entries, _) in &batch {
                                for (index, _) in entries {
                                    tail.remove(index);
                                }
                            }
                        }
                    }
                }
                for (_, callback) in batch {
                    match &result {
                        Ok(()) => callback.log_io_completed(Ok(())),
                        Err(e) => {
                            callback.log_io_completed(Err(std::io::Error::other(e.to_string())))
                        }
                    }
                }
            }
            LogOp::Truncate { from_index, done } => {
                let _ = done.send(remove_range(
                    &shared,
                    (Bound::Included(from_index), Bound::Unbounded),
                    None,
                ));
            }
            LogOp::Purge { log_id, done } => {
                let _ = done.send(remove_range(
                    &shared,
                    (Bound::Unbounded, Bound::Included(log_id.index)),
                    Some(log_id),
                ));
            }
        }
    }
}

/// The newest flushed entries the tail keeps, by count and by size.
const RECENT_ENTRIES: usize = 256;
const RECENT_BYTES: usize = 4 << 20;

/// Drops the oldest flushed entries (those up to `flushed_upto`) beyond the
/// newest [`RECENT_ENTRIES`] and [`RECENT_BYTES`]; entries not yet flushed
/// always stay.
fn trim_tail(tail: &mut BTreeMap<u64, Arc<Vec<u8>>>, flushed_upto: u64) {
    let (mut count, mut bytes) = (0usize, 0usize);
    let mut cut = None;
    for (index, entry) in tail.range(..=flushed_upto).rev() {
        count += 1;
        bytes += entry.len();
        if count > RECENT_ENTRIES || bytes > RECENT_BYTES {
            cut = Some(*index);
            break;
        }
    }
    if let Some(cut) = cut {
        *tail = tail.split_off(&(cut + 1));
    }
}

/// How often at most the committed index (a restart hint) is written with
/// appends: each write of it is pages more for the append's fsync.
const COMMITTED_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

fn commit_appends(
    shared: &Shared,
    batch: &AppendBatch,
    committed_written: &mut Option<std::time::Instant>,
) -> StoreResult<()> {
    let due = committed_written.is_none_or(|at| at.elapsed() >= COMMITTED_EVERY);
    let committed = if due {
        shared
            .pending_committed
            .lock()
            .expect("pending committed")
            .take()
    } else {
        None
    };
    if committed.is_some() {
        *committed_written = Some(std::time::Instant::now());
    }
    let mut txn = shared.db.begin_write().map_err(write_err)?;
    txn.set_durability(Durability::Immediate);
    {
        if let Some(committed) = committed {
            let bytes = serde_json::to_vec(&committed).map_err(write_err)?;
            let mut meta = txn.open_table(META).map_err(write_err)?;
            meta.insert(KEY_COMMITTED, bytes.as_slice())
                .map_err(write_err)?;
        }
        let mut table = txn.open_table(LOG).map_err(write_err)?;
        for (entries, _) in batch {
            for (index, bytes) in entries {
                table.insert(*index, bytes.as_slice()).map_err(write_err)?;
            }
        }
    }
    txn.commit().map_err(write_err)
}

fn remove_range(
    shared: &Shared,
    range: (Bound<u64>, Bound<u64>),
    purged: Option<LogId<NodeId>>,
) -> StoreResult<()> {
    let mut txn = shared.db.begin_write().map_err(write_err)?;
    txn.set_durability(Durability::Immediate);
    {
        if let Some(log_id) = purged {
            let bytes = serde_json::to_vec(&log_id).map_err(write_err)?;
            let mut meta = txn.open_table(META).map_err(write_err)?;
            meta.insert(KEY_LAST_PURGED, bytes.as_slice())
                .map_err(write_err)?;
        }
        let mut table = txn.open_table(LOG).map_err(write_err)?;
        let doomed: Vec<u64> = table
            .range::<u64>(range)
            .map_err(write_err)?
            .map(|item| item.map(|(k, _)| k.value()))
            .collect::<Result<_, _>>()
            .map_err(write_err)?;
        for index in doomed {
            table.remove(index).map_err(write_err)?;
        }
    }
    txn.commit().map_err(write_err)?;
    // Appends before this operation were committed before it ran, so the
    // tail holds nothing in the range; clear it anyway for the invariant.
    let mut tail = shared.tail.lock().expect("log tail");
    tail.retain(|index, _| !range.contains(index));
    Ok(())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StoreResult<Vec<Entry<TypeConfig>>> {
        let range: (Bound<u64>, Bound<u64>) =
            (range.start_bound().cloned(), range.end_bound().cloned());
        // The tail first, then the database: an entry the writer moves from
        // one to the other in between is then seen in the database.
        let tail: Vec<(u64, Arc<Vec<u8>>)> = {
            let tail = self.shared.tail.lock().expect("log tail");
            tail.range(range).map(|(i, b)| (*i, b.clone())).collect()
        };
        // The common case of a lone write: the entries replication asks for
        // were just appended and are all in the tail, so the database (and
        // a hop to a storage thread) is not needed.
        let wanted = match range {
            (Bound::Included(first), Bound::Excluded(end)) => end.checked_sub(first),
            (Bound::Included(first), Bound::Included(last)) => {
                last.checked_sub(first).map(|n| n + 1)
            }
            _ => None,
        };
        if wanted.is_some_and(|n| n > 0 && n == tail.len() as u64) {
            return tail
                .iter()
                .map(|(_, bytes)| crate::codec::decode_entry(bytes).map_err(read_err))
                .collect();
        }
        self.blocking(move |this| {
            let txn = this.shared.db.begin_read().map_err(read_err)?;
            let table = txn.open_table(LOG).map_err(read_err)?;
            let mut merged: BTreeMap<u64, Entry<TypeConfig>> = BTreeMap::new();
            for item in table.range::<u64>(range).map_err(read_err)? {
                let (key, value) = item.map_err(read_err)?;
                merged.insert(
                    key.value(),
                    crate::codec::decode_entry(value.value()).map_err(read_err)?,
                );
            }
            for (index, bytes) in tail {
                merged.insert(index, crate::codec::decode_entry(&bytes).map_err(read_err)?);
            }
            Ok(merged.into_values().collect())
        })
        .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StoreResult<LogState<TypeConfig>> {
        let tail_last: Option<Vec<u8>> = {
            let tail = self.shared.tail.lock().expect("log tail");
            tail.last_key_value().map(|(_, b)| b.as_ref().clone())
        };
        self.blocking(move |this| {
            let last_purged_log_id: Option<LogId<NodeId>> = this.get_meta(KEY_LAST_PURGED)?;
            let last_bytes = match tail_last {
                Some(bytes) => Some(bytes),
                None => {
                    let txn = this.shared.db.begin_read().map_err(read_err)?;
                    let table = txn.open_table(LOG).map_err(read_err)?;
                    let last = table
                        .last()
                        .map_err(read_err)?
                        .map(|(_, v)| v.value().to_vec());
                    last
                }
            };
            let last = match last_bytes {
                Some(bytes) => Some(crate::codec::decode_entry(&bytes).map_err(read_err)?.log_id),
                None => None,
            };
            Ok(LogState {
                last_purged_log_id,
                last_log_id: last.or(last_purged_log_id),
            })
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
            let mut txn = this.shared.db.begin_write().map_err(vote_err)?;
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
        // The committed index is only a restart hint (losing the latest value
        // means re-learning it from the leader), and openraft reports it on
        // its hot path: keep it in memory and let the writer persist it with
        // a later batch of entries (at most once a second) instead of taking
        // the write lock here.
        *self
            .shared
            .pending_committed
            .lock()
            .expect("pending committed") = Some(committed);
        Ok(())
    }

    async fn read_committed(&mut self) -> StoreResult<Option<LogId<NodeId>>> {
        if let Some(pending) = *self
            .shared
            .pending_committed
            .lock()
            .expect("pending committed")
        {
            return Ok(pending);
        }
        self.blocking(|this| {
            Ok(this
                .get_meta::<Option<LogId<NodeId>>>(KEY_COMMITTED)?
                .flatten())
        })
        .await
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StoreResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        for entry in entries {
            encoded.push((
                entry.log_id.index,
                crate::codec::encode_entry(&entry).map_err(write_err)?,
            ));
        }
        {
            let mut tail = self.shared.tail.lock().expect("log tail");
            for (index, bytes) in &encoded {
                tail.insert(*index, Arc::new(bytes.clone()));
            }
        }
        self.ops
            .send(LogOp::Append {
                entries: encoded,
                callback,
            })
            .map_err(|_| write_err(std::io::Error::other("the Raft log writer has stopped")))
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StoreResult<()> {
        // Entries not yet committed must disappear for readers at once.
        self.shared
            .tail
            .lock()
            .expect("log tail")
            .retain(|index, _| *index < log_id.index);
        self.submit(|done| LogOp::Truncate {
            from_index: log_id.index,
            done,
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StoreResult<()> {
        self.submit(|done| LogOp::Purge { log_id, done }).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tail_of(indexes: std::ops::RangeInclusive<u64>, size: usize) -> BTreeMap<u64, Arc<Vec<u8>>> {
        indexes.map(|i| (i, Arc::new(vec![0; size]))).collect()
    }

    #[test]
    fn the_tail_keeps_the_newest_flushed_entries_and_every_unflushed_one() {
        let mut tail = tail_of(1..=1000, 10);
        trim_tail(&mut tail, 900);
        let kept: Vec<u64> = tail.keys().copied().collect();
        // 256 flushed (645..=900) and the 100 not yet flushed.
        assert_eq!(kept.first(), Some(&(900 - RECENT_ENTRIES as u64 + 1)));
        assert_eq!(kept.last(), Some(&1000));
        assert_eq!(kept.len(), RECENT_ENTRIES + 100);

        // Large entries: bounded by size, and unflushed ones stay whatever
        // their size.
        let mut tail = tail_of(1..=20, 1 << 20);
        trim_tail(&mut tail, 10);
        let kept: Vec<u64> = tail.keys().copied().collect();
        assert_eq!(kept, (7..=20).collect::<Vec<_>>());
        let mut tail = tail_of(1..=3, 1 << 20);
        trim_tail(&mut tail, 0);
        assert_eq!(tail.len(), 3);
    }
}
