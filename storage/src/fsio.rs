//! The file operations the object store makes, behind a small trait: the
//! real file system ([`OsFs`]), and for tests a recording one that can
//! produce the states a power loss may leave (`sim`).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

#[cfg(test)]
pub mod sim;

/// How a file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Read,
    ReadWrite,
    /// Read-write, created if missing, emptied if present.
    Create,
}

/// A directory tree of files.
pub trait Fs: Send + Sync + fmt::Debug {
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Names in a directory, each with whether it is a directory.
    fn read_dir(&self, path: &Path) -> io::Result<Vec<(String, bool)>>;
    fn open(&self, path: &Path, mode: Mode) -> io::Result<Arc<dyn FileIo>>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Makes the directory's entries (creations, renames, removals) durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
}

/// An open file, addressed by offset.
pub trait FileIo: Send + Sync + fmt::Debug {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// The file's size in bytes.
    fn size(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Frees `len` bytes at `offset` (they read as zeros), size unchanged.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// The first run of data at or after `offset`, as `(start, end)`;
    /// `None` when only holes follow.
    fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>>;
    /// Makes the file's data (and size) durable.
    fn sync_data(&self) -> io::Result<()>;
}

/// The real file system.
#[derive(Debug, Default)]
pub struct OsFs;

impl Fs for OsFs {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<(String, bool)>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(path)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            out.push((name, entry.file_type()?.is_dir()));
        }
        Ok(out)
    }

    fn open(&self, path: &Path, mode: Mode) -> io::Result<Arc<dyn FileIo>> {
        let file = match mode {
            Mode::Read => File::open(path)?,
            Mode::ReadWrite => OpenOptions::new().read(true).write(true).open(path)?,
            Mode::Create => OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)?,
        };
        Ok(Arc::new(OsFile(file)))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir_all(path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }
}

#[derive(Debug)]
struct OsFile(File);

impl FileIo for OsFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        use nix::fcntl::{fallocate, FallocateFlags};
        fallocate(
            &self.0,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset as i64,
            len as i64,
        )
        .map_err(io::Error::from)
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        use nix::unistd::{lseek, Whence};
        let start = match lseek(&self.0, offset as i64, Whence::SeekData) {
            Ok(d) => d,
            Err(nix::errno::Errno::ENXIO) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let end = lseek(&self.0, start, Whence::SeekHole)?;
        Ok(Some((start as u64, end as u64)))
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
}
