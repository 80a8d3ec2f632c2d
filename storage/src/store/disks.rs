//! The disks one node's store spreads its objects over.
//!
//! Each disk is a directory (the root of a file system made on it) that
//! holds object files; an object's files live on one disk, chosen by
//! weighted rendezvous hashing over the disks (the same function that places
//! replicas on nodes), so disks fill in proportion to their size and adding
//! one moves nothing. The store root keeps the volumes' own small records
//! (writer epoch, storage map) and `disks`, the list of the store's disks;
//! a disk listed there but absent (its marker file missing: not mounted,
//! replaced) stops the store from opening rather than letting it serve the
//! objects it held as never written.
//!
//! A store opened on its root alone, with no disks given or recorded, keeps
//! objects in the root itself.

use std::path::{Path, PathBuf};

use super::{io_err, read_small, sync_dir, StoreError};
use crate::fsio::{Fs, Mode};
use crate::placement::{MapNode, StorageMap};

/// The file in each disk's directory that names the disk.
pub const MARKER: &str = "allod-disk";
const RECORD: &str = "disks";
/// The store root's own directory, when it held objects before disks
/// were given: read from, never chosen for new objects.
const ROOT_ID: &str = "data-dir";

/// One disk of a node's store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Stable name (the file system's UUID); letters, digits and '-'.
    pub id: String,
    /// The directory on the disk's file system that holds objects.
    pub dir: PathBuf,
    /// Relative share of new objects (the disk's size in GiB, at least 1);
    /// 0 for a directory only read from.
    pub weight: u64,
}

#[derive(Debug)]
pub(super) struct DiskSet {
    pub(super) disks: Vec<Disk>,
    /// The disks new objects may go to, as a placement map (node = index
    /// into `disks`).
    map: StorageMap,
}

impl DiskSet {
    fn new(disks: Vec<Disk>) -> Self {
        let nodes = disks
            .iter()
            .enumerate()
            .filter(|(_, d)| d.weight > 0)
            .map(|(i, d)| MapNode {
                node: i as u64,
                weight: d.weight,
                failure_domain: d.id.clone(),
            })
            .collect();
        Self {
            disks,
            map: StorageMap { epoch: 0, nodes },
        }
    }

    /// The disk (index into `disks`) a new file of object `index` of
    /// `volume` goes to.
    pub(super) fn pick(&self, volume: &str, index: u64) -> usize {
        match self.map.nodes.as_slice() {
            [only] => only.node as usize,
            _ => self.map.place(volume, index, 1)[0] as usize,
        }
    }

    /// The store's disks as its root records them (the root alone when it
    /// records none).
    pub(super) fn recorded(fs: &dyn Fs, root: &Path) -> Result<Self, StoreError> {
        let disks = read_record(fs, root)?;
        if disks.is_empty() {
            return Ok(Self::new(vec![Disk {
                id: ROOT_ID.into(),
                dir: root.to_owned(),
                weight: 1,
            }]));
        }
        for d in &disks {
            check_marker(fs, d)?;
        }
        Ok(Self::new(disks))
    }

    /// Takes `given` as the store's disks: every disk recorded before must
    /// be among them (a missing one is refused, naming it); new ones are
    /// marked and recorded. Objects the root held before it had disks stay
    /// readable there.
    pub(super) fn adopt(fs: &dyn Fs, root: &Path, given: Vec<Disk>) -> Result<Self, StoreError> {
        let recorded = read_record(fs, root)?;
        for old in recorded.iter().filter(|d| d.id != ROOT_ID) {
            if !given.iter().any(|g| g.id == old.id) {
                return Err(StoreError::Invalid(format!(
                    "storage disk {} (last at {}) holds part of this node's objects but was not given; \
                     reconnect it, or remove this node from the cluster (`allod cluster remove --force`) \
                     so its copies are made again elsewhere, and set it up anew",
                    old.id,
                    old.dir.display()
                )));
            }
        }
        let mut disks = Vec::new();
        let root_held = recorded.iter().any(|d| d.id == ROOT_ID)
            || (recorded.is_empty() && root_holds_objects(fs, root)?);
        if root_held {
            disks.push(Disk {
                id: ROOT_ID.into(),
                dir: root.to_owned(),
                weight: 0,
            });
        }
        for g in given {
            if !super::valid_volume_id(&g.id) {
                return Err(StoreError::Invalid(format!(
                    "{:?} is not a disk id (letters, digits and '-')",
                    g.id
                )));
            }
            // A disk keeps the weight it was first given, so objects are
            // found where they were put.
            let weight = recorded
                .iter()
                .find(|d| d.id == g.id)
                .map_or(g.weight.max(1), |d| d.weight);
            if recorded.iter().any(|d| d.id == g.id) {
                check_marker(fs, &g)?;
            } else {
                fs.create_dir_all(&g.dir)
                    .map_err(io_err(format!("creating {}", g.dir.display())))?;
                write_file(fs, &g.dir, MARKER, &g.id)?;
            }
            disks.push(Disk { weight, ..g });
        }
        let text: String = disks
            .iter()
            .map(|d| format!("{} {} {}\n", d.id, d.weight, d.dir.display()))
            .collect();
        write_file(fs, root, RECORD, &text)?;
        Ok(Self::new(disks))
    }
}

