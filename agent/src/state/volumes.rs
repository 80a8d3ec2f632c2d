//! Volumes, snapshots, clones, images and the storage map as the state
//! machine changes them. Everything that decides where data lives (the map
//! a volume is placed with, its snapshot sequence, its writer epoch) is
//! decided here, in log order, so every node agrees.

use allod_raft::{KvRead, KvWrite, NodeId};
use serde::{Deserialize, Serialize};
use storage::StorageMap;

use super::nodes::update_node;
use super::projects::Project;
use super::quotas::Usage;
use super::zones::Zone;
use super::{
    domain, get_json, put_json, ErrorCode, Outcome, ReadError, StateView, PREFIX_PROJECTS,
    PREFIX_VOLUMES,
};

type KvResult<T> = Result<T, allod_raft::KvError>;

/// Whether a volume can be used (serialised as the word in quotes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VolumeState {
    #[serde(rename = "available")]
    Available,
    /// Attached to a VM.
    #[serde(rename = "in-use")]
    InUse,
    /// An image's base volume until its import finishes.
    #[serde(rename = "importing")]
    Importing,
    /// Some replicas are out of sync (`out_of_sync` names their nodes):
    /// writes go on while at least `min_replicas` are in sync.
    #[serde(rename = "degraded")]
    Degraded,
    /// An out-of-sync replica is catching up (`recovering` names it).
    #[serde(rename = "recovering")]
    Recovering,
}

/// Whether an image can be cloned yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageState {
    Importing,
    Available,
}

impl ImageState {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageState::Importing => "importing",
            ImageState::Available => "available",
        }
    }
}

/// A block volume's record: what the cluster knows of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VolumeRecord {
    /// Stable and unique in the cluster (the NBD export name).
    pub id: String,
    pub name: String,
    pub project: String,
    pub size_bytes: u64,
    /// Copies of every object, on distinct nodes (1 to 3).
    pub replicas: u8,
    /// In-sync copies a write needs before it is acknowledged (1 to
    /// `replicas`; default 2, or 1 for a single replica).
    #[serde(default)]
    pub min_replicas: u8,
    /// The size of the objects a volume is split into.
    pub object_size_bytes: u64,
    /// `available`; `in-use` while attached to a VM; `importing` for an
    /// image's base volume until its import finishes; `degraded` while a
    /// replica is out of sync; `recovering` while one catches up.
    #[schema(value_type = String)]
    pub state: VolumeState,
    /// The project's zone, which the volume's replicas must honour.
    pub zone: Zone,
    pub created_at_ms: u64,
    /// The id of the VM it is attached to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached_to: Option<String>,
    /// The storage map (by epoch) its objects are placed with.
    #[serde(default)]
    pub map_epoch: u64,
    /// The newest snapshot's id (0: none yet); writes carry it.
    #[serde(default)]
    pub seq: u64,
    #[serde(default)]
    pub snapshots: Vec<SnapshotRecord>,
    /// For a clone: the snapshot it reads through to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRef>,
    /// The node that may write it, and the epoch that fences older writers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
    /// An image's base volume: read-only once imported.
    #[serde(default)]
    pub read_only: bool,
    /// Nodes whose replicas hold every acknowledged write (every node of
    /// the volume's storage map, until one misses a write).
    #[serde(default)]
    pub in_sync: Vec<NodeId>,
    /// Nodes whose replicas missed a write: never read until resynced.
    #[serde(default)]
    pub out_of_sync: Vec<NodeId>,
    /// Out-of-sync nodes whose resync is under way.
    #[serde(default)]
    pub recovering: Vec<NodeId>,
    /// The storage map its writer is moving its objects to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moving_to: Option<u64>,
    /// When its replicas were last compared (light scrub) and last read
    /// whole against their checksums (deep scrub); 0: never.
    #[serde(default)]
    pub scrubbed_at_ms: u64,
    #[serde(default)]
    pub deep_scrubbed_at_ms: u64,
    /// Damaged copies scrubs have repaired, in all.
    #[serde(default)]
    pub scrub_repairs: u64,
    /// Objects a scrub found with no intact copy (at the last scrub).
    #[serde(default)]
    pub scrub_unrepairable: u64,
    /// A scrub an operator asked for (`true`: deep), until it has run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scrub_requested: Option<bool>,
}

