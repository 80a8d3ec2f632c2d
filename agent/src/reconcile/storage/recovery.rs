//! Storage that heals itself: the leader's failure detection (a storage
//! node unheard for [`DOWN_AFTER`] is `down`; down for the configured
//! `down_out_after`, `out`; heard again, `in`), the movers that bring each
//! volume to the current storage map (re-replication, rebalancing,
//! draining), the jobs they report, and the removal of copies no map
//! places here any more.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use storage::{Progress, StorageMap, Throttle};

use super::BlockStore;
use crate::cluster::join::now_ms;
use crate::cluster::node::ClusterNode;
use crate::state::storage::{StorageJob, StorageNodeState};
use crate::state::volumes::VolumeRecord;
use crate::state::Command;

/// A storage node the leader has not heard from for this long is `down`.
pub const DOWN_AFTER: Duration = Duration::from_secs(5);
/// How often copies no map places here are looked for (each must be seen
/// misplaced twice, this far apart, before it goes: every node has long
/// applied the move by then).
const MISPLACED_EVERY: Duration = Duration::from_secs(15);
/// A failed move is tried again after this long.
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// This node's recovery work.
pub struct Recovery {
    /// Paces every copy this node makes for recovery.
    pub throttle: Arc<Throttle>,
    /// Running jobs by volume id.
    jobs: std::sync::Mutex<HashMap<String, Job>>,
    /// Volumes whose move is running (`None`) or failed (when).
    moves: std::sync::Mutex<HashMap<String, Option<Instant>>>,
    /// Objects found misplaced at the last look, with the map that said so.
    misplaced: std::sync::Mutex<HashMap<(String, u64), u64>>,
    last_misplaced: std::sync::Mutex<Option<Instant>>,
    /// When volumes were last looked through for moves (and the map epoch
    /// then) and for scrubs: every volume is read, so not on every pass.
    last_move_scan: std::sync::Mutex<Option<(Instant, u64)>>,
    last_scrub_scan: std::sync::Mutex<Option<(Instant, u64)>>,
    /// Whether the last report said some job was running.
    reported_busy: std::sync::atomic::AtomicBool,
    last_report: std::sync::Mutex<Option<Instant>>,
}

struct Job {
    kind: &'static str,
    progress: Arc<Progress>,
    started_at_ms: u64,
}

impl Recovery {
    /// Recovery paced by `throttle` (the block store's).
    pub fn new(throttle: Arc<Throttle>) -> Self {
        throttle.set_rate(crate::state::storage::StorageConfig::default().recovery_rate_bytes);
        Self {
            throttle,
            jobs: Default::default(),
            moves: Default::default(),
            misplaced: Default::default(),
            last_misplaced: Default::default(),
            last_move_scan: Default::default(),
            last_scrub_scan: Default::default(),
            reported_busy: Default::default(),
            last_report: Default::default(),
        }
    }
}

impl Recovery {
    /// Registers a running job; it is reported until the guard drops.
    pub fn job(self: &Arc<Self>, volume: &str, kind: &'static str) -> (JobGuard, Arc<Progress>) {
        let progress = Arc::new(Progress::default());
        self.jobs.lock().unwrap().insert(
            volume.to_string(),
            Job {
                kind,
                progress: progress.clone(),
                started_at_ms: now_ms(),
            },
        );
        (
            JobGuard {
                recovery: Arc::downgrade(self),
                volume: volume.to_string(),
            },
            progress,
        )
    }

    fn snapshot(&self) -> Vec<StorageJob> {
        let mut jobs: Vec<StorageJob> = self
            .jobs
            .lock()
            .unwrap()
            .iter()
            .map(|(volume, j)| StorageJob {
                kind: j.kind.to_string(),
                volume: volume.clone(),
                done_bytes: j.progress.done_bytes.load(Ordering::Relaxed),
                total_bytes: j.progress.total_bytes.load(Ordering::Relaxed),
                copied_bytes: j.progress.copied_bytes.load(Ordering::Relaxed),
                started_at_ms: j.started_at_ms,
                node: 0,
            })
            .collect();
        jobs.sort_by(|a, b| a.volume.cmp(&b.volume));
        jobs
    }
}

