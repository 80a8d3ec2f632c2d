//! Router namespaces, pinned by a bind mount under a directory the way
//! `ip netns add` pins them under `/run/netns`.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

use crate::Error;

fn ns_error(name: &str, what: &'static str, source: io::Error) -> Error {
    Error::Namespace {
        name: name.to_string(),
        what,
        source,
    }
}

/// Names of the router namespaces pinned in `dir`.
pub fn list(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| crate::names::vni_of_namespace(n).is_some())
        .filter(|n| is_pinned(&dir.join(n)))
        .collect();
    names.sort();
    names
}

/// Whether `path` is a namespace pin and not a leftover empty file.
fn is_pinned(path: &Path) -> bool {
    // A pinned namespace file is on the nsfs filesystem: its device differs
    // from the directory's.
    use std::os::unix::fs::MetadataExt;
    match (
        std::fs::metadata(path),
        path.parent().map(std::fs::metadata),
    ) {
        (Ok(file), Some(Ok(dir))) => file.dev() != dir.dev(),
        _ => false,
    }
}

/// Creates and pins a new network namespace at `dir/name`.
pub fn create(dir: &Path, name: &str) -> Result<(), Error> {
    std::fs::create_dir_all(dir)
        .map_err(|e| ns_error(name, "cannot create the pin directory", e))?;
    let path = dir.join(name);
    if !path.exists() {
        File::create(&path).map_err(|e| ns_error(name, "cannot create the pin file", e))?;
    }
    let pin = path.clone();
    // unshare changes the calling thread only: do it on a thread of its own
    // that ends right after.
    std::thread::spawn(move || -> io::Result<()> {
        unshare(CloneFlags::CLONE_NEWNET)?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &pin,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )?;
        Ok(())
    })
    .join()
    .expect("namespace thread does not panic")
    .map_err(|e| {
        let _ = std::fs::remove_file(&path);
        ns_error(name, "cannot create", e)
    })
}

/// Unpins and removes `dir/name`; its links go with the last reference.
pub fn delete(dir: &Path, name: &str) -> Result<(), Error> {
    let path = dir.join(name);
    match umount2(&path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(ns_error(name, "cannot unpin", e.into())),
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ns_error(name, "cannot remove the pin file", e)),
    }
}

/// The path of a pinned namespace.
pub fn path(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// Runs `f` on a short-lived thread inside the namespace pinned at `path`.
/// Sockets opened there stay in that namespace.
pub fn run_in<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let file = File::open(path)?;
    std::thread::spawn(move || {
        setns(&file, CloneFlags::CLONE_NEWNET)?;
        f()
    })
    .join()
    .expect("namespace thread does not panic")
}
