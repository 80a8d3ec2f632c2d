//! This node's part of block storage: its object store served to the other
//! nodes on the storage port, the NBD server (`DATA_DIR/nbd.sock`, optional
//! TCP), and the link between the cluster state and `storage/`: the storage
//! map, volume specs, writer leases, and clean-up of deleted volumes and
//! snapshots.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use storage::nbd::{self, BoxFuture, Exports};
use storage::transport::{self, Peers};
use storage::{ObjectStore, ParentSpec, ReplicaSets, Storage, VolumeHandle, VolumeSpec};

use crate::cluster::node::ClusterNode;
use crate::state::volumes::NodeStorage;
use crate::state::volumes::{ReplicaChange, VolumeRecord};
use crate::state::Command;

mod exports;
pub mod recovery;
mod standby;

/// How the block store is set up on this node.
#[derive(Debug, Clone)]
pub struct BlockOptions {
    /// Where the store keeps volumes' records, and their objects when the
    /// node has no storage disks (default `DATA_DIR/storage`).
    pub dir: Option<PathBuf>,
    /// The node's storage disks, mounted (see `daemon::disks`).
    pub disks: Vec<storage::store::Disk>,
    /// Replicas go to distinct failure domains first (default: the node name).
    pub failure_domain: Option<String>,
    /// NBD on TCP: refused at start (see [`BlockStore::start`]); kept so the
    /// flag says why instead of being unknown.
    pub nbd_listen: Option<String>,
    /// Where the NBD socket's directory is made (default `/run/allod`,
    /// or a directory of this user's under the temporary directory when
    /// that cannot be written).
    pub run_dir: Option<PathBuf>,
}

pub struct BlockStore {
    /// The threads block I/O runs on (the NBD server, the storage port,
    /// resyncs); shut down with the store.
    runtime: std::sync::Mutex<Option<tokio::runtime::Runtime>>,
    pub storage: Arc<Storage>,
    node: Weak<ClusterNode>,
    pub addr: String,
    pub failure_domain: String,
    pub nbd_socket: PathBuf,
    /// Volumes whose resync is running or waits to retry (with when it
    /// last failed).
    resyncs: std::sync::Mutex<HashMap<String, Option<std::time::Instant>>>,
    /// One resync or move at a time on this node.
    resync_turn: tokio::sync::Mutex<()>,
    /// Moves, jobs and the recovery throttle.
    pub recovery: Arc<recovery::Recovery>,
    /// NBD connections opened with an operator's grant, to withdraw when
    /// the grant expires or a VM takes the volume.
    open_grants: std::sync::Mutex<Vec<OpenGrant>>,
}

struct OpenGrant {
    grant_id: String,
    volume_id: String,
    expires_at_ms: u64,
    withdrawn: Arc<std::sync::atomic::AtomicBool>,
}

impl BlockStore {
    /// Withdraws the grant connections that must go: those of `volume_id`
    /// (a VM takes it), or with `None`, those whose grant expired, is gone,
    /// or whose volume a VM holds now. Closed connections are forgotten.
    fn withdraw_grants(&self, node: &ClusterNode, volume_id: Option<&str>) {
        let now = crate::cluster::join::now_ms();
        let mut open = self.open_grants.lock().unwrap();
        open.retain(|g| Arc::strong_count(&g.withdrawn) > 1);
        for g in open.iter() {
            let withdraw = match volume_id {
                Some(v) => g.volume_id == v,
                None => {
                    g.expires_at_ms <= now
                        || !node
                            .state
                            .export_grant(&g.grant_id)
                            .is_ok_and(|x| x.is_some())
                        || node
                            .state
                            .volume_by_id(&g.volume_id)
                            .ok()
                            .flatten()
                            .is_none_or(|v| v.attached_to.is_some())
                }
            };
            if withdraw && !g.withdrawn.swap(true, std::sync::atomic::Ordering::AcqRel) {
                tracing::info!(grant = %g.grant_id, volume = %g.volume_id, "NBD grant withdrawn from its connection");
            }
        }
    }
}

