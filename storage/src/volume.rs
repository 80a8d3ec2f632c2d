//! A volume as its writer sees it: byte ranges split into objects, each sent
//! to the in-sync replicas the placement function names; reads from one
//! in-sync replica (the local one when it is); clones reading through to
//! their parent until an object is first written (copy-up).
//!
//! The replication rules (ARCHITECTURE.md states them as invariants):
//! - The cluster state holds, per volume, the writer's epoch and the set of
//!   nodes that are in sync. Only in-sync replicas are written, read or
//!   copied from.
//! - Before its first I/O a writer fences every in-sync replica with its
//!   epoch; a replica that cannot be fenced, or whose epoch shows it missed
//!   an earlier fence, leaves the in-sync set. The writer then makes the
//!   in-sync replicas agree object by object (an older writer may have died
//!   with a write on some of them only).
//! - A write is acknowledged when at least `min_replicas` in-sync replicas
//!   have it; an in-sync replica that failed it leaves the in-sync set
//!   (through [`ReplicaSets`], durably, cluster-wide) before the write is
//!   acknowledged.
//! - Overlapping writes to one object are applied one at a time, in the
//!   same order on every replica (disjoint ones commute, and may run
//!   together); a read waits for a write it overlaps in progress, so no read
//!   returns a value older than one an earlier read returned.
//! - A replica whose connection changed since it was fenced may have
//!   restarted and lost what it had not synced: it leaves the in-sync set.
//! - A replica out of sync comes back by resync: fenced, then every object
//!   placed on it copied whole from an in-sync replica where they differ,
//!   while writes go on (an object already copied gets the writes too);
//!   then it rejoins the in-sync set.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock, Weak};

use futures_util::future::{join_all, BoxFuture};

use crate::placement::StorageMap;
use crate::proto::{ErrorKind, Request, Response};
use crate::range_lock::{RangeLock, ALL};
use crate::store::{ObjectInfo, ObjectStore};
use crate::transport::{self, Peers};

mod migrate;
mod scrub;
pub use migrate::{Progress, Throttle};
pub use scrub::{ScrubRepair, ScrubReport};

/// Everything needed to read or write a volume's objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    pub id: String,
    pub size: u64,
    pub object_size: u64,
    pub replicas: usize,
    /// In-sync replicas a write needs before it is acknowledged.
    pub min_replicas: usize,
    /// Nodes that hold every acknowledged write of the objects placed on
    /// them (from the cluster state).
    pub in_sync: Vec<u64>,
    /// The newest snapshot's id (0: none); writes carry it.
    pub seq: u64,
    /// The writer lease this node holds (fences older writers).
    pub epoch: u64,
    pub map: Arc<StorageMap>,
    pub parent: Option<Arc<ParentSpec>>,
}

/// A clone's source: a snapshot of another volume, up to `overlap` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentSpec {
    pub volume: VolumeSpec,
    pub snap: u64,
    pub overlap: u64,
}

/// Why an I/O failed, in the terms an NBD client gets.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IoError {
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Fenced(String),
    #[error("{0}")]
    Failed(String),
}

/// Where a writer records which replicas are in sync: the cluster state,
/// through Raft, refused when `epoch` is no longer the volume's writer.
pub trait ReplicaSets: Send + Sync + 'static {
    /// `nodes` missed (or may have missed) an acknowledged write.
    fn out_of_sync(
        &self,
        volume: &str,
        epoch: u64,
        nodes: Vec<u64>,
    ) -> BoxFuture<'_, Result<(), String>>;
    /// `node`'s resync has started.
    fn recovering(&self, volume: &str, epoch: u64, node: u64) -> BoxFuture<'_, Result<(), String>>;
    /// `node` holds every acknowledged write again.
    fn in_sync(&self, volume: &str, epoch: u64, node: u64) -> BoxFuture<'_, Result<(), String>>;
    /// The writer is copying the volume's objects to where storage map
    /// `map` places them (by default, moves are refused).
    fn moving(&self, volume: &str, _epoch: u64, map: u64) -> BoxFuture<'_, Result<(), String>> {
        let why = format!(
            "volume {volume} cannot move to storage map {map}: moves are not recorded here"
        );
        Box::pin(async move { Err(why) })
    }
    /// Every object is where storage map `map` places it, and every node of
    /// that map holds every acknowledged write of its objects: the volume
    /// now uses `map`.
    fn moved(&self, volume: &str, _epoch: u64, map: u64) -> BoxFuture<'_, Result<(), String>> {
        let why = format!(
            "volume {volume} cannot move to storage map {map}: moves are not recorded here"
        );
        Box::pin(async move { Err(why) })
    }
}

/// One node's view of the storage cluster: its own store and its peers.
pub struct Storage {
    pub node: u64,
    pub store: Arc<ObjectStore>,
    pub peers: Peers,
    /// Paces this node's recovery copies (moves, resyncs, scrubs), and
    /// hears how long tenants' writes take.
    pub pace: Arc<Throttle>,
    sets: Arc<dyn ReplicaSets>,
    handles: Mutex<HashMap<String, Weak<VolumeHandle>>>,
}

/// A replica's answer and the connection it came on (0: the local store).
type Traced = Result<(Response, u64), IoError>;

impl Storage {
    pub fn new(
        node: u64,
        store: Arc<ObjectStore>,
        peers: Peers,
        sets: Arc<dyn ReplicaSets>,
    ) -> Arc<Self> {
        Arc::new(Self {
            node,
            store,
            peers,
            pace: Arc::new(Throttle::new(0)),
            sets,
            handles: Mutex::new(HashMap::new()),
        })
    }

    /// Sends a request to a node (the local store directly).
    pub async fn call(&self, node: u64, req: Request) -> Result<Response, IoError> {
        self.call_traced(node, &req).await.map(|(r, _)| r)
    }

    async fn call_traced(&self, node: u64, req: &Request) -> Traced {
        let (resp, conn) = if node == self.node {
            (transport::handle_ref(&self.store, req).await, 0)
        } else {
            self.peers
                .call_traced(node, req)
                .await
                .map_err(|e| IoError::Failed(e.to_string()))?
        };
        match resp {
            Response::Error {
                kind: ErrorKind::StaleEpoch,
                message,
            } => Err(IoError::Fenced(format!("storage node {node}: {message}"))),
            Response::Error {
                kind: ErrorKind::Invalid,
                message,
            } => Err(IoError::Invalid(format!("storage node {node}: {message}"))),
            Response::Error { message, .. } => {
                Err(IoError::Failed(format!("storage node {node}: {message}")))
            }
            ok => Ok((ok, conn)),
        }
    }