/// A change to a volume's in-sync set, made by its writer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaChange {
    /// These replicas missed (or may have missed) an acknowledged write.
    OutOfSync { nodes: Vec<NodeId> },
    /// This replica's resync has started.
    Recovering { node: NodeId },
    /// This replica holds every acknowledged write again.
    InSync { node: NodeId },
    /// The writer is copying objects to where storage map `map` puts them.
    Moving { map: u64 },
    /// Every node of storage map `map` holds every acknowledged write of
    /// the objects it places there: the volume uses `map` from now on.
    Moved { map: u64 },
    /// A scrub finished, repairing `repairs` copies.
    Scrubbed {
        deep: bool,
        at_ms: u64,
        repairs: u64,
        unrepairable: u64,
    },
}

impl VolumeRecord {
    /// Sets `state` from what the record says: importing, then recovering,
    /// degraded, in use, available.
    pub fn refresh_state(&mut self) {
        if self.state == VolumeState::Importing {
            return;
        }
        self.state = if !self.recovering.is_empty() {
            VolumeState::Recovering
        } else if !self.out_of_sync.is_empty() {
            VolumeState::Degraded
        } else if self.attached_to.is_some() {
            VolumeState::InUse
        } else {
            VolumeState::Available
        };
    }

    /// The in-sync copies a write needs (records written before the field
    /// existed: 2, or 1 for a single replica).
    pub fn min_replicas(&self) -> u8 {
        match self.min_replicas {
            0 => self.replicas.min(2),
            n => n.min(self.replicas),
        }
    }

    pub fn usage(&self) -> Usage {
        Usage {
            storage_bytes: self.size_bytes,
            volumes: 1,
            ..Default::default()
        }
    }
}

/// `volume_ids/<id>` → `<project>/<name>`.
pub const PREFIX_VOLUME_IDS: &str = "volume_ids/";
pub const KEY_STORAGE_MAP: &str = "storage/map";
/// `storage/maps/<epoch>`: every map a volume may still be placed with.
pub const PREFIX_STORAGE_MAPS: &str = "storage/maps/";
/// `images/<name>`.
pub const PREFIX_IMAGES: &str = "images/";
/// The pseudo-project that holds images' base volumes.
pub const IMAGE_PROJECT: &str = "_images";
/// The snapshot of an image's base volume that clones read through to.
pub const IMAGE_SNAPSHOT: &str = "base";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SnapshotRecord {
    /// Snapshot ids grow with every snapshot of the volume.
    pub id: u64,
    pub name: String,
    pub created_at_ms: u64,
    /// Ids of the volumes cloned from it (it cannot be deleted while any exist).
    #[serde(default)]
    pub clones: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ParentRef {
    pub volume_id: String,
    pub project: String,
    pub volume: String,
    pub snapshot_id: u64,
    pub snapshot: String,
    /// Bytes read through to the parent (its size when cloned).
    pub overlap_bytes: u64,
    /// The image it was cloned from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Lease {
    pub node: NodeId,
    pub epoch: u64,
}

/// What a node's block store reports of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeStorage {
    /// HOST:PORT of its storage port (mutual TLS).
    pub addr: String,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub failure_domain: String,
    /// The path of its NBD socket (on that node).
    #[serde(default)]
    pub nbd_socket: String,
    /// Why its block store does not serve (a disk missing, say): the
    /// leader then counts it down, and out after `down_out_after`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}

/// Where a new volume's data comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeSource {
    Snapshot { volume: String, snapshot: String },
    Image { name: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImageRecord {
    pub name: String,
    /// `None`: public, every project may use it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// The disk's size as a VM sees it.
    pub size_bytes: u64,
    /// `raw` or `qcow2`, as detected from the upload.
    pub format: String,
    /// SHA-256 of the uploaded file.
    pub sha256: String,
    /// `importing`, then `available`.
    #[schema(value_type = String)]
    pub state: ImageState,
    pub volume_id: String,
    pub created_at_ms: u64,
}

fn volume_key(project: &str, name: &str) -> String {
    format!("{PREFIX_VOLUMES}{project}/{name}")
}

fn not_found(project: &str, name: &str) -> crate::state::DomainError {
    domain(
        ErrorCode::NotFound,
        format!("volume {name:?} does not exist in project {project:?}"),
    )
}

fn value<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).expect("serialisable")
}