impl Drop for BlockStore {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.lock().unwrap().take() {
            rt.shutdown_background();
        }
    }
}

/// Records in-sync set changes through Raft, as the writer of `epoch`.
struct AgentReplicaSets(Weak<ClusterNode>);

impl AgentReplicaSets {
    /// Writes the change, trying again for a while when the cluster cannot
    /// commit (a leader election); a refusal is final.
    async fn record(
        &self,
        volume_id: &str,
        epoch: u64,
        change: ReplicaChange,
    ) -> Result<(), String> {
        let command = Command::UpdateReplicas {
            volume_id: volume_id.to_string(),
            epoch,
            change,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let node = self.0.upgrade().ok_or("this node is shutting down")?;
            match node.write(&command).await {
                Ok(outcome) => return outcome.map(drop).map_err(|e| e.message),
                Err(e) if std::time::Instant::now() > deadline => return Err(e.to_string()),
                Err(e) => {
                    tracing::debug!(volume = volume_id, "replica change not committed yet: {e}");
                    drop(node);
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }
}

impl ReplicaSets for AgentReplicaSets {
    fn out_of_sync(
        &self,
        volume: &str,
        epoch: u64,
        nodes: Vec<u64>,
    ) -> BoxFuture<'_, Result<(), String>> {
        let volume = volume.to_string();
        Box::pin(async move {
            self.record(&volume, epoch, ReplicaChange::OutOfSync { nodes })
                .await
        })
    }

    fn recovering(&self, volume: &str, epoch: u64, node: u64) -> BoxFuture<'_, Result<(), String>> {
        let volume = volume.to_string();
        Box::pin(async move {
            self.record(&volume, epoch, ReplicaChange::Recovering { node })
                .await
        })
    }

    fn in_sync(&self, volume: &str, epoch: u64, node: u64) -> BoxFuture<'_, Result<(), String>> {
        let volume = volume.to_string();
        Box::pin(async move {
            self.record(&volume, epoch, ReplicaChange::InSync { node })
                .await
        })
    }