    /// Every volume some connection on this node has open.
    pub fn open_handles(&self) -> Vec<Arc<VolumeHandle>> {
        self.handles
            .lock()
            .unwrap()
            .values()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// Opens a volume for I/O (sharing the handle with every other user on
    /// this node, so a flush on one connection covers writes on all). The
    /// caller [activates](VolumeHandle::activate) it before its first I/O.
    pub fn open(self: &Arc<Self>, spec: VolumeSpec) -> Arc<VolumeHandle> {
        let mut handles = self.handles.lock().unwrap();
        if let Some(h) = handles.get(&spec.id).and_then(Weak::upgrade) {
            h.update(spec);
            return h;
        }
        handles.retain(|_, w| w.strong_count() > 0);
        let h = Arc::new(VolumeHandle {
            storage: self.clone(),
            spec: RwLock::new(Arc::new(spec.clone())),
            present: Mutex::new(HashSet::new()),
            locks: Mutex::new(HashMap::new()),
            replicas: Mutex::new(Replicas::default()),
            dirty: Mutex::new(Dirty::default()),
            activation: tokio::sync::Mutex::new(0),
        });
        handles.insert(spec.id, Arc::downgrade(&h));
        h
    }

    /// A handle of its own (not shared with this node's other users of
    /// the volume, nor kept current by them) for reading at another
    /// writer's epoch: a live migration's destination reads so before it
    /// becomes the writer.
    pub fn open_reader(self: &Arc<Self>, spec: VolumeSpec) -> Arc<VolumeHandle> {
        Arc::new(VolumeHandle {
            storage: self.clone(),
            spec: RwLock::new(Arc::new(spec)),
            present: Mutex::new(HashSet::new()),
            locks: Mutex::new(HashMap::new()),
            replicas: Mutex::new(Replicas::default()),
            dirty: Mutex::new(Dirty::default()),
            // Never activated: reads do not fence.
            activation: tokio::sync::Mutex::new(0),
        })
    }

    /// Reads `len` bytes at `offset` of a snapshot of a volume (which never
    /// changes: no writer's epoch is needed).
    pub async fn read_snapshot(
        &self,
        spec: &VolumeSpec,
        snap: u64,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, IoError> {
        check_range(spec, offset, len)?;
        let pieces = split(spec.object_size, offset, len);
        let reads = pieces
            .iter()
            .map(|(idx, off, n)| self.read_at_snapshot(spec, snap, *idx, *off, *n));
        assemble(len, &pieces, join_all(reads).await)
    }

    /// One object of a snapshot, through to the parent where it is absent.
    fn read_at_snapshot<'a>(
        &'a self,
        spec: &'a VolumeSpec,
        snap: u64,
        index: u64,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, IoError>> {
        Box::pin(async move {
            let nodes = self.readable(spec, index, &spec.in_sync);
            match self
                .read_from(spec, &nodes, snap, index, offset, len)
                .await?
            {
                Some(d) => Ok(Some(d)),
                None => self.read_parent(spec, index, offset, len).await,
            }
        })
    }

    /// The in-sync replicas of an object, this node first.
    fn readable(&self, spec: &VolumeSpec, index: u64, in_sync: &[u64]) -> Vec<u64> {
        let mut nodes: Vec<u64> = spec
            .map
            .place(&spec.id, index, spec.replicas)
            .into_iter()
            .filter(|n| in_sync.contains(n))
            .collect();
        if let Some(i) = nodes.iter().position(|n| *n == self.node) {
            nodes.swap(0, i);
        }
        nodes
    }

    /// Reads snapshot `snap` of an object from the first of `nodes` that
    /// answers. `Ok(None)`: the object is absent there (in sync: absent
    /// everywhere).
    async fn read_from(
        &self,
        spec: &VolumeSpec,
        nodes: &[u64],
        snap: u64,
        index: u64,
        offset: u64,
        len: u64,
    ) -> Result<Option<Vec<u8>>, IoError> {
        let mut last = IoError::Failed(format!(
            "object {index} of volume {} has no in-sync replica to read from (in sync: {:?})",
            spec.id, spec.in_sync
        ));
        for node in nodes {
            // A snapshot never changes: no writer's epoch is needed.
            let req = Request::Read {
                volume: spec.id.clone(),
                index,
                snap: Some(snap),
                offset: offset as u32,
                len: len as u32,
                epoch: 0,
            };
            match self.call(*node, req).await {
                Ok(Response::Data(d)) if d.len() as u64 == len => return Ok(Some(d)),
                Ok(Response::Absent) => return Ok(None),
                Ok(other) => {
                    last = IoError::Failed(format!(
                        "storage node {node} answered a read with {other:?}"
                    ));
                }
                Err(e @ (IoError::Invalid(_) | IoError::Fenced(_))) => return Err(e),
                Err(e) => {
                    tracing::warn!(
                        "reading object {index} of volume {} from node {node}: {e}",
                        spec.id
                    );
                    last = e;
                }
            }
        }
        Err(last)
    }

    async fn read_parent(
        &self,
        spec: &VolumeSpec,
        index: u64,
        offset: u64,
        len: u64,
    ) -> Result<Option<Vec<u8>>, IoError> {
        let Some(parent) = &spec.parent else {
            return Ok(None);
        };
        let start = index * spec.object_size + offset;
        if start >= parent.overlap {
            return Ok(None);
        }
        let n = len.min(parent.overlap - start);
        let Some(mut data) = self
            .read_at_snapshot(&parent.volume, parent.snap, index, offset, n)
            .await?
        else {
            return Ok(None);
        };
        data.resize(len as usize, 0);
        Ok(Some(data))
    }
}

/// What the writer knows of its replicas beyond the cluster state's
/// (which catches up through [`VolumeHandle::update`]).
#[derive(Default)]
struct Replicas {
    /// Left the in-sync set (or are about to: the change is on its way).
    dropped: HashSet<u64>,
    /// Rejoined after a resync.
    joined: HashSet<u64>,
    /// The connection each in-sync peer was fenced on.
    conns: HashMap<u64, u64>,
    /// Objects the in-sync replicas may disagree on (a write failed on
    /// some and its failure could not be recorded): made to agree before
    /// their next I/O.
    suspect: HashSet<u64>,
    repair: Option<Repair>,
    /// A move to another storage map in progress.
    moving: Option<migrate::Move>,
}

/// A resync in progress: objects not yet copied skip the node; the others
/// get every write.
struct Repair {
    node: u64,
    pending: HashSet<u64>,
    failed: bool,
}

/// Nodes and objects written since the last flush, each with the tick of
/// its last completed write.
#[derive(Default)]
struct Dirty {
    tick: u64,
    nodes: HashMap<u64, u64>,
    objects: HashMap<u64, u64>,
}

/// An open volume on its writer node.
pub struct VolumeHandle {
    storage: Arc<Storage>,
    spec: RwLock<Arc<VolumeSpec>>,
    /// Objects known to exist in this (clone) volume: no copy-up needed.
    present: Mutex<HashSet<u64>>,
    /// Per object, by byte range: a write excludes what it overlaps,
    /// reads share.
    locks: Mutex<HashMap<u64, Arc<RangeLock>>>,
    replicas: Mutex<Replicas>,
    dirty: Mutex<Dirty>,
    /// The epoch this handle was last activated for.
    activation: tokio::sync::Mutex<u64>,
}

enum Mutation<'a> {
    Write(&'a [u8]),
    Zero { len: u64, punch: bool },
}

impl VolumeHandle {
    pub fn spec(&self) -> Arc<VolumeSpec> {
        self.spec.read().unwrap().clone()
    }

    /// Takes a newer record (snapshot taken, resized, lease renewed,
    /// replicas in or out of sync).
    pub fn update(&self, spec: VolumeSpec) {
        let mut cur = self.spec.write().unwrap();
        if **cur != spec {
            if cur.seq != spec.seq || cur.epoch != spec.epoch {
                // A rollback may have removed objects; ask again.
                self.present.lock().unwrap().clear();
            }
            let mut r = self.replicas.lock().unwrap();
            if cur.epoch != spec.epoch {
                *r = Replicas::default();
            } else {
                // What the state now says needs no local note.
                r.dropped.retain(|n| spec.in_sync.contains(n));
                r.joined.retain(|n| !spec.in_sync.contains(n));
            }
            *cur = Arc::new(spec);
        }
    }

    /// Forgets which objects exist (after a rollback removed some).
    pub fn forget_present(&self) {
        self.present.lock().unwrap().clear();
    }

    /// The nodes of the volume's map in sync as this writer knows it now.
    fn in_sync_members(&self, spec: &VolumeSpec) -> Vec<u64> {
        self.in_sync()
            .into_iter()
            .filter(|n| spec.map.nodes.iter().any(|m| m.node == *n))
            .collect()
    }

    /// Every object index any of `nodes` holds of the volume.
    async fn indexes_on(&self, spec: &VolumeSpec, nodes: &[u64]) -> Result<BTreeSet<u64>, IoError> {
        let lists = join_all(nodes.iter().map(|n| self.list(spec, *n))).await;
        let mut indexes = BTreeSet::new();
        for list in lists {
            indexes.extend(list?.into_iter().map(|o| o.index));
        }
        Ok(indexes)
    }

    /// The nodes in sync as this writer knows it now.
    pub fn in_sync(&self) -> Vec<u64> {
        let spec = self.spec();
        let r = self.replicas.lock().unwrap();
        in_sync_now(&spec, &r)
    }

    fn lock_for(&self, index: u64) -> Arc<RangeLock> {
        let mut locks = self.locks.lock().unwrap();
        if locks.len() > 4096 {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(index).or_default().clone()
    }

    /// Sends a request to a replica, checking that a peer still answers on
    /// the connection it was fenced on: one that does not may have
    /// restarted and lost writes it had not synced, and leaves the in-sync
    /// set before the answer is used.
    async fn call_checked(
        &self,
        spec: &VolumeSpec,
        node: u64,
        req: &Request,
    ) -> Result<Response, IoError> {
        let (resp, conn) = self.storage.call_traced(node, req).await?;
        if node != self.storage.node {
            let changed = {
                let r = self.replicas.lock().unwrap();
                r.conns
                    .get(&node)
                    .is_some_and(|fenced_on| *fenced_on != conn)
            };
            if changed {
                self.drop_replicas(spec, vec![node]).await?;
                return Err(IoError::Failed(format!(
                    "storage node {node} was reconnected since it was fenced (it may have restarted)"
                )));
            }
            if self.move_target_reconnected(node, conn) {
                return Err(IoError::Failed(format!(
                    "storage node {node} was reconnected since the move to it began (it may have restarted)"
                )));
            }
        }
        Ok(resp)
    }

    /// Takes `nodes` out of the in-sync set, durably, before anything that
    /// depends on it is acknowledged.
    async fn drop_replicas(&self, spec: &VolumeSpec, nodes: Vec<u64>) -> Result<(), IoError> {
        if nodes.is_empty() {
            return Ok(());
        }
        {
            let mut r = self.replicas.lock().unwrap();
            for n in &nodes {
                r.dropped.insert(*n);
                r.joined.remove(n);
                r.conns.remove(n);
            }
            // A node of a move's new map that missed a write holds less
            // than the switch would claim.
            if let Some(m) = r.moving.as_mut() {
                let new: Vec<u64> = nodes
                    .iter()
                    .copied()
                    .filter(|n| m.map.nodes.iter().any(|x| x.node == *n))
                    .collect();
                m.failed.extend(new);
            }
        }
        tracing::warn!(volume = %spec.id, "replicas on nodes {nodes:?} are out of sync");
        self.storage
            .sets
            .out_of_sync(&spec.id, spec.epoch, nodes.clone())
            .await
            .map_err(|e| {
                IoError::Failed(format!(
                    "cannot record that the replicas of volume {} on nodes {nodes:?} are out of sync: {e}",
                    spec.id
                ))
            })
    }

    /// Fences every in-sync replica with this writer's epoch, drops those
    /// that cannot be fenced or missed an earlier fence, and makes the rest
    /// agree. Runs once per epoch; later calls return at once.
    pub async fn activate(&self) -> Result<(), IoError> {
        let mut activated = self.activation.lock().await;
        let spec = self.spec();
        if *activated == spec.epoch {
            return Ok(());
        }
        let nodes: Vec<u64> = spec
            .map
            .nodes
            .iter()
            .map(|n| n.node)
            .filter(|n| spec.in_sync.contains(n))
            .collect();
        let fence = Request::Fence {
            volume: spec.id.clone(),
            epoch: spec.epoch,
        };
        let fences = nodes.iter().map(|n| self.storage.call_traced(*n, &fence));
        let answers: Vec<Traced> = join_all(fences).await;
        let mut held = Vec::new();
        let mut bad = Vec::new();
        for (node, a) in nodes.iter().zip(answers) {
            match a {
                Ok((Response::Number(prev), conn)) => held.push((*node, prev, conn)),
                Err(IoError::Fenced(m)) => return Err(IoError::Fenced(m)),
                Ok((other, _)) => {
                    tracing::warn!(volume = %spec.id, "node {node} answered a fence with {other:?}");
                    bad.push(*node);
                }
                Err(e) => {
                    tracing::warn!(volume = %spec.id, "cannot fence the replica on node {node}: {e}");
                    bad.push(*node);
                }
            }
        }
        // Every in-sync replica took the previous writer's fence; one that
        // holds an older epoch than another missed it (it was cut off, or
        // lost its disk) and cannot be trusted.
        let newest = held.iter().map(|(_, p, _)| *p).max().unwrap_or(0);
        for (node, prev, _) in &held {
            if *prev < newest {
                tracing::warn!(volume = %spec.id, "the replica on node {node} holds epoch {prev}, older than {newest}: it missed a writer");
                bad.push(*node);
            }
        }
        held.retain(|(n, _, _)| !bad.contains(n));
        {
            let mut r = self.replicas.lock().unwrap();
            *r = Replicas::default();
            for (node, _, conn) in &held {
                r.conns.insert(*node, *conn);
            }
        }
        self.drop_replicas(&spec, bad).await?;
        if held.is_empty() {
            return Err(IoError::Failed(format!(
                "volume {} has no in-sync replica that can be reached (in sync: {:?})",
                spec.id, spec.in_sync
            )));
        }
        self.agree(&spec).await?;
        *activated = spec.epoch;
        Ok(())
    }

    /// Makes the in-sync replicas agree on every object they hold (a writer
    /// that died may have left a write on some of them only).
    async fn agree(&self, spec: &VolumeSpec) -> Result<(), IoError> {
        let nodes = self.in_sync();
        let lists = join_all(nodes.iter().map(|n| self.list(spec, *n))).await;
        let mut all: HashMap<u64, Vec<Option<ObjectInfo>>> = HashMap::new();
        for (i, list) in lists.into_iter().enumerate() {
            for info in list? {
                let index = info.index;
                all.entry(index).or_insert_with(|| vec![None; nodes.len()])[i] = Some(info);
            }
        }
        let mut repaired = 0;
        for (index, infos) in all {
            let placed = spec.map.place(&spec.id, index, spec.replicas);
            let wanted: Vec<&Option<ObjectInfo>> = nodes
                .iter()
                .zip(&infos)
                .filter(|(n, _)| placed.contains(n))
                .map(|(_, i)| i)
                .collect();
            let uncertain = wanted
                .iter()
                .any(|i| i.as_ref().is_some_and(|i| i.uncertain));
            if uncertain || wanted.windows(2).any(|w| w[0] != w[1]) {
                let lock = self.lock_for(index);
                let _exclusive = lock.lock(ALL, true).await;
                self.make_agree(spec, index).await?;
                repaired += 1;
            }
        }
        if repaired > 0 {
            tracing::info!(volume = %spec.id, "made {repaired} objects agree on the in-sync replicas");
        }
        Ok(())
    }

    async fn list(&self, spec: &VolumeSpec, node: u64) -> Result<Vec<ObjectInfo>, IoError> {
        match self
            .call_checked(
                spec,
                node,
                &Request::List {
                    volume: spec.id.clone(),
                },
            )
            .await?
        {
            Response::Objects(list) => Ok(list),
            other => Err(IoError::Failed(format!(
                "storage node {node} answered a list with {other:?}"
            ))),
        }
    }

    async fn stat(
        &self,
        spec: &VolumeSpec,
        node: u64,
        index: u64,
    ) -> Result<Option<ObjectInfo>, IoError> {
        match self
            .call_checked(
                spec,
                node,
                &Request::Stat {
                    volume: spec.id.clone(),
                    index,
                },
            )
            .await?
        {
            Response::Objects(mut list) => Ok(list.pop()),
            other => Err(IoError::Failed(format!(
                "storage node {node} answered a look-up with {other:?}"
            ))),
        }
    }

    /// Copies the newest copy of one object among its in-sync replicas to
    /// the others. The caller holds the object's write lock.
    async fn make_agree(&self, spec: &VolumeSpec, index: u64) -> Result<(), IoError> {
        let in_sync = self.in_sync();
        let nodes: Vec<u64> = spec
            .map
            .place(&spec.id, index, spec.replicas)
            .into_iter()
            .filter(|n| in_sync.contains(n))
            .collect();
        let infos = join_all(nodes.iter().map(|n| self.stat(spec, *n, index))).await;
        let mut known = Vec::new();
        let mut failed = Vec::new();
        for (n, i) in nodes.iter().zip(infos) {
            match i {
                Ok(info) => known.push((*n, info)),
                Err(_) => failed.push(*n),
            }
        }
        // A copy that may lack writes (found dirty after a crash) is the
        // source only when every copy is in that state.
        let Some((source, best)) = known
            .iter()
            .max_by_key(|(_, i)| i.as_ref().map(|i| (!i.uncertain, i.version, i.seq, i.head)))
            .cloned()
        else {
            return Err(IoError::Failed(format!(
                "no in-sync replica of object {index} of volume {} answers",
                spec.id
            )));
        };
        let certify = best.as_ref().is_some_and(|b| b.uncertain);
        for (node, info) in &known {
            // An uncertain source is rewritten too, which makes it certain.
            if *info != best
                || info.as_ref().is_some_and(|i| i.uncertain)
                || (certify && *node == source)
            {
                if let Err(e) = self.copy_object(spec, index, source, *node).await {
                    tracing::warn!(volume = %spec.id, "cannot copy object {index} from node {source} to node {node}: {e}");
                    failed.push(*node);
                }
            }
        }
        self.drop_replicas(spec, failed).await?;
        self.replicas.lock().unwrap().suspect.remove(&index);
        Ok(())
    }

    /// Copies one object whole (snapshot copies first, then the head) from
    /// `from` to `to`. The caller holds the object's write lock.
    async fn copy_object(
        &self,
        spec: &VolumeSpec,
        index: u64,
        from: u64,
        to: u64,
    ) -> Result<(), IoError> {
        let info = self.stat(spec, from, index).await?.unwrap_or(ObjectInfo {
            index,
            version: 0,
            seq: 0,
            head: false,
            uncertain: false,
            clones: Vec::new(),
        });
        let len = spec.object_size as u32;
        let read = |snap: Option<u64>| Request::Read {
            volume: spec.id.clone(),
            index,
            snap,
            offset: 0,
            len,
            epoch: spec.epoch,
        };
        for (lo, hi) in &info.clones {
            let data = match self.call_checked(spec, from, &read(Some(*hi))).await? {
                Response::Data(d) => d,
                other => {
                    return Err(IoError::Failed(format!(
                        "node {from} answered a read of a snapshot copy with {other:?}"
                    )))
                }
            };
            self.call_checked(
                spec,
                to,
                &Request::PutClone {
                    volume: spec.id.clone(),
                    index,
                    epoch: spec.epoch,
                    lo: *lo,
                    hi: *hi,
                    version: info.version,
                    data,
                },
            )
            .await?;
        }
        let data = if info.head {
            match self.call_checked(spec, from, &read(None)).await? {
                Response::Data(d) => d,
                other => {
                    return Err(IoError::Failed(format!(
                        "node {from} answered a read with {other:?}"
                    )))
                }
            }
        } else {
            Vec::new()
        };
        self.call_checked(
            spec,
            to,
            &Request::PutHead {
                volume: spec.id.clone(),
                index,
                epoch: spec.epoch,
                version: info.version,
                seq: info.seq,
                absent: !info.head,
                keep: info.clones.iter().map(|(_, hi)| *hi).collect(),
                data,
            },
        )
        .await?;
        Ok(())
    }

    pub async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, IoError> {
        let spec = self.spec();
        check_range(&spec, offset, len)?;
        let pieces = split(spec.object_size, offset, len);
        let reads = pieces
            .iter()
            .map(|(idx, off, n)| self.read_object(&spec, *idx, *off, *n));
        assemble(len, &pieces, join_all(reads).await)
    }

    async fn read_object(
        &self,
        spec: &VolumeSpec,
        index: u64,
        offset: u64,
        len: u64,
    ) -> Result<Option<Vec<u8>>, IoError> {
        let lock = self.lock_for(index);
        let range = (offset, offset + len);
        let mut shared = lock.lock(range, false).await;
        if self.replicas.lock().unwrap().suspect.contains(&index) {
            drop(shared);
            {
                let _exclusive = lock.lock(ALL, true).await;
                if self.replicas.lock().unwrap().suspect.contains(&index) {
                    self.make_agree(spec, index).await?;
                }
            }
            shared = lock.lock(range, false).await;
        }
        let mut nodes = self.storage.readable(spec, index, &self.in_sync());
        loop {
            if nodes.is_empty() {
                return Err(self.degraded(spec, index, &[]));
            }
            let node = nodes.remove(0);
            let req = Request::Read {
                volume: spec.id.clone(),
                index,
                snap: None,
                offset: offset as u32,
                len: len as u32,
                epoch: spec.epoch,
            };
            match self.call_checked(spec, node, &req).await {
                Ok(Response::Data(d)) if d.len() as u64 == len => return Ok(Some(d)),
                Ok(Response::Absent) => {
                    drop(shared);
                    return self.storage.read_parent(spec, index, offset, len).await;
                }
                Err(e @ (IoError::Invalid(_) | IoError::Fenced(_))) => return Err(e),
                other => {
                    tracing::warn!(volume = %spec.id, "reading object {index} from node {node}: {other:?}");
                }
            }
        }
    }

    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        let started = std::time::Instant::now();
        let result = self.write_pieces(offset, data).await;
        self.storage.pace.tenant_write(started.elapsed());
        result
    }

    async fn write_pieces(&self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        let spec = self.spec();
        check_range(&spec, offset, data.len() as u64)?;
        let pieces = split(spec.object_size, offset, data.len() as u64);
        let mut at = 0usize;
        let mut writes = Vec::with_capacity(pieces.len());
        for (idx, off, n) in pieces {
            let chunk = &data[at..at + n as usize];
            at += n as usize;
            writes.push(self.mutate(&spec, idx, off, Mutation::Write(chunk)));
        }
        join_all(writes).await.into_iter().collect()
    }

    /// Zeroes a range; `punch` lets whole blocks become holes.
    pub async fn zero(&self, offset: u64, len: u64, punch: bool) -> Result<(), IoError> {
        let spec = self.spec();
        check_range(&spec, offset, len)?;
        let writes = split(spec.object_size, offset, len)
            .into_iter()
            .map(|(idx, off, n)| self.mutate(&spec, idx, off, Mutation::Zero { len: n, punch }));
        join_all(writes).await.into_iter().collect()
    }

    /// Makes every write completed before it, on any connection of this
    /// node, durable on every in-sync replica it reached.
    pub async fn flush(&self) -> Result<(), IoError> {
        let spec = self.spec();
        let (tick, nodes, objects) = {
            let d = self.dirty.lock().unwrap();
            (
                d.tick,
                d.nodes.keys().copied().collect::<Vec<_>>(),
                d.objects.keys().copied().collect::<Vec<_>>(),
            )
        };
        let (in_sync, repairing, moving) = {
            let r = self.replicas.lock().unwrap();
            (
                in_sync_now(&spec, &r),
                r.repair.as_ref().map(|p| p.node),
                r.moving.as_ref().map(|m| m.targets()).unwrap_or_default(),
            )
        };
        let targets: Vec<u64> = nodes
            .iter()
            .copied()
            .filter(|n| in_sync.contains(n) || repairing == Some(*n) || moving.contains(n))
            .collect();
        let flush = Request::Flush {
            volume: spec.id.clone(),
        };
        let calls = targets.iter().map(|n| self.call_checked(&spec, *n, &flush));
        let mut failed = Vec::new();
        for (node, r) in targets.iter().zip(join_all(calls).await) {
            match r {
                Ok(_) => {}
                Err(IoError::Fenced(m)) => return Err(IoError::Fenced(m)),
                Err(e) => {
                    tracing::warn!(volume = %spec.id, "flush on node {node} failed: {e}");
                    if in_sync.contains(node) {
                        failed.push(*node);
                    } else if repairing == Some(*node) {
                        self.abort_repair(*node);
                    } else {
                        self.abort_move(*node);
                    }
                }
            }
        }
        // A replica that failed to sync may have lost what it held.
        self.drop_replicas(&spec, failed).await?;
        let in_sync = self.in_sync();
        for index in &objects {
            let placed = spec.map.place(&spec.id, *index, spec.replicas);
            let live = placed.iter().filter(|n| in_sync.contains(n)).count();
            if live < spec.min_replicas {
                return Err(self.degraded(&spec, *index, &[]));
            }
        }
        let mut d = self.dirty.lock().unwrap();
        d.nodes.retain(|n, t| *t > tick && in_sync.contains(n));
        d.objects.retain(|_, t| *t > tick);
        Ok(())
    }

    fn degraded(&self, spec: &VolumeSpec, index: u64, failed: &[u64]) -> IoError {
        let in_sync = self.in_sync();
        let placed = spec.map.place(&spec.id, index, spec.replicas);
        let mut missing: Vec<u64> = placed
            .iter()
            .copied()
            .filter(|n| !in_sync.contains(n) || failed.contains(n))
            .collect();
        missing.sort_unstable();
        IoError::Failed(format!(
            "volume {} is degraded: object {index} needs {} in-sync replicas and nodes {missing:?} are missing or out of sync; writes resume when they are back",
            spec.id, spec.min_replicas
        ))
    }

    fn abort_repair(&self, node: u64) {
        let mut r = self.replicas.lock().unwrap();
        if let Some(p) = r.repair.as_mut().filter(|p| p.node == node) {
            p.failed = true;
        }
    }

    async fn mutate(
        &self,
        spec: &VolumeSpec,
        index: u64,
        offset: u64,
        m: Mutation<'_>,
    ) -> Result<(), IoError> {
        let placed = spec.map.place(&spec.id, index, spec.replicas);
        if placed.len() < spec.replicas {
            return Err(IoError::Failed(format!(
                "volume {} keeps {} replicas but its storage map has only {} nodes",
                spec.id,
                spec.replicas,
                placed.len()
            )));
        }
        let lock = self.lock_for(index);
        let len = match m {
            Mutation::Write(data) => data.len() as u64,
            Mutation::Zero { len, .. } => len,
        };
        let mut _exclusive = lock.lock((offset, offset + len), true).await;
        // Making replicas agree, or a clone's first write (copy-up), takes
        // the whole object.
        let whole = self.replicas.lock().unwrap().suspect.contains(&index)
            || (spec.parent.is_some() && !self.present.lock().unwrap().contains(&index));
        if whole {
            drop(_exclusive);
            _exclusive = lock.lock(ALL, true).await;
        }
        if self.replicas.lock().unwrap().suspect.contains(&index) {
            self.make_agree(spec, index).await?;
        }
        let (live, extra, newer) = {
            let r = self.replicas.lock().unwrap();
            // Read under the replicas' lock: a move switches the map before
            // it stops sending writes to the new map's nodes, so a write
            // that finds no move in progress finds the new map.
            let newer = Some(self.spec()).filter(|now| now.map.epoch != spec.map.epoch);
            let spec: &VolumeSpec = newer.as_deref().unwrap_or(spec);
            let placed = spec.map.place(&spec.id, index, spec.replicas);
            let in_sync = in_sync_now(spec, &r);
            let live: Vec<u64> = placed
                .iter()
                .copied()
                .filter(|n| in_sync.contains(n))
                .collect();
            let mut extra: Vec<u64> = r
                .repair
                .as_ref()
                .filter(|p| placed.contains(&p.node) && !p.pending.contains(&index) && !p.failed)
                .map(|p| p.node)
                .into_iter()
                .collect();
            if let Some(m) = r.moving.as_ref() {
                for n in m.extra_for(spec, index, &live) {
                    if !extra.contains(&n) {
                        extra.push(n);
                    }
                }
            }
            (live, extra, newer)
        };
        let spec: &VolumeSpec = newer.as_deref().unwrap_or(spec);
        if live.len() < spec.min_replicas {
            return Err(self.degraded(spec, index, &[]));
        }
        let req = if spec.parent.is_some() && !self.present.lock().unwrap().contains(&index) {
            self.copy_up_request(spec, &live, index, offset, m).await?
        } else {
            request(spec, index, offset, m)
        };
        let mut targets = live.clone();
        targets.extend(extra);
        let calls = targets.iter().map(|n| self.call_checked(spec, *n, &req));
        let results = join_all(calls).await;
        let mut done = Vec::new();
        let mut failed = Vec::new();
        let mut refusal = None;
        for (node, r) in targets.iter().zip(results) {
            match r {
                Ok(_) => done.push(*node),
                Err(IoError::Fenced(m)) => return Err(IoError::Fenced(m)),
                Err(e) => {
                    tracing::warn!(volume = %spec.id, "write of object {index} on node {node} failed: {e}");
                    if live.contains(node) {
                        failed.push(*node);
                    } else {
                        self.abort_repair(*node);
                        self.abort_move(*node);
                    }
                    refusal = Some(e);
                }
            }
        }
        let applied = done.iter().filter(|n| live.contains(n)).count();
        if applied == 0 {
            // Refused everywhere alike (a bad request), or lost everywhere:
            // none is known to hold it, all may; check before the next I/O.
            self.replicas.lock().unwrap().suspect.insert(index);
            return Err(refusal.unwrap_or_else(|| self.degraded(spec, index, &failed)));
        }
        if let Err(e) = self.drop_replicas(spec, failed.clone()).await {
            self.replicas.lock().unwrap().suspect.insert(index);
            return Err(e);
        }
        if applied < spec.min_replicas {
            return Err(self.degraded(spec, index, &failed));
        }
        if spec.parent.is_some() {
            self.present.lock().unwrap().insert(index);
        }
        let mut d = self.dirty.lock().unwrap();
        d.tick += 1;
        let tick = d.tick;
        for n in done {
            d.nodes.insert(n, tick);
        }
        d.objects.insert(index, tick);
        Ok(())
    }

    /// First write to a clone's object: the object becomes the parent's
    /// bytes with this write applied, written whole. An in-sync replica
    /// that says the object is absent speaks for all of them.
    async fn copy_up_request(
        &self,
        spec: &VolumeSpec,
        live: &[u64],
        index: u64,
        offset: u64,
        m: Mutation<'_>,
    ) -> Result<Request, IoError> {
        let mut exists = None;
        for node in live {
            match self
                .call_checked(
                    spec,
                    *node,
                    &Request::Exists {
                        volume: spec.id.clone(),
                        index,
                    },
                )
                .await
            {
                Ok(Response::Bool(b)) => {
                    exists = Some(b);
                    break;
                }
                Ok(other) => tracing::warn!("node {node} answered a look-up with {other:?}"),
                Err(e) => tracing::warn!("node {node}: {e}"),
            }
        }
        let Some(exists) = exists else {
            return Err(self.degraded(spec, index, live));
        };
        if exists {
            self.present.lock().unwrap().insert(index);
            return Ok(request(spec, index, offset, m));
        }
        let len = spec.object_size.min(spec.size - index * spec.object_size);
        let mut base = self
            .storage
            .read_parent(spec, index, 0, len)
            .await?
            .unwrap_or_else(|| vec![0u8; len as usize]);
        match m {
            Mutation::Write(data) => {
                base[offset as usize..offset as usize + data.len()].copy_from_slice(data)
            }
            Mutation::Zero { len, .. } => base[offset as usize..(offset + len) as usize].fill(0),
        }
        Ok(Request::Write {
            volume: spec.id.clone(),
            index,
            offset: 0,
            seq: spec.seq,
            epoch: spec.epoch,
            data: base,
        })
    }

    /// Brings the replica on `node` back into sync: fences it, copies every
    /// object placed on it that differs from an in-sync replica's (while
    /// writes go on), then records it in sync. Returns the objects copied;
    /// `progress` counts the bytes of the objects looked at and copied.
    pub async fn resync(&self, node: u64, progress: &Progress) -> Result<usize, IoError> {
        self.activate().await?;
        let spec = self.spec();
        if self.in_sync().contains(&node) {
            return Ok(0);
        }
        let (_, conn) = self
            .storage
            .call_traced(
                node,
                &Request::Fence {
                    volume: spec.id.clone(),
                    epoch: spec.epoch,
                },
            )
            .await?;
        self.storage
            .sets
            .recovering(&spec.id, spec.epoch, node)
            .await
            .map_err(IoError::Failed)?;
        // From here every write goes to the node too (an object it holds
        // stale takes the write and is then copied whole), so an object
        // created after the listing below is whole there.
        {
            let mut r = self.replicas.lock().unwrap();
            r.conns.insert(node, conn);
            r.repair = Some(Repair {
                node,
                pending: HashSet::new(),
                failed: false,
            });
        }
        let copied = match self.copy_all(&spec, node, progress).await {
            Ok(n) => n,
            Err(e) => {
                self.replicas.lock().unwrap().repair = None;
                return Err(e);
            }
        };
        let joined = self.storage.sets.in_sync(&spec.id, spec.epoch, node).await;
        let failed = {
            let mut r = self.replicas.lock().unwrap();
            let failed = r.repair.take().is_none_or(|p| p.failed);
            if joined.is_ok() && !failed {
                r.dropped.remove(&node);
                r.joined.insert(node);
            }
            failed
        };
        match joined {
            Ok(()) if !failed => {
                tracing::info!(volume = %spec.id, "the replica on node {node} is in sync again ({copied} objects copied)");
                Ok(copied)
            }
            Ok(()) => {
                // Recorded in sync, but a write since failed on it.
                self.drop_replicas(&spec, vec![node]).await?;
                Err(IoError::Failed(format!(
                    "node {node} failed a write during its resync"
                )))
            }
            Err(e) => Err(IoError::Failed(format!(
                "cannot record node {node} in sync: {e}"
            ))),
        }
    }

    /// Returns every object to snapshot `snap`'s content on every in-sync
    /// replica (one that fails leaves the in-sync set).
    pub async fn rollback(&self, snap: u64) -> Result<(), IoError> {
        self.activate().await?;
        let spec = self.spec();
        let nodes = self.in_sync_members(&spec);
        let req = Request::Rollback {
            volume: spec.id.clone(),
            snap,
            seq: spec.seq,
            epoch: spec.epoch,
        };
        let calls = nodes.iter().map(|n| self.call_checked(&spec, *n, &req));
        let mut failed = Vec::new();
        let mut last = None;
        for (node, r) in nodes.iter().zip(join_all(calls).await) {
            match r {
                Ok(_) => {}
                Err(e @ (IoError::Fenced(_) | IoError::Invalid(_))) => return Err(e),
                Err(e) => {
                    failed.push(*node);
                    last = Some(e);
                }
            }
        }
        if failed.len() == nodes.len() {
            return Err(last.unwrap_or_else(|| {
                IoError::Failed(format!("volume {} has no in-sync replica", spec.id))
            }));
        }
        self.drop_replicas(&spec, failed).await?;
        self.forget_present();
        Ok(())
    }

    /// Lists every object the in-sync replicas or the returning one hold
    /// and placed on the node, marks them pending (writes skip the node for
    /// them until they are copied), and copies those that differ.
    async fn copy_all(
        &self,
        spec: &VolumeSpec,
        node: u64,
        progress: &Progress,
    ) -> Result<usize, IoError> {
        let mut sources = self.in_sync();
        sources.push(node);
        let lists = join_all(sources.iter().map(|n| {
            self.storage.call(
                *n,
                Request::List {
                    volume: spec.id.clone(),
                },
            )
        }))
        .await;
        let mut indexes = BTreeSet::new();
        for l in lists {
            match l? {
                Response::Objects(list) => indexes.extend(list.into_iter().map(|o| o.index)),
                other => return Err(IoError::Failed(format!("a list answered {other:?}"))),
            }
        }
        indexes.retain(|i| spec.map.place(&spec.id, *i, spec.replicas).contains(&node));
        if let Some(p) = self.replicas.lock().unwrap().repair.as_mut() {
            p.pending.extend(indexes.iter().copied());
        }
        progress
            .total_bytes
            .fetch_add(indexes.len() as u64 * spec.object_size, Ordering::Relaxed);
        self.copy_pending(spec, node, &indexes, progress).await
    }

    async fn copy_pending(
        &self,
        spec: &VolumeSpec,
        node: u64,
        indexes: &BTreeSet<u64>,
        progress: &Progress,
    ) -> Result<usize, IoError> {
        let mut copied = 0;
        for index in indexes {
            let lock = self.lock_for(*index);
            let _exclusive = lock.lock(ALL, true).await;
            if self
                .replicas
                .lock()
                .unwrap()
                .repair
                .as_ref()
                .is_none_or(|p| p.failed)
            {
                return Err(IoError::Failed(format!(
                    "node {node} failed a write during its resync"
                )));
            }
            let in_sync = self.in_sync();
            let source = self
                .storage
                .readable(spec, *index, &in_sync)
                .first()
                .copied()
                .ok_or_else(|| self.degraded(spec, *index, &[]))?;
            let (want, have) = (
                self.stat(spec, source, *index).await?,
                self.stat(spec, node, *index).await?,
            );
            let copy = want != have;
            if copy {
                self.copy_object(spec, *index, source, node).await?;
                copied += 1;
            }
            if let Some(p) = self.replicas.lock().unwrap().repair.as_mut() {
                p.pending.remove(index);
            }
            progress
                .done_bytes
                .fetch_add(spec.object_size, Ordering::Relaxed);
            if copy {
                progress
                    .copied_bytes
                    .fetch_add(spec.object_size, Ordering::Relaxed);
            }
            // Paced with the object's writes let through.
            drop(_exclusive);
            if copy {
                self.storage.pace.take(spec.object_size).await;
            }
        }
        Ok(copied)
    }
}

fn in_sync_now(spec: &VolumeSpec, r: &Replicas) -> Vec<u64> {
    let mut nodes: Vec<u64> = spec
        .in_sync
        .iter()
        .chain(r.joined.iter())
        .copied()
        .filter(|n| !r.dropped.contains(n))
        .collect();
    nodes.sort_unstable();
    nodes.dedup();
    nodes
}

fn request(spec: &VolumeSpec, index: u64, offset: u64, m: Mutation<'_>) -> Request {
    match m {
        Mutation::Write(data) => Request::Write {
            volume: spec.id.clone(),
            index,
            offset: offset as u32,
            seq: spec.seq,
            epoch: spec.epoch,
            data: data.to_vec(),
        },
        Mutation::Zero { len, punch } => Request::Zero {
            volume: spec.id.clone(),
            index,
            offset: offset as u32,
            len: len as u32,
            punch,
            seq: spec.seq,
            epoch: spec.epoch,
        },
    }
}

fn check_range(spec: &VolumeSpec, offset: u64, len: u64) -> Result<(), IoError> {
    if offset.checked_add(len).is_none_or(|end| end > spec.size) {
        return Err(IoError::OutOfRange(format!(
            "{len} bytes at offset {offset} go past the end of volume {} ({} bytes)",
            spec.id, spec.size
        )));
    }
    Ok(())
}

/// Puts the pieces of a read together (an absent piece reads as zeros).
fn assemble(
    len: u64,
    pieces: &[(u64, u64, u64)],
    results: Vec<Result<Option<Vec<u8>>, IoError>>,
) -> Result<Vec<u8>, IoError> {
    let mut out = vec![0u8; len as usize];
    let mut at = 0usize;
    for (r, (_, _, n)) in results.into_iter().zip(pieces) {
        if let Some(data) = r? {
            out[at..at + *n as usize].copy_from_slice(&data);
        }
        at += *n as usize;
    }
    Ok(out)
}

/// Splits a byte range into (object index, offset in object, length).
pub fn split(object_size: u64, offset: u64, len: u64) -> Vec<(u64, u64, u64)> {
    let mut out = Vec::new();
    let (mut at, end) = (offset, offset + len);
    while at < end {
        let idx = at / object_size;
        let off = at % object_size;
        let n = (object_size - off).min(end - at);
        out.push((idx, off, n));
        at += n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsio::sim::SimFs;
    use crate::placement::MapNode;

    /// Records in-sync changes in memory.
    #[derive(Default)]
    struct Sets(Mutex<Vec<String>>);

    impl ReplicaSets for Sets {
        fn out_of_sync(
            &self,
            volume: &str,
            epoch: u64,
            nodes: Vec<u64>,
        ) -> BoxFuture<'_, Result<(), String>> {
            let line = format!("{volume}@{epoch}: {nodes:?} out");
            Box::pin(async move {
                self.0.lock().unwrap().push(line);
                Ok(())
            })
        }
        fn recovering(&self, _: &str, _: u64, _: u64) -> BoxFuture<'_, Result<(), String>> {
            Box::pin(async { Ok(()) })
        }
        fn in_sync(&self, _: &str, _: u64, _: u64) -> BoxFuture<'_, Result<(), String>> {
            Box::pin(async { Ok(()) })
        }
    }