fn volume_by_id(kv: &impl KvRead, id: &str) -> KvResult<Option<(String, VolumeRecord)>> {
    let Some(path) = get_json::<String>(kv, &format!("{PREFIX_VOLUME_IDS}{id}"))? else {
        return Ok(None);
    };
    let key = format!("{PREFIX_VOLUMES}{path}");
    Ok(get_json::<VolumeRecord>(kv, &key)?.map(|v| (key, v)))
}

/// Registers a node's block store; a node new to the map (or moved to
/// another failure domain) starts a new map epoch. Volumes keep the epoch
/// they were created with, so their data is found where it was put.
pub fn set_node_storage(
    kv: &mut KvWrite<'_>,
    id: NodeId,
    storage: NodeStorage,
) -> KvResult<Outcome> {
    let outcome = update_node(kv, id, |_, node| {
        node.storage = Some(storage);
        Ok(Ok(()))
    })?;
    if outcome.is_ok() {
        super::storage::recompute_map(kv)?;
    }
    Ok(outcome)
}

pub fn create_volume(
    kv: &mut KvWrite<'_>,
    mut volume: VolumeRecord,
    source: Option<VolumeSource>,
) -> KvResult<Outcome> {
    let project_key = format!("{PREFIX_PROJECTS}{}", volume.project);
    let key = volume_key(&volume.project, &volume.name);
    let image_volume = volume.project == IMAGE_PROJECT;
    let mut project = match get_json::<Project>(kv, &project_key)? {
        None if !image_volume => {
            return Ok(Err(domain(
                ErrorCode::NotFound,
                format!("project {:?} does not exist", volume.project),
            )))
        }
        p => p,
    };
    if kv.get(&key)?.is_some() {
        return Ok(Err(domain(
            ErrorCode::AlreadyExists,
            format!(
                "volume {:?} already exists in project {:?}",
                volume.name, volume.project
            ),
        )));
    }
    let Some(map) = get_json::<StorageMap>(kv, KEY_STORAGE_MAP)? else {
        return Ok(Err(domain(
            ErrorCode::FailedPrecondition,
            "no node has registered its block store yet; wait for the nodes to start",
        )));
    };
    let nodes = map.nodes.len();
    if volume.replicas == 0 {
        volume.replicas = nodes.min(3) as u8;
    }
    if usize::from(volume.replicas) > nodes {
        return Ok(Err(domain(
            ErrorCode::FailedPrecondition,
            format!(
                "a volume with {} replicas needs {} storage nodes, but the cluster has {nodes}; ask for --replicas {nodes} or add nodes",
                volume.replicas, volume.replicas
            ),
        )));
    }
    if volume.min_replicas > volume.replicas {
        return Ok(Err(domain(
            ErrorCode::InvalidArgument,
            format!(
                "min_replicas {} is more than replicas {}; a write cannot need more copies than the volume keeps",
                volume.min_replicas, volume.replicas
            ),
        )));
    }
    volume.min_replicas = volume.min_replicas();
    volume.map_epoch = map.epoch;
    volume.in_sync = map.nodes.iter().map(|n| n.node).collect();
    volume.out_of_sync.clear();
    volume.recovering.clear();
    volume.refresh_state();
    // A clone: find the snapshot and register with it.
    if let Some(source) = source {
        let (parent_key, mut parent, snapshot_name, image) = match source {
            VolumeSource::Snapshot {
                volume: v,
                snapshot,
            } => {
                let pk = volume_key(&volume.project, &v);
                match get_json::<VolumeRecord>(kv, &pk)? {
                    Some(p) => (pk, p, snapshot, None),
                    None => return Ok(Err(not_found(&volume.project, &v))),
                }
            }
            VolumeSource::Image { name } => {
                let image = get_json::<ImageRecord>(kv, &format!("{PREFIX_IMAGES}{name}"))?;
                let image = match image {
                    Some(i) if i.project.as_ref().is_none_or(|p| *p == volume.project) => i,
                    _ => {
                        return Ok(Err(domain(
                            ErrorCode::NotFound,
                            format!("image {name:?} does not exist (or is not shared with project {:?}); `allod image list` shows the images you can use", volume.project),
                        )))
                    }
                };
                if image.state != ImageState::Available {
                    return Ok(Err(domain(
                        ErrorCode::FailedPrecondition,
                        format!(
                            "image {name:?} is still {}; try again when its import has finished",
                            image.state.as_str()
                        ),
                    )));
                }
                let Some((pk, p)) = volume_by_id(kv, &image.volume_id)? else {
                    return Ok(Err(domain(
                        ErrorCode::NotFound,
                        format!("image {name:?} has lost its base volume"),
                    )));
                };
                (pk, p, IMAGE_SNAPSHOT.to_string(), Some(name))
            }
        };
        let Some(snap) = parent
            .snapshots
            .iter_mut()
            .find(|s| s.name == snapshot_name)
        else {
            return Ok(Err(domain(
                ErrorCode::NotFound,
                format!("volume {:?} has no snapshot {snapshot_name:?}", parent.name),
            )));
        };
        if volume.size_bytes == 0 {
            volume.size_bytes = parent.size_bytes;
        }
        if volume.size_bytes < parent.size_bytes {
            return Ok(Err(domain(
                ErrorCode::InvalidArgument,
                format!(
                    "a clone must be at least as large as its source ({} bytes), not {} bytes",
                    parent.size_bytes, volume.size_bytes
                ),
            )));
        }
        snap.clones.push(volume.id.clone());
        volume.object_size_bytes = parent.object_size_bytes;
        volume.parent = Some(ParentRef {
            volume_id: parent.id.clone(),
            project: parent.project.clone(),
            volume: parent.name.clone(),
            snapshot_id: snap.id,
            snapshot: snap.name.clone(),
            overlap_bytes: parent.size_bytes,
            image,
        });
        put_json(kv, &parent_key, &parent)?;
    } else if volume.size_bytes == 0 {
        return Ok(Err(domain(
            ErrorCode::InvalidArgument,
            "size_bytes is required (e.g. --size 20G)",
        )));
    }
    if let Some(project) = project.as_mut() {
        if let Err(why) = project.quota.admits(&project.usage, &volume.usage()) {
            return Ok(Err(domain(ErrorCode::QuotaExceeded, why)));
        }
        project.usage = project.usage.plus(&volume.usage());
        volume.zone = project.zone;
        put_json(kv, &project_key, project)?;
    }
    put_json(
        kv,
        &format!("{PREFIX_VOLUME_IDS}{}", volume.id),
        &format!("{}/{}", volume.project, volume.name),
    )?;
    put_json(kv, &key, &volume)?;
    Ok(Ok(value(&volume)))
}