    fn moving(&self, volume: &str, epoch: u64, map: u64) -> BoxFuture<'_, Result<(), String>> {
        let volume = volume.to_string();
        Box::pin(async move {
            self.record(&volume, epoch, ReplicaChange::Moving { map })
                .await
        })
    }

    fn moved(&self, volume: &str, epoch: u64, map: u64) -> BoxFuture<'_, Result<(), String>> {
        let volume = volume.to_string();
        Box::pin(async move {
            self.record(&volume, epoch, ReplicaChange::Moved { map })
                .await
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Unavailable(String),
}

impl BlockOptions {
    /// Refuses options no block store may start with.
    pub fn check(&self) -> anyhow::Result<()> {
        if let Some(addr) = &self.nbd_listen {
            anyhow::bail!(
                "--nbd-listen {addr}: NBD over plain TCP is refused, since it would carry tenant disks \
                 unencrypted; reach a volume through this node's NBD socket with a credential from \
                 `allod volume export` (over SSH from elsewhere), and leave --nbd-listen out"
            );
        }
        Ok(())
    }
}

impl BlockStore {
    /// Opens the store, starts serving it and NBD, and starts the task that
    /// keeps this node's registration, peer addresses and open volumes
    /// current.
    pub async fn start(
        node: &Arc<ClusterNode>,
        listener: tokio::net::TcpListener,
        advertise: String,
        options: &BlockOptions,
    ) -> anyhow::Result<Arc<Self>> {
        use anyhow::Context;
        let dir = options
            .dir
            .clone()
            .unwrap_or_else(|| node.data_dir.path().join("storage"));
        let store = Arc::new(
            ObjectStore::open_on(&dir, options.disks.clone())
                .with_context(|| format!("cannot open the block store in {}", dir.display()))?,
        );
        {
            // Tenants' bytes: only the agent may enter.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("cannot restrict the block store {}", dir.display()))?;
        }
        let alpn = transport::ALPN.to_vec();
        let server_tls = {
            let mut c = (*node.tls.peer_server_config()?).clone();
            c.alpn_protocols = vec![alpn.clone(), transport::BULK_ALPN.to_vec()];
            Arc::new(c)
        };
        let client_tls = {
            let mut c = node.peer_client_tls.clone();
            c.alpn_protocols = vec![alpn];
            Arc::new(c)
        };
        // Block I/O (page-cache reads and writes, the odd fsync) runs on
        // threads of its own, never on the workers Raft and the API use.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("allod-storage")
            .enable_all()
            .build()
            .context("cannot start the block store's threads")?;
        let io = runtime.handle().clone();
        let listener = listener.into_std()?;
        let served = store.clone();
        let gate = Arc::new(crate::cluster::admission::StorageGate(Arc::downgrade(node)));
        io.spawn(async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => transport::serve(l, server_tls, served, gate).await,
                Err(e) => tracing::error!("cannot serve the block store: {e}"),
            }
        });
        let storage = Storage::new(
            node.id,
            store,
            Peers::new(client_tls),
            Arc::new(AgentReplicaSets(Arc::downgrade(node))),
        );
        let nbd_socket = nbd_socket_path(options.run_dir.as_deref(), node)?;
        let _ = std::fs::remove_file(&nbd_socket);
        let unix = tokio::net::UnixListener::bind(&nbd_socket)
            .with_context(|| format!("cannot listen on {}", nbd_socket.display()))?;
        share_with_qemu(&nbd_socket);
        let pace = storage.pace.clone();
        let blocks = Arc::new(Self {
            runtime: std::sync::Mutex::new(Some(runtime)),
            storage,
            node: Arc::downgrade(node),
            addr: advertise,
            failure_domain: options
                .failure_domain
                .clone()
                .unwrap_or_else(|| node.config.name.clone()),
            nbd_socket,
            resyncs: std::sync::Mutex::new(HashMap::new()),
            resync_turn: tokio::sync::Mutex::new(()),
            recovery: Arc::new(recovery::Recovery::new(pace)),
            open_grants: std::sync::Mutex::new(Vec::new()),
        });
        let exports: Arc<dyn Exports> = Arc::new(exports::AgentExports(Arc::downgrade(&blocks)));
        let unix = unix.into_std()?;
        let unix_exports = exports.clone();
        io.spawn(async move {
            match tokio::net::UnixListener::from_std(unix) {
                Ok(l) => nbd::serve_unix(l, unix_exports).await,
                Err(e) => tracing::error!("cannot serve NBD: {e}"),
            }
        });
        io.spawn(maintain(Arc::downgrade(&blocks), node.applied.subscribe()));
        Ok(blocks)
    }

    fn node(&self) -> Result<Arc<ClusterNode>, BlockError> {
        self.node
            .upgrade()
            .ok_or_else(|| BlockError::Unavailable("this node is shutting down".into()))
    }

    /// Everything `storage/` needs to reach a volume's bytes.
    pub fn spec(&self, volume: &VolumeRecord) -> Result<VolumeSpec, BlockError> {
        let node = self.node()?;
        let mut chain = Vec::new();
        let mut cur = volume.clone();
        while let Some(parent) = cur.parent.clone() {
            if chain.len() > 32 {
                return Err(BlockError::Refused(format!(
                    "volume {} has more than 32 ancestors",
                    volume.id
                )));
            }
            let p = node
                .state
                .volume_by_id(&parent.volume_id)
                .map_err(|e| BlockError::Unavailable(e.to_string()))?
                .ok_or_else(|| {
                    BlockError::NotFound(format!(
                        "volume {} lost its parent {}",
                        cur.id, parent.volume_id
                    ))
                })?;
            chain.push((parent, cur));
            cur = p;
        }
        let mut spec = self.bare_spec(&node, &cur)?;
        while let Some((parent, child)) = chain.pop() {
            let mut s = self.bare_spec(&node, &child)?;
            s.parent = Some(Arc::new(ParentSpec {
                volume: spec,
                snap: parent.snapshot_id,
                overlap: parent.overlap_bytes,
            }));
            spec = s;
        }
        Ok(spec)
    }

    fn bare_spec(&self, node: &ClusterNode, v: &VolumeRecord) -> Result<VolumeSpec, BlockError> {
        let map = node
            .state
            .storage_map(v.map_epoch)
            .map_err(|e| BlockError::Unavailable(e.to_string()))?
            .ok_or_else(|| {
                BlockError::NotFound(format!(
                    "storage map {} of volume {} is gone",
                    v.map_epoch, v.id
                ))
            })?;
        let in_sync = if v.in_sync.is_empty() && v.out_of_sync.is_empty() {
            // Recorded before in-sync sets were: every node was.
            map.nodes.iter().map(|n| n.node).collect()
        } else {
            v.in_sync.clone()
        };
        Ok(VolumeSpec {
            id: v.id.clone(),
            size: v.size_bytes,
            object_size: v.object_size_bytes,
            replicas: usize::from(v.replicas),
            min_replicas: usize::from(v.min_replicas()),
            in_sync,
            seq: v.seq,
            epoch: v
                .lease
                .as_ref()
                .filter(|l| l.node == node.id)
                .map_or(0, |l| l.epoch),
            map: Arc::new(map),
            parent: None,
        })
    }

    /// Makes this node the volume's writer (a new epoch fences any other)
    /// and opens it.
    pub async fn open_for_write(
        &self,
        volume_id: &str,
    ) -> Result<(VolumeRecord, Arc<VolumeHandle>), BlockError> {
        let node = self.node()?;
        node.linearizable_read()
            .await
            .map_err(|e| BlockError::Unavailable(e.to_string()))?;
        let volume = node
            .state
            .volume_by_id(volume_id)
            .map_err(|e| BlockError::Unavailable(e.to_string()))?
            .ok_or_else(|| BlockError::NotFound(format!("no volume has the id {volume_id:?}")))?;
        let volume = if volume.lease.as_ref().is_some_and(|l| l.node == node.id) {
            volume
        } else {
            let outcome = node
                .write(&Command::AcquireLease {
                    volume_id: volume_id.to_string(),
                    node: node.id,
                })
                .await
                .map_err(|e| BlockError::Unavailable(e.to_string()))?
                .map_err(|e| BlockError::Refused(e.message))?;
            serde_json::from_value(outcome).map_err(|e| BlockError::Unavailable(e.to_string()))?
        };
        let spec = self.spec(&volume)?;
        let handle = self.storage.open(spec);
        handle.activate().await.map_err(|e| {
            BlockError::Unavailable(format!("cannot open volume {volume_id} for writing: {e}"))
        })?;
        Ok((volume, handle))
    }

    /// Returns every object of the volume to a snapshot's content.
    pub async fn rollback(&self, volume_id: &str, snapshot_id: u64) -> Result<(), BlockError> {
        let (_, handle) = self.open_for_write(volume_id).await?;
        handle
            .rollback(snapshot_id)
            .await
            .map_err(|e| BlockError::Unavailable(format!("rollback failed: {e}")))
    }

    /// Starts resyncing the out-of-sync replicas of the volumes this node
    /// writes, one volume at a time; a failed resync is tried again after
    /// ten seconds.
    fn start_resyncs(self: &Arc<Self>, node: &ClusterNode) {
        let Ok(volumes) = node.state.all_volumes() else {
            return;
        };
        for v in volumes {
            let mine = v.lease.as_ref().is_some_and(|l| l.node == node.id);
            if !mine || v.out_of_sync.is_empty() {
                continue;
            }
            {
                let mut resyncs = self.resyncs.lock().unwrap();
                match resyncs.get(&v.id) {
                    Some(None) => continue,
                    Some(Some(failed)) if failed.elapsed() < Duration::from_secs(10) => continue,
                    _ => {}
                }
                resyncs.insert(v.id.clone(), None);
            }
            let blocks = self.clone();
            tokio::spawn(async move {
                let result = blocks.resync(&v).await;
                let mut resyncs = blocks.resyncs.lock().unwrap();
                match result {
                    Ok(()) => {
                        resyncs.remove(&v.id);
                    }
                    Err(e) => {
                        tracing::warn!(volume = %v.id, "resync did not finish: {e}; trying again in 10 s");
                        resyncs.insert(v.id.clone(), Some(std::time::Instant::now()));
                    }
                }
            });
        }
    }

    async fn resync(&self, v: &VolumeRecord) -> Result<(), String> {
        let _turn = self.resync_turn.lock().await;
        let spec = self.spec(v).map_err(|e| e.to_string())?;
        let handle = self.storage.open(spec);
        let (_job, progress) = self.recovery.job(&v.id, "resync");
        for node in &v.out_of_sync {
            let copied = handle
                .resync(*node, &progress)
                .await
                .map_err(|e| e.to_string())?;
            tracing::info!(volume = %v.id, "node {node} resynced: {copied} objects copied");
        }
        Ok(())
    }
}

