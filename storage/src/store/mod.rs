//! The object store on one node's storage directory.
//!
//! Layout: `ROOT/<volume id>/<index>.head` is an object's current data;
//! `ROOT/<volume id>/<index>.<hi>.clone` keeps what the object held for the
//! snapshots with ids in `(lo, hi]` (copied on the first write after a
//! snapshot). Every object file starts with a 4 KiB header (format, kind,
//! version, snapshot sequence) and a CRC32C per 4 KiB block; data follows at
//! [`DATA_OFFSET`], sparse where nothing was written.
//!
//! Snapshot sequence numbers: a volume's writes carry the id of its newest
//! snapshot (`seq`, 0 before any). The head remembers the `seq` it was last
//! written under; a write with a larger one first preserves the head as a
//! clone file for the snapshots taken in between. A snapshot `x` sees data
//! written under sequences below `x`.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::fsio::{FileIo, Fs, Mode, OsFs};

mod disks;
use disks::DiskSet;
pub use disks::{Disk, MARKER as DISK_MARKER};

/// Checksum granularity.
pub const BLOCK: u64 = 4096;
/// The largest object size a store accepts.
pub const MAX_OBJECT_SIZE: u64 = 16 << 20;
const HEADER: u64 = 4096;
const CRC_BYTES: u64 = MAX_OBJECT_SIZE / BLOCK * 4;
/// Where an object's data starts in its file.
pub const DATA_OFFSET: u64 = HEADER + CRC_BYTES;
const MAGIC: &[u8; 8] = b"ALLODOBJ";
const FORMAT: u32 = 1;
const KIND_HEAD: u32 = 1;
const KIND_CLONE: u32 = 2;
const FLAG_ABSENT: u32 = 1;
/// The object may hold writes not yet synced: its block checksums are
/// checked, and repaired where a power loss tore a write from its
/// checksum, when it is next loaded.
const FLAG_DIRTY: u32 = 2;
/// A written object keeps its dirty flag through flushes while it is
/// written this often, so a busy object costs no extra sync per flush.
const HOT: std::time::Duration = std::time::Duration::from_secs(1);
/// Object files kept open; beyond this, files are opened per operation.
const OPEN_FILES_CAP: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("request from writer epoch {got} refused: epoch {current} has taken over the volume")]
    StaleEpoch { got: u64, current: u64 },
    #[error("request from writer epoch {got} refused: this replica holds epoch {current} and was never fenced for {got} (it is out of sync)")]
    NotFenced { got: u64, current: u64 },
    #[error("checksum mismatch in object {index} of volume {volume} at byte {offset}: the copy on this node is damaged")]
    Checksum {
        volume: String,
        index: u64,
        offset: u64,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError {
    let what = what.into();
    move |source| StoreError::Io { what, source }
}

/// What a node holds of one object (for checks and, later, resync).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub index: u64,
    pub version: u64,
    /// The snapshot sequence the head was last written under.
    pub seq: u64,
    /// The head holds data (not absent).
    pub head: bool,
    /// This copy may lack writes its peers have (found dirty after a crash,
    /// or a sync of it failed): never a source while a certain copy exists.
    pub uncertain: bool,
    /// `(lo, hi]` ranges of snapshot ids preserved in clone files.
    pub clones: Vec<(u64, u64)>,
}

#[derive(Debug)]
struct Head {
    seq: u64,
    version: u64,
    absent: bool,
    file: Option<Arc<dyn FileIo>>,
}

#[derive(Debug, Default)]
struct ObjState {
    loaded: bool,
    /// Clone files found by name when the store was opened, headers unread.
    found_clones: Vec<u64>,
    head: Option<Head>,
    /// hi → lo.
    clones: BTreeMap<u64, u64>,
    /// Written since its last sync.
    dirty: bool,
    /// The head's header on disk carries [`FLAG_DIRTY`].
    marked: bool,
    /// See [`ObjectInfo::uncertain`].
    uncertain: bool,
    /// A sync failed: what it held may be gone from the disk; every flush
    /// fails until the object is replaced whole.
    lost: bool,
    last_write: Option<std::time::Instant>,
}

impl ObjState {
    /// A head written whole and synced took the old one's place.
    fn replace_head(&mut self, seq: u64, version: u64, absent: bool) {
        self.head = Some(Head {
            seq,
            version,
            absent,
            file: None,
        });
        self.marked = false;
        self.uncertain = false;
        self.lost = false;
    }
}

#[derive(Debug)]
struct Obj {
    state: RwLock<ObjState>,
}

#[derive(Debug)]
struct Vol {
    name: String,
    /// The volume's own records (writer epoch, storage map), in the root.
    meta: PathBuf,
    /// The volume's directory on each disk of the store.
    dirs: Vec<PathBuf>,
    disks: Arc<DiskSet>,
    /// Objects found, when the store opened, on a disk other than the one
    /// placement now picks (disks were added since they were written).
    found: HashMap<u64, usize>,
    epoch: AtomicU64,
    /// The newest storage map a writer announced it is moving the volume
    /// to (see [`ObjectStore::hold`]); an object is dropped as misplaced
    /// only by a caller that decided with a map at least this new.
    map: AtomicU64,
    /// Held shared by every epoch-checked operation for its whole length,
    /// and exclusively by a fence: a fence waits for older writers' I/O in
    /// progress, and none starts after it.
    io: RwLock<()>,
    /// One flush at a time: a second flush waits for the first one's
    /// syncs instead of finding nothing dirty and returning early.
    flushing: Mutex<()>,
    objects: RwLock<HashMap<u64, Arc<Obj>>>,
}

/// Where a read at a snapshot finds its bytes.
enum Source {
    Head,
    Clone(u64),
    Absent,
}

/// One node's object store.
#[derive(Debug)]
pub struct ObjectStore {
    fs: Arc<dyn Fs>,
    root: PathBuf,
    disks: Arc<DiskSet>,
    volumes: RwLock<HashMap<String, Arc<Vol>>>,
    open_files: AtomicUsize,
}