pub fn delete_volume(kv: &mut KvWrite<'_>, project: &str, name: &str) -> KvResult<Outcome> {
    let key = volume_key(project, name);
    let Some(volume) = get_json::<VolumeRecord>(kv, &key)? else {
        return Ok(Err(not_found(project, name)));
    };
    if volume.attached_to.is_some() {
        return Ok(Err(domain(
            ErrorCode::FailedPrecondition,
            format!("volume {name:?} is attached to a VM; detach it first"),
        )));
    }
    if let Some(s) = volume.snapshots.iter().find(|s| !s.clones.is_empty()) {
        return Ok(Err(domain(
            ErrorCode::FailedPrecondition,
            format!(
                "snapshot {:?} of volume {name:?} has {} clone(s) that read through to it; delete them first",
                s.name,
                s.clones.len()
            ),
        )));
    }
    if let Some(parent) = &volume.parent {
        if let Some((pk, mut p)) = volume_by_id(kv, &parent.volume_id)? {
            for s in &mut p.snapshots {
                s.clones.retain(|c| *c != volume.id);
            }
            put_json(kv, &pk, &p)?;
        }
    }
    let project_key = format!("{PREFIX_PROJECTS}{project}");
    if let Some(mut record) = get_json::<Project>(kv, &project_key)? {
        record.usage = record.usage.minus(&volume.usage());
        put_json(kv, &project_key, &record)?;
    }
    kv.delete(&format!("{PREFIX_VOLUME_IDS}{}", volume.id))?;
    kv.delete(&key)?;
    Ok(Ok(serde_json::Value::Null))
}

