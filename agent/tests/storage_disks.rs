//! A node's own storage disks, through the real binary: two loop devices
//! given with `allod node setup --storage-disk` get file systems the agent
//! makes and mounts, hold the volume's objects (spread by size) and give
//! the node its capacity; after a SIGKILL the agent mounts them again, and
//! a disk that is gone stops only the node's block storage, with a message
//! naming it. Needs root and util-linux (losetup, unshare); each agent runs
//! in a mount namespace of its own, so its mounts end with it.

mod common;
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::{qemu_io, run, Cluster, BIN};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const OBJECT: u64 = 4 * MIB;
const OBJECTS: u64 = 64;

/// Loop devices, detached when the test ends.
struct Loops(Vec<String>);

impl Drop for Loops {
    fn drop(&mut self) {
        for device in &self.0 {
            let _ = Command::new("losetup").args(["-d", device]).output();
        }
    }
}

fn attach(image: &Path) -> String {
    run("losetup", &["-f", "--show", image.to_str().unwrap()])
        .trim()
        .to_string()
}

fn patterned(uri: &str, op: &str) -> String {
    let commands: Vec<String> = (0..OBJECTS)
        .map(|i| {
            format!(
                "{op} -P {} {} 64k",
                i % 250 + 1,
                i * OBJECT + (i % 7) * 65536
            )
        })
        .collect();
    let refs: Vec<&str> = commands.iter().map(String::as_str).collect();
    qemu_io(uri, &refs)
}

/// A path as the agent (in its own mount namespace) sees it.
fn seen_by(c: &Cluster, path: &Path) -> PathBuf {
    PathBuf::from(format!("/proc/{}/root", c.children[0].id()))
        .join(path.strip_prefix("/").unwrap())
}

fn heads_in(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|e| {
            e.flatten()
                .filter(|f| f.file_name().to_string_lossy().ends_with(".head"))
                .count()
        })
        .unwrap_or(0)
}

/// Size in bytes of the file system mounted at `dir`, by `stat -f`.
fn fs_size(dir: &Path) -> u64 {
    let out = run("stat", &["-f", "-c", "%S %b", dir.to_str().unwrap()]);
    let mut parts = out.split_whitespace().map(|n| n.parse::<u64>().unwrap());
    parts.next().unwrap() * parts.next().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn storage_disks_hold_the_objects_give_the_capacity_and_are_mounted_again_after_sigkill() {
    let images = tempfile::tempdir().unwrap();
    let (small, large) = (
        images.path().join("small.img"),
        images.path().join("large.img"),
    );
    for (image, size) in [(&small, GIB), (&large, 3 * GIB)] {
        std::fs::File::create(image).unwrap().set_len(size).unwrap();
    }
    let mut loops = Loops(vec![attach(&small), attach(&large)]);
    let devices = loops.0.clone();

    let mut c = Cluster::start_prepared(1, &[], true, |_, dir| {
        let d = dir.to_str().unwrap();
        let mut args = vec!["node", "setup", "--data-dir", d];
        for device in &devices {
            args.extend(["--storage-disk", device, "--wipe", device]);
        }
        let out = run(BIN, &args);
        assert!(out.contains("storage disk"), "{out}");
    })
    .await;
    let data_dir = c.dirs[0].clone();

    // Each disk has the file system the agent made, recorded by its UUID.
    let disks: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data_dir.join("disks.json")).unwrap()).unwrap();
    let disks = disks.as_array().unwrap().clone();
    assert_eq!(disks.len(), 2, "{disks:#?}");
    let mut mounts = Vec::new();
    for (disk, device) in disks.iter().zip(&devices) {
        let uuid = disk["uuid"].as_str().unwrap();
        let blkid = run("blkid", &["-s", "UUID", "-o", "value", device]);
        assert_eq!(blkid.trim(), uuid);
        mounts.push(data_dir.join("disks").join(uuid));
    }

    // The node's capacity is its disks'.
    let capacity: u64 = mounts.iter().map(|m| fs_size(&seen_by(&c, m))).sum();
    let nodes = c.json(&["node", "list"]);
    let reported = nodes[0]["storage"]["capacity_bytes"].as_u64().unwrap();
    assert_eq!(reported, capacity, "{nodes:#}");
    assert!(capacity > 3 * GIB && capacity < 4 * GIB, "{capacity}");

    // A volume's objects land on the disks, in proportion to their size.
    c.allod_ok(&["project", "create", "p"]);
    let v = c.json(&[
        "volume",
        "create",
        "v",
        "--project",
        "p",
        "--size",
        "256M",
        "--replicas",
        "1",
    ]);
    let id = v["id"].as_str().unwrap().to_string();
    patterned(&c.uri(0, &id), "write");
    let on: Vec<usize> = mounts
        .iter()
        .map(|m| heads_in(&seen_by(&c, &m.join("store").join(&id))))
        .collect();
    assert_eq!(on.iter().sum::<usize>() as u64, OBJECTS, "{on:?}");
    // Weights are whole GiB of each file system (at least 1): 1 and 2
    // here, so about 21 of 64 on the small disk (3.5 standard deviations
    // either side; a 1 : 3 expectation failed now and then).
    assert!((8..=34).contains(&on[0]), "objects per disk: {on:?}");
    assert_eq!(heads_in(&data_dir.join("storage").join(&id)), 0);

    // SIGKILL: the new process (in a new mount namespace) mounts the disks
    // again, and every block reads back.
    c.kill(0);
    c.restart(0);
    let out = patterned(&c.uri(0, &id), "read");
    assert!(!out.contains("error"), "{out}");
    assert!(seen_by(&c, &mounts[1]).join("store").join(&id).exists());

    // The large disk is gone: the node keeps serving its API and says
    // which disk is missing, but serves no block storage.
    c.kill(0);
    run("losetup", &["-d", &loops.0[1]]);
    c.restart(0);
    let log = data_dir.with_extension("log");
    let uuid = disks[1]["uuid"].as_str().unwrap().to_string();
    common::wait_for(
        "the missing disk named in the log",
        Duration::from_secs(30),
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains(&format!(
                    "storage disk {uuid} (last seen as {}) is not attached",
                    devices[1]
                ))
        },
    )
    .await;
    c.allod_ok(&["cluster", "status"]);
    // The cluster hears it too: the node is down (and would be declared out
    // after down_out_after), with the reason.
    common::wait_for(
        "the node down for its missing disk",
        Duration::from_secs(30),
        || {
            let s = c.json(&["storage", "status"]);
            s["nodes"][0]["state"] == "down"
                && s["nodes"][0]["unavailable"]
                    .as_str()
                    .is_some_and(|why| why.contains(&uuid) && why.contains("not attached"))
        },
    )
    .await;

    // Attached again, perhaps under another name: found by its UUID, and
    // the node is in again.
    loops.0[1] = attach(&large);
    c.kill(0);
    c.restart(0);
    let out = patterned(&c.uri(0, &id), "read");
    assert!(!out.contains("error"), "{out}");
    common::wait_for("the node in again", Duration::from_secs(30), || {
        let s = c.json(&["storage", "status"]);
        s["nodes"][0]["state"] == "in" && s["nodes"][0]["unavailable"].is_null()
    })
    .await;
}