/// The NBD socket of this node: `RUN_DIR/<cluster>-n<node>/nbd.sock`,
/// outside the data directory (which only the agent may enter), in a
/// directory QEMU can always reach.
fn nbd_socket_path(run_dir: Option<&Path>, node: &ClusterNode) -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    use std::os::unix::fs::PermissionsExt;
    let root = match run_dir {
        Some(dir) => dir.to_path_buf(),
        None if std::fs::create_dir_all("/run/allod").is_ok() => PathBuf::from("/run/allod"),
        None => std::env::temp_dir().join(format!("allod-{}", nix::unistd::getuid())),
    };
    // A directory someone else made (where anyone may write, under the
    // temporary directory) is not ours to serve disks from.
    if let Ok(meta) = std::fs::symlink_metadata(&root) {
        use std::os::unix::fs::MetadataExt;
        if !meta.is_dir() || meta.uid() != nix::unistd::getuid().as_raw() {
            anyhow::bail!(
                "{} is not a directory of this user's; remove it or pick another run directory",
                root.display()
            );
        }
    }
    let dir = root.join(format!("{}-n{}", node.config.cluster_id, node.id));
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot make the run directory {}", dir.display()))?;
    // Traversable by all, listable by none: what is inside is reached by name.
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o711))
        .with_context(|| format!("cannot set the mode of {}", root.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))
        .with_context(|| format!("cannot set the mode of {}", dir.display()))?;
    Ok(dir.join("nbd.sock"))
}