pub fn resize_volume(
    kv: &mut KvWrite<'_>,
    project: &str,
    name: &str,
    size_bytes: u64,
) -> KvResult<Outcome> {
    let key = volume_key(project, name);
    let Some(mut volume) = get_json::<VolumeRecord>(kv, &key)? else {
        return Ok(Err(not_found(project, name)));
    };
    if size_bytes < volume.size_bytes {
        return Ok(Err(domain(
            ErrorCode::InvalidArgument,
            format!(
                "volumes only grow: {name:?} has {} bytes, more than the {size_bytes} asked for",
                volume.size_bytes
            ),
        )));
    }
    if volume.read_only {
        return Ok(Err(domain(
            ErrorCode::FailedPrecondition,
            format!("volume {name:?} is read-only"),
        )));
    }
    let project_key = format!("{PREFIX_PROJECTS}{project}");
    if let Some(mut record) = get_json::<Project>(kv, &project_key)? {
        let extra = crate::state::quotas::Usage {
            storage_bytes: size_bytes - volume.size_bytes,
            ..Default::default()
        };
        if let Err(why) = record.quota.admits(&record.usage, &extra) {
            return Ok(Err(domain(ErrorCode::QuotaExceeded, why)));
        }
        record.usage = record.usage.plus(&extra);
        put_json(kv, &project_key, &record)?;
    }
    volume.size_bytes = size_bytes;
    put_json(kv, &key, &volume)?;
    Ok(Ok(value(&volume)))
}

pub fn create_snapshot(
    kv: &mut KvWrite<'_>,
    project: &str,
    name: &str,
    snapshot: &str,
    now_ms: u64,
) -> KvResult<Outcome> {
    let key = volume_key(project, name);
    let Some(mut volume) = get_json::<VolumeRecord>(kv, &key)? else {
        return Ok(Err(not_found(project, name)));
    };
    if volume.snapshots.iter().any(|s| s.name == snapshot) {
        return Ok(Err(domain(
            ErrorCode::AlreadyExists,
            format!("volume {name:?} already has a snapshot {snapshot:?}"),
        )));
    }
    volume.seq += 1;
    volume.snapshots.push(SnapshotRecord {
        id: volume.seq,
        name: snapshot.to_string(),
        created_at_ms: now_ms,
        clones: Vec::new(),
    });
    put_json(kv, &key, &volume)?;
    Ok(Ok(value(&volume)))
}

pub fn delete_snapshot(
    kv: &mut KvWrite<'_>,
    project: &str,
    name: &str,
    snapshot: &str,
) -> KvResult<Outcome> {
    let key = volume_key(project, name);
    let Some(mut volume) = get_json::<VolumeRecord>(kv, &key)? else {
        return Ok(Err(not_found(project, name)));
    };
    let Some(pos) = volume.snapshots.iter().position(|s| s.name == snapshot) else {
        return Ok(Err(domain(
            ErrorCode::NotFound,
            format!("volume {name:?} has no snapshot {snapshot:?}"),
        )));
    };
    if !volume.snapshots[pos].clones.is_empty() {
        return Ok(Err(domain(
            ErrorCode::FailedPrecondition,
            format!(
                "snapshot {snapshot:?} has {} clone(s) that read through to it; delete the clones first",
                volume.snapshots[pos].clones.len()
            ),
        )));
    }
    volume.snapshots.remove(pos);
    put_json(kv, &key, &volume)?;
    Ok(Ok(value(&volume)))
}

