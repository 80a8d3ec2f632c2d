//! Moving a volume to a newer storage map: re-replication after a node is
//! declared out, rebalancing after a node joins, draining before one
//! leaves. The volume's writer does it, while its I/O goes on:
//!
//! 1. Every node of the new map that is not an in-sync replica is fenced
//!    with the writer's epoch, and every node of the new map records,
//!    durably, that the volume is moving there (`Request::Hold`), so that
//!    its garbage collection leaves the copies alone.
//! 2. The move is recorded in the cluster state (`ReplicaSets::moving`).
//! 3. Every object the new map places on a node that holds no in-sync copy
//!    of it is copied there whole from an in-sync replica: first without
//!    the object's lock (its writes go on), then under its write lock again
//!    only if a write changed the source meanwhile (a look-up each side
//!    otherwise). From then on that object's writes reach the new node too
//!    (an object created during the move reaches it from its first write).
//!    Copies are paced by a [`Throttle`].
//! 4. The volume switches to the new map through Raft
//!    (`ReplicaSets::moved`): every node of the new map is in sync. A new
//!    node that failed a write during the move aborts it (nothing switched)
//!    or, when it failed after the last check, leaves the in-sync set at
//!    once after the switch.
//!
//! The old copies are deleted by their nodes' garbage collection once the
//! state shows the switch (never before: until then they are what the
//! volume reads).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{IoError, VolumeHandle, VolumeSpec};
use crate::placement::StorageMap;
use crate::proto::{Request, Response};
use crate::range_lock::ALL;

/// A move in progress, as the writer's I/O sees it.
pub(super) struct Move {
    pub(super) map: Arc<StorageMap>,
    /// Objects not copied yet: their writes skip the new nodes.
    pub(super) pending: HashSet<u64>,
    /// New nodes a write, flush or copy failed on since the move began.
    pub(super) failed: HashSet<u64>,
    /// The connection each newly fenced node answered on.
    pub(super) conns: HashMap<u64, u64>,
}

impl Move {
    /// The new map's nodes that still take writes.
    pub(super) fn targets(&self) -> Vec<u64> {
        self.map
            .nodes
            .iter()
            .map(|n| n.node)
            .filter(|n| !self.failed.contains(n))
            .collect()
    }

    /// Where a write of object `index` goes besides its in-sync replicas
    /// (`live`): the new map's nodes for it, once it is copied there.
    pub(super) fn extra_for(&self, spec: &VolumeSpec, index: u64, live: &[u64]) -> Vec<u64> {
        if self.pending.contains(&index) {
            return Vec::new();
        }
        self.map
            .place(&spec.id, index, spec.replicas)
            .into_iter()
            .filter(|n| !live.contains(n) && !self.failed.contains(n))
            .collect()
    }
}

/// How far a recovery job has got, read by whoever reports it.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes of objects looked at (copied or found already in place).
    pub done_bytes: AtomicU64,
    /// Bytes of every object the job must look at (grows as it lists).
    pub total_bytes: AtomicU64,
    /// Bytes actually copied.
    pub copied_bytes: AtomicU64,
}

/// Paces recovery copies on one node, shared by every job of the node
/// (which run one object at a time: a queue depth of one): at most `rate`
/// bytes a second (0: unlimited), lowered while tenants' writes are slow.
///
/// The rule: `recent` is the moving average of the latest tenant writes'
/// latency (weight 1/5 for each new one), `baseline` a slower one (weight
/// 1/50) learnt only while no recovery copy has run for 2 s. While
/// `recent` exceeds 1.5 × `baseline`, the rate is multiplied by
/// `1.5 × baseline / recent`, down to a tenth of it.
#[derive(Debug)]
pub struct Throttle {
    rate: AtomicU64,
    next: tokio::sync::Mutex<Instant>,
    tenant: std::sync::Mutex<TenantLatency>,
}

#[derive(Debug, Default)]
struct TenantLatency {
    recent_us: f64,
    baseline_us: f64,
    last_copy: Option<Instant>,
}

impl Throttle {
    pub fn new(bytes_per_second: u64) -> Self {
        Self {
            rate: AtomicU64::new(bytes_per_second),
            next: tokio::sync::Mutex::new(Instant::now()),
            tenant: Default::default(),
        }
    }

    /// Notes how long a tenant's write took.
    pub fn tenant_write(&self, took: Duration) {
        let us = took.as_secs_f64() * 1e6;
        let mut t = self.tenant.lock().unwrap();
        t.recent_us = if t.recent_us == 0.0 {
            us
        } else {
            t.recent_us * 0.8 + us * 0.2
        };
        let copying = t
            .last_copy
            .is_some_and(|at| at.elapsed() < Duration::from_secs(2));
        if !copying {
            t.baseline_us = if t.baseline_us == 0.0 {
                us
            } else {
                t.baseline_us * 0.98 + us * 0.02
            };
        }
    }