/// Removes its job from the report when dropped.
pub struct JobGuard {
    recovery: Weak<Recovery>,
    volume: String,
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        if let Some(r) = self.recovery.upgrade() {
            r.jobs.lock().unwrap().remove(&self.volume);
        }
    }
}

/// What a move does, for the operator: `re-replication` when the volume's
/// map holds a node that is out or gone, `drain` when one is draining,
/// else `rebalance`.
pub fn move_kind(node: &ClusterNode, v: &VolumeRecord) -> &'static str {
    let (Ok(Some(map)), Ok(nodes)) = (node.state.storage_map(v.map_epoch), node.state.nodes())
    else {
        return "rebalance";
    };
    let state = |id: u64| nodes.iter().find(|n| n.id == id).map(|n| n.storage_state);
    let states: Vec<Option<StorageNodeState>> = map.nodes.iter().map(|n| state(n.node)).collect();
    if states
        .iter()
        .any(|s| matches!(s, None | Some(StorageNodeState::Out)))
    {
        "re-replication"
    } else if states.contains(&Some(StorageNodeState::Draining)) {
        "drain"
    } else {
        "rebalance"
    }
}

impl BlockStore {
    /// Starts moving the volumes this node is the mover of to the current
    /// storage map, one volume at a time (with resyncs). Nothing moves
    /// while a node of the current map is down: copies to it would fail.
    pub(super) fn start_moves(self: &Arc<Self>, node: &ClusterNode) {
        let Ok(current) = node.state.current_storage_map() else {
            return;
        };
        {
            // At once when the map changed, else every 5 s (retries).
            let mut last = self.recovery.last_move_scan.lock().unwrap();
            if last.is_some_and(|(at, epoch)| {
                epoch == current.epoch && at.elapsed() < Duration::from_secs(5)
            }) {
                return;
            }
            *last = Some((Instant::now(), current.epoch));
        }
        let (Ok(volumes), Ok(nodes)) = (node.state.all_volumes(), node.state.nodes()) else {
            return;
        };
        let down = current.nodes.iter().any(|m| {
            nodes
                .iter()
                .any(|n| n.id == m.node && n.storage_state == StorageNodeState::Down)
        });
        if down {
            return;
        }
        let current = Arc::new(current);
        let Ok(stewards) = node.state.stewards() else {
            return;
        };
        for v in volumes {
            if v.map_epoch >= current.epoch || stewards.mover_of(&v).ok().flatten() != Some(node.id)
            {
                continue;
            }
            {
                let mut moves = self.recovery.moves.lock().unwrap();
                match moves.get(&v.id) {
                    Some(None) => continue,
                    Some(Some(failed)) if failed.elapsed() < RETRY_AFTER => continue,
                    _ => {}
                }
                moves.insert(v.id.clone(), None);
            }
            let blocks = self.clone();
            let target = current.clone();
            let kind = move_kind(node, &v);
            tokio::spawn(async move {
                let result = blocks.move_volume(&v, target, kind).await;
                let mut moves = blocks.recovery.moves.lock().unwrap();
                match result {
                    Ok(()) => {
                        moves.remove(&v.id);
                    }
                    Err(e) => {
                        tracing::warn!(volume = %v.id, "{kind} did not finish: {e}; trying again in {} s", RETRY_AFTER.as_secs());
                        moves.insert(v.id.clone(), Some(Instant::now()));
                    }
                }
            });
        }
    }

