//! A volume as its writer sees it: byte ranges split into objects, each sent
//! to the replicas the placement function names; reads from the local
//! replica when there is one; clones reading through to their parent until
//! an object is first written (copy-up).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock, Weak};

use futures_util::future::join_all;

use crate::placement::StorageMap;
use crate::proto::{ErrorKind, Request, Response};
use crate::store::ObjectStore;
use crate::transport::{self, Peers};

/// Everything needed to read or write a volume's objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    pub id: String,
    pub size: u64,
    pub object_size: u64,
    pub replicas: usize,
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

/// One node's view of the storage cluster: its own store and its peers.
pub struct Storage {
    pub node: u64,
    pub store: Arc<ObjectStore>,
    pub peers: Peers,
    handles: Mutex<HashMap<String, Weak<VolumeHandle>>>,
}

impl Storage {
    pub fn new(node: u64, store: Arc<ObjectStore>, peers: Peers) -> Arc<Self> {
        Arc::new(Self {
            node,
            store,
            peers,
            handles: Mutex::new(HashMap::new()),
        })
    }

    /// Sends a request to a node (the local store directly).
    pub async fn call(&self, node: u64, req: Request) -> Result<Response, IoError> {
        let resp = if node == self.node {
            transport::handle(&self.store, req).await
        } else {
            self.peers
                .call(node, &req)
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
            ok => Ok(ok),
        }
    }

    /// Sends a request to every node of a map; all must succeed.
    pub async fn broadcast(&self, map: &StorageMap, req: Request) -> Result<(), IoError> {
        let calls = map.nodes.iter().map(|n| self.call(n.node, req.clone()));
        for r in join_all(calls).await {
            r?;
        }
        Ok(())
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
    /// this node, so a flush on one connection covers writes on all).
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
            copy_up: tokio::sync::Mutex::new(()),
            dirty: Mutex::new(HashSet::new()),
        });
        handles.insert(spec.id, Arc::downgrade(&h));
        h
    }

    /// Reads `len` bytes at `offset` of a volume at a snapshot (`None`: now).
    pub async fn read(
        &self,
        spec: &VolumeSpec,
        snap: Option<u64>,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, IoError> {
        check_range(spec, offset, len)?;
        let mut out = vec![0u8; len as usize];
        let pieces = split(spec.object_size, offset, len);
        let reads = pieces
            .iter()
            .map(|(idx, off, n)| self.read_object(spec, snap, *idx, *off, *n));
        let mut at = 0usize;
        for (r, (_, _, n)) in join_all(reads).await.into_iter().zip(&pieces) {
            if let Some(data) = r? {
                out[at..at + *n as usize].copy_from_slice(&data);
            }
            at += *n as usize;
        }
        Ok(out)
    }

    /// One object's bytes, through to the parent where the object is absent.
    /// `None`: zeros.
    fn read_object<'a>(
        &'a self,
        spec: &'a VolumeSpec,
        snap: Option<u64>,
        index: u64,
        offset: u64,
        len: u64,
    ) -> futures_util::future::BoxFuture<'a, Result<Option<Vec<u8>>, IoError>> {
        Box::pin(async move {
            let mut nodes = spec.map.place(&spec.id, index, spec.replicas);
            if let Some(i) = nodes.iter().position(|n| *n == self.node) {
                nodes.swap(0, i);
            }
            let mut last = IoError::Failed(format!(
                "object {index} of volume {} has no storage node",
                spec.id
            ));
            for node in nodes {
                let req = Request::Read {
                    volume: spec.id.clone(),
                    index,
                    snap,
                    offset: offset as u32,
                    len: len as u32,
                };
                match self.call(node, req).await {
                    Ok(Response::Data(d)) if d.len() as u64 == len => return Ok(Some(d)),
                    Ok(Response::Absent) => {
                        return self.read_parent(spec, index, offset, len).await
                    }
                    Ok(other) => {
                        last = IoError::Failed(format!(
                            "storage node {node} answered a read with {other:?}"
                        ));
                    }
                    Err(IoError::Invalid(m)) => return Err(IoError::Invalid(m)),
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
        })
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
            .read_object(&parent.volume, Some(parent.snap), index, offset, n)
            .await?
        else {
            return Ok(None);
        };
        data.resize(len as usize, 0);
        Ok(Some(data))
    }
}

/// An open volume on its writer node.
pub struct VolumeHandle {
    storage: Arc<Storage>,
    spec: RwLock<Arc<VolumeSpec>>,
    /// Objects known to exist in this (clone) volume: no copy-up needed.
    present: Mutex<HashSet<u64>>,
    copy_up: tokio::sync::Mutex<()>,
    /// Nodes written to since the last flush.
    dirty: Mutex<HashSet<u64>>,
}