pub fn acquire_lease(kv: &mut KvWrite<'_>, volume_id: &str, node: NodeId) -> KvResult<Outcome> {
    let Some((key, mut volume)) = volume_by_id(kv, volume_id)? else {
        return Ok(Err(domain(
            ErrorCode::NotFound,
            format!("no volume has the id {volume_id:?}"),
        )));
    };
    match &volume.lease {
        Some(l) if l.node == node => {}
        other => {
            let epoch = other.as_ref().map_or(0, |l| l.epoch) + 1;
            volume.lease = Some(Lease { node, epoch });
            // The new writer starts any resync again.
            volume.recovering.clear();
            volume.refresh_state();
            put_json(kv, &key, &volume)?;
        }
    }
    Ok(Ok(value(&volume)))
}

/// Gives the volume's writer lease to `to` (`None`: to nobody, node 0)
/// with a new epoch, which fences whoever wrote it before; for a VM moved
/// off a dead node. Nothing if the volume is gone.
pub fn hand_over_lease(kv: &mut KvWrite<'_>, volume_id: &str, to: Option<NodeId>) -> KvResult<()> {
    let Some((key, mut volume)) = volume_by_id(kv, volume_id)? else {
        return Ok(());
    };
    let epoch = volume.lease.as_ref().map_or(0, |l| l.epoch) + 1;
    volume.lease = Some(Lease {
        node: to.unwrap_or(0),
        epoch,
    });
    volume.recovering.clear();
    volume.refresh_state();
    put_json(kv, &key, &volume)
}

