//! A file system in memory that records every write and sync, for crash
//! tests: [`SimFs::crash`] gives a state a power loss could leave (what was
//! synced, plus any subset of the writes since, each torn at 512-byte
//! sectors, and a prefix of each directory's unsynced entry changes), and
//! [`SimFs::fail_next_syncs`] makes syncs fail the way Linux's do (the
//! unsynced data is dropped, the error reported once).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{FileIo, Fs, Mode};

/// The sector a disk writes atomically.
pub const SECTOR: u64 = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    File(usize),
    Dir,
}

#[derive(Debug, Clone)]
enum DataOp {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
    Punch { offset: u64, len: u64 },
}

#[derive(Debug, Clone)]
enum NameOp {
    Link(PathBuf, Entry),
    Unlink(PathBuf),
    Rename(PathBuf, PathBuf),
}

#[derive(Debug, Clone, Default)]
struct Inode {
    data: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<DataOp>,
}

#[derive(Debug, Default)]
struct State {
    inodes: Vec<Inode>,
    names: BTreeMap<PathBuf, Entry>,
    durable_names: BTreeMap<PathBuf, Entry>,
    /// Per directory, entry changes not yet synced, in order.
    pending_names: BTreeMap<PathBuf, Vec<NameOp>>,
    fail_syncs: usize,
}

/// A recording file system; clones share one state.
#[derive(Debug, Clone)]
pub struct SimFs(Arc<Mutex<State>>);

/// A small deterministic generator (xorshift64*), so a failing crash state
/// is reproduced from its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `p` per mille.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

fn apply(data: &mut Vec<u8>, op: &DataOp) {
    match op {
        DataOp::Write { offset, data: d } => {
            let end = *offset as usize + d.len();
            if data.len() < end {
                data.resize(end, 0);
            }
            data[*offset as usize..end].copy_from_slice(d);
        }
        DataOp::SetLen(len) => data.resize(*len as usize, 0),
        DataOp::Punch { offset, len } => {
            let start = (*offset as usize).min(data.len());
            let end = ((offset + len) as usize).min(data.len());
            data[start..end].fill(0);
        }
    }
}

fn apply_name(names: &mut BTreeMap<PathBuf, Entry>, op: &NameOp) {
    match op {
        NameOp::Link(p, e) => {
            names.insert(p.clone(), *e);
        }
        NameOp::Unlink(p) => {
            names.remove(p);
        }
        NameOp::Rename(from, to) => {
            if let Some(e) = names.remove(from) {
                names.insert(to.clone(), e);
            }
        }
    }
}

fn parent(p: &Path) -> PathBuf {
    p.parent().map(Path::to_path_buf).unwrap_or_default()
}

fn not_found(p: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} not found", p.display()),
    )
}

impl Default for SimFs {
    fn default() -> Self {
        Self::new()
    }
}

impl SimFs {
    /// An empty file system whose root directory exists durably.
    pub fn new() -> Self {
        let mut st = State::default();
        st.names.insert(PathBuf::from("/"), Entry::Dir);
        st.durable_names.insert(PathBuf::from("/"), Entry::Dir);
        Self(Arc::new(Mutex::new(st)))
    }

    /// The next `n` syncs fail, losing what they would have made durable.
    pub fn fail_next_syncs(&self, n: usize) {
        self.0.lock().unwrap().fail_syncs = n;
    }

    /// A state a power loss now could leave, as a new file system.
    pub fn crash(&self, rng: &mut Rng) -> SimFs {
        let st = self.0.lock().unwrap();
        let mut names = st.durable_names.clone();
        for ops in st.pending_names.values() {
            let keep = rng.below(ops.len() as u64 + 1) as usize;
            for op in &ops[..keep] {
                apply_name(&mut names, op);
            }
        }
        // How eagerly the page cache was written back before the crash.
        let per_mille = rng.below(1001);
        let inodes = st
            .inodes
            .iter()
            .map(|ino| {
                let mut data = ino.durable.clone();
                for op in &ino.pending {
                    match op {
                        DataOp::Write { offset, data: d } => {
                            // Each sector of the write landed or not.
                            let end = offset + d.len() as u64;
                            let mut at = *offset;
                            while at < end {
                                let next = ((at / SECTOR + 1) * SECTOR).min(end);
                                if rng.chance(per_mille) {
                                    let piece =
                                        &d[(at - offset) as usize..(next - offset) as usize];
                                    apply(
                                        &mut data,
                                        &DataOp::Write {
                                            offset: at,
                                            data: piece.to_vec(),
                                        },
                                    );
                                }
                                at = next;
                            }
                        }
                        other => {
                            if rng.chance(per_mille) {
                                apply(&mut data, other);
                            }
                        }
                    }
                }
                Inode {
                    data: data.clone(),
                    durable: data,
                    pending: Vec::new(),
                }
            })
            .collect();
        SimFs(Arc::new(Mutex::new(State {
            inodes,
            names: names.clone(),
            durable_names: names,
            pending_names: BTreeMap::new(),
            fail_syncs: 0,
        })))
    }
}

