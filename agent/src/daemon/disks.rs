//! The disks an operator gave Allod (`allod node setup --storage-disk`):
//! each gets an ext4 file system of its own, made by the agent and mounted
//! at `DATA_DIR/disks/<UUID>`, and the block store keeps its objects in
//! `store/` on it (see `storage::store::Disk`).
//!
//! A file system rather than the raw device: object files keep using the
//! kernel's page cache, sparse files and rename for atomic replacement,
//! which the store relies on, and an operator can inspect a disk with
//! standard tools. The disks are recorded in `DATA_DIR/disks.json` by the
//! UUID their file system was made with; at start the agent mounts each,
//! finding it by that UUID even when the kernel named it differently.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// One storage disk as the node recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// The UUID its file system was made with.
    pub uuid: String,
    /// The device it was last found at.
    pub device: String,
    /// Its file system's size when it was made: its share of new objects.
    pub capacity_bytes: u64,
}

pub fn record_path(data_dir: &Path) -> PathBuf {
    data_dir.join("disks.json")
}

fn mount_point(data_dir: &Path, uuid: &str) -> PathBuf {
    data_dir.join("disks").join(uuid)
}

/// The node's storage disks (none before any was set up).
pub fn recorded(data_dir: &Path) -> anyhow::Result<Vec<DiskRecord>> {
    let path = record_path(data_dir);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} is damaged; it lists this node's storage disks",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn save(data_dir: &Path, disks: &[DiskRecord]) -> anyhow::Result<()> {
    let path = record_path(data_dir);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(disks)?)
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The ext4 UUID of the file system on `device`, if it holds one.
pub fn ext4_uuid(device: &Path) -> Option<String> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(device).ok()?;
    let mut sb = [0u8; 0x78];
    file.read_exact_at(&mut sb, 1024).ok()?;
    if sb[0x38..0x3a] != [0x53, 0xef] {
        return None;
    }
    let u = &sb[0x68..0x78];
    let hex: String = u.iter().map(|b| format!("{b:02x}")).collect();
    Some(format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    ))
}

/// Whether `device` is one of this node's storage disks (its file system
/// carries a recorded UUID).
pub fn is_ours(device: &str, disks: &[DiskRecord]) -> Option<DiskRecord> {
    let uuid = ext4_uuid(Path::new(device))?;
    disks.iter().find(|d| d.uuid == uuid).cloned()
}

/// Whether something is mounted at `dir` (it sits on another device than
/// its parent).
fn is_mount(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(here), Some(Ok(parent))) =
        (std::fs::metadata(dir), dir.parent().map(std::fs::metadata))
    else {
        return false;
    };
    here.dev() != parent.dev()
}

fn mount(device: &Path, dir: &Path) -> anyhow::Result<()> {
    use nix::mount::MsFlags;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    nix::mount::mount(
        Some(device),
        dir,
        Some("ext4"),
        MsFlags::MS_NOATIME | MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .with_context(|| format!("cannot mount {} at {}", device.display(), dir.display()))
}

/// Makes an ext4 file system on `device` (already checked to hold nothing
/// or wiped), mounts it and records it as a storage disk of this node.
pub fn prepare(data_dir: &Path, device: &str) -> anyhow::Result<DiskRecord> {
    let raw = crate::cluster::join::random_hex(16);
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        &raw[0..8],
        &raw[8..12],
        &raw[12..16],
        &raw[16..20],
        &raw[20..32]
    );
    let out = std::process::Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-m",
            "0",
            "-L",
            "allod-store",
            "-U",
            &uuid,
            device,
        ])
        .output()
        .context("cannot run mkfs.ext4 (install e2fsprogs)")?;
    if !out.status.success() {
        anyhow::bail!(
            "making a file system on {device} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let dir = mount_point(data_dir, &uuid);
    mount(Path::new(device), &dir)?;
    let (capacity_bytes, _) = crate::reconcile::storage::disk_space(&dir);
    let record = DiskRecord {
        uuid,
        device: device.to_string(),
        capacity_bytes,
    };
    let mut disks = recorded(data_dir)?;
    add(&mut disks, record.clone());
    save(data_dir, &disks)?;
    Ok(record)
}

/// Records a newly made disk. Records are keyed by UUID, never by device
/// name: a known disk last seen at the new disk's name has moved (the
/// kernel renamed it), and still holds objects.
fn add(disks: &mut Vec<DiskRecord>, record: DiskRecord) {
    disks.retain(|d| d.uuid != record.uuid);
    disks.push(record);
}

/// Finds a recorded disk's device: where it was last seen, else any block
/// device whose file system carries its UUID.
pub fn find(disk: &DiskRecord) -> Option<PathBuf> {
    let last = PathBuf::from(&disk.device);
    if ext4_uuid(&last).as_deref() == Some(disk.uuid.as_str()) {
        return Some(last);
    }
    let names = std::fs::read_dir("/sys/class/block").ok()?;
    names
        .flatten()
        .map(|e| Path::new("/dev").join(e.file_name()))
        .find(|dev| ext4_uuid(dev).as_deref() == Some(disk.uuid.as_str()))
}

/// Mounts every recorded storage disk that is not mounted yet and returns
/// them as the block store's disks. A disk that cannot be found stops the
/// block store (see the store's module doc): its error names the disk.
pub fn mount_all(data_dir: &Path) -> anyhow::Result<Vec<storage::store::Disk>> {
    let mut out = Vec::new();
    let mut disks = recorded(data_dir)?;
    let mut moved = false;
    for disk in &mut disks {
        let dir = mount_point(data_dir, &disk.uuid);
        if !is_mount(&dir) {
            let device = find(disk).ok_or_else(|| {
                anyhow::anyhow!(
                    "storage disk {} (last seen as {}) is not attached to this machine; \
                     reconnect it and restart the agent, or remove this node from the cluster \
                     (`allod cluster remove --force`) so its copies are made again elsewhere",
                    disk.uuid,
                    disk.device
                )
            })?;
            mount(&device, &dir)?;
            tracing::info!(disk = %disk.uuid, device = %device.display(), "mounted a storage disk at {}", dir.display());
            // Renamed by the kernel: messages name where it is now.
            let device = device.display().to_string();
            if disk.device != device {
                disk.device = device;
                moved = true;
            }
        }
        out.push(storage::store::Disk {
            id: disk.uuid.clone(),
            dir: dir.join("store"),
            weight: (disk.capacity_bytes >> 30).max(1),
        });
    }
    if moved {
        save(data_dir, &disks)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(uuid: &str, device: &str) -> DiskRecord {
        DiskRecord {
            uuid: uuid.into(),
            device: device.into(),
            capacity_bytes: 1 << 30,
        }
    }

    /// A known disk renamed by the kernel (sdb → sdc), and a new disk made
    /// at its old name: both stay recorded.
    #[test]
    fn a_new_disk_at_a_moved_disks_old_name_keeps_both_records() {
        let mut disks = vec![disk("a", "/dev/sdb")];
        add(&mut disks, disk("b", "/dev/sdb"));
        assert_eq!(disks, vec![disk("a", "/dev/sdb"), disk("b", "/dev/sdb")]);
    }
}