/// The writer of `epoch` records a change to the volume's in-sync set;
/// refused for any other epoch (an older writer, fenced).
pub fn update_replicas(
    kv: &mut KvWrite<'_>,
    volume_id: &str,
    epoch: u64,
    change: ReplicaChange,
) -> KvResult<Outcome> {
    let Some((key, mut volume)) = volume_by_id(kv, volume_id)? else {
        return Ok(Err(domain(
            ErrorCode::NotFound,
            format!("no volume has the id {volume_id:?}"),
        )));
    };
    let current = volume.lease.as_ref().map_or(0, |l| l.epoch);
    if current != epoch {
        return Ok(Err(domain(
            ErrorCode::FailedPrecondition,
            format!(
                "volume {volume_id}: writer epoch {epoch} is not the current writer ({current}); its view of the replicas is stale"
            ),
        )));
    }
    let members: Vec<NodeId> = match get_json::<StorageMap>(
        kv,
        &format!("{PREFIX_STORAGE_MAPS}{:020}", volume.map_epoch),
    )? {
        Some(map) => map.nodes.iter().map(|n| n.node).collect(),
        None => {
            return Ok(Err(domain(
                ErrorCode::NotFound,
                format!(
                    "storage map {} of volume {volume_id} is gone",
                    volume.map_epoch
                ),
            )))
        }
    };
    if volume.in_sync.is_empty() && volume.out_of_sync.is_empty() {
        // Written before in-sync sets were recorded: every node was.
        volume.in_sync = members.clone();
    }
    let check = |n: &NodeId| -> Result<(), crate::state::DomainError> {
        if members.contains(n) {
            Ok(())
        } else {
            Err(domain(
                ErrorCode::InvalidArgument,
                format!(
                    "node {n} holds no replica of volume {volume_id} (its storage map has {members:?})"
                ),
            ))
        }
    };
    match change {
        ReplicaChange::OutOfSync { nodes } => {
            for n in &nodes {
                if let Err(e) = check(n) {
                    return Ok(Err(e));
                }
            }
            volume.in_sync.retain(|n| !nodes.contains(n));
            volume.recovering.retain(|n| !nodes.contains(n));
            volume.out_of_sync.extend(nodes);
        }
        ReplicaChange::Recovering { node } => {
            if let Err(e) = check(&node) {
                return Ok(Err(e));
            }
            if !volume.in_sync.contains(&node) {
                volume.recovering.push(node);
                volume.out_of_sync.push(node);
            }
        }
        ReplicaChange::InSync { node } => {
            if let Err(e) = check(&node) {
                return Ok(Err(e));
            }
            volume.out_of_sync.retain(|n| *n != node);
            volume.recovering.retain(|n| *n != node);
            volume.in_sync.push(node);
        }
        ReplicaChange::Moving { map } => {
            let target = get_json::<StorageMap>(kv, &format!("{PREFIX_STORAGE_MAPS}{map:020}"))?;
            match target {
                Some(t) if t.epoch > volume.map_epoch && t.nodes.len() >= usize::from(volume.replicas) => {
                    volume.moving_to = Some(map);
                }
                Some(_) => {
                    return Ok(Err(domain(
                        ErrorCode::FailedPrecondition,
                        format!(
                            "volume {volume_id} cannot move to storage map {map}: it uses map {} and keeps {} replicas",
                            volume.map_epoch, volume.replicas
                        ),
                    )))
                }
                None => {
                    return Ok(Err(domain(
                        ErrorCode::NotFound,
                        format!("storage map {map} does not exist"),
                    )))
                }
            }
        }
        ReplicaChange::Scrubbed {
            deep,
            at_ms,
            repairs,
            unrepairable,
        } => {
            volume.scrubbed_at_ms = at_ms;
            if deep {
                volume.deep_scrubbed_at_ms = at_ms;
            }
            // A deep scrub answers a light request too.
            if volume.scrub_requested.is_some_and(|d| deep || !d) {
                volume.scrub_requested = None;
            }
            volume.scrub_repairs += repairs;
            volume.scrub_unrepairable = unrepairable;
        }
        ReplicaChange::Moved { map } => {
            if volume.moving_to != Some(map) {
                return Ok(Err(domain(
                    ErrorCode::FailedPrecondition,
                    format!(
                        "volume {volume_id} is not moving to storage map {map} (moving to: {:?})",
                        volume.moving_to
                    ),
                )));
            }
            let Some(target) =
                get_json::<StorageMap>(kv, &format!("{PREFIX_STORAGE_MAPS}{map:020}"))?
            else {
                return Ok(Err(domain(
                    ErrorCode::NotFound,
                    format!("storage map {map} does not exist"),
                )));
            };
            volume.map_epoch = map;
            volume.moving_to = None;
            volume.in_sync = target.nodes.iter().map(|n| n.node).collect();
            volume.out_of_sync.clear();
            volume.recovering.clear();
        }
    }
    for list in [
        &mut volume.in_sync,
        &mut volume.out_of_sync,
        &mut volume.recovering,
    ] {
        list.sort_unstable();
        list.dedup();
    }
    volume.refresh_state();
    put_json(kv, &key, &volume)?;
    Ok(Ok(value(&volume)))
}

pub fn create_image(
    kv: &mut KvWrite<'_>,
    image: ImageRecord,
    volume: VolumeRecord,
) -> KvResult<Outcome> {
    let key = format!("{PREFIX_IMAGES}{}", image.name);
    if kv.get(&key)?.is_some() {
        return Ok(Err(domain(
            ErrorCode::AlreadyExists,
            format!("image {:?} already exists", image.name),
        )));
    }
    if let Some(p) = &image.project {
        if get_json::<Project>(kv, &format!("{PREFIX_PROJECTS}{p}"))?.is_none() {
            return Ok(Err(domain(
                ErrorCode::NotFound,
                format!("project {p:?} does not exist"),
            )));
        }
    }
    let created = create_volume(kv, volume, None)?;
    if created.is_err() {
        return Ok(created);
    }
    put_json(kv, &key, &image)?;
    Ok(Ok(value(&image)))
}