/// Lets QEMU (user libvirt-qemu) connect to the NBD socket: the socket
/// belongs to that user's group, read-writable by it and by nobody else.
/// What a connection may open is decided by its export name's credential.
fn share_with_qemu(socket: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let gid = match nix::unistd::User::from_name("libvirt-qemu") {
        Ok(Some(user)) => Some(user.gid),
        _ => None,
    };
    let shared = nix::unistd::chown(socket, None, gid)
        .map_err(std::io::Error::from)
        .and_then(|()| {
            let mode = if gid.is_some() { 0o660 } else { 0o600 };
            std::fs::set_permissions(socket, std::fs::Permissions::from_mode(mode))
        });
    if let Err(e) = shared {
        tracing::warn!(
            "cannot share the NBD socket with libvirt-qemu: {e}; guests will not reach their disks"
        );
    }
}

/// Keeps this node registered in the storage map with its current use,
/// peers' storage addresses current, open volumes' specs current, and
/// removes what deleted volumes and snapshots left on this node.
async fn maintain(blocks: Weak<BlockStore>, mut applied: tokio::sync::watch::Receiver<u64>) {
    let mut last_report: Option<(NodeStorage, std::time::Instant)> = None;
    let mut last_gc = std::time::Instant::now() - Duration::from_secs(50);
    // Volumes seen on disk but not in the state at the last collection.
    let mut missing_before: HashSet<String> = HashSet::new();
    loop {
        let Some(b) = blocks.upgrade() else { return };
        let Ok(node) = b.node() else { return };
        b.withdraw_grants(&node, None);
        // The key attachments' export credentials derive from: made once,
        // by whichever node gets there first.
        if node.state.export_key().ok().flatten().is_none() {
            let key = crate::cluster::join::random_hex(32);
            if let Err(e) = node.write(&Command::SetExportKey { key }).await {
                tracing::debug!("export key not set yet: {e}");
            }
        }
        // Peer addresses.
        if let Ok(nodes) = node.state.nodes() {
            let addrs: HashMap<u64, String> = nodes
                .iter()
                .filter_map(|n| n.storage.as_ref().map(|s| (n.id, s.addr.clone())))
                .collect();
            b.storage.peers.set_addresses(addrs);
            // Registration and use, reported when they change (use: at most
            // once a minute).
            let (capacity, free) = b
                .storage
                .store
                .disk_dirs()
                .iter()
                .map(|d| disk_space(d))
                .fold((0, 0), |(c, f), (dc, df)| (c + dc, f + df));
            let mine = NodeStorage {
                addr: b.addr.clone(),
                capacity_bytes: capacity,
                used_bytes: capacity.saturating_sub(free),
                failure_domain: b.failure_domain.clone(),
                nbd_socket: b.nbd_socket.display().to_string(),
                unavailable: None,
            };
            let member = nodes.iter().find(|n| n.id == node.id);
            let recorded = member.and_then(|n| n.storage.clone());
            let due = registration_due(
                member.is_some(),
                recorded.as_ref(),
                &mine,
                last_report.as_ref().map(|(_, at)| at.elapsed()),
            );
            if due {
                match node
                    .write(&Command::SetNodeStorage {
                        id: node.id,
                        storage: mine.clone(),
                    })
                    .await
                {
                    Ok(Ok(_)) => {
                        if recorded.is_none() {
                            tracing::info!(addr = %mine.addr, domain = %mine.failure_domain, "registered this node's block store");
                        }
                        last_report = Some((mine, std::time::Instant::now()));
                    }
                    Ok(Err(e)) => tracing::debug!("block store not registered yet: {e}"),
                    Err(e) => tracing::debug!("block store not registered yet: {e}"),
                }
            }
        }
        // Open volumes follow their records (snapshots, resizes, leases).
        for handle in b.storage.open_handles() {
            let id = handle.spec().id.clone();
            if let Ok(Some(v)) = node.state.volume_by_id(&id) {
                if let Ok(spec) = b.spec(&v) {
                    handle.update(spec);
                }
            }
        }
        b.start_resyncs(&node);
        if let Ok(config) = node.state.storage_config() {
            b.recovery.throttle.set_rate(config.recovery_rate_bytes);
        }
        b.start_moves(&node);
        b.start_scrubs(&node);
        b.report_jobs(&node).await;
        b.drop_misplaced(&node).await;
        if last_gc.elapsed() > Duration::from_secs(60) {
            last_gc = std::time::Instant::now();
            collect_garbage(&b, &node, &mut missing_before).await;
        }
        drop(node);
        drop(b);
        let _ = tokio::time::timeout(Duration::from_secs(2), applied.changed()).await;
    }
}