    async fn move_volume(
        &self,
        v: &VolumeRecord,
        target: Arc<StorageMap>,
        kind: &'static str,
    ) -> Result<(), String> {
        let _turn = self.resync_turn.lock().await;
        let (_, handle) = self
            .open_for_write(&v.id)
            .await
            .map_err(|e| e.to_string())?;
        let (_job, progress) = self.recovery.job(&v.id, kind);
        tracing::info!(volume = %v.id, "{kind}: moving from storage map {} to {}", v.map_epoch, target.epoch);
        let started = Instant::now();
        let copied = handle
            .migrate(target.clone(), &self.recovery.throttle, &progress)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(
            volume = %v.id,
            "{kind}: volume now on storage map {} ({copied} bytes copied in {:.1} s)",
            target.epoch,
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// Starts the scrubs that are due on the volumes this node is the
    /// steward of (one job at a time on the node, with moves and resyncs):
    /// deep every `scrub_interval`, light every seventh of it (at least a
    /// minute), or when an operator asked. A volume still to move is moved
    /// first.
    pub(super) fn start_scrubs(self: &Arc<Self>, node: &ClusterNode) {
        {
            // At once when an operator asked for a scrub, else every 30 s.
            let asked = node.state.scrub_generation().unwrap_or(0);
            let mut last = self.recovery.last_scrub_scan.lock().unwrap();
            if last.is_some_and(|(at, generation)| {
                generation == asked && at.elapsed() < Duration::from_secs(30)
            }) {
                return;
            }
            *last = Some((Instant::now(), asked));
        }
        let (Ok(volumes), Ok(current), Ok(config)) = (
            node.state.all_volumes(),
            node.state.current_storage_map(),
            node.state.storage_config(),
        ) else {
            return;
        };
        let now = now_ms();
        let deep_every = config.scrub_interval_s.saturating_mul(1000);
        let light_every = (deep_every / 7).max(60_000);
        let Ok(stewards) = node.state.stewards() else {
            return;
        };
        for v in volumes {
            if v.map_epoch < current.epoch || v.moving_to.is_some() {
                continue;
            }
            let deep = v.scrub_requested == Some(true)
                || now >= v.deep_scrubbed_at_ms.max(v.created_at_ms) + deep_every;
            let light = v.scrub_requested == Some(false)
                || now >= v.scrubbed_at_ms.max(v.created_at_ms) + light_every;
            if (!deep && !light) || stewards.steward_of(&v).ok().flatten() != Some(node.id) {
                continue;
            }
            let key = format!("scrub {}", v.id);
            {
                let mut moves = self.recovery.moves.lock().unwrap();
                match moves.get(&key) {
                    Some(None) => continue,
                    Some(Some(failed)) if failed.elapsed() < RETRY_AFTER => continue,
                    _ => {}
                }
                moves.insert(key.clone(), None);
            }
            let blocks = self.clone();
            tokio::spawn(async move {
                let result = blocks.scrub_volume(&v, deep).await;
                let mut moves = blocks.recovery.moves.lock().unwrap();
                match result {
                    Ok(()) => {
                        moves.remove(&key);
                    }
                    Err(e) => {
                        tracing::warn!(volume = %v.id, "scrub did not finish: {e}; trying again in {} s", RETRY_AFTER.as_secs());
                        moves.insert(key, Some(Instant::now()));
                    }
                }
            });
        }
    }

    async fn scrub_volume(&self, v: &VolumeRecord, deep: bool) -> Result<(), String> {
        let _turn = self.resync_turn.lock().await;
        let (_, handle) = self
            .open_for_write(&v.id)
            .await
            .map_err(|e| e.to_string())?;
        let kind = if deep { "deep-scrub" } else { "scrub" };
        let (_job, progress) = self.recovery.job(&v.id, kind);
        let report = handle
            .scrub(deep, &self.recovery.throttle, &progress)
            .await
            .map_err(|e| e.to_string())?;
        let node = self.node().map_err(|e| e.to_string())?;
        let command = Command::UpdateReplicas {
            volume_id: v.id.clone(),
            epoch: handle.spec().epoch,
            change: crate::state::volumes::ReplicaChange::Scrubbed {
                deep,
                at_ms: now_ms(),
                repairs: report.repairs.len() as u64,
                unrepairable: report.unrepairable.len() as u64,
            },
        };
        node.write(&command)
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.message)?;
        if report.repairs.is_empty() && report.unrepairable.is_empty() {
            tracing::info!(volume = %v.id, "{kind}: {} objects checked, all copies intact", report.objects);
        } else {
            tracing::warn!(
                volume = %v.id,
                "{kind}: {} objects checked, {} damaged copies repaired {:?}, {} objects with no intact copy {:?}",
                report.objects,
                report.repairs.len(),
                report.repairs,
                report.unrepairable.len(),
                report.unrepairable
            );
        }
        Ok(())
    }

    /// Reports this node's running jobs through Raft: every 3 s while some
    /// run, and once when the last one ends.
    pub(super) async fn report_jobs(&self, node: &ClusterNode) {
        let jobs = self.recovery.snapshot();
        let busy = !jobs.is_empty();
        let was_busy = self.recovery.reported_busy.load(Ordering::Relaxed);
        let due = {
            let last = self.recovery.last_report.lock().unwrap();
            last.is_none_or(|at| at.elapsed() >= Duration::from_secs(3))
        };
        if !(busy && due) && busy == was_busy {
            return;
        }
        let command = Command::ReportStorageJobs {
            node: node.id,
            jobs,
        };
        if let Ok(Ok(_)) = node.write(&command).await {
            self.recovery.reported_busy.store(busy, Ordering::Relaxed);
            *self.recovery.last_report.lock().unwrap() = Some(Instant::now());
        }
    }

    /// Removes copies that no storage map places here any more (this node
    /// left a volume's map, or returned after it was declared out), once
    /// each was seen misplaced twice [`MISPLACED_EVERY`] apart with the
    /// volume on the same map and not moving. The store refuses when a
    /// writer has since announced a move that may want the copy here.
    pub(super) async fn drop_misplaced(&self, node: &ClusterNode) {
        {
            let mut last = self.recovery.last_misplaced.lock().unwrap();
            if last.is_some_and(|at| at.elapsed() < MISPLACED_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        if node.linearizable_read().await.is_err() {
            return;
        }
        let store = self.storage.store.clone();
        let mut found: HashMap<(String, u64), u64> = HashMap::new();
        for id in store.volumes() {
            let Ok(Some(v)) = node.state.volume_by_id(&id) else {
                continue;
            };
            if v.moving_to.is_some() {
                continue;
            }
            let Ok(Some(map)) = node.state.storage_map(v.map_epoch) else {
                continue;
            };
            let replicas = usize::from(v.replicas);
            let listed = {
                let store = store.clone();
                let id = id.clone();
                tokio::task::spawn_blocking(move || store.list(&id)).await
            };
            let Ok(Ok(objects)) = listed else { continue };
            for o in objects {
                if !map.place(&id, o.index, replicas).contains(&node.id) {
                    found.insert((id.clone(), o.index), map.epoch);
                }
            }
        }
        let doomed: Vec<((String, u64), u64)> = {
            let mut before = self.recovery.misplaced.lock().unwrap();
            let doomed = found
                .iter()
                .filter(|(k, map)| before.get(*k) == Some(*map))
                .map(|(k, map)| (k.clone(), *map))
                .collect();
            *before = found;
            doomed
        };
        if doomed.is_empty() {
            return;
        }
        let _ = tokio::task::spawn_blocking(move || {
            let mut dropped: HashMap<String, usize> = HashMap::new();
            for ((volume, index), map) in doomed {
                match store.drop_misplaced(&volume, index, map) {
                    Ok(true) => *dropped.entry(volume).or_default() += 1,
                    Ok(false) => {}
                    Err(e) => tracing::warn!(volume = %volume, "cannot remove misplaced object {index}: {e}"),
                }
            }
            for (volume, n) in dropped {
                tracing::info!(volume = %volume, "removed {n} objects no storage map places on this node any more");
            }
        })
        .await;
    }
}

/// The leader's failure detection for storage nodes, checked every second:
/// `in` → `down` when unheard for [`DOWN_AFTER`] or when the node reports
/// that its block store cannot serve; `down` → `out` after the
/// configured `down_out_after`; `down` or `out` → `in` when heard again.
/// Only transitions are written through Raft. A node that just became
/// leader gives every node [`DOWN_AFTER`] to be heard first.
pub async fn watch_storage_nodes(node: Weak<ClusterNode>) {
    let mut leader_since: Option<Instant> = None;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(node) = node.upgrade() else { return };
        if node.leader() != Some(node.id) {
            leader_since = None;
            continue;
        }
        let since = *leader_since.get_or_insert_with(Instant::now);
        let (Ok(nodes), Ok(config)) = (node.state.nodes(), node.state.storage_config()) else {
            continue;
        };
        let now = now_ms();
        for n in nodes.iter() {
            let Some(storage) = &n.storage else { continue };
            // A node whose block store cannot serve (a disk missing) is
            // down however well it answers Raft.
            let heard = storage.unavailable.is_none()
                && (n.id == node.id
                    || since.elapsed() < DOWN_AFTER
                    || node.peers.last_heard(n.id).is_some_and(|d| d < DOWN_AFTER));
            let next = match (n.storage_state, heard) {
                (StorageNodeState::In, false) => Some(StorageNodeState::Down),
                (StorageNodeState::Down | StorageNodeState::Out, true) => {
                    Some(StorageNodeState::In)
                }
                (StorageNodeState::Down, false)
                    if now.saturating_sub(n.storage_state_since_ms)
                        >= config.down_out_after_s.saturating_mul(1000) =>
                {
                    Some(StorageNodeState::Out)
                }
                _ => None,
            };
            let Some(state) = next else { continue };
            let command = Command::SetStorageNodeState {
                id: n.id,
                state,
                at_ms: now,
            };
            match node.write(&command).await {
                Ok(Ok(_)) => match state {
                    StorageNodeState::Down if storage.unavailable.is_some() => tracing::warn!(
                        "storage node {} ({}) cannot serve its block store ({}): down; its objects get new replicas if it stays down {} s",
                        n.id, n.name, storage.unavailable.as_deref().unwrap_or_default(), config.down_out_after_s
                    ),
                    StorageNodeState::Down => tracing::warn!(
                        "storage node {} ({}) has not answered for {} s: down; its objects get new replicas if it stays down {} s",
                        n.id, n.name, DOWN_AFTER.as_secs(), config.down_out_after_s
                    ),
                    StorageNodeState::Out => tracing::warn!(
                        "storage node {} ({}) has been down for {} s: declared out; its objects get new replicas elsewhere",
                        n.id, n.name, config.down_out_after_s
                    ),
                    _ => tracing::info!("storage node {} ({}) answers again: in", n.id, n.name),
                },
                Ok(Err(e)) => tracing::warn!("cannot change storage node {}'s state: {}", n.id, e.message),
                Err(e) => tracing::debug!("storage node {}'s state not changed yet: {e}", n.id),
            }
        }
    }
}

/// Tells the cluster that this node's block store cannot serve, and why
/// (a disk missing, say), so that the leader counts it down and its objects
/// get new replicas after `down_out_after`. Written once the node's
/// storage record exists and differs, retried every 5 s until it is; a
/// node that never served block storage has nothing to report.
pub async fn report_unavailable(node: Weak<ClusterNode>, reason: String) {
    loop {
        let Some(node) = node.upgrade() else { return };
        let recorded = node.own_record().and_then(|n| n.storage);
        let Some(recorded) = recorded else { return };
        if recorded.unavailable.as_deref() == Some(reason.as_str()) {
            return;
        }
        let command = Command::SetNodeStorage {
            id: node.id,
            storage: crate::state::volumes::NodeStorage {
                unavailable: Some(reason.clone()),
                ..recorded
            },
        };
        match node.write(&command).await {
            Ok(Ok(_)) => return,
            Ok(Err(e)) => tracing::warn!(
                "cannot report that this node's block store does not serve: {}",
                e.message
            ),
            Err(e) => tracing::debug!("this node's block store's state not reported yet: {e}"),
        }
        drop(node);
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}
