//! The storage cluster as a whole: its settings, each node's storage state
//! (`in`, `down`, `out`, `draining`), the storage map those states make,
//! the recovery jobs nodes report, and the health an operator reads.
//!
//! The current storage map holds every node that registered a block store
//! and is `in` or `down`: a down node keeps its place (its replicas are out
//! of sync until it returns or is declared out), an `out` or `draining`
//! node has none. Every change of that set is a new map epoch; volumes
//! move to it (re-replication, rebalancing, draining) through their writer.

use allod_raft::{KvRead, KvWrite, NodeId};
use serde::{Deserialize, Serialize};
use storage::{MapNode, StorageMap};

use super::nodes::NodeRecord;
use super::volumes::{VolumeRecord, KEY_STORAGE_MAP, PREFIX_STORAGE_MAPS};
use super::{domain, get_json, put_json, ErrorCode, Outcome, ReadError, StateView, PREFIX_NODES};

type KvResult<T> = Result<T, allod_raft::KvError>;

pub const KEY_STORAGE_CONFIG: &str = "storage/config";
/// Moves on with every scrub an operator asks for.
pub const KEY_SCRUB_GENERATION: &str = "storage/scrub_generation";
/// `storage/jobs/<node>`: the recovery jobs a node last reported.
pub const PREFIX_STORAGE_JOBS: &str = "storage/jobs/";

/// Cluster-wide storage settings (`allod storage config`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StorageConfig {
    /// Seconds a node may stay down before it is declared out and every
    /// object it held gets a new replica elsewhere.
    #[schema(minimum = 1, maximum = 31_536_000)]
    pub down_out_after_s: u64,
    /// Bytes a second each node may copy for recovery and rebalancing
    /// (0: unlimited).
    #[schema(maximum = 1_099_511_627_776_u64)]
    pub recovery_rate_bytes: u64,
    /// Seconds between two deep scrubs of a replica.
    #[schema(minimum = 60, maximum = 31_536_000)]
    pub scrub_interval_s: u64,
}

/// The longest `down_out_after` and `scrub_interval`: a year.
pub const MAX_INTERVAL_S: u64 = 365 * 86_400;
/// The highest recovery rate other than unlimited (1 TiB/s).
pub const MAX_RECOVERY_RATE: u64 = 1 << 40;

impl StorageConfig {
    /// What is wrong with these settings, said so an operator can fix it.
    pub fn check(&self) -> Result<(), String> {
        if self.down_out_after_s == 0 || self.down_out_after_s > MAX_INTERVAL_S {
            return Err(format!(
                "down_out_after {} s is out of range: give from one second to a year (e.g. --down-out-after 10m)",
                self.down_out_after_s
            ));
        }
        if self.recovery_rate_bytes != 0 && self.recovery_rate_bytes < 1 << 20 {
            return Err(format!(
                "recovery_rate {} bytes a second would take days to heal a disk; give at least 1M (e.g. --recovery-rate 200M), or 0 for unlimited",
                self.recovery_rate_bytes
            ));
        }
        if self.recovery_rate_bytes > MAX_RECOVERY_RATE {
            return Err(format!(
                "recovery_rate {} bytes a second is more than any node can copy; give at most 1T, or 0 for unlimited",
                self.recovery_rate_bytes
            ));
        }
        if self.scrub_interval_s < 60 || self.scrub_interval_s > MAX_INTERVAL_S {
            return Err(format!(
                "scrub_interval {} s is out of range: give from a minute to a year (e.g. --scrub-interval 7d)",
                self.scrub_interval_s
            ));
        }
        Ok(())
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            down_out_after_s: 600,
            recovery_rate_bytes: 200 << 20,
            scrub_interval_s: 7 * 86_400,
        }
    }
}

/// A node's place in the storage cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StorageNodeState {
    /// Holds replicas and takes new ones.
    #[default]
    In,
    /// Unreachable: keeps its place in the map, its replicas out of sync,
    /// until it returns or is declared out.
    Down,
    /// Declared out: its objects were given new replicas elsewhere.
    Out,
    /// Leaving: its objects move elsewhere before it is removed.
    Draining,
}

impl StorageNodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            StorageNodeState::In => "in",
            StorageNodeState::Down => "down",
            StorageNodeState::Out => "out",
            StorageNodeState::Draining => "draining",
        }
    }

    /// Whether the node has a place in the current storage map.
    pub fn placed(self) -> bool {
        matches!(self, StorageNodeState::In | StorageNodeState::Down)
    }
}