    /// What the rate is multiplied by now (see the type's doc).
    pub fn factor(&self) -> f64 {
        let t = self.tenant.lock().unwrap();
        if t.baseline_us <= 0.0 || t.recent_us <= 1.5 * t.baseline_us {
            return 1.0;
        }
        (1.5 * t.baseline_us / t.recent_us).clamp(0.1, 1.0)
    }

    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    pub fn set_rate(&self, bytes_per_second: u64) {
        self.rate.store(bytes_per_second, Ordering::Relaxed);
    }

    /// Waits until `bytes` more may be copied.
    pub async fn take(&self, bytes: u64) {
        self.tenant.lock().unwrap().last_copy = Some(Instant::now());
        let rate = self.rate();
        if rate == 0 {
            return;
        }
        let rate = rate as f64 * self.factor();
        let start = {
            let mut next = self.next.lock().await;
            let start = (*next).max(Instant::now());
            *next = start + Duration::from_secs_f64(bytes as f64 / rate);
            start
        };
        tokio::time::sleep_until(start.into()).await;
    }
}

impl VolumeHandle {
    /// Moves the volume to storage map `target` (see the module's doc).
    /// Returns the bytes copied.
    pub async fn migrate(
        &self,
        target: Arc<StorageMap>,
        throttle: &Throttle,
        progress: &Progress,
    ) -> Result<u64, IoError> {
        self.activate().await?;
        let spec = self.spec();
        if spec.map.epoch == target.epoch {
            return Ok(0);
        }
        if spec.map.epoch > target.epoch {
            return Err(IoError::Invalid(format!(
                "volume {} already uses storage map {}, newer than {}",
                spec.id, spec.map.epoch, target.epoch
            )));
        }
        if target.nodes.len() < spec.replicas {
            return Err(IoError::Failed(format!(
                "volume {} keeps {} replicas but storage map {} has only {} nodes",
                spec.id,
                spec.replicas,
                target.epoch,
                target.nodes.len()
            )));
        }
        let in_sync = self.in_sync();
        let mut conns = HashMap::new();
        for n in target.nodes.iter().map(|n| n.node) {
            if !in_sync.contains(&n) {
                let fence = Request::Fence {
                    volume: spec.id.clone(),
                    epoch: spec.epoch,
                };
                match self.storage.call_traced(n, &fence).await? {
                    (Response::Number(_), conn) => {
                        conns.insert(n, conn);
                    }
                    (other, _) => {
                        return Err(IoError::Failed(format!(
                            "storage node {n} answered a fence with {other:?}"
                        )))
                    }
                }
            }
            let hold = Request::Hold {
                volume: spec.id.clone(),
                map: target.epoch,
            };
            self.call_checked(&spec, n, &hold).await?;
        }
        self.storage
            .sets
            .moving(&spec.id, spec.epoch, target.epoch)
            .await
            .map_err(IoError::Failed)?;
        self.replicas.lock().unwrap().moving = Some(Move {
            map: target.clone(),
            pending: HashSet::new(),
            failed: HashSet::new(),
            conns,
        });
        let copied = match self.copy_for_move(&spec, &target, throttle, progress).await {
            Ok(n) => n,
            Err(e) => {
                self.replicas.lock().unwrap().moving = None;
                return Err(e);
            }
        };
        if let Err(e) = self
            .storage
            .sets
            .moved(&spec.id, spec.epoch, target.epoch)
            .await
        {
            self.replicas.lock().unwrap().moving = None;
            return Err(IoError::Failed(format!(
                "cannot record that volume {} uses storage map {}: {e}",
                spec.id, target.epoch
            )));
        }
        let switched = self.switch_map(target);
        let failed = {
            let mut r = self.replicas.lock().unwrap();
            let m = r.moving.take();
            let failed: Vec<u64> = m
                .map(|m| m.failed.into_iter().collect())
                .unwrap_or_default();
            r.dropped.extend(failed.iter().copied());
            failed
        };
        // A new node that failed a write after the last check.
        self.drop_replicas(&switched, failed).await?;
        tracing::info!(volume = %spec.id, "moved to storage map {} ({copied} bytes copied)", switched.map.epoch);
        Ok(copied)
    }

    /// Makes the handle use the map the state now records for it: every
    /// node of it in sync. The spec changes before the move stops sending
    /// writes to the new nodes (see `mutate`).
    fn switch_map(&self, target: Arc<StorageMap>) -> Arc<VolumeSpec> {
        let mut spec = (*self.spec()).clone();
        spec.in_sync = target.nodes.iter().map(|n| n.node).collect();
        spec.map = target;
        let spec = Arc::new(spec);
        *self.spec.write().unwrap() = spec.clone();
        let mut r = self.replicas.lock().unwrap();
        r.dropped.clear();
        r.joined.clear();
        if let Some(m) = r.moving.as_ref() {
            let conns: Vec<(u64, u64)> = m.conns.iter().map(|(n, c)| (*n, *c)).collect();
            r.conns.extend(conns);
        }
        spec
    }