fn read_record(fs: &dyn Fs, root: &Path) -> Result<Vec<Disk>, StoreError> {
    let Some(bytes) = read_small(fs, &root.join(RECORD)) else {
        return Ok(Vec::new());
    };
    let text = String::from_utf8_lossy(&bytes);
    let mut disks = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut parts = line.splitn(3, ' ');
        let (Some(id), Some(weight), Some(dir)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad_record(root, line));
        };
        let weight = weight.parse().map_err(|_| bad_record(root, line))?;
        disks.push(Disk {
            id: id.into(),
            dir: dir.into(),
            weight,
        });
    }
    Ok(disks)
}

fn bad_record(root: &Path, line: &str) -> StoreError {
    StoreError::Invalid(format!(
        "{}: line {line:?} is not `ID WEIGHT DIRECTORY`",
        root.join(RECORD).display()
    ))
}

/// The disk's directory must name it: an unmounted disk leaves an empty
/// mount point, which would look like a disk that holds nothing.
fn check_marker(fs: &dyn Fs, disk: &Disk) -> Result<(), StoreError> {
    if disk.id == ROOT_ID {
        return Ok(());
    }
    let found = read_small(fs, &disk.dir.join(MARKER))
        .map(|b| String::from_utf8_lossy(&b).trim().to_string());
    match found {
        Some(id) if id == disk.id => Ok(()),
        Some(other) => Err(StoreError::Invalid(format!(
            "{} holds storage disk {other}, not {}: another disk is mounted there",
            disk.dir.display(),
            disk.id
        ))),
        None => Err(StoreError::Invalid(format!(
            "storage disk {} is not at {} (is it mounted?); this node's block store does not \
             start without it, so no object it holds is served as never written",
            disk.id,
            disk.dir.display()
        ))),
    }
}

/// Whether the root holds any object file (a store used before it was
/// given disks).
fn root_holds_objects(fs: &dyn Fs, root: &Path) -> Result<bool, StoreError> {
    let entries = match fs.read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err(format!("reading {}", root.display()))(e)),
    };
    for (name, is_dir) in entries {
        if !is_dir || !super::valid_volume_id(&name) {
            continue;
        }
        let dir = root.join(&name);
        let files = fs
            .read_dir(&dir)
            .map_err(io_err(format!("reading {}", dir.display())))?;
        if files
            .iter()
            .any(|(f, _)| f.ends_with(".head") || f.ends_with(".clone"))
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Replaces `dir/name` with `text`, durably.
fn write_file(fs: &dyn Fs, dir: &Path, name: &str, text: &str) -> Result<(), StoreError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let what = format!("writing {}", dir.join(name).display());
    let f = fs.open(&tmp, Mode::Create).map_err(io_err(what.clone()))?;
    f.set_len(0)
        .and_then(|()| f.write_all_at(text.as_bytes(), 0))
        .and_then(|()| f.sync_data())
        .map_err(io_err(what.clone()))?;
    fs.rename(&tmp, &dir.join(name)).map_err(io_err(what))?;
    sync_dir(fs, dir)
}