    /// One node, its store on a recording file system (no peers reached).
    fn single_node(fs: SimFs) -> (Arc<Storage>, Arc<Sets>, VolumeSpec) {
        use crate::fsio::Fs;
        fs.create_dir_all(std::path::Path::new("/s")).unwrap();
        let store = ObjectStore::open_with(Arc::new(fs), std::path::Path::new("/s")).unwrap();
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let sets = Arc::new(Sets::default());
        let storage = Storage::new(1, Arc::new(store), Peers::new(Arc::new(tls)), sets.clone());
        let spec = VolumeSpec {
            id: "v".into(),
            size: 8 << 20,
            object_size: 4 << 20,
            replicas: 1,
            min_replicas: 1,
            in_sync: vec![1],
            seq: 0,
            epoch: 1,
            map: Arc::new(StorageMap {
                epoch: 1,
                nodes: vec![MapNode {
                    node: 1,
                    weight: 1,
                    failure_domain: "a".into(),
                }],
            }),
            parent: None,
        };
        (storage, sets, spec)
    }

    #[tokio::test]
    async fn a_flush_that_failed_is_never_followed_by_one_that_claims_durability() {
        let fs = SimFs::new();
        let (storage, sets, spec) = single_node(fs.clone());
        let handle = storage.open(spec);
        handle.activate().await.unwrap();
        handle.write(0, &[7u8; 4096]).await.unwrap();
        fs.fail_next_syncs(1);
        let err = handle.flush().await.unwrap_err();
        assert!(err.to_string().contains("degraded"), "{err}");
        // The write was not made durable: no later flush may say it was.
        let again = handle.flush().await;
        assert!(again.is_err(), "a retried flush claimed durability");
        assert_eq!(*sets.0.lock().unwrap(), vec!["v@1: [1] out".to_string()]);
    }

    #[test]
    fn ranges_split_at_object_boundaries() {
        assert_eq!(split(4, 0, 0), vec![]);
        assert_eq!(split(4, 1, 2), vec![(0, 1, 2)]);
        assert_eq!(split(4, 3, 6), vec![(0, 3, 1), (1, 0, 4), (2, 0, 1)]);
        assert_eq!(split(4, 8, 4), vec![(2, 0, 4)]);
    }
}