impl ObjectStore {
    /// Opens (creating) the store at `root`, on the disks it records (the
    /// root alone when none), and indexes the objects in it by file name;
    /// headers are read on first use.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        Self::open_with(Arc::new(OsFs), root)
    }

    /// Opens the store at `root` on the file system `fs`.
    pub fn open_with(fs: Arc<dyn Fs>, root: &Path) -> Result<Self, StoreError> {
        fs.create_dir_all(root)
            .map_err(io_err(format!("creating {}", root.display())))?;
        let disks = DiskSet::recorded(&*fs, root)?;
        Self::open_parts(fs, root, disks)
    }

    /// Opens the store at `root` with its objects on `disks` (see
    /// [`Disk`]): every disk it recorded before must be given; new ones
    /// are taken into use.
    pub fn open_on(root: &Path, disks: Vec<Disk>) -> Result<Self, StoreError> {
        let fs: Arc<dyn Fs> = Arc::new(OsFs);
        fs.create_dir_all(root)
            .map_err(io_err(format!("creating {}", root.display())))?;
        let disks = if disks.is_empty() {
            DiskSet::recorded(&*fs, root)?
        } else {
            DiskSet::adopt(&*fs, root, disks)?
        };
        Self::open_parts(fs, root, disks)
    }

    fn open_parts(fs: Arc<dyn Fs>, root: &Path, disks: DiskSet) -> Result<Self, StoreError> {
        let disks = Arc::new(disks);
        let mut volumes = HashMap::new();
        let entries = fs
            .read_dir(root)
            .map_err(io_err(format!("reading {}", root.display())))?;
        for (name, is_dir) in entries {
            if !is_dir || !valid_volume_id(&name) {
                continue;
            }
            let vol = Vol::scan(&*fs, root, &name, &disks)?;
            volumes.insert(name, Arc::new(vol));
        }
        Ok(Self {
            fs,
            root: root.to_owned(),
            disks,
            volumes: RwLock::new(volumes),
            open_files: AtomicUsize::new(0),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directories new objects go to (the store's disks, or its root):
    /// the node's capacity is theirs.
    pub fn disk_dirs(&self) -> Vec<PathBuf> {
        self.disks
            .disks
            .iter()
            .filter(|d| d.weight > 0)
            .map(|d| d.dir.clone())
            .collect()
    }

    /// Volume ids with anything stored here.
    pub fn volumes(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.volumes.read().unwrap().keys().cloned().collect();
        ids.sort();
        ids
    }

    fn volume(&self, id: &str, create: bool) -> Result<Option<Arc<Vol>>, StoreError> {
        if let Some(v) = self.volumes.read().unwrap().get(id) {
            return Ok(Some(v.clone()));
        }
        if !create {
            return Ok(None);
        }
        if !valid_volume_id(id) {
            return Err(StoreError::Invalid(format!(
                "{id:?} is not a volume id (letters, digits and '-', 1 to 64 characters)"
            )));
        }
        let mut volumes = self.volumes.write().unwrap();
        if let Some(v) = volumes.get(id) {
            return Ok(Some(v.clone()));
        }
        let dir = self.root.join(id);
        self.fs
            .create_dir_all(&dir)
            .map_err(io_err(format!("creating {}", dir.display())))?;
        sync_dir(&*self.fs, &self.root)?;
        let vol = Arc::new(Vol::scan(&*self.fs, &self.root, id, &self.disks)?);
        for disk in self.disks.disks.iter().filter(|d| d.dir != self.root) {
            sync_dir(&*self.fs, &disk.dir)?;
        }
        volumes.insert(id.to_owned(), vol.clone());
        Ok(Some(vol))
    }

    /// Admits an operation of writer `epoch`: only the epoch this replica
    /// was last fenced with. The guard is held for the whole operation.
    fn admit(vol: &Vol, epoch: u64) -> Result<std::sync::RwLockReadGuard<'_, ()>, StoreError> {
        let guard = vol.io.read().unwrap();
        let current = not_older(vol, epoch)?;
        if epoch > current {
            return Err(StoreError::NotFenced {
                got: epoch,
                current,
            });
        }
        Ok(guard)
    }

    /// Installs writer `epoch` on the volume (creating it), durably, after
    /// every operation of an older writer in progress has finished; from
    /// then on older writers are refused. Returns the epoch held before.
    pub fn fence(&self, volume: &str, epoch: u64) -> Result<u64, StoreError> {
        let vol = self.volume(volume, true)?.expect("created");
        let _exclusive = vol.io.write().unwrap();
        let current = not_older(&vol, epoch)?;
        if epoch > current {
            let path = vol.meta.join("epoch");
            let tmp = vol.meta.join("epoch.tmp");
            let f = self
                .fs
                .open(&tmp, Mode::Create)
                .map_err(io_err("recording the writer epoch"))?;
            f.write_all_at(epoch.to_string().as_bytes(), 0)
                .and_then(|()| f.sync_data())
                .map_err(io_err("recording the writer epoch"))?;
            self.fs
                .rename(&tmp, &path)
                .map_err(io_err("recording the writer epoch"))?;
            sync_dir(&*self.fs, &vol.meta)?;
            vol.epoch.store(epoch, Ordering::Release);
        }
        Ok(current)
    }

    /// Records, durably, that a writer is moving the volume to storage map
    /// `map` and may copy objects here that the volume's current map does
    /// not place here. Waits for operations in progress (like a fence).
    /// Returns the map held before.
    pub fn hold(&self, volume: &str, map: u64) -> Result<u64, StoreError> {
        let vol = self.volume(volume, true)?.expect("created");
        let _exclusive = vol.io.write().unwrap();
        let current = vol.map.load(Ordering::Acquire);
        if map > current {
            self.write_small_durably(&vol.meta, "map", map)?;
            vol.map.store(map, Ordering::Release);
        }
        Ok(current)
    }

    /// Removes object `index` (its head and snapshot copies) as misplaced,
    /// decided with storage map `map`: refused (`Ok(false)`) when a writer
    /// has since announced a newer map, whose placement may want it here.
    pub fn drop_misplaced(&self, volume: &str, index: u64, map: u64) -> Result<bool, StoreError> {
        let Some(vol) = self.volume(volume, false)? else {
            return Ok(true);
        };
        let _exclusive = vol.io.write().unwrap();
        if vol.map.load(Ordering::Acquire) > map {
            return Ok(false);
        }
        let Some(obj) = Self::object(&vol, index, false) else {
            return Ok(true);
        };
        let mut st = obj.state.write().unwrap();
        self.load(&vol, index, &mut st)?;
        self.drop_head_file(&mut st);
        if st.head.take().is_some() {
            match self.fs.remove_file(&head_path(vol.odir(index), index)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("removing a misplaced object")(e)),
            }
        }
        let clones: Vec<u64> = st.clones.keys().copied().collect();
        for hi in clones {
            self.fs
                .remove_file(&clone_path(vol.odir(index), index, hi))
                .map_err(io_err("removing a misplaced snapshot copy"))?;
            st.clones.remove(&hi);
        }
        st.dirty = false;
        st.marked = false;
        st.uncertain = false;
        st.lost = false;
        drop(st);
        vol.objects.write().unwrap().remove(&index);
        sync_dir(&*self.fs, vol.odir(index))?;
        Ok(true)
    }

    /// Writes a small number to `dir/name` through a temporary file, a
    /// rename and a directory sync.
    fn write_small_durably(&self, dir: &Path, name: &str, value: u64) -> Result<(), StoreError> {
        let path = dir.join(name);
        let tmp = dir.join(format!("{name}.tmp"));
        let what = format!("recording {name} {value}");
        let f = self
            .fs
            .open(&tmp, Mode::Create)
            .map_err(io_err(what.clone()))?;
        f.write_all_at(value.to_string().as_bytes(), 0)
            .and_then(|()| f.sync_data())
            .map_err(io_err(what.clone()))?;
        self.fs.rename(&tmp, &path).map_err(io_err(what))?;
        sync_dir(&*self.fs, dir)
    }

    fn object(vol: &Vol, index: u64, create: bool) -> Option<Arc<Obj>> {
        if let Some(o) = vol.objects.read().unwrap().get(&index) {
            return Some(o.clone());
        }
        if !create {
            return None;
        }
        let mut objects = vol.objects.write().unwrap();
        Some(
            objects
                .entry(index)
                .or_insert_with(|| {
                    Arc::new(Obj {
                        state: RwLock::new(ObjState {
                            loaded: true,
                            ..Default::default()
                        }),
                    })
                })
                .clone(),
        )
    }

    /// Writes `data` at `offset` within object `index`.
    pub fn write(
        &self,
        volume: &str,
        index: u64,
        offset: u64,
        data: &[u8],
        seq: u64,
        epoch: u64,
    ) -> Result<(), StoreError> {
        check_range(offset, data.len() as u64)?;
        let vol = self.fenced_volume(volume)?;
        let _admitted = Self::admit(&vol, epoch)?;
        let obj = Self::object(&vol, index, true).expect("created");
        let mut st = obj.state.write().unwrap();
        self.load(&vol, index, &mut st)?;
        let file = self.prepare_head(&vol, index, &mut st, seq)?;
        Self::mark_dirty(&*file, &mut st)?;
        write_checked(&*file, offset, data, vol.odir(index), index)?;
        let head = st.head.as_mut().expect("prepared");
        head.version += 1;
        st.dirty = true;
        st.last_write = Some(std::time::Instant::now());
        Ok(())
    }

    /// Zeroes `len` bytes at `offset`; with `punch`, whole blocks become
    /// holes that take no space.
    #[allow(clippy::too_many_arguments)]
    pub fn zero(
        &self,
        volume: &str,
        index: u64,
        offset: u64,
        len: u64,
        punch: bool,
        seq: u64,
        epoch: u64,
    ) -> Result<(), StoreError> {
        check_range(offset, len)?;
        let vol = self.fenced_volume(volume)?;
        let _admitted = Self::admit(&vol, epoch)?;
        let obj = Self::object(&vol, index, true).expect("created");
        let mut st = obj.state.write().unwrap();
        self.load(&vol, index, &mut st)?;
        let file = self.prepare_head(&vol, index, &mut st, seq)?;
        Self::mark_dirty(&*file, &mut st)?;
        let end = offset + len;
        let (first_full, last_full) = (offset.div_ceil(BLOCK) * BLOCK, end / BLOCK * BLOCK);
        if punch && first_full < last_full {
            if offset < first_full {
                write_checked(
                    &*file,
                    offset,
                    &vec![0; (first_full - offset) as usize],
                    vol.odir(index),
                    index,
                )?;
            }
            punch_hole(&*file, DATA_OFFSET + first_full, last_full - first_full)?;
            let zeros = vec![0u8; ((last_full - first_full) / BLOCK * 4) as usize];
            file.write_all_at(&zeros, HEADER + first_full / BLOCK * 4)
                .map_err(io_err("clearing checksums"))?;
            if last_full < end {
                write_checked(
                    &*file,
                    last_full,
                    &vec![0; (end - last_full) as usize],
                    vol.odir(index),
                    index,
                )?;
            }
        } else {
            let chunk = vec![0u8; len.min(1 << 20) as usize];
            let mut at = offset;
            while at < end {
                let n = (end - at).min(chunk.len() as u64);
                write_checked(&*file, at, &chunk[..n as usize], vol.odir(index), index)?;
                at += n;
            }
        }
        st.head.as_mut().expect("prepared").version += 1;
        st.dirty = true;
        st.last_write = Some(std::time::Instant::now());
        Ok(())
    }

    /// Reads `len` bytes at `offset` of object `index` as it was at
    /// snapshot `snap` (`None`: now, which only the writer of the current
    /// `epoch` may read). `Ok(None)`: the object did not exist then (the
    /// caller reads the parent or zeros).
    pub fn read(
        &self,
        volume: &str,
        index: u64,
        snap: Option<u64>,
        offset: u64,
        len: u64,
        epoch: u64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        check_range(offset, len)?;
        let Some(vol) = self.volume(volume, false)? else {
            if snap.is_none() {
                return Err(StoreError::NotFenced {
                    got: epoch,
                    current: 0,
                });
            }
            return Ok(None);
        };
        let _admitted = match snap {
            None => Some(Self::admit(&vol, epoch)?),
            Some(_) => None,
        };
        let Some(obj) = Self::object(&vol, index, false) else {
            return Ok(None);
        };
        {
            let st = obj.state.read().unwrap();
            if st.loaded {
                return self.read_loaded(&vol, volume, index, &st, snap, offset, len);
            }
        }
        let mut st = obj.state.write().unwrap();
        self.load(&vol, index, &mut st)?;
        self.read_loaded(&vol, volume, index, &st, snap, offset, len)
    }

    #[allow(clippy::too_many_arguments)]
    fn read_loaded(
        &self,
        vol: &Vol,
        volume: &str,
        index: u64,
        st: &ObjState,
        snap: Option<u64>,
        offset: u64,
        len: u64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let data = match resolve(st, snap) {
            Source::Absent => return Ok(None),
            Source::Head => {
                let file = self.head_file(vol, index, st)?;
                read_checked(&*file, offset, len)
            }
            Source::Clone(hi) => {
                let path = clone_path(vol.odir(index), index, hi);
                let file = self
                    .fs
                    .open(&path, Mode::Read)
                    .map_err(io_err(format!("opening {}", path.display())))?;
                read_checked(&*file, offset, len)
            }
        };
        match data {
            Ok(d) => Ok(Some(d)),
            Err(ReadFault::Io(e)) => Err(StoreError::Io {
                what: format!("reading object {index} of volume {volume}"),
                source: e,
            }),
            Err(ReadFault::Checksum(at)) => Err(StoreError::Checksum {
                volume: volume.to_owned(),
                index,
                offset: at,
            }),
        }
    }

    /// Deep scrub: reads the object's head and every snapshot copy over
    /// `len` bytes and checks each block against its checksum. `Ok(false)`:
    /// some block does not match (this copy is damaged).
    pub fn verify(&self, volume: &str, index: u64, len: u64) -> Result<bool, StoreError> {
        check_range(0, len)?;
        let Some(vol) = self.volume(volume, false)? else {
            return Ok(true);
        };
        let Some(obj) = Self::object(&vol, index, false) else {
            return Ok(true);
        };
        let mut st = obj.state.write().unwrap();
        self.load(&vol, index, &mut st)?;
        let mut snaps: Vec<Option<u64>> = vec![None];
        snaps.extend(st.clones.keys().map(|hi| Some(*hi)));
        for snap in snaps {
            match self.read_loaded(&vol, volume, index, &st, snap, 0, len) {
                Ok(_) => {}
                Err(StoreError::Checksum { .. }) => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Whether the object's head holds data of its own.
    pub fn exists(&self, volume: &str, index: u64) -> Result<bool, StoreError> {
        Ok(self.stat(volume, index)?.is_some_and(|i| i.head))
    }

    /// Makes everything written to the volume so far durable.
    pub fn flush(&self, volume: &str) -> Result<(), StoreError> {
        let Some(vol) = self.volume(volume, false)? else {
            return Ok(());
        };
        let _one_flush = vol.flushing.lock().unwrap();
        let objects = vol.objects_now();
        let mut lost = Vec::new();
        for (index, obj) in objects {
            let (file, version) = {
                let mut st = obj.state.write().unwrap();
                if st.lost {
                    lost.push(index);
                }
                if !st.dirty {
                    continue;
                }
                st.dirty = false;
                let file = self.head_file(&vol, index, &st)?;
                (file, st.head.as_ref().map_or(0, |h| h.version))
            };
            if let Err(e) = file.sync_data() {
                // The kernel may have dropped the unwritten pages: this
                // copy cannot be trusted until it is replaced whole.
                let mut st = obj.state.write().unwrap();
                st.lost = true;
                st.uncertain = true;
                tracing::error!(volume, "syncing object {index} failed: {e}; this copy is out of sync until it is replaced");
                return Err(StoreError::Io {
                    what: format!("flushing object {index} (version {version}) of volume {volume}"),
                    source: e,
                });
            }
            // Synced: the header may now say so (a crash before this
            // header reaches the disk leaves the flag set, which is safe).
            let mut st = obj.state.write().unwrap();
            let idle = st.last_write.is_none_or(|t| t.elapsed() > HOT);
            let unchanged = st.head.as_ref().is_some_and(|h| h.version == version);
            if let Some(h) = st.head.as_ref().filter(|_| unchanged) {
                let flags = if idle { 0 } else { FLAG_DIRTY };
                write_header(&*file, KIND_HEAD, h.version, h.seq, 0, flags)?;
                st.marked = !idle;
            }
        }
        for dir in &vol.dirs {
            sync_dir(&*self.fs, dir)?;
        }
        if !lost.is_empty() {
            return Err(StoreError::Io {
                what: format!("flushing volume {volume}"),
                source: io::Error::other(format!(
                    "objects {lost:?} failed to sync earlier and may have lost data; they are replaced when this replica resyncs"
                )),
            });
        }
        Ok(())
    }

    /// Returns every object of the volume to its content at snapshot `snap`,
    /// preserving the present content for newer snapshots first.
    pub fn rollback(
        &self,
        volume: &str,
        snap: u64,
        seq: u64,
        epoch: u64,
    ) -> Result<(), StoreError> {
        if snap == 0 || snap > seq {
            return Err(StoreError::Invalid(format!(
                "snapshot {snap} is not older than the volume's sequence {seq}"
            )));
        }
        let Some(vol) = self.volume(volume, false)? else {
            return Ok(());
        };
        let _admitted = Self::admit(&vol, epoch)?;
        let objects = vol.objects_now();
        for (index, obj) in objects {
            let mut st = obj.state.write().unwrap();
            self.load(&vol, index, &mut st)?;
            match resolve(&st, Some(snap)) {
                Source::Head => {}
                Source::Clone(hi) => {
                    self.replace_head(&vol, index, &mut st, seq, Some(hi))?;
                }
                Source::Absent => {
                    if st.head.as_ref().is_some_and(|h| h.absent && h.seq == seq) {
                        continue;
                    }
                    self.replace_head(&vol, index, &mut st, seq, None)?;
                }
            }
        }
        for dir in &vol.dirs {
            sync_dir(&*self.fs, dir)?;
        }
        Ok(())
    }

    /// Rollback of one object: preserves the head for newer snapshots, then
    /// makes a new head (under `seq`) from the clone file `from`, or an
    /// absent one, durably, replacing the old by rename.
    fn replace_head(
        &self,
        vol: &Vol,
        index: u64,
        st: &mut ObjState,
        seq: u64,
        from: Option<u64>,
    ) -> Result<(), StoreError> {
        self.preserve(vol, index, st, seq)?;
        self.drop_head_file(st);
        let version = st.head.as_ref().map_or(0, |h| h.version) + 1;
        let tmp = vol.odir(index).join(format!("{index:016x}.rollback"));
        let f = match from {
            Some(hi) => {
                let src = self
                    .fs
                    .open(&clone_path(vol.odir(index), index, hi), Mode::Read)
                    .map_err(io_err("copying a snapshot's object back"))?;
                copy_sparse(&*self.fs, &*src, &tmp)?
            }
            None => self
                .fs
                .open(&tmp, Mode::Create)
                .map_err(io_err("rolling back"))?,
        };
        let absent = from.is_none();
        write_header(&*f, KIND_HEAD, version, seq, 0, absent_flag(absent))?;
        f.sync_data().map_err(io_err("rolling back"))?;
        self.fs
            .rename(&tmp, &head_path(vol.odir(index), index))
            .map_err(io_err("rolling back"))?;
        st.replace_head(seq, version, absent);
        Ok(())
    }

    /// Deletes clone files that no live snapshot needs any more.
    pub fn trim_snapshots(
        &self,
        volume: &str,
        live: &[u64],
        known_seq: u64,
    ) -> Result<usize, StoreError> {
        let Some(vol) = self.volume(volume, false)? else {
            return Ok(0);
        };
        let objects = vol.objects_now();
        let mut removed = 0;
        for (index, obj) in objects {
            let mut st = obj.state.write().unwrap();
            self.load(&vol, index, &mut st)?;
            let dead: Vec<u64> = st
                .clones
                .iter()
                // A copy for a snapshot newer than the caller knows of
                // (taken after it read `live`) is that snapshot's.
                .filter(|(hi, _)| **hi <= known_seq)
                .filter(|(hi, lo)| !live.iter().any(|s| *s > **lo && *s <= **hi))
                .map(|(hi, _)| *hi)
                .collect();
            for hi in dead {
                self.fs
                    .remove_file(&clone_path(vol.odir(index), index, hi))
                    .map_err(io_err("removing an unused snapshot copy"))?;
                st.clones.remove(&hi);
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Removes everything stored for the volume.
    pub fn delete_volume(&self, volume: &str) -> Result<(), StoreError> {
        let removed = self.volumes.write().unwrap().remove(volume);
        if let Some(vol) = removed {
            let objects = vol.objects.read().unwrap();
            for obj in objects.values() {
                let mut st = obj.state.write().unwrap();
                self.drop_head_file(&mut st);
            }
            drop(objects);
            for dir in vol.dirs.iter().filter(|d| **d != vol.meta) {
                match self.fs.remove_dir_all(dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(format!("removing {}", dir.display()))(e)),
                }
            }
            self.fs
                .remove_dir_all(&vol.meta)
                .map_err(io_err(format!("removing {}", vol.meta.display())))?;
        }
        Ok(())
    }

    /// What this node holds of the volume, by object index.
    pub fn list(&self, volume: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let Some(vol) = self.volume(volume, false)? else {
            return Ok(Vec::new());
        };
        let objects = vol.objects_now();
        let mut out = Vec::with_capacity(objects.len());
        for (index, obj) in objects {
            let mut st = obj.state.write().unwrap();
            self.load(&vol, index, &mut st)?;
            out.extend(info(index, &st));
        }
        out.sort_by_key(|o| o.index);
        Ok(out)
    }

    /// What this node holds of one object (`None`: nothing at all).
    pub fn stat(&self, volume: &str, index: u64) -> Result<Option<ObjectInfo>, StoreError> {
        let Some(vol) = self.volume(volume, false)? else {
            return Ok(None);
        };
        let Some(obj) = Self::object(&vol, index, false) else {
            return Ok(None);
        };
        let mut st = obj.state.write().unwrap();
        self.load(&vol, index, &mut st)?;
        Ok(info(index, &st))
    }

    /// Resync: installs one snapshot copy `(lo, hi]` of an object, whole
    /// and durable, as an in-sync replica holds it.
    #[allow(clippy::too_many_arguments)]
    pub fn put_clone(
        &self,
        volume: &str,
        index: u64,
        epoch: u64,
        lo: u64,
        hi: u64,
        version: u64,
        data: &[u8],
    ) -> Result<(), StoreError> {
        check_range(0, data.len() as u64)?;
        if lo >= hi {
            return Err(StoreError::Invalid(format!(
                "snapshot copy ({lo}, {hi}] covers no snapshot"
            )));
        }
        let vol = self.fenced_volume(volume)?;
        let _admitted = Self::admit(&vol, epoch)?;
        let obj = Self::object(&vol, index, true).expect("created");
        let mut st = obj.state.write().unwrap();
        self.load(&vol, index, &mut st)?;
        let tmp = vol.odir(index).join(format!("{index:016x}.{hi:016x}.tmp"));
        write_whole(&*self.fs, &tmp, KIND_CLONE, version, hi, lo, false, data)?;
        self.fs
            .rename(&tmp, &clone_path(vol.odir(index), index, hi))
            .map_err(io_err("installing a snapshot copy"))?;
        sync_dir(&*self.fs, vol.odir(index))?;
        st.clones.insert(hi, lo);
        Ok(())
    }

    /// Resync: replaces an object's head, whole and durable, with an
    /// in-sync replica's, then removes snapshot copies not in `keep`.
    #[allow(clippy::too_many_arguments)]
    pub fn put_head(
        &self,
        volume: &str,
        index: u64,
        epoch: u64,
        version: u64,
        seq: u64,
        absent: bool,
        keep: &[u64],
        data: &[u8],
    ) -> Result<(), StoreError> {
        check_range(0, data.len() as u64)?;
        let vol = self.fenced_volume(volume)?;
        let _admitted = Self::admit(&vol, epoch)?;
        let obj = Self::object(&vol, index, true).expect("created");
        let mut st = obj.state.write().unwrap();
        self.load(&vol, index, &mut st)?;
        let tmp = vol.odir(index).join(format!("{index:016x}.resync"));
        write_whole(&*self.fs, &tmp, KIND_HEAD, version, seq, 0, absent, data)?;
        self.drop_head_file(&mut st);
        self.fs
            .rename(&tmp, &head_path(vol.odir(index), index))
            .map_err(io_err("installing an object"))?;
        let extra: Vec<u64> = st
            .clones
            .keys()
            .filter(|hi| !keep.contains(hi))
            .copied()
            .collect();
        for hi in extra {
            self.fs
                .remove_file(&clone_path(vol.odir(index), index, hi))
                .map_err(io_err("removing a snapshot copy the in-sync replicas lack"))?;
            st.clones.remove(&hi);
        }
        sync_dir(&*self.fs, vol.odir(index))?;
        st.replace_head(seq, version, absent);
        st.dirty = false;
        Ok(())
    }

    /// Before an object's first write since it was last synced clean, its
    /// header says durably that it may hold unsynced writes.
    fn mark_dirty(file: &dyn FileIo, st: &mut ObjState) -> Result<(), StoreError> {
        if st.marked {
            return Ok(());
        }
        let h = st.head.as_ref().expect("prepared");
        write_header(file, KIND_HEAD, h.version, h.seq, 0, FLAG_DIRTY)?;
        file.sync_data()
            .map_err(io_err("marking an object as being written"))?;
        st.marked = true;
        Ok(())
    }

    /// A volume a writer may do I/O on: one it fenced.
    fn fenced_volume(&self, volume: &str) -> Result<Arc<Vol>, StoreError> {
        if !valid_volume_id(volume) {
            return Err(StoreError::Invalid(format!(
                "{volume:?} is not a volume id (letters, digits and '-', 1 to 64 characters)"
            )));
        }
        self.volume(volume, false)?
            .ok_or(StoreError::NotFenced { got: 0, current: 0 })
    }

    /// The writer epoch this node has seen for the volume.
    pub fn epoch(&self, volume: &str) -> u64 {
        self.volume(volume, false)
            .ok()
            .flatten()
            .map_or(0, |v| v.epoch.load(Ordering::Acquire))
    }

    /// Reads an object's headers the first time it is used.
    fn load(&self, vol: &Vol, index: u64, st: &mut ObjState) -> Result<(), StoreError> {
        if st.loaded {
            return Ok(());
        }
        let head = head_path(vol.odir(index), index);
        match self.fs.open(&head, Mode::ReadWrite) {
            Ok(f) if never_written(&*f) => {
                // Created, then a power loss before its header reached the
                // disk (its first write syncs the header): nothing in it was
                // ever flushed.
                tracing::info!(
                    "{} was created but never synced before a crash; removing it",
                    head.display()
                );
                self.fs
                    .remove_file(&head)
                    .map_err(io_err(format!("removing {}", head.display())))?;
            }
            Ok(f) => {
                let h = read_header(&*f, &head)?;
                if h.kind != KIND_HEAD {
                    return Err(bad_file(&head, "is not an object head"));
                }
                if h.dirty {
                    let repaired = repair_checksums(&*f)
                        .map_err(io_err(format!("checking {}", head.display())))?;
                    if repaired > 0 {
                        tracing::warn!(
                            "{}: {repaired} blocks were written when the node lost power; their checksums are repaired and the copy is marked uncertain until its peers confirm it",
                            head.display()
                        );
                    }
                    st.uncertain = true;
                    st.marked = true;
                }
                st.head = Some(Head {
                    seq: h.seq,
                    version: h.version,
                    absent: h.absent,
                    file: None,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(StoreError::Io {
                    what: format!("opening {}", head.display()),
                    source: e,
                })
            }
        }
        st.clones.clear();
        for hi in std::mem::take(&mut st.found_clones) {
            let path = clone_path(vol.odir(index), index, hi);
            let f = self
                .fs
                .open(&path, Mode::Read)
                .map_err(io_err(format!("opening {}", path.display())))?;
            let h = read_header(&*f, &path)?;
            st.clones.insert(hi, h.lo);
        }
        st.loaded = true;
        Ok(())
    }

    fn head_file(
        &self,
        vol: &Vol,
        index: u64,
        st: &ObjState,
    ) -> Result<Arc<dyn FileIo>, StoreError> {
        if let Some(f) = st.head.as_ref().and_then(|h| h.file.clone()) {
            return Ok(f);
        }
        let path = head_path(vol.odir(index), index);
        self.fs
            .open(&path, Mode::ReadWrite)
            .map_err(io_err(format!("opening {}", path.display())))
    }

    fn keep_open(&self, st: &mut ObjState, file: &Arc<dyn FileIo>) {
        if let Some(head) = st.head.as_mut() {
            if head.file.is_none() && self.open_files.load(Ordering::Relaxed) < OPEN_FILES_CAP {
                self.open_files.fetch_add(1, Ordering::Relaxed);
                head.file = Some(file.clone());
            }
        }
    }

    fn drop_head_file(&self, st: &mut ObjState) {
        if let Some(head) = st.head.as_mut() {
            if head.file.take().is_some() {
                self.open_files.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Makes the head writable under `seq`: creates it, revives it, or
    /// preserves it for the snapshots taken since it was last written.
    fn prepare_head(
        &self,
        vol: &Vol,
        index: u64,
        st: &mut ObjState,
        seq: u64,
    ) -> Result<Arc<dyn FileIo>, StoreError> {
        match st.head.as_ref() {
            None => {
                let path = head_path(vol.odir(index), index);
                let f = self
                    .fs
                    .open(&path, Mode::Create)
                    .map_err(io_err(format!("creating {}", path.display())))?;
                write_header(&*f, KIND_HEAD, 0, seq, 0, 0)?;
                st.head = Some(Head {
                    seq,
                    version: 0,
                    absent: false,
                    file: None,
                });
                self.keep_open(st, &f);
                return Ok(f);
            }
            Some(h) if h.absent => {
                let file = self.head_file(vol, index, st)?;
                file.set_len(DATA_OFFSET)
                    .map_err(io_err("reviving an object"))?;
                punch_hole(&*file, HEADER, CRC_BYTES)?;
                write_header(&*file, KIND_HEAD, h.version, seq, 0, 0)?;
                st.marked = false;
                let head = st.head.as_mut().expect("matched");
                head.seq = seq;
                head.absent = false;
                self.keep_open(st, &file);
                return Ok(file);
            }
            Some(h) if h.seq < seq => {
                self.preserve(vol, index, st, seq)?;
            }
            Some(h) if h.seq > seq => {
                return Err(StoreError::Invalid(format!(
                    "write under snapshot sequence {seq}, but object {index} was written under {}: the writer's view of the volume is out of date",
                    h.seq
                )));
            }
            Some(_) => {}
        }
        let file = self.head_file(vol, index, st)?;
        self.keep_open(st, &file);
        Ok(file)
    }

    /// Copies a live head to a clone file for snapshots `(head.seq, seq]`,
    /// durably, and moves the head to `seq`.
    fn preserve(
        &self,
        vol: &Vol,
        index: u64,
        st: &mut ObjState,
        seq: u64,
    ) -> Result<(), StoreError> {
        let Some(head) = st.head.as_ref() else {
            return Ok(());
        };
        if head.seq >= seq {
            return Ok(());
        }
        let (lo, version, absent) = (head.seq, head.version, head.absent);
        let keep = if st.marked { FLAG_DIRTY } else { 0 };
        let file = self.head_file(vol, index, st)?;
        if !absent {
            let clone = clone_path(vol.odir(index), index, seq);
            let tmp = vol.odir(index).join(format!("{index:016x}.{seq:016x}.tmp"));
            let c = copy_sparse(&*self.fs, &*file, &tmp)?;
            write_header(&*c, KIND_CLONE, version, seq, lo, 0)?;
            c.sync_data().map_err(io_err("preserving a snapshot"))?;
            self.fs
                .rename(&tmp, &clone)
                .map_err(io_err("preserving a snapshot"))?;
            sync_dir(&*self.fs, vol.odir(index))?;
            st.clones.insert(seq, lo);
        }
        // Durably: a head whose old sequence came back after a crash would
        // be preserved again, over the good copy, on its next write.
        write_header(
            &*file,
            KIND_HEAD,
            version,
            seq,
            0,
            keep | absent_flag(absent),
        )?;
        file.sync_data().map_err(io_err("preserving a snapshot"))?;
        if let Some(h) = st.head.as_mut() {
            h.seq = seq;
        }
        Ok(())
    }
}

impl Vol {
    /// The directory holding object `index`'s files.
    fn odir(&self, index: u64) -> &Path {
        let d = match self.found.get(&index) {
            Some(d) => *d,
            None => self.disks.pick(&self.name, index),
        };
        &self.dirs[d]
    }

    /// The volume's objects as they are now (the map is not held while
    /// they are worked on).
    fn objects_now(&self) -> Vec<(u64, Arc<Obj>)> {
        self.objects
            .read()
            .unwrap()
            .iter()
            .map(|(i, o)| (*i, o.clone()))
            .collect()
    }

    /// Indexes volume `name`'s objects on every disk (creating its
    /// directory where missing) and reads its records from `root`.
    fn scan(
        fs: &dyn Fs,
        root: &Path,
        name: &str,
        disks: &Arc<DiskSet>,
    ) -> Result<Self, StoreError> {
        let mut objects = HashMap::new();
        let mut found: HashMap<u64, usize> = HashMap::new();
        let mut dirs = Vec::with_capacity(disks.disks.len());
        for (d, disk) in disks.disks.iter().enumerate() {
            let dir = disk.dir.join(name);
            fs.create_dir_all(&dir)
                .map_err(io_err(format!("creating {}", dir.display())))?;
            let entries = fs
                .read_dir(&dir)
                .map_err(io_err(format!("reading {}", dir.display())))?;
            for (file, _) in entries {
                if file.ends_with(".tmp")
                    || file.ends_with(".rollback")
                    || file.ends_with(".resync")
                {
                    // Left by a crash before the rename that would have made it count.
                    let _ = fs.remove_file(&dir.join(&file));
                    continue;
                }
                let parts: Vec<&str> = file.split('.').collect();
                let (index, clone) = match parts.as_slice() {
                    [idx, "head"] => (u64::from_str_radix(idx, 16), None),
                    [idx, hi, "clone"] => (
                        u64::from_str_radix(idx, 16),
                        u64::from_str_radix(hi, 16).ok(),
                    ),
                    _ => continue,
                };
                let Ok(index) = index else { continue };
                match found.get(&index) {
                    Some(other) if *other != d => {
                        return Err(StoreError::Invalid(format!(
                            "object {index} of volume {name} has files on two disks ({} and {}); \
                             remove this node's copy of the volume so it is copied again",
                            disks.disks[*other].dir.display(),
                            disk.dir.display()
                        )));
                    }
                    _ => {
                        found.insert(index, d);
                    }
                }
                let state = objects.entry(index).or_insert_with(ObjState::default);
                if let Some(hi) = clone {
                    state.found_clones.push(hi);
                }
            }
            dirs.push(dir);
        }
        // Only objects off their picked disk need remembering.
        found.retain(|index, d| disks.pick(name, *index) != *d);
        let dir = root.join(name);
        let objects = objects
            .into_iter()
            .map(|(i, state)| {
                (
                    i,
                    Arc::new(Obj {
                        state: RwLock::new(state),
                    }),
                )
            })
            .collect();
        let epoch = read_small(fs, &dir.join("epoch"))
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let map = read_small(fs, &dir.join("map"))
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        Ok(Self {
            name: name.to_owned(),
            meta: dir,
            dirs,
            disks: disks.clone(),
            found,
            epoch: AtomicU64::new(epoch),
            map: AtomicU64::new(map),
            io: RwLock::new(()),
            flushing: Mutex::new(()),
            objects: RwLock::new(objects),
        })
    }
}

/// Refuses a writer older than the volume's epoch; returns that epoch.
fn not_older(vol: &Vol, epoch: u64) -> Result<u64, StoreError> {
    let current = vol.epoch.load(Ordering::Acquire);
    if epoch < current {
        return Err(StoreError::StaleEpoch {
            got: epoch,
            current,
        });
    }
    Ok(current)
}

fn info(index: u64, st: &ObjState) -> Option<ObjectInfo> {
    if st.head.is_none() && st.clones.is_empty() {
        return None;
    }
    Some(ObjectInfo {
        index,
        // A lost copy claims no version its peers could have.
        version: if st.lost {
            0
        } else {
            st.head.as_ref().map_or(0, |h| h.version)
        },
        seq: st.head.as_ref().map_or(0, |h| h.seq),
        head: st.head.as_ref().is_some_and(|h| !h.absent),
        uncertain: st.uncertain,
        clones: st.clones.iter().map(|(hi, lo)| (*lo, *hi)).collect(),
    })
}

/// Writes a new object file whole (all-zero blocks stay holes, never
/// written) and syncs it; the caller renames it into place.
#[allow(clippy::too_many_arguments)]
fn write_whole(
    fs: &dyn Fs,
    path: &Path,
    kind: u32,
    version: u64,
    seq: u64,
    lo: u64,
    absent: bool,
    data: &[u8],
) -> Result<(), StoreError> {
    let what = || format!("writing {}", path.display());
    let f = fs.open(path, Mode::Create).map_err(io_err(what()))?;
    write_header(&*f, kind, version, seq, lo, absent_flag(absent))?;
    let mut crcs = vec![0u8; data.len().div_ceil(BLOCK as usize) * 4];
    let mut run: Option<usize> = None;
    let blocks: Vec<&[u8]> = data.chunks(BLOCK as usize).collect();
    for (b, block) in blocks.iter().enumerate() {
        let zero = block.iter().all(|x| *x == 0);
        if !zero {
            let mut full = [0u8; BLOCK as usize];
            full[..block.len()].copy_from_slice(block);
            let crc = nonzero(crc32c::crc32c(&full));
            crcs[b * 4..b * 4 + 4].copy_from_slice(&crc.to_le_bytes());
        }
        match (zero, run) {
            (false, None) => run = Some(b),
            (true, Some(start)) => {
                let (a, z) = (start * BLOCK as usize, b * BLOCK as usize);
                f.write_all_at(&data[a..z], DATA_OFFSET + a as u64)
                    .map_err(io_err(what()))?;
                run = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run {
        let a = start * BLOCK as usize;
        f.write_all_at(&data[a..], DATA_OFFSET + a as u64)
            .map_err(io_err(what()))?;
    }
    f.write_all_at(&crcs, HEADER).map_err(io_err(what()))?;
    f.sync_data().map_err(io_err(what()))
}

fn resolve(st: &ObjState, snap: Option<u64>) -> Source {
    let Some(x) = snap else {
        return match &st.head {
            Some(h) if !h.absent => Source::Head,
            _ => Source::Absent,
        };
    };
    if let Some((hi, lo)) = st.clones.range(x..).next() {
        return if *lo < x {
            Source::Clone(*hi)
        } else {
            Source::Absent
        };
    }
    match &st.head {
        Some(h) if !h.absent && h.seq < x => Source::Head,
        _ => Source::Absent,
    }
}

pub fn valid_volume_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn check_range(offset: u64, len: u64) -> Result<(), StoreError> {
    if offset
        .checked_add(len)
        .is_none_or(|end| end > MAX_OBJECT_SIZE)
    {
        return Err(StoreError::Invalid(format!(
            "range {offset}+{len} lies outside an object (at most {MAX_OBJECT_SIZE} bytes)"
        )));
    }
    Ok(())
}

fn head_path(dir: &Path, index: u64) -> PathBuf {
    dir.join(format!("{index:016x}.head"))
}

fn clone_path(dir: &Path, index: u64, hi: u64) -> PathBuf {
    dir.join(format!("{index:016x}.{hi:016x}.clone"))
}

fn bad_file(path: &Path, why: &str) -> StoreError {
    StoreError::Io {
        what: format!("{} {why}", path.display()),
        source: io::Error::new(io::ErrorKind::InvalidData, "damaged object file"),
    }
}

struct Header {
    kind: u32,
    version: u64,
    seq: u64,
    lo: u64,
    absent: bool,
    dirty: bool,
}

fn absent_flag(absent: bool) -> u32 {
    if absent {
        FLAG_ABSENT
    } else {
        0
    }
}

fn write_header(
    f: &dyn FileIo,
    kind: u32,
    version: u64,
    seq: u64,
    lo: u64,
    flags: u32,
) -> Result<(), StoreError> {
    let mut h = [0u8; 48];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&FORMAT.to_le_bytes());
    h[12..16].copy_from_slice(&kind.to_le_bytes());
    h[16..24].copy_from_slice(&version.to_le_bytes());
    h[24..32].copy_from_slice(&seq.to_le_bytes());
    h[32..40].copy_from_slice(&lo.to_le_bytes());
    h[40..44].copy_from_slice(&flags.to_le_bytes());
    let crc = crc32c::crc32c(&h[..44]);
    h[44..48].copy_from_slice(&crc.to_le_bytes());
    f.write_all_at(&h, 0)
        .map_err(io_err("writing an object header"))
}

/// A head file whose header is missing or all zeros.
fn never_written(f: &dyn FileIo) -> bool {
    let mut h = [0u8; 48];
    f.size().is_ok_and(|l| l < 48) || (read_full(f, 0, &mut h).is_ok() && h.iter().all(|b| *b == 0))
}

/// After a power loss, an object that was being written may hold blocks
/// whose data and checksum did not both reach the disk: such a block holds
/// what some write left (sector by sector), so its checksum is recomputed.
/// Returns how many blocks were repaired; the repairs are synced.
fn repair_checksums(f: &dyn FileIo) -> io::Result<usize> {
    // Every checksum slot: a block past the end of the file (its data never
    // reached the disk) reads as zeros.
    let blocks = CRC_BYTES / 4;
    let mut crcs = vec![0u8; (blocks * 4) as usize];
    read_full(f, HEADER, &mut crcs)?;
    let mut block = vec![0u8; BLOCK as usize];
    let mut repaired = 0;
    for b in 0..blocks {
        let at = (b * 4) as usize;
        let want = u32::from_le_bytes(crcs[at..at + 4].try_into().expect("4 bytes"));
        if want == 0 {
            continue;
        }
        read_full(f, DATA_OFFSET + b * BLOCK, &mut block)?;
        let got = nonzero(crc32c::crc32c(&block));
        if got != want {
            f.write_all_at(&got.to_le_bytes(), HEADER + b * 4)?;
            repaired += 1;
        }
    }
    if repaired > 0 {
        f.sync_data()?;
    }
    Ok(repaired)
}

fn read_header(f: &dyn FileIo, path: &Path) -> Result<Header, StoreError> {
    let mut h = [0u8; 48];
    read_full(f, 0, &mut h).map_err(io_err(format!("reading the header of {}", path.display())))?;
    if &h[..8] != MAGIC || crc32c::crc32c(&h[..44]).to_le_bytes() != h[44..48] {
        return Err(bad_file(path, "has a damaged header"));
    }
    let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
    if u32_at(8) != FORMAT {
        return Err(bad_file(path, "has an unknown format"));
    }
    Ok(Header {
        kind: u32_at(12),
        version: u64_at(16),
        seq: u64_at(24),
        lo: u64_at(32),
        absent: u32_at(40) & FLAG_ABSENT != 0,
        dirty: u32_at(40) & FLAG_DIRTY != 0,
    })
}

/// Writes data and the checksums of the blocks it touches (reading the
/// untouched part of partial blocks).
fn write_checked(
    f: &dyn FileIo,
    offset: u64,
    data: &[u8],
    dir: &Path,
    index: u64,
) -> Result<(), StoreError> {
    if data.is_empty() {
        return Ok(());
    }
    let what = || format!("writing object {index} in {}", dir.display());
    f.write_all_at(data, DATA_OFFSET + offset)
        .map_err(io_err(what()))?;
    let end = offset + data.len() as u64;
    let first = offset / BLOCK;
    let last = (end - 1) / BLOCK;
    let mut crcs = Vec::with_capacity(((last - first + 1) * 4) as usize);
    let mut block = vec![0u8; BLOCK as usize];
    for b in first..=last {
        let (bs, be) = (b * BLOCK, (b + 1) * BLOCK);
        let crc = if bs >= offset && be <= end {
            crc32c::crc32c(&data[(bs - offset) as usize..(be - offset) as usize])
        } else {
            read_full(f, DATA_OFFSET + bs, &mut block).map_err(io_err(what()))?;
            crc32c::crc32c(&block)
        };
        crcs.extend_from_slice(&nonzero(crc).to_le_bytes());
    }
    f.write_all_at(&crcs, HEADER + first * 4)
        .map_err(io_err(what()))
}

/// 0 marks a block never written; a real checksum of 0 is stored as 1 and
/// compared the same way.
fn nonzero(crc: u32) -> u32 {
    if crc == 0 {
        1
    } else {
        crc
    }
}

enum ReadFault {
    Io(io::Error),
    Checksum(u64),
}

fn read_checked(f: &dyn FileIo, offset: u64, len: u64) -> Result<Vec<u8>, ReadFault> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let first = offset / BLOCK;
    let last = (offset + len - 1) / BLOCK;
    let span = ((last - first + 1) * BLOCK) as usize;
    let mut buf = vec![0u8; span];
    read_full(f, DATA_OFFSET + first * BLOCK, &mut buf).map_err(ReadFault::Io)?;
    let mut crcs = vec![0u8; ((last - first + 1) * 4) as usize];
    read_full(f, HEADER + first * 4, &mut crcs).map_err(ReadFault::Io)?;
    for (i, c) in crcs.chunks_exact(4).enumerate() {
        let want = u32::from_le_bytes(c.try_into().expect("4 bytes"));
        if want == 0 {
            continue;
        }
        let block = &buf[i * BLOCK as usize..(i + 1) * BLOCK as usize];
        if nonzero(crc32c::crc32c(block)) != want {
            return Err(ReadFault::Checksum((first + i as u64) * BLOCK));
        }
    }
    let start = (offset - first * BLOCK) as usize;
    buf.truncate(start + len as usize);
    buf.drain(..start);
    Ok(buf)
}

/// Reads as much as the file has; the rest (a sparse tail) stays zero.
fn read_full(f: &dyn FileIo, mut at: u64, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], at) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => {
                done += n;
                at += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn punch_hole(f: &dyn FileIo, offset: u64, len: u64) -> Result<(), StoreError> {
    f.punch_hole(offset, len).map_err(|e| StoreError::Io {
        what: "freeing zeroed blocks".into(),
        source: e,
    })
}

/// Copies an object file to a new file `dst` (returned open), skipping
/// holes so a thin object stays thin. Nothing is synced.
fn copy_sparse(fs: &dyn Fs, src: &dyn FileIo, dst: &Path) -> Result<Arc<dyn FileIo>, StoreError> {
    let out = fs
        .open(dst, Mode::Create)
        .map_err(io_err(format!("creating {}", dst.display())))?;
    let len = src.size().map_err(io_err("reading an object's size"))?;
    out.set_len(len).map_err(io_err("sizing a copy"))?;
    let mut at = 0;
    let mut buf = vec![0u8; 1 << 20];
    while at < len {
        let Some((start, end)) = src.next_data(at).map_err(io_err("finding data"))? else {
            break;
        };
        let mut pos = start;
        while pos < end.min(len) {
            let n = ((end.min(len) - pos) as usize).min(buf.len());
            read_full(src, pos, &mut buf[..n]).map_err(io_err("copying an object"))?;
            out.write_all_at(&buf[..n], pos)
                .map_err(io_err("copying an object"))?;
            pos += n as u64;
        }
        at = end;
    }
    Ok(out)
}

/// A small file's bytes (`None`: missing or unreadable).
fn read_small(fs: &dyn Fs, path: &Path) -> Option<Vec<u8>> {
    let f = fs.open(path, Mode::Read).ok()?;
    let mut buf = vec![0u8; f.size().ok()?.min(4096) as usize];
    read_full(&*f, 0, &mut buf).ok()?;
    Some(buf)
}

fn sync_dir(fs: &dyn Fs, dir: &Path) -> Result<(), StoreError> {
    fs.sync_dir(dir)
        .map_err(io_err(format!("syncing {}", dir.display())))
}

#[cfg(test)]
mod crash_tests;
#[cfg(test)]
mod tests;