pub fn finish_image(kv: &mut KvWrite<'_>, name: &str, now_ms: u64) -> KvResult<Outcome> {
    let key = format!("{PREFIX_IMAGES}{name}");
    let Some(mut image) = get_json::<ImageRecord>(kv, &key)? else {
        return Ok(Err(domain(
            ErrorCode::NotFound,
            format!("image {name:?} does not exist"),
        )));
    };
    let Some((vkey, mut volume)) = volume_by_id(kv, &image.volume_id)? else {
        return Ok(Err(domain(
            ErrorCode::NotFound,
            format!("image {name:?} has lost its base volume"),
        )));
    };
    if !volume.snapshots.iter().any(|s| s.name == IMAGE_SNAPSHOT) {
        volume.seq += 1;
        volume.snapshots.push(SnapshotRecord {
            id: volume.seq,
            name: IMAGE_SNAPSHOT.into(),
            created_at_ms: now_ms,
            clones: Vec::new(),
        });
    }
    volume.read_only = true;
    volume.state = VolumeState::Available;
    volume.refresh_state();
    image.state = ImageState::Available;
    put_json(kv, &vkey, &volume)?;
    put_json(kv, &key, &image)?;
    Ok(Ok(value(&image)))
}

pub fn delete_image(kv: &mut KvWrite<'_>, name: &str) -> KvResult<Outcome> {
    let key = format!("{PREFIX_IMAGES}{name}");
    let Some(image) = get_json::<ImageRecord>(kv, &key)? else {
        return Ok(Err(domain(
            ErrorCode::NotFound,
            format!("image {name:?} does not exist"),
        )));
    };
    if let Some((_, volume)) = volume_by_id(kv, &image.volume_id)? {
        let clones: usize = volume.snapshots.iter().map(|s| s.clones.len()).sum();
        if clones > 0 {
            return Ok(Err(domain(
                ErrorCode::FailedPrecondition,
                format!("image {name:?} is used by {clones} volume(s); delete them first"),
            )));
        }
        let deleted = delete_volume(kv, IMAGE_PROJECT, &volume.name)?;
        if deleted.is_err() {
            return Ok(deleted);
        }
    }
    kv.delete(&key)?;
    Ok(Ok(serde_json::Value::Null))
}

/// Typed reads for the block store.
impl StateView {
    pub fn volumes(&self, project: &str) -> Result<Vec<VolumeRecord>, ReadError> {
        self.list(&format!("{PREFIX_VOLUMES}{project}/"))
    }

    pub fn volume(&self, project: &str, name: &str) -> Result<Option<VolumeRecord>, ReadError> {
        self.get(&format!("{PREFIX_VOLUMES}{project}/{name}"))
    }

    pub fn volume_by_id(&self, id: &str) -> Result<Option<VolumeRecord>, crate::state::ReadError> {
        let Some(path) = self.get::<String>(&format!("{PREFIX_VOLUME_IDS}{id}"))? else {
            return Ok(None);
        };
        self.get(&format!("{PREFIX_VOLUMES}{path}"))
    }

    pub fn all_volumes(&self) -> Result<Vec<VolumeRecord>, crate::state::ReadError> {
        self.list(PREFIX_VOLUMES)
    }

    pub fn storage_map(&self, epoch: u64) -> Result<Option<StorageMap>, crate::state::ReadError> {
        self.get(&format!("{PREFIX_STORAGE_MAPS}{epoch:020}"))
    }

    pub fn images(&self) -> Result<Vec<ImageRecord>, crate::state::ReadError> {
        self.list(PREFIX_IMAGES)
    }

    pub fn image(&self, name: &str) -> Result<Option<ImageRecord>, crate::state::ReadError> {
        self.get(&format!("{PREFIX_IMAGES}{name}"))
    }
}