/// One recovery job a node runs, as it reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StorageJob {
    /// `resync`, `re-replication`, `rebalance`, `drain` or `scrub`.
    pub kind: String,
    /// The volume's id.
    pub volume: String,
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Bytes actually copied so far.
    #[serde(default)]
    pub copied_bytes: u64,
    pub started_at_ms: u64,
    /// The node running it (filled in when read).
    #[serde(default)]
    pub node: NodeId,
}

/// A change to the storage settings: each field given replaces the
/// current value, the others stay.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StorageConfigChange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 31_536_000)]
    pub down_out_after_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 1_099_511_627_776_u64)]
    pub recovery_rate_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 60, maximum = 31_536_000)]
    pub scrub_interval_s: Option<u64>,
}

pub(super) fn set_storage_config(
    kv: &mut KvWrite<'_>,
    change: StorageConfigChange,
) -> KvResult<Outcome> {
    let mut config = get_json::<StorageConfig>(kv, KEY_STORAGE_CONFIG)?.unwrap_or_default();
    if let Some(v) = change.down_out_after_s {
        config.down_out_after_s = v;
    }
    if let Some(v) = change.recovery_rate_bytes {
        config.recovery_rate_bytes = v;
    }
    if let Some(v) = change.scrub_interval_s {
        config.scrub_interval_s = v;
    }
    if let Err(why) = config.check() {
        return Ok(Err(domain(ErrorCode::InvalidArgument, why)));
    }
    put_json(kv, KEY_STORAGE_CONFIG, &config)?;
    Ok(Ok(serde_json::to_value(&config).expect("serialisable")))
}

/// Records a node's storage state (chosen by the leader's failure
/// detection, or by a drain) and makes the storage map follow.
pub(super) fn set_storage_node_state(
    kv: &mut KvWrite<'_>,
    id: NodeId,
    state: StorageNodeState,
    at_ms: u64,
) -> KvResult<Outcome> {
    let outcome = super::nodes::update_node(kv, id, |_, node| {
        if node.storage_state != state {
            node.storage_state = state;
            node.storage_state_since_ms = at_ms;
        }
        Ok(Ok(()))
    })?;
    if outcome.is_ok() {
        recompute_map(kv)?;
    }
    Ok(outcome)
}

/// Makes the current storage map hold exactly the nodes with a registered
/// block store that are `in` or `down`, as a new epoch when that changes
/// (a node keeps the weight it had in the map).
pub(super) fn recompute_map(kv: &mut KvWrite<'_>) -> KvResult<()> {
    let current = get_json::<StorageMap>(kv, KEY_STORAGE_MAP)?.unwrap_or_default();
    let mut nodes = Vec::new();
    for (_, bytes) in kv.scan(PREFIX_NODES)? {
        let Ok(node) = serde_json::from_slice::<NodeRecord>(&bytes) else {
            continue;
        };
        let Some(storage) = node.storage.as_ref() else {
            continue;
        };
        if !node.storage_state.placed() {
            continue;
        }
        let weight = current
            .nodes
            .iter()
            .find(|n| n.node == node.id)
            .map_or((storage.capacity_bytes >> 30).max(1), |n| n.weight);
        nodes.push(MapNode {
            node: node.id,
            weight,
            failure_domain: storage.failure_domain.clone(),
        });
    }
    nodes.sort_by_key(|n| n.node);
    if nodes != current.nodes {
        let map = StorageMap {
            epoch: current.epoch + 1,
            nodes,
        };
        put_json(kv, KEY_STORAGE_MAP, &map)?;
        put_json(kv, &format!("{PREFIX_STORAGE_MAPS}{:020}", map.epoch), &map)?;
    }
    Ok(())
}