/// Whether this node must (re-)register its block store: a member that
/// never did, one whose address or failure domain changed, or whose use
/// changed (reported at most once a minute).
pub fn registration_due(
    member: bool,
    recorded: Option<&NodeStorage>,
    mine: &NodeStorage,
    since_last_report: Option<Duration>,
) -> bool {
    match (recorded, since_last_report) {
        (None, _) => member,
        (Some(r), _)
            if r.addr != mine.addr
                || r.failure_domain != mine.failure_domain
                || r.nbd_socket != mine.nbd_socket
                || r.unavailable != mine.unavailable =>
        {
            true
        }
        (Some(r), Some(age)) => r.used_bytes != mine.used_bytes && age > Duration::from_secs(60),
        (Some(r), None) => r.used_bytes != mine.used_bytes,
    }
}

/// The volumes whose objects may go: missing from the state now and at the
/// collection before (a minute apart), so a create still on its way here
/// is never mistaken for a delete.
pub fn doomed_volumes(
    missing_now: &HashSet<String>,
    missing_before: &HashSet<String>,
) -> Vec<String> {
    let mut doomed: Vec<String> = missing_now.intersection(missing_before).cloned().collect();
    doomed.sort();
    doomed
}

/// Deletes the objects of volumes the cluster no longer has (seen missing
/// on two passes a minute apart, so a create still on its way here is not
/// mistaken for a delete), and snapshot copies no live snapshot needs.
async fn collect_garbage(b: &BlockStore, node: &ClusterNode, missing_before: &mut HashSet<String>) {
    if node.linearizable_read().await.is_err() {
        return;
    }
    let store = b.storage.store.clone();
    let mut missing = HashSet::new();
    let mut trims = Vec::new();
    for id in store.volumes() {
        match node.state.volume_by_id(&id) {
            Ok(None) => {
                missing.insert(id);
            }
            Ok(Some(v)) => trims.push((
                id,
                v.snapshots.iter().map(|s| s.id).collect::<Vec<_>>(),
                v.seq,
            )),
            Err(_) => return,
        }
    }
    let doomed = doomed_volumes(&missing, missing_before);
    *missing_before = missing;
    let _ = tokio::task::spawn_blocking(move || {
        for id in doomed {
            match store.delete_volume(&id) {
                Ok(()) => tracing::info!(volume = %id, "removed the objects of a deleted volume"),
                Err(e) => {
                    tracing::warn!(volume = %id, "cannot remove a deleted volume's objects: {e}")
                }
            }
        }
        for (id, live, known_seq) in trims {
            match store.trim_snapshots(&id, &live, known_seq) {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(volume = %id, "removed {n} snapshot copies no snapshot needs")
                }
                Err(e) => tracing::warn!(volume = %id, "cannot trim snapshot copies: {e}"),
            }
        }
    })
    .await;
}