    /// Copies every object the new map places on a node without an
    /// in-sync copy of it. Returns the bytes copied.
    async fn copy_for_move(
        &self,
        spec: &VolumeSpec,
        target: &StorageMap,
        throttle: &Throttle,
        progress: &Progress,
    ) -> Result<u64, IoError> {
        let in_sync = self.in_sync();
        let mut listed = self.in_sync_members(spec);
        for n in &target.nodes {
            if !listed.contains(&n.node) {
                listed.push(n.node);
            }
        }
        let mut indexes = self.indexes_on(spec, &listed).await?;
        let live = |index: u64, in_sync: &[u64]| -> Vec<u64> {
            spec.map
                .place(&spec.id, index, spec.replicas)
                .into_iter()
                .filter(|n| in_sync.contains(n))
                .collect()
        };
        indexes.retain(|i| {
            let have = live(*i, &in_sync);
            target
                .place(&spec.id, *i, spec.replicas)
                .iter()
                .any(|n| !have.contains(n))
        });
        progress
            .total_bytes
            .fetch_add(indexes.len() as u64 * spec.object_size, Ordering::Relaxed);
        match self.replicas.lock().unwrap().moving.as_mut() {
            Some(m) => m.pending.extend(indexes.iter().copied()),
            None => return Err(self.move_interrupted(spec)),
        }
        let mut copied_bytes = 0;
        for index in indexes {
            // Copied first without the object's lock, so that its writes
            // go on meanwhile; then again under the lock, which copies
            // nothing unless a write changed the source since.
            self.still_moving(spec)?;
            let unlocked = self.copy_to_new(spec, target, index).await?;
            let lock = self.lock_for(index);
            let exclusive = lock.lock(ALL, true).await;
            self.still_moving(spec)?;
            let locked = self.copy_to_new(spec, target, index).await?;
            progress
                .done_bytes
                .fetch_add(spec.object_size, Ordering::Relaxed);
            if let Some(m) = self.replicas.lock().unwrap().moving.as_mut() {
                m.pending.remove(&index);
            }
            // Paced with the object's writes let through.
            drop(exclusive);
            if unlocked || locked {
                copied_bytes += spec.object_size;
                progress
                    .copied_bytes
                    .fetch_add(spec.object_size, Ordering::Relaxed);
                throttle.take(spec.object_size).await;
            }
        }
        Ok(copied_bytes)
    }

    /// Fails when the move was interrupted or a new node failed a write.
    fn still_moving(&self, spec: &VolumeSpec) -> Result<(), IoError> {
        match self.replicas.lock().unwrap().moving.as_ref() {
            None => Err(self.move_interrupted(spec)),
            Some(m) if !m.failed.is_empty() => Err(IoError::Failed(format!(
                "nodes {:?} failed a write while volume {} was moving to them",
                m.failed, spec.id
            ))),
            Some(_) => Ok(()),
        }
    }

    /// Copies object `index` from an in-sync replica to each node `target`
    /// places it on that holds no in-sync copy and whose copy differs.
    /// Returns whether it copied anything.
    async fn copy_to_new(
        &self,
        spec: &VolumeSpec,
        target: &StorageMap,
        index: u64,
    ) -> Result<bool, IoError> {
        let in_sync = self.in_sync();
        let have: Vec<u64> = spec
            .map
            .place(&spec.id, index, spec.replicas)
            .into_iter()
            .filter(|n| in_sync.contains(n))
            .collect();
        let source = self
            .storage
            .readable(spec, index, &in_sync)
            .first()
            .copied()
            .ok_or_else(|| self.degraded(spec, index, &[]))?;
        let want = self.stat(spec, source, index).await?;
        let mut copied = false;
        for node in target.place(&spec.id, index, spec.replicas) {
            if have.contains(&node) {
                continue;
            }
            if self.stat(spec, node, index).await? != want {
                self.copy_object(spec, index, source, node).await?;
                copied = true;
            }
        }
        Ok(copied)
    }

    fn move_interrupted(&self, spec: &VolumeSpec) -> IoError {
        IoError::Failed(format!(
            "the move of volume {} was interrupted (another writer took it over)",
            spec.id
        ))
    }

    /// A write or flush failed on a node the volume is moving to.
    pub(super) fn abort_move(&self, node: u64) {
        if let Some(m) = self.replicas.lock().unwrap().moving.as_mut() {
            m.failed.insert(node);
        }
    }

    /// Whether `node`, a node the volume is moving to, answered on another
    /// connection than it was fenced on (then the move fails: it may have
    /// restarted and lost copies it had not synced).
    pub(super) fn move_target_reconnected(&self, node: u64, conn: u64) -> bool {
        let mut r = self.replicas.lock().unwrap();
        let Some(m) = r.moving.as_mut() else {
            return false;
        };
        if m.conns.get(&node).is_some_and(|c| *c != conn) {
            m.failed.insert(node);
            return true;
        }
        false
    }
}