/// Asks for a scrub of each volume (deep, or light).
pub(super) fn request_scrub(
    kv: &mut KvWrite<'_>,
    volume_ids: Vec<String>,
    deep: bool,
) -> KvResult<Outcome> {
    let mut asked = 0;
    for id in &volume_ids {
        let Some(path) =
            get_json::<String>(kv, &format!("{}{id}", super::volumes::PREFIX_VOLUME_IDS))?
        else {
            continue;
        };
        let key = format!("{}{path}", super::PREFIX_VOLUMES);
        let Some(mut v) = get_json::<VolumeRecord>(kv, &key)? else {
            continue;
        };
        v.scrub_requested = Some(deep || v.scrub_requested == Some(true));
        put_json(kv, &key, &v)?;
        asked += 1;
    }
    let generation = get_json::<u64>(kv, KEY_SCRUB_GENERATION)?.unwrap_or(0) + 1;
    put_json(kv, KEY_SCRUB_GENERATION, &generation)?;
    Ok(Ok(serde_json::json!({ "volumes": asked, "deep": deep })))
}

pub(super) fn report_jobs(
    kv: &mut KvWrite<'_>,
    node: NodeId,
    jobs: Vec<StorageJob>,
) -> KvResult<Outcome> {
    let key = format!("{PREFIX_STORAGE_JOBS}{node:020}");
    if jobs.is_empty() {
        kv.delete(&key)?;
    } else {
        put_json(kv, &key, &jobs)?;
    }
    Ok(Ok(serde_json::Value::Null))
}

