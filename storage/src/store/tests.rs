//! The object store's unit tests.
use super::*;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;

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

fn disk(root: &Path, id: &str, weight: u64) -> Disk {
    Disk {
        id: id.into(),
        dir: root.join(id).join("store"),
        weight,
    }
}

/// Object files of volume `v1` in each disk's directory.
fn files_on(d: &Disk) -> usize {
    fs::read_dir(d.dir.join("v1"))
        .map(|e| {
            e.flatten()
                .filter(|f| f.file_name().to_string_lossy().ends_with(".head"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn objects_spread_over_disks_by_weight_and_stay_found_when_disks_are_added() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("meta");
    let (a, b) = (disk(tmp.path(), "disk-a", 1), disk(tmp.path(), "disk-b", 3));
    let s = ObjectStore::open_on(&root, vec![a.clone(), b.clone()]).unwrap();
    s.fence("v1", 1).unwrap();
    for i in 0..400u64 {
        s.write("v1", i, 0, &i.to_le_bytes(), 0, 1).unwrap();
    }
    s.flush("v1").unwrap();
    let (on_a, on_b) = (files_on(&a), files_on(&b));
    assert_eq!(on_a + on_b, 400);
    // 1:3 by weight: a quarter on a, within a few percent.
    assert!(
        (80..=120).contains(&on_a),
        "{on_a} of 400 on the light disk"
    );
    // The root keeps only the volume's records.
    assert!(fs::read_dir(root.join("v1"))
        .unwrap()
        .flatten()
        .all(|f| !f.file_name().to_string_lossy().ends_with(".head")));
    drop(s);

    // Opened on its root alone, the store finds its disks from its record.
    let s = ObjectStore::open(&root).unwrap();
    assert_eq!(s.epoch("v1"), 1);
    assert_eq!(s.disk_dirs(), vec![a.dir.clone(), b.dir.clone()]);
    for i in 0..400u64 {
        assert_eq!(
            s.read("v1", i, None, 0, 8, 1).unwrap().unwrap(),
            i.to_le_bytes()
        );
    }
    drop(s);

    // A third disk: what was written stays where it is and reads back; new
    // objects go to every disk, the new one among them.
    let c = disk(tmp.path(), "disk-c", 4);
    let s = ObjectStore::open_on(&root, vec![a.clone(), b.clone(), c.clone()]).unwrap();
    for i in 0..400u64 {
        assert_eq!(
            s.read("v1", i, None, 0, 8, 1).unwrap().unwrap(),
            i.to_le_bytes()
        );
        s.write("v1", i, 8, b"again", 0, 1).unwrap();
    }
    for i in 400..800u64 {
        s.write("v1", i, 0, &i.to_le_bytes(), 0, 1).unwrap();
    }
    s.flush("v1").unwrap();
    assert_eq!(files_on(&a) + files_on(&b) + files_on(&c), 800);
    assert!(
        files_on(&c) > 100,
        "{} new objects on the new disk",
        files_on(&c)
    );
    drop(s);
    let s = ObjectStore::open(&root).unwrap();
    for i in 0..800u64 {
        assert_eq!(
            s.read("v1", i, None, 0, 8, 1).unwrap().unwrap(),
            i.to_le_bytes()
        );
    }
    assert_eq!(s.read("v1", 7, None, 8, 5, 1).unwrap().unwrap(), b"again");
    s.delete_volume("v1").unwrap();
    assert!(!a.dir.join("v1").exists() && !c.dir.join("v1").exists());
}

#[test]
fn a_missing_or_swapped_disk_stops_the_store_from_opening() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("meta");
    let (a, b) = (disk(tmp.path(), "disk-a", 1), disk(tmp.path(), "disk-b", 1));
    let s = ObjectStore::open_on(&root, vec![a.clone(), b.clone()]).unwrap();
    s.fence("v1", 1).unwrap();
    s.write("v1", 0, 0, b"x", 0, 1).unwrap();
    drop(s);
    // Not given: refused, naming the disk and the way out.
    let err = ObjectStore::open_on(&root, vec![a.clone()])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("disk-b") && err.contains("cluster remove"),
        "{err}"
    );
    // Unmounted: its directory is empty, and it is not taken for a disk
    // that holds nothing.
    fs::rename(&b.dir, tmp.path().join("away")).unwrap();
    fs::create_dir_all(&b.dir).unwrap();
    let err = ObjectStore::open(&root).unwrap_err().to_string();
    assert!(err.contains("disk-b") && err.contains("mounted"), "{err}");
    let err = ObjectStore::open_on(&root, vec![a.clone(), b.clone()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("mounted"), "{err}");
    // Another disk mounted in its place.
    fs::write(b.dir.join(DISK_MARKER), "disk-z").unwrap();
    let err = ObjectStore::open(&root).unwrap_err().to_string();
    assert!(
        err.contains("disk-z") && err.contains("another disk"),
        "{err}"
    );
    fs::remove_dir_all(&b.dir).unwrap();
    fs::rename(tmp.path().join("away"), &b.dir).unwrap();
    let s = ObjectStore::open(&root).unwrap();
    assert_eq!(s.read("v1", 0, None, 0, 1, 1).unwrap().unwrap(), b"x");
}

#[test]
fn a_store_given_disks_keeps_reading_what_its_root_held() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("meta");
    let s = ObjectStore::open(&root).unwrap();
    s.fence("v1", 1).unwrap();
    s.write("v1", 0, 0, b"old", 0, 1).unwrap();
    s.flush("v1").unwrap();
    drop(s);
    let a = disk(tmp.path(), "disk-a", 1);
    let s = ObjectStore::open_on(&root, vec![a.clone()]).unwrap();
    assert_eq!(s.read("v1", 0, None, 0, 3, 1).unwrap().unwrap(), b"old");
    s.write("v1", 1, 0, b"new", 0, 1).unwrap();
    s.flush("v1").unwrap();
    assert_eq!(files_on(&a), 1);
    assert_eq!(s.disk_dirs(), vec![a.dir.clone()]);
    drop(s);
    let s = ObjectStore::open(&root).unwrap();
    assert_eq!(s.read("v1", 0, None, 0, 3, 1).unwrap().unwrap(), b"old");
    assert_eq!(s.read("v1", 1, None, 0, 3, 1).unwrap().unwrap(), b"new");
}