/// (capacity, free) bytes of the file system holding `path`.
pub fn disk_space(path: &std::path::Path) -> (u64, u64) {
    match nix::sys::statvfs::statvfs(path) {
        Ok(s) => {
            let f = s.fragment_size();
            (s.blocks() * f, s.blocks_available() * f)
        }
        Err(_) => (0, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage(addr: &str, domain: &str, used_bytes: u64) -> NodeStorage {
        NodeStorage {
            addr: addr.into(),
            capacity_bytes: 100 << 30,
            used_bytes,
            failure_domain: domain.into(),
            nbd_socket: "/run/allod/c-n1/nbd.sock".into(),
            unavailable: None,
        }
    }

    #[test]
    fn when_a_node_registers_its_block_store() {
        let mine = storage("10.0.0.1:7445", "rack-1", 5 << 30);
        let minute = Some(Duration::from_secs(61));
        let moments = Some(Duration::from_secs(5));
        let cases = [
            ("a member never registered", true, None, None, true),
            ("not yet a member", false, None, None, false),
            ("unchanged", true, Some(mine.clone()), moments, false),
            (
                "moved",
                true,
                Some(storage("10.0.0.9:7445", "rack-1", 5 << 30)),
                moments,
                true,
            ),
            (
                "relabelled",
                true,
                Some(storage("10.0.0.1:7445", "rack-2", 5 << 30)),
                moments,
                true,
            ),
            (
                "use changed moments ago",
                true,
                Some(storage("10.0.0.1:7445", "rack-1", 4 << 30)),
                moments,
                false,
            ),
            (
                "use changed a minute ago",
                true,
                Some(storage("10.0.0.1:7445", "rack-1", 4 << 30)),
                minute,
                true,
            ),
            (
                "use changed, none reported since start",
                true,
                Some(storage("10.0.0.1:7445", "rack-1", 4 << 30)),
                None,
                true,
            ),
        ];
        for (name, member, recorded, since, want) in cases {
            assert_eq!(
                registration_due(member, recorded.as_ref(), &mine, since),
                want,
                "{name}"
            );
        }
    }

    #[test]
    fn only_volumes_missing_twice_in_a_row_are_collected() {
        let set = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<HashSet<_>>();
        assert!(doomed_volumes(&set(&["a"]), &set(&[])).is_empty());
        assert_eq!(
            doomed_volumes(&set(&["a", "b"]), &set(&["b", "c"])),
            vec!["b"]
        );
        assert!(doomed_volumes(&set(&[]), &set(&["c"])).is_empty());
    }
}