/// What `allod storage status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StorageStatus {
    /// `ok`; `degraded` (some object has fewer in-sync replicas than
    /// wanted and nothing is repairing it); `recovering` (data is being
    /// copied: resync, re-replication, rebalancing or draining).
    pub health: String,
    /// The current storage map's epoch.
    pub map_epoch: u64,
    pub nodes: Vec<StorageNodeStatus>,
    /// Object slots (of the volumes' address space) with a replica on a
    /// node that is out of sync, down or out.
    pub objects_degraded: u64,
    /// Volumes (`project/name`) with such objects.
    pub volumes_degraded: Vec<String>,
    /// Volumes whose objects are not all where the current map places them.
    pub volumes_to_move: u64,
    /// Bytes the running jobs still have to look at.
    pub bytes_to_move: u64,
    /// Bytes a second the running jobs copied, on average since they started.
    pub rate_bytes_per_s: u64,
    /// Seconds until the running jobs finish at that rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<u64>,
    pub jobs: Vec<StorageJob>,
    pub config: StorageConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StorageNodeStatus {
    pub id: NodeId,
    pub name: String,
    /// `in`, `down`, `out` or `draining`.
    #[schema(value_type = String)]
    pub state: StorageNodeState,
    /// Since when (milliseconds since the epoch; 0: since it joined).
    pub since_ms: u64,
    pub used_bytes: u64,
    pub capacity_bytes: u64,
    pub failure_domain: String,
    /// Why its block store does not serve, when it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}

impl StateView {
    pub fn storage_config(&self) -> Result<StorageConfig, ReadError> {
        Ok(self.get(KEY_STORAGE_CONFIG)?.unwrap_or_default())
    }

    /// Moves on with every scrub an operator asks for.
    pub fn scrub_generation(&self) -> Result<u64, ReadError> {
        Ok(self.get(KEY_SCRUB_GENERATION)?.unwrap_or(0))
    }

    /// The map new volumes are placed with and old ones move to.
    pub fn current_storage_map(&self) -> Result<StorageMap, ReadError> {
        Ok(self.get(KEY_STORAGE_MAP)?.unwrap_or_default())
    }

    /// Every job every node reported, each with its node.
    pub fn storage_jobs(&self) -> Result<Vec<StorageJob>, ReadError> {
        let mut all = Vec::new();
        for (key, bytes) in self.reader.scan(PREFIX_STORAGE_JOBS)? {
            let node = key[PREFIX_STORAGE_JOBS.len()..].parse().unwrap_or(0);
            if let Ok(jobs) = serde_json::from_slice::<Vec<StorageJob>>(&bytes) {
                all.extend(jobs.into_iter().map(|j| StorageJob { node, ..j }));
            }
        }
        Ok(all)
    }

    /// The node that moves `volume` to the current storage map, if it must
    /// move: its steward.
    pub fn mover_of(&self, volume: &VolumeRecord) -> Result<Option<NodeId>, ReadError> {
        self.stewards()?.mover_of(volume)
    }

    /// The node that does a volume's background work: see [`Stewards`].
    pub fn steward_of(&self, volume: &VolumeRecord) -> Result<Option<NodeId>, ReadError> {
        self.stewards()?.steward_of(volume)
    }

    /// What deciding volumes' stewards needs, read once for many volumes.
    pub fn stewards(&self) -> Result<Stewards<'_>, ReadError> {
        Ok(Stewards {
            view: self,
            map: self.current_storage_map()?,
            states: self
                .nodes()?
                .into_iter()
                .map(|n| (n.id, n.storage_state))
                .collect(),
            vm_nodes: std::cell::OnceCell::new(),
        })
    }

    /// Volumes (`project/name`) still placed with a map that holds `node`.
    pub fn volumes_on(&self, node: NodeId) -> Result<Vec<VolumeRecord>, ReadError> {
        let mut on = Vec::new();
        for v in self.all_volumes()? {
            if let Some(map) = self.storage_map(v.map_epoch)? {
                if map.nodes.iter().any(|n| n.node == node) {
                    on.push(v);
                }
            }
        }
        Ok(on)
    }

    /// Volumes (`project/name`) with an object whose only in-sync copies
    /// are on `node`: removing that node while it cannot be read from
    /// loses those objects.
    pub fn only_copies_on(&self, node: NodeId) -> Result<Vec<String>, ReadError> {
        let mut lost = Vec::new();
        for v in self.volumes_on(node)? {
            let Some(map) = self.storage_map(v.map_epoch)? else {
                continue;
            };
            if v.object_size_bytes == 0 {
                continue;
            }
            let in_sync: Vec<NodeId> = if v.in_sync.is_empty() && v.out_of_sync.is_empty() {
                map.nodes.iter().map(|n| n.node).collect()
            } else {
                v.in_sync.clone()
            };
            let replicas = usize::from(v.replicas);
            let slots = v.size_bytes.div_ceil(v.object_size_bytes);
            let alone = (0..slots).any(|i| {
                map.place(&v.id, i, replicas)
                    .iter()
                    .filter(|n| in_sync.contains(n))
                    .all(|n| *n == node)
            });
            if alone {
                lost.push(format!("{}/{}", v.project, v.name));
            }
        }
        Ok(lost)
    }

    /// The storage cluster's health, use and work, as of the applied state.
    pub fn storage_status(&self, now_ms: u64) -> Result<StorageStatus, ReadError> {
        let nodes = self.nodes()?;
        let map = self.current_storage_map()?;
        let unhealthy: Vec<NodeId> = nodes
            .iter()
            .filter(|n| {
                matches!(
                    n.storage_state,
                    StorageNodeState::Down | StorageNodeState::Out
                )
            })
            .map(|n| n.id)
            .collect();
        let mut objects_degraded = 0;
        let mut volumes_degraded = Vec::new();
        let mut volumes_to_move = 0;
        let mut moving = false;
        for v in self.all_volumes()? {
            if v.map_epoch < map.epoch {
                volumes_to_move += 1;
            }
            moving |= v.moving_to.is_some() || !v.recovering.is_empty();
            let Some(vmap) = self.storage_map(v.map_epoch)? else {
                continue;
            };
            let bad: Vec<NodeId> = vmap
                .nodes
                .iter()
                .map(|n| n.node)
                .filter(|n| {
                    v.out_of_sync.contains(n)
                        || unhealthy.contains(n)
                        || !nodes.iter().any(|m| m.id == *n)
                })
                .collect();
            if bad.is_empty() || v.object_size_bytes == 0 {
                continue;
            }
            let slots = v.size_bytes.div_ceil(v.object_size_bytes);
            let replicas = usize::from(v.replicas);
            let n = (0..slots)
                .filter(|i| {
                    vmap.place(&v.id, *i, replicas)
                        .iter()
                        .any(|p| bad.contains(p))
                })
                .count() as u64;
            if n > 0 {
                objects_degraded += n;
                volumes_degraded.push(format!("{}/{}", v.project, v.name));
            }
        }
        let jobs = self.storage_jobs()?;
        let bytes_to_move: u64 = jobs
            .iter()
            .map(|j| j.total_bytes.saturating_sub(j.done_bytes))
            .sum();
        let rate_bytes_per_s: u64 = jobs
            .iter()
            .map(|j| {
                let secs = now_ms.saturating_sub(j.started_at_ms).max(1000) / 1000;
                j.done_bytes / secs
            })
            .sum();
        let eta_s = (bytes_to_move > 0 && rate_bytes_per_s > 0)
            .then(|| bytes_to_move.div_ceil(rate_bytes_per_s));
        let health = if !jobs.is_empty() || moving {
            "recovering"
        } else if objects_degraded > 0 {
            "degraded"
        } else if volumes_to_move > 0 {
            "recovering"
        } else {
            "ok"
        };
        Ok(StorageStatus {
            health: health.to_string(),
            map_epoch: map.epoch,
            nodes: nodes
                .iter()
                .filter_map(|n| {
                    let s = n.storage.as_ref()?;
                    Some(StorageNodeStatus {
                        id: n.id,
                        name: n.name.clone(),
                        state: n.storage_state,
                        since_ms: n.storage_state_since_ms,
                        used_bytes: s.used_bytes,
                        capacity_bytes: s.capacity_bytes,
                        failure_domain: s.failure_domain.clone(),
                        unavailable: s.unavailable.clone(),
                    })
                })
                .collect(),
            objects_degraded,
            volumes_degraded,
            volumes_to_move,
            bytes_to_move,
            rate_bytes_per_s,
            eta_s,
            jobs,
            config: self.storage_config()?,
        })
    }
}

