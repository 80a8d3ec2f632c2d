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
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

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
const FLAG_ABSENT: u64 = 1;
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
    /// `(lo, hi]` ranges of snapshot ids preserved in clone files.
    pub clones: Vec<(u64, u64)>,
}

#[derive(Debug)]
struct Head {
    seq: u64,
    version: u64,
    absent: bool,
    file: Option<Arc<File>>,
}

#[derive(Debug, Default)]
struct ObjState {
    loaded: bool,
    /// Clone files found by name when the store was opened, headers unread.
    found_clones: Vec<u64>,
    head: Option<Head>,
    /// hi → lo.
    clones: BTreeMap<u64, u64>,
    dirty: bool,
}

#[derive(Debug)]
struct Obj {
    state: RwLock<ObjState>,
}

#[derive(Debug)]
struct Vol {
    dir: PathBuf,
    epoch: AtomicU64,
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
    root: PathBuf,
    volumes: RwLock<HashMap<String, Arc<Vol>>>,
    open_files: AtomicUsize,
}

impl ObjectStore {
    /// Opens (creating) the store at `root` and indexes the objects in it by
    /// file name; headers are read on first use.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(root).map_err(io_err(format!("creating {}", root.display())))?;
        let mut volumes = HashMap::new();
        for entry in fs::read_dir(root).map_err(io_err(format!("reading {}", root.display())))? {
            let entry = entry.map_err(io_err(format!("reading {}", root.display())))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !entry.path().is_dir() || !valid_volume_id(&name) {
                continue;
            }
            let vol = Vol::scan(entry.path())?;
            volumes.insert(name, Arc::new(vol));
        }
        Ok(Self {
            root: root.to_owned(),
            volumes: RwLock::new(volumes),
            open_files: AtomicUsize::new(0),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
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
        fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        sync_dir(&self.root)?;
        let vol = Arc::new(Vol::scan(dir)?);
        volumes.insert(id.to_owned(), vol.clone());
        Ok(Some(vol))
    }

    /// Admits an operation of writer `epoch`: only the epoch this replica
    /// was last fenced with. The guard is held for the whole operation.
    fn admit(vol: &Vol, epoch: u64) -> Result<std::sync::RwLockReadGuard<'_, ()>, StoreError> {
        let guard = vol.io.read().unwrap();
        let current = vol.epoch.load(Ordering::Acquire);
        if epoch < current {
            return Err(StoreError::StaleEpoch {
                got: epoch,
                current,
            });
        }
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
        let current = vol.epoch.load(Ordering::Acquire);
        if epoch < current {
            return Err(StoreError::StaleEpoch {
                got: epoch,
                current,
            });
        }
        if epoch > current {
            let path = vol.dir.join("epoch");
            let tmp = vol.dir.join("epoch.tmp");
            let f = File::create(&tmp).map_err(io_err("recording the writer epoch"))?;
            f.write_all_at(epoch.to_string().as_bytes(), 0)
                .and_then(|()| f.sync_all())
                .map_err(io_err("recording the writer epoch"))?;
            fs::rename(&tmp, &path).map_err(io_err("recording the writer epoch"))?;
            sync_dir(&vol.dir)?;
            vol.epoch.store(epoch, Ordering::Release);
        }
        Ok(current)
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
        write_checked(&file, offset, data, &vol.dir, index)?;
        let head = st.head.as_mut().expect("prepared");
        head.version += 1;
        st.dirty = true;
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
        let end = offset + len;
        let (first_full, last_full) = (offset.div_ceil(BLOCK) * BLOCK, end / BLOCK * BLOCK);
        if punch && first_full < last_full {
            if offset < first_full {
                write_checked(
                    &file,
                    offset,
                    &vec![0; (first_full - offset) as usize],
                    &vol.dir,
                    index,
                )?;
            }
            punch_hole(&file, DATA_OFFSET + first_full, last_full - first_full)?;
            let zeros = vec![0u8; ((last_full - first_full) / BLOCK * 4) as usize];
            file.write_all_at(&zeros, HEADER + first_full / BLOCK * 4)
                .map_err(io_err("clearing checksums"))?;
            if last_full < end {
                write_checked(
                    &file,
                    last_full,
                    &vec![0; (end - last_full) as usize],
                    &vol.dir,
                    index,
                )?;
            }
        } else {
            let chunk = vec![0u8; len.min(1 << 20) as usize];
            let mut at = offset;
            while at < end {
                let n = (end - at).min(chunk.len() as u64);
                write_checked(&file, at, &chunk[..n as usize], &vol.dir, index)?;
                at += n;
            }
        }
        st.head.as_mut().expect("prepared").version += 1;
        st.dirty = true;
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
                read_checked(&file, offset, len)
            }
            Source::Clone(hi) => {
                let path = clone_path(&vol.dir, index, hi);
                let file =
                    File::open(&path).map_err(io_err(format!("opening {}", path.display())))?;
                read_checked(&file, offset, len)
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

    /// Whether the object's head holds data of its own.
    pub fn exists(&self, volume: &str, index: u64) -> Result<bool, StoreError> {
        let Some(vol) = self.volume(volume, false)? else {
            return Ok(false);
        };
        let Some(obj) = Self::object(&vol, index, false) else {
            return Ok(false);
        };
        let mut st = obj.state.write().unwrap();
        self.load(&vol, index, &mut st)?;
        Ok(st.head.as_ref().is_some_and(|h| !h.absent))
    }

    /// Makes everything written to the volume so far durable.
    pub fn flush(&self, volume: &str) -> Result<(), StoreError> {
        let Some(vol) = self.volume(volume, false)? else {
            return Ok(());
        };
        let _one_flush = vol.flushing.lock().unwrap();
        let objects = vol.objects_now();
        for (index, obj) in objects {
            let (file, version) = {
                let mut st = obj.state.write().unwrap();
                if !st.dirty {
                    continue;
                }
                st.dirty = false;
                let file = self.head_file(&vol, index, &st)?;
                let head = st.head.as_ref().expect("a dirty object has a head");
                write_header(&file, KIND_HEAD, head.version, head.seq, 0, head.absent)?;
                (file, head.version)
            };
            if let Err(e) = file.sync_data() {
                let mut st = obj.state.write().unwrap();
                st.dirty = true;
                return Err(StoreError::Io {
                    what: format!("flushing object {index} (version {version}) of volume {volume}"),
                    source: e,
                });
            }
        }
        sync_dir(&vol.dir)
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
        sync_dir(&vol.dir)
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
        let tmp = vol.dir.join(format!("{index:016x}.rollback"));
        let f = match from {
            Some(hi) => {
                fs::copy(clone_path(&vol.dir, index, hi), &tmp)
                    .map_err(io_err("copying a snapshot's object back"))?;
                OpenOptions::new().write(true).open(&tmp)
            }
            None => File::create(&tmp),
        }
        .map_err(io_err("rolling back"))?;
        let absent = from.is_none();
        write_header(&f, KIND_HEAD, version, seq, 0, absent)?;
        f.sync_all().map_err(io_err("rolling back"))?;
        fs::rename(&tmp, head_path(&vol.dir, index)).map_err(io_err("rolling back"))?;
        st.head = Some(Head {
            seq,
            version,
            absent,
            file: None,
        });
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
                fs::remove_file(clone_path(&vol.dir, index, hi))
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
            fs::remove_dir_all(&vol.dir)
                .map_err(io_err(format!("removing {}", vol.dir.display())))?;
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
        let tmp = vol.dir.join(format!("{index:016x}.{hi:016x}.tmp"));
        write_whole(&tmp, KIND_CLONE, version, hi, lo, false, data)?;
        fs::rename(&tmp, clone_path(&vol.dir, index, hi))
            .map_err(io_err("installing a snapshot copy"))?;
        sync_dir(&vol.dir)?;
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
        let tmp = vol.dir.join(format!("{index:016x}.resync"));
        write_whole(&tmp, KIND_HEAD, version, seq, 0, absent, data)?;
        self.drop_head_file(&mut st);
        fs::rename(&tmp, head_path(&vol.dir, index)).map_err(io_err("installing an object"))?;
        let extra: Vec<u64> = st
            .clones
            .keys()
            .filter(|hi| !keep.contains(hi))
            .copied()
            .collect();
        for hi in extra {
            fs::remove_file(clone_path(&vol.dir, index, hi))
                .map_err(io_err("removing a snapshot copy the in-sync replicas lack"))?;
            st.clones.remove(&hi);
        }
        sync_dir(&vol.dir)?;
        st.head = Some(Head {
            seq,
            version,
            absent,
            file: None,
        });
        st.dirty = false;
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
        let head = head_path(&vol.dir, index);
        match File::open(&head) {
            Ok(f) => {
                let h = read_header(&f, &head)?;
                if h.kind != KIND_HEAD {
                    return Err(bad_file(&head, "is not an object head"));
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
            let path = clone_path(&vol.dir, index, hi);
            let f = File::open(&path).map_err(io_err(format!("opening {}", path.display())))?;
            let h = read_header(&f, &path)?;
            st.clones.insert(hi, h.lo);
        }
        st.loaded = true;
        Ok(())
    }

    fn head_file(&self, vol: &Vol, index: u64, st: &ObjState) -> Result<Arc<File>, StoreError> {
        if let Some(f) = st.head.as_ref().and_then(|h| h.file.clone()) {
            return Ok(f);
        }
        let path = head_path(&vol.dir, index);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(format!("opening {}", path.display())))?;
        Ok(Arc::new(f))
    }

    fn keep_open(&self, st: &mut ObjState, file: &Arc<File>) {
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
    ) -> Result<Arc<File>, StoreError> {
        match st.head.as_ref() {
            None => {
                let path = head_path(&vol.dir, index);
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)
                    .map_err(io_err(format!("creating {}", path.display())))?;
                write_header(&f, KIND_HEAD, 0, seq, 0, false)?;
                let f = Arc::new(f);
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
                punch_hole(&file, HEADER, CRC_BYTES)?;
                write_header(&file, KIND_HEAD, h.version, seq, 0, false)?;
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
        let file = self.head_file(vol, index, st)?;
        if !absent {
            let clone = clone_path(&vol.dir, index, seq);
            let tmp = vol.dir.join(format!("{index:016x}.{seq:016x}.tmp"));
            write_header(&file, KIND_HEAD, version, lo, 0, false)?;
            copy_sparse(&file, &tmp)?;
            let c = OpenOptions::new()
                .write(true)
                .open(&tmp)
                .map_err(io_err("preserving a snapshot"))?;
            write_header(&c, KIND_CLONE, version, seq, lo, false)?;
            c.sync_all().map_err(io_err("preserving a snapshot"))?;
            fs::rename(&tmp, &clone).map_err(io_err("preserving a snapshot"))?;
            sync_dir(&vol.dir)?;
            st.clones.insert(seq, lo);
        }
        write_header(&file, KIND_HEAD, version, seq, 0, absent)?;
        if let Some(h) = st.head.as_mut() {
            h.seq = seq;
        }
        Ok(())
    }
}

impl Vol {
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

    fn scan(dir: PathBuf) -> Result<Self, StoreError> {
        let mut objects = HashMap::new();
        for entry in fs::read_dir(&dir).map_err(io_err(format!("reading {}", dir.display())))? {
            let entry = entry.map_err(io_err(format!("reading {}", dir.display())))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") || name.ends_with(".rollback") || name.ends_with(".resync") {
                // Left by a crash before the rename that would have made it count.
                let _ = fs::remove_file(entry.path());
                continue;
            }
            let parts: Vec<&str> = name.split('.').collect();
            let (index, clone) = match parts.as_slice() {
                [idx, "head"] => (u64::from_str_radix(idx, 16), None),
                [idx, hi, "clone"] => (
                    u64::from_str_radix(idx, 16),
                    u64::from_str_radix(hi, 16).ok(),
                ),
                _ => continue,
            };
            let Ok(index) = index else { continue };
            let state = objects.entry(index).or_insert_with(ObjState::default);
            if let Some(hi) = clone {
                state.found_clones.push(hi);
            }
        }
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
        let epoch = fs::read_to_string(dir.join("epoch"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        Ok(Self {
            dir,
            epoch: AtomicU64::new(epoch),
            io: RwLock::new(()),
            flushing: Mutex::new(()),
            objects: RwLock::new(objects),
        })
    }
}

fn info(index: u64, st: &ObjState) -> Option<ObjectInfo> {
    if st.head.is_none() && st.clones.is_empty() {
        return None;
    }
    Some(ObjectInfo {
        index,
        version: st.head.as_ref().map_or(0, |h| h.version),
        seq: st.head.as_ref().map_or(0, |h| h.seq),
        head: st.head.as_ref().is_some_and(|h| !h.absent),
        clones: st.clones.iter().map(|(hi, lo)| (*lo, *hi)).collect(),
    })
}

/// Writes a new object file whole (all-zero blocks stay holes, never
/// written) and syncs it; the caller renames it into place.
fn write_whole(
    path: &Path,
    kind: u32,
    version: u64,
    seq: u64,
    lo: u64,
    absent: bool,
    data: &[u8],
) -> Result<(), StoreError> {
    let what = || format!("writing {}", path.display());
    let f = File::create(path).map_err(io_err(what()))?;
    write_header(&f, kind, version, seq, lo, absent)?;
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
    f.sync_all().map_err(io_err(what()))
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
}

fn write_header(
    f: &File,
    kind: u32,
    version: u64,
    seq: u64,
    lo: u64,
    absent: bool,
) -> Result<(), StoreError> {
    let mut h = [0u8; 48];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&FORMAT.to_le_bytes());
    h[12..16].copy_from_slice(&kind.to_le_bytes());
    h[16..24].copy_from_slice(&version.to_le_bytes());
    h[24..32].copy_from_slice(&seq.to_le_bytes());
    h[32..40].copy_from_slice(&lo.to_le_bytes());
    h[40..44].copy_from_slice(&(if absent { FLAG_ABSENT as u32 } else { 0 }).to_le_bytes());
    let crc = crc32c::crc32c(&h[..44]);
    h[44..48].copy_from_slice(&crc.to_le_bytes());
    f.write_all_at(&h, 0)
        .map_err(io_err("writing an object header"))
}

fn read_header(f: &File, path: &Path) -> Result<Header, StoreError> {
    let mut h = [0u8; 48];
    f.read_exact_at(&mut h, 0)
        .map_err(io_err(format!("reading the header of {}", path.display())))?;
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
        absent: u64::from(u32_at(40)) & FLAG_ABSENT != 0,
    })
}

/// Writes data and the checksums of the blocks it touches (reading the
/// untouched part of partial blocks).
fn write_checked(
    f: &File,
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

fn read_checked(f: &File, offset: u64, len: u64) -> Result<Vec<u8>, ReadFault> {
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
fn read_full(f: &File, mut at: u64, buf: &mut [u8]) -> io::Result<()> {
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

fn punch_hole(f: &File, offset: u64, len: u64) -> Result<(), StoreError> {
    use nix::fcntl::{fallocate, FallocateFlags};
    fallocate(
        f,
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        offset as i64,
        len as i64,
    )
    .map_err(|e| StoreError::Io {
        what: "freeing zeroed blocks".into(),
        source: io::Error::from(e),
    })
}

/// Copies an object file, skipping holes so a thin object stays thin.
fn copy_sparse(src: &File, dst: &Path) -> Result<(), StoreError> {
    use nix::unistd::{lseek, Whence};
    let out = File::create(dst).map_err(io_err(format!("creating {}", dst.display())))?;
    let len = src
        .metadata()
        .map_err(io_err("reading an object's size"))?
        .len();
    out.set_len(len).map_err(io_err("sizing a snapshot copy"))?;
    let mut at: i64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    while (at as u64) < len {
        let data = match lseek(src, at, Whence::SeekData) {
            Ok(d) => d,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => {
                return Err(StoreError::Io {
                    what: "finding data".into(),
                    source: io::Error::from(e),
                })
            }
        };
        let hole = lseek(src, data, Whence::SeekHole).map_err(|e| StoreError::Io {
            what: "finding holes".into(),
            source: io::Error::from(e),
        })?;
        let mut pos = data as u64;
        while pos < hole as u64 {
            let n = ((hole as u64 - pos) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], pos)
                .map_err(io_err("copying an object"))?;
            out.write_all_at(&buf[..n], pos)
                .map_err(io_err("copying an object"))?;
            pos += n as u64;
        }
        at = hole;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(format!("syncing {}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, ObjectStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = ObjectStore::open(dir.path()).unwrap();
        s.fence("v1", 1).unwrap();
        (dir, s)
    }

    fn read(s: &ObjectStore, snap: Option<u64>, off: u64, len: u64) -> Option<Vec<u8>> {
        s.read("v1", 0, snap, off, len, 1).unwrap()
    }

    #[test]
    fn unwritten_objects_are_absent_and_writes_read_back() {
        let (_d, s) = store();
        assert_eq!(read(&s, None, 0, 10), None);
        s.write("v1", 0, 5000, b"hello", 0, 1).unwrap();
        let got = read(&s, None, 4998, 9).unwrap();
        assert_eq!(&got, b"\0\0hello\0\0");
        // Never-written parts of an existing object read as zeros.
        assert_eq!(read(&s, None, 1 << 20, 4).unwrap(), vec![0; 4]);
        assert!(s.exists("v1", 0).unwrap());
        assert!(!s.exists("v1", 1).unwrap());
    }

    #[test]
    fn a_snapshot_keeps_what_was_there_when_it_was_taken() {
        let (_d, s) = store();
        s.write("v1", 0, 0, b"one", 0, 1).unwrap();
        // Snapshot 1 taken; writes now carry seq 1.
        s.write("v1", 0, 0, b"two", 1, 1).unwrap();
        // Snapshot 2 taken.
        s.write("v1", 0, 0, b"333", 2, 1).unwrap();
        assert_eq!(read(&s, Some(1), 0, 3).unwrap(), b"one");
        assert_eq!(read(&s, Some(2), 0, 3).unwrap(), b"two");
        assert_eq!(read(&s, None, 0, 3).unwrap(), b"333");
        // Snapshot 3 has not been overwritten since: it reads the head.
        assert_eq!(read(&s, Some(3), 0, 3).unwrap(), b"333");
        // An object first written after a snapshot did not exist in it.
        s.write("v1", 1, 0, b"new", 2, 1).unwrap();
        assert_eq!(s.read("v1", 1, Some(2), 0, 3, 1).unwrap(), None);
        assert_eq!(s.read("v1", 1, Some(3), 0, 3, 1).unwrap().unwrap(), b"new");
    }

    #[test]
    fn rollback_restores_content_and_absence_and_keeps_newer_snapshots() {
        let (_d, s) = store();
        s.write("v1", 0, 0, b"aaa", 0, 1).unwrap();
        // Snapshot 1. Object 1 appears only after it.
        s.write("v1", 0, 0, b"bbb", 1, 1).unwrap();
        s.write("v1", 1, 0, b"zzz", 1, 1).unwrap();
        // Snapshot 2, then roll back to 1 (writes now carry seq 2).
        s.rollback("v1", 1, 2, 1).unwrap();
        assert_eq!(read(&s, None, 0, 3).unwrap(), b"aaa");
        assert_eq!(s.read("v1", 1, None, 0, 3, 1).unwrap(), None);
        // Snapshot 2 still sees what was there before the rollback.
        assert_eq!(read(&s, Some(2), 0, 3).unwrap(), b"bbb");
        assert_eq!(s.read("v1", 1, Some(2), 0, 3, 1).unwrap().unwrap(), b"zzz");
        // Writing the rolled-back-away object creates it afresh: zeros around.
        s.write("v1", 1, 1, b"y", 2, 1).unwrap();
        assert_eq!(s.read("v1", 1, None, 0, 3, 1).unwrap().unwrap(), b"\0y\0");
        // State survives reopening the store.
        drop(s);
        let s = ObjectStore::open(_d.path()).unwrap();
        assert_eq!(read(&s, None, 0, 3).unwrap(), b"aaa");
        assert_eq!(read(&s, Some(2), 0, 3).unwrap(), b"bbb");
        assert_eq!(read(&s, Some(1), 0, 3).unwrap(), b"aaa");
        assert_eq!(s.read("v1", 1, None, 0, 3, 1).unwrap().unwrap(), b"\0y\0");
    }

    #[test]
    fn older_writers_are_fenced() {
        let (d, s) = store();
        assert_eq!(s.fence("v1", 5).unwrap(), 1);
        s.write("v1", 0, 0, b"x", 0, 5).unwrap();
        let err = s.write("v1", 0, 0, b"y", 0, 4).unwrap_err();
        assert!(
            matches!(err, StoreError::StaleEpoch { got: 4, current: 5 }),
            "{err}"
        );
        drop(s);
        let s = ObjectStore::open(d.path()).unwrap();
        assert_eq!(s.epoch("v1"), 5);
        assert!(s.zero("v1", 0, 0, 1, false, 0, 3).is_err());
        assert_eq!(s.read("v1", 0, None, 0, 1, 5).unwrap().unwrap(), b"x");
    }

    /// Before: a replica learnt of a new writer only when written, accepted
    /// any epoch for a volume it had never stored, and never fenced reads.
    #[test]
    fn a_fence_refuses_the_old_writer_reads_included_and_a_new_one_must_fence_first() {
        let (d, s) = store();
        s.write("v1", 0, 0, b"old", 0, 1).unwrap();
        // Snapshot 1, then written again: snapshot reads need no epoch.
        s.write("v1", 0, 0, b"new", 1, 1).unwrap();
        assert_eq!(s.fence("v1", 2).unwrap(), 1);
        for err in [
            s.read("v1", 0, None, 0, 3, 1).unwrap_err(),
            s.write("v1", 0, 0, b"x", 1, 1).unwrap_err(),
            s.zero("v1", 0, 0, 1, false, 1, 1).unwrap_err(),
            s.rollback("v1", 1, 1, 1).unwrap_err(),
        ] {
            assert!(
                matches!(err, StoreError::StaleEpoch { got: 1, current: 2 }),
                "{err}"
            );
        }
        assert_eq!(s.read("v1", 0, None, 0, 3, 2).unwrap().unwrap(), b"new");
        assert_eq!(s.read("v1", 0, Some(1), 0, 3, 0).unwrap().unwrap(), b"old");
        // A writer this replica was never fenced for is refused, on a
        // volume it holds and on one it has never seen.
        let err = s.write("v1", 0, 0, b"x", 1, 3).unwrap_err();
        assert!(
            matches!(err, StoreError::NotFenced { got: 3, current: 2 }),
            "{err}"
        );
        for err in [
            s.write("v2", 0, 0, b"x", 0, 7).unwrap_err(),
            s.read("v2", 0, None, 0, 1, 7).unwrap_err(),
        ] {
            assert!(matches!(err, StoreError::NotFenced { .. }), "{err}");
        }
        assert!(!d.path().join("v2").exists());
        // An older fence changes nothing; the same one is answered again.
        assert!(s.fence("v1", 1).is_err());
        assert_eq!(s.fence("v1", 2).unwrap(), 2);
        // The epoch survives a restart.
        drop(s);
        let s = ObjectStore::open(d.path()).unwrap();
        assert!(s.read("v1", 0, None, 0, 3, 1).is_err());
        assert_eq!(s.read("v1", 0, None, 0, 3, 2).unwrap().unwrap(), b"new");
    }

    /// A fence waits for an older writer's operation in progress, and no
    /// operation of that writer lands after the fence answered.
    #[test]
    fn a_fence_is_atomic_with_the_io_it_guards() {
        let (_d, s) = store();
        let s = Arc::new(s);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (s, stop) = (s.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    match s.write("v1", n % 4, 0, &n.to_le_bytes(), 0, 1) {
                        Ok(()) => n += 1,
                        Err(StoreError::StaleEpoch { .. }) => return n,
                        Err(e) => panic!("{e}"),
                    }
                }
                n
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        s.fence("v1", 2).unwrap();
        let seen: Vec<ObjectInfo> = s.list("v1").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        stop.store(true, Ordering::Relaxed);
        let written = writer.join().unwrap();
        assert!(written > 0);
        assert_eq!(
            s.list("v1").unwrap(),
            seen,
            "a write landed after the fence"
        );
    }

    #[test]
    fn an_object_copied_whole_reads_the_same_with_its_snapshots() {
        let (_a, a) = store();
        let (_b, b) = store();
        a.write("v1", 0, 0, &[1u8; 5000], 0, 1).unwrap();
        a.write("v1", 0, 8192, &[2u8; 10], 1, 1).unwrap(); // copy (0,1]
        a.write("v1", 0, 0, &[3u8; 3], 2, 1).unwrap(); // copy (1,2]
                                                       // The stale replica holds an older head and a copy since trimmed.
        b.write("v1", 0, 0, &[9u8; 7], 0, 1).unwrap();
        b.write("v1", 0, 0, &[9u8; 7], 5, 1).unwrap();
        let info = a.stat("v1", 0).unwrap().unwrap();
        for (lo, hi) in &info.clones {
            let data = a.read("v1", 0, Some(*hi), 0, 16384, 0).unwrap().unwrap();
            b.put_clone("v1", 0, 1, *lo, *hi, info.version, &data)
                .unwrap();
        }
        let head = a.read("v1", 0, None, 0, 16384, 1).unwrap().unwrap();
        let keep: Vec<u64> = info.clones.iter().map(|c| c.1).collect();
        b.put_head("v1", 0, 1, info.version, info.seq, !info.head, &keep, &head)
            .unwrap();
        assert_eq!(b.stat("v1", 0).unwrap().unwrap(), info);
        for snap in [None, Some(1), Some(2), Some(3)] {
            let e = if snap.is_none() { 1 } else { 0 };
            assert_eq!(
                a.read("v1", 0, snap, 0, 16384, e).unwrap(),
                b.read("v1", 0, snap, 0, 16384, e).unwrap(),
                "{snap:?}"
            );
        }
        // And after reopening (the copies were made durable by rename).
        let b = ObjectStore::open(_b.path()).unwrap();
        assert_eq!(b.list("v1").unwrap(), a.list("v1").unwrap());
        // Zero blocks stayed holes.
        let meta = fs::metadata(_b.path().join("v1").join(format!("{:016x}.head", 0))).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert!(
            meta.blocks() * 512 <= DATA_OFFSET + 3 * 4096,
            "{}",
            meta.blocks() * 512
        );
    }

    #[test]
    fn damaged_data_is_detected_not_returned() {
        let (d, s) = store();
        s.write("v1", 0, 0, &[7u8; 8192], 0, 1).unwrap();
        s.flush("v1").unwrap();
        let path = d.path().join("v1").join(format!("{:016x}.head", 0));
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(b"rot", DATA_OFFSET + 4100).unwrap();
        assert!(matches!(
            s.read("v1", 0, None, 0, 10, 1).unwrap().as_deref(),
            Some([7, 7, 7, 7, 7, 7, 7, 7, 7, 7])
        ));
        let err = s.read("v1", 0, None, 4096, 10, 1).unwrap_err();
        assert!(
            matches!(err, StoreError::Checksum { offset: 4096, .. }),
            "{err}"
        );
    }

    #[test]
    fn zeroing_punches_whole_blocks_and_writes_partial_ones() {
        let (d, s) = store();
        s.write("v1", 0, 0, &[9u8; 3 * 4096], 0, 1).unwrap();
        s.zero("v1", 0, 100, 3 * 4096 - 200, true, 0, 1).unwrap();
        let got = read(&s, None, 0, 3 * 4096).unwrap();
        assert!(got[..100].iter().all(|b| *b == 9));
        assert!(got[100..3 * 4096 - 100].iter().all(|b| *b == 0));
        assert!(got[3 * 4096 - 100..].iter().all(|b| *b == 9));
        s.flush("v1").unwrap();
        let meta = fs::metadata(d.path().join("v1").join(format!("{:016x}.head", 0))).unwrap();
        use std::os::unix::fs::MetadataExt;
        // Header + checksums + the two partial blocks; the middle one is a hole.
        assert!(
            meta.blocks() * 512 <= DATA_OFFSET + 2 * 4096,
            "{} bytes",
            meta.blocks() * 512
        );
    }

    #[test]
    fn trimming_removes_only_copies_no_live_snapshot_needs() {
        let (_d, s) = store();
        s.write("v1", 0, 0, b"a", 0, 1).unwrap();
        s.write("v1", 0, 0, b"b", 1, 1).unwrap(); // clone (0,1]
        s.write("v1", 0, 0, b"c", 3, 1).unwrap(); // clone (1,3]: snapshots 2, 3
        assert_eq!(s.list("v1").unwrap()[0].clones, vec![(0, 1), (1, 3)]);
        // Snapshot 1 deleted; 3 lives.
        assert_eq!(s.trim_snapshots("v1", &[3], 3).unwrap(), 1);
        assert_eq!(read(&s, Some(3), 0, 1).unwrap(), b"b");
        assert_eq!(s.trim_snapshots("v1", &[], 3).unwrap(), 1);
        assert!(s.list("v1").unwrap()[0].clones.is_empty());
    }

    /// The collector reads the live snapshots, then trims; a snapshot taken
    /// in between (and a write under it that made its first copy) is not
    /// among them. Its copy must survive the trim.
    #[test]
    fn a_snapshot_taken_while_the_collector_runs_keeps_its_copy() {
        let (_d, s) = store();
        s.write("v1", 0, 0, b"a", 0, 1).unwrap();
        // The collector reads: no live snapshot, the volume at seq 0.
        let (live, known_seq): (Vec<u64>, u64) = (Vec::new(), 0);
        // Meanwhile snapshot 1 is taken and the object written under it.
        s.write("v1", 0, 0, b"b", 1, 1).unwrap();
        assert_eq!(s.list("v1").unwrap()[0].clones, vec![(0, 1)]);
        assert_eq!(s.trim_snapshots("v1", &live, known_seq).unwrap(), 0);
        assert_eq!(read(&s, Some(1), 0, 1).unwrap(), b"a");
    }

    #[test]
    fn bad_requests_are_refused_plainly() {
        let (_d, s) = store();
        assert!(matches!(
            s.write("v1", 0, MAX_OBJECT_SIZE, b"x", 0, 1),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            s.write("../etc", 0, 0, b"x", 0, 1),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            s.read("v1", 0, None, u64::MAX, 2, 1),
            Err(StoreError::Invalid(_))
        ));
        s.write("v1", 0, 0, b"x", 2, 1).unwrap();
        assert!(matches!(
            s.write("v1", 0, 0, b"x", 1, 1),
            Err(StoreError::Invalid(_))
        ));
    }

    #[test]
    fn deleting_a_volume_removes_its_files() {
        let (d, s) = store();
        s.write("v1", 3, 0, b"x", 0, 1).unwrap();
        s.delete_volume("v1").unwrap();
        assert!(!d.path().join("v1").exists());
        assert_eq!(s.stat("v1", 3).unwrap(), None);
        assert!(s.read("v1", 3, None, 0, 1, 1).is_err());
        assert!(s.volumes().is_empty());
    }
}