impl State {
    fn link(&mut self, path: &Path, e: Entry) {
        self.names.insert(path.to_path_buf(), e);
        self.pending_names
            .entry(parent(path))
            .or_default()
            .push(NameOp::Link(path.to_path_buf(), e));
    }

    fn dir_exists(&self, path: &Path) -> bool {
        self.names.get(path) == Some(&Entry::Dir)
    }
}

impl Fs for SimFs {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut st = self.0.lock().unwrap();
        let mut missing = Vec::new();
        let mut p = Some(path);
        while let Some(dir) = p {
            match st.names.get(dir) {
                Some(Entry::Dir) => break,
                Some(Entry::File(_)) => {
                    return Err(io::Error::other(format!("{} is a file", dir.display())))
                }
                None => missing.push(dir.to_path_buf()),
            }
            p = dir.parent();
        }
        for dir in missing.into_iter().rev() {
            st.link(&dir, Entry::Dir);
        }
        Ok(())
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<(String, bool)>> {
        let st = self.0.lock().unwrap();
        if !st.dir_exists(path) {
            return Err(not_found(path));
        }
        Ok(st
            .names
            .iter()
            .filter(|(p, _)| p.parent() == Some(path))
            .map(|(p, e)| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                (name, *e == Entry::Dir)
            })
            .collect())
    }

    fn open(&self, path: &Path, mode: Mode) -> io::Result<Arc<dyn FileIo>> {
        let mut st = self.0.lock().unwrap();
        let ino = match (st.names.get(path).copied(), mode) {
            (Some(Entry::File(ino)), Mode::Create) => {
                let inode = &mut st.inodes[ino];
                inode.data.clear();
                inode.pending.push(DataOp::SetLen(0));
                ino
            }
            (Some(Entry::File(ino)), _) => ino,
            (Some(Entry::Dir), _) => {
                return Err(io::Error::other(format!(
                    "{} is a directory",
                    path.display()
                )))
            }
            (None, Mode::Create) => {
                if !st.dir_exists(&parent(path)) {
                    return Err(not_found(&parent(path)));
                }
                st.inodes.push(Inode::default());
                let ino = st.inodes.len() - 1;
                st.link(path, Entry::File(ino));
                ino
            }
            (None, _) => return Err(not_found(path)),
        };
        Ok(Arc::new(SimFile {
            fs: self.clone(),
            ino,
            writable: mode != Mode::Read,
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut st = self.0.lock().unwrap();
        let e = st.names.remove(from).ok_or_else(|| not_found(from))?;
        st.names.insert(to.to_path_buf(), e);
        st.pending_names
            .entry(parent(to))
            .or_default()
            .push(NameOp::Rename(from.to_path_buf(), to.to_path_buf()));
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut st = self.0.lock().unwrap();
        st.names.remove(path).ok_or_else(|| not_found(path))?;
        st.pending_names
            .entry(parent(path))
            .or_default()
            .push(NameOp::Unlink(path.to_path_buf()));
        Ok(())
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut st = self.0.lock().unwrap();
        let doomed: Vec<PathBuf> = st
            .names
            .keys()
            .filter(|p| p.starts_with(path))
            .cloned()
            .collect();
        for p in doomed {
            st.names.remove(&p);
            st.pending_names
                .entry(parent(&p))
                .or_default()
                .push(NameOp::Unlink(p));
        }
        Ok(())
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let mut st = self.0.lock().unwrap();
        if !st.dir_exists(path) {
            return Err(not_found(path));
        }
        let ops = st.pending_names.remove(path).unwrap_or_default();
        for op in &ops {
            apply_name(&mut st.durable_names, op);
        }
        Ok(())
    }
}

#[derive(Debug)]
struct SimFile {
    fs: SimFs,
    ino: usize,
    writable: bool,
}

impl SimFile {
    fn change(&self, op: DataOp) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "opened read-only",
            ));
        }
        let mut st = self.fs.0.lock().unwrap();
        let inode = &mut st.inodes[self.ino];
        apply(&mut inode.data, &op);
        inode.pending.push(op);
        Ok(())
    }
}

impl FileIo for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let st = self.fs.0.lock().unwrap();
        let data = &st.inodes[self.ino].data;
        if offset >= data.len() as u64 {
            return Ok(0);
        }
        let n = buf.len().min(data.len() - offset as usize);
        buf[..n].copy_from_slice(&data[offset as usize..offset as usize + n]);
        Ok(n)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.change(DataOp::Write {
            offset,
            data: buf.to_vec(),
        })
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.fs.0.lock().unwrap().inodes[self.ino].data.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.change(DataOp::SetLen(len))
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.change(DataOp::Punch { offset, len })
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        let len = self.size()?;
        Ok((offset < len).then_some((offset, len)))
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut st = self.fs.0.lock().unwrap();
        if st.fail_syncs > 0 {
            st.fail_syncs -= 1;
            // As Linux does: the pages are marked clean though never
            // written; what they held is lost to a power loss.
            st.inodes[self.ino].pending.clear();
            return Err(io::Error::from_raw_os_error(5));
        }
        let inode = &mut st.inodes[self.ino];
        for op in std::mem::take(&mut inode.pending) {
            apply(&mut inode.durable, &op);
        }
        Ok(())
    }
}