enum Mutation<'a> {
    Write(&'a [u8]),
    Zero { len: u64, punch: bool },
}

impl VolumeHandle {
    pub fn spec(&self) -> Arc<VolumeSpec> {
        self.spec.read().unwrap().clone()
    }

    /// Takes a newer record (snapshot taken, resized, lease renewed).
    pub fn update(&self, spec: VolumeSpec) {
        let mut cur = self.spec.write().unwrap();
        if **cur != spec {
            if cur.seq != spec.seq || cur.epoch != spec.epoch {
                // A rollback may have removed objects; ask again.
                self.present.lock().unwrap().clear();
            }
            *cur = Arc::new(spec);
        }
    }

    /// Forgets which objects exist (after a rollback removed some).
    pub fn forget_present(&self) {
        self.present.lock().unwrap().clear();
    }

    pub async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, IoError> {
        let spec = self.spec();
        self.storage.read(&spec, None, offset, len).await
    }

    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<(), IoError> {
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

    /// Makes every acknowledged write durable on every replica.
    pub async fn flush(&self) -> Result<(), IoError> {
        let spec = self.spec();
        let nodes: Vec<u64> = self.dirty.lock().unwrap().drain().collect();
        let calls = nodes.iter().map(|n| {
            self.storage.call(
                *n,
                Request::Flush {
                    volume: spec.id.clone(),
                },
            )
        });
        let results = join_all(calls).await;
        let mut failed = None;
        for (node, r) in nodes.iter().zip(results) {
            if let Err(e) = r {
                self.dirty.lock().unwrap().insert(*node);
                failed = Some(e);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    async fn mutate(
        &self,
        spec: &VolumeSpec,
        index: u64,
        offset: u64,
        m: Mutation<'_>,
    ) -> Result<(), IoError> {
        let nodes = spec.map.place(&spec.id, index, spec.replicas);
        if nodes.len() < spec.replicas {
            return Err(IoError::Failed(format!(
                "volume {} keeps {} replicas but its storage map has only {} nodes",
                spec.id,
                spec.replicas,
                nodes.len()
            )));
        }
        if spec.parent.is_some() && !self.present.lock().unwrap().contains(&index) {
            return self.copy_up(spec, &nodes, index, offset, m).await;
        }
        let req = match m {
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
        };
        self.send_all(&nodes, req).await
    }

    async fn send_all(&self, nodes: &[u64], req: Request) -> Result<(), IoError> {
        self.dirty.lock().unwrap().extend(nodes.iter().copied());
        let calls = nodes.iter().map(|n| self.storage.call(*n, req.clone()));
        for r in join_all(calls).await {
            r?;
        }
        Ok(())
    }

    /// First write to a clone's object: the object becomes the parent's
    /// bytes with this write applied, written whole to every replica.
    async fn copy_up(
        &self,
        spec: &VolumeSpec,
        nodes: &[u64],
        index: u64,
        offset: u64,
        m: Mutation<'_>,
    ) -> Result<(), IoError> {
        let _one_at_a_time = self.copy_up.lock().await;
        let exists = match self
            .storage
            .call(
                nodes[0],
                Request::Exists {
                    volume: spec.id.clone(),
                    index,
                },
            )
            .await?
        {
            Response::Bool(b) => b,
            other => return Err(IoError::Failed(format!("unexpected answer {other:?}"))),
        };
        if !exists {
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
                Mutation::Zero { len, .. } => {
                    base[offset as usize..(offset + len) as usize].fill(0)
                }
            }
            self.send_all(
                nodes,
                Request::Write {
                    volume: spec.id.clone(),
                    index,
                    offset: 0,
                    seq: spec.seq,
                    epoch: spec.epoch,
                    data: base,
                },
            )
            .await?;
            self.present.lock().unwrap().insert(index);
            return Ok(());
        }
        self.present.lock().unwrap().insert(index);
        drop(_one_at_a_time);
        Box::pin(self.mutate(spec, index, offset, m)).await
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
    use super::split;

    #[test]
    fn ranges_split_at_object_boundaries() {
        assert_eq!(split(4, 0, 0), vec![]);
        assert_eq!(split(4, 1, 2), vec![(0, 1, 2)]);
        assert_eq!(split(4, 3, 6), vec![(0, 3, 1), (1, 0, 4), (2, 0, 1)]);
        assert_eq!(split(4, 8, 4), vec![(2, 0, 4)]);
    }
}