/// Decides which node does a volume's background work (moves, scrubs) as
/// its writer, its *steward*: the node of the VM it is attached to, else
/// its writer's node, while that node is `in` or `draining` (a `down` one
/// is waited for: it may still hold the volume open); else the first `in`
/// node of the current map. None for an image's volume being imported.
pub struct Stewards<'a> {
    view: &'a StateView,
    pub map: StorageMap,
    states: std::collections::HashMap<NodeId, StorageNodeState>,
    /// VM id → its node, read the first time an attached volume needs it.
    vm_nodes: std::cell::OnceCell<std::collections::HashMap<String, NodeId>>,
}

impl Stewards<'_> {
    pub fn mover_of(&self, volume: &VolumeRecord) -> Result<Option<NodeId>, ReadError> {
        if volume.map_epoch >= self.map.epoch {
            return Ok(None);
        }
        self.steward_of(volume)
    }

    pub fn steward_of(&self, volume: &VolumeRecord) -> Result<Option<NodeId>, ReadError> {
        if volume.state == super::volumes::VolumeState::Importing {
            return Ok(None);
        }
        let mut claimants = Vec::new();
        if let Some(vm) = &volume.attached_to {
            if self.vm_nodes.get().is_none() {
                let all = self
                    .view
                    .list::<super::vms::VmRecord>(super::PREFIX_VMS)?
                    .into_iter()
                    .map(|vm| (vm.id, vm.node_id))
                    .collect();
                let _ = self.vm_nodes.set(all);
            }
            if let Some(node) = self.vm_nodes.get().and_then(|m| m.get(vm)) {
                claimants.push(*node);
            }
        }
        if let Some(lease) = &volume.lease {
            claimants.push(lease.node);
        }
        for c in claimants {
            match self.states.get(&c) {
                Some(StorageNodeState::In | StorageNodeState::Draining) => return Ok(Some(c)),
                Some(StorageNodeState::Down) => return Ok(None),
                Some(StorageNodeState::Out) | None => {}
            }
        }
        Ok(self
            .map
            .nodes
            .iter()
            .map(|n| n.node)
            .find(|n| self.states.get(n) == Some(&StorageNodeState::In)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_settings_out_of_range_are_refused_with_the_range() {
        assert_eq!(StorageConfig::default().check(), Ok(()));
        let with = |f: fn(&mut StorageConfig)| {
            let mut c = StorageConfig::default();
            f(&mut c);
            c.check()
        };
        assert_eq!(with(|c| c.recovery_rate_bytes = 0), Ok(()));
        assert_eq!(with(|c| c.recovery_rate_bytes = MAX_RECOVERY_RATE), Ok(()));
        for (bad, words) in [
            (with(|c| c.recovery_rate_bytes = 1000), "at least 1M"),
            (with(|c| c.recovery_rate_bytes = 1 << 63), "at most 1T"),
            (with(|c| c.down_out_after_s = 0), "one second to a year"),
            (
                with(|c| c.down_out_after_s = u64::MAX),
                "one second to a year",
            ),
            (with(|c| c.scrub_interval_s = 59), "a minute to a year"),
            (
                with(|c| c.scrub_interval_s = MAX_INTERVAL_S + 1),
                "a minute to a year",
            ),
        ] {
            let why = bad.unwrap_err();
            assert!(why.contains(words), "{why}");
        }
    }
}
