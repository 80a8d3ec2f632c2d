//! Storage that heals itself, through the real binary: four `allod agent`
//! processes, volumes written through NBD, a node killed with SIGKILL for
//! good and declared out, a node joining; every object must come back to
//! its wanted number of in-sync copies, readable through every node, with
//! every copy holding the same bytes.

mod common;
mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use storage::{ObjectStore, StorageMap};
use support::{qemu_io, Cluster};

const MIB: u64 = 1 << 20;
const OBJECT: u64 = 4 * MIB;

/// The byte object `index` of a test volume is filled with (never 0, so a
/// lost object never reads back as its pattern).
fn pattern(index: u64) -> u64 {
    index % 250 + 1
}

/// Runs qemu-io's `op` (`write` or `read`) with each object's pattern on
/// 64 KiB at an offset of its own (a read fails on a mismatch).
fn patterned(uri: &str, op: &str, objects: u64) -> String {
    let commands: Vec<String> = (0..objects)
        .map(|i| {
            format!(
                "{op} -P {} {} 64k",
                pattern(i),
                i * OBJECT + (i % 7) * 65536
            )
        })
        .collect();
    let refs: Vec<&str> = commands.iter().map(String::as_str).collect();
    qemu_io(uri, &refs)
}

fn fill(uri: &str, objects: u64) {
    patterned(uri, "write", objects);
}

fn verify(uri: &str, objects: u64) {
    let out = patterned(uri, "read", objects);
    assert!(!out.contains("error"), "{out}");
}

/// Polls `allod storage status` (every half second) until `done` holds.
async fn wait_for_status(
    c: &Cluster,
    what: &str,
    timeout: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let out = c.allod(&["storage", "status", "--output", "json"]);
        if out.status.success() {
            let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if done(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; storage status: {status:#}"
            );
        } else {
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn node_state(status: &serde_json::Value, id: u64) -> String {
    status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"].as_u64() == Some(id))
        .map_or("absent".into(), |n| {
            n["state"].as_str().unwrap().to_string()
        })
}

/// The storage map a volume's record says it uses, read from a node's
/// state through the CLI's view of the nodes (the map of `in` nodes).
fn current_map(c: &Cluster, exclude: &[u64]) -> StorageMap {
    let mut map = c.map();
    map.nodes.retain(|n| !exclude.contains(&n.node));
    map
}

/// Every copy of every object of `volume` that `map` places on the nodes
/// at `dirs` holds the same bytes, and as many copies exist as `replicas`.
/// Run with the agents stopped.
fn copies_agree(c: &Cluster, alive: &[usize], volume: &str, map: &StorageMap, objects: u64) {
    let stores: Vec<(u64, ObjectStore)> = alive
        .iter()
        .map(|i| {
            (
                c.node_id(*i),
                ObjectStore::open(&c.dirs[*i].join("storage")).unwrap(),
            )
        })
        .collect();
    for index in 0..objects {
        let placed = map.place(volume, index, 3);
        assert_eq!(placed.len(), 3);
        let mut contents = Vec::new();
        for node in &placed {
            let (_, store) = stores.iter().find(|(id, _)| id == node).unwrap_or_else(|| {
                panic!("object {index} is placed on node {node}, which is not alive")
            });
            let epoch = store.epoch(volume);
            let data = store
                .read(volume, index, None, 0, OBJECT, epoch)
                .unwrap()
                .unwrap_or_else(|| panic!("node {node} lacks object {index}"));
            contents.push((*node, data));
        }
        let first = &contents[0].1;
        let at = ((index % 7) * 65536) as usize;
        assert!(
            first[at..at + 65536]
                .iter()
                .all(|b| u64::from(*b) == pattern(index)),
            "object {index} on node {} does not hold what was written",
            contents[0].0
        );
        for (node, data) in &contents[1..] {
            assert!(
                data == first,
                "object {index}: the copy on node {node} differs from the one on node {}",
                contents[0].0
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_with_sigkill_for_good_is_declared_out_and_its_objects_get_new_replicas() {
    let mut c = Cluster::start_nodes(4, &[]).await;
    c.allod_ok(&["storage", "config", "--down-out-after", "3s"]);
    c.allod_ok(&["project", "create", "p"]);
    let objects = 64;
    let mut ids = Vec::new();
    for name in ["a", "b"] {
        let v = c.json(&[
            "volume",
            "create",
            name,
            "--project",
            "p",
            "--size",
            "256M",
            "--replicas",
            "3",
        ]);
        let id = v["id"].as_str().unwrap().to_string();
        fill(&c.uri(0, &id), objects);
        ids.push(id);
    }
    let healthy = wait_for_status(&c, "health ok", Duration::from_secs(30), |s| {
        s["health"] == "ok"
    })
    .await;
    assert_eq!(healthy["objects_degraded"], 0, "{healthy:#}");

    // The fourth node dies for good.
    let dead = c.node_id(3);
    c.kill(3);
    let out = wait_for_status(
        &c,
        "the dead node declared out",
        Duration::from_secs(60),
        |s| node_state(s, dead) == "out",
    )
    .await;
    assert!(out["nodes"].as_array().unwrap().len() == 4, "{out:#}");
    // Every volume gets back to three in-sync copies, none on the dead node.
    let healed = wait_for_status(&c, "storage healed", Duration::from_secs(120), |s| {
        s["health"] == "ok" && s["volumes_to_move"] == 0
    })
    .await;
    assert_eq!(healed["objects_degraded"], 0, "{healed:#}");
    for name in ["a", "b"] {
        let v = c.json(&["volume", "show", name, "--project", "p"]);
        let in_sync: BTreeSet<u64> = v["in_sync"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_u64().unwrap())
            .collect();
        assert_eq!(in_sync.len(), 3, "{v:#}");
        assert!(!in_sync.contains(&dead), "{v:#}");
        assert_eq!(v["out_of_sync"], serde_json::json!([]), "{v:#}");
    }
    // Readable, identically, through every node left.
    for i in 0..3 {
        for id in &ids {
            verify(&c.uri(i, id), objects);
        }
    }
    // Every copy of every object agrees, on the nodes the new map names.
    let map = current_map(&c, &[dead]);
    for i in 0..3 {
        c.kill(i);
    }
    for id in &ids {
        copies_agree(&c, &[0, 1, 2], id, &map, objects);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_takes_a_fair_share_while_every_block_stays_readable() {
    let mut c = Cluster::start_nodes(3, &[]).await;
    c.allod_ok(&["project", "create", "p"]);
    let objects = 1024;
    let v = c.json(&[
        "volume",
        "create",
        "big",
        "--project",
        "p",
        "--size",
        "4G",
        "--replicas",
        "3",
    ]);
    let id = v["id"].as_str().unwrap().to_string();
    let uri = c.uri(0, &id);
    fill(&uri, objects);
    wait_for_status(&c, "health ok", Duration::from_secs(30), |s| {
        s["health"] == "ok"
    })
    .await;

    // A reader checks every block, and a watcher the in-sync set, all
    // through the move.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (stop, uri) = (stop.clone(), uri.clone());
        std::thread::spawn(move || {
            let mut rounds = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                verify(&uri, objects);
                rounds += 1;
            }
            rounds
        })
    };
    let watcher = {
        let (stop, env) = (stop.clone(), c.env.clone());
        std::thread::spawn(move || {
            let mut fewest = usize::MAX;
            let mut progress_seen = false;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = std::process::Command::new(support::BIN)
                    .args([
                        "volume",
                        "show",
                        "big",
                        "--project",
                        "p",
                        "--output",
                        "json",
                    ])
                    .envs(env.iter().cloned())
                    .output()
                    .unwrap();
                if out.status.success() {
                    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                    fewest = fewest.min(v["in_sync"].as_array().unwrap().len());
                    progress_seen |= v["recovery"]["kind"] == "rebalance"
                        && v["recovery"]["total_bytes"].as_u64() > Some(0);
                    assert!(
                        v["in_sync"].as_array().unwrap().len() >= 2,
                        "fewer in-sync copies than min_replicas during the move: {v:#}"
                    );
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            (fewest, progress_seen)
        })
    };
    let new = c.add_node().await;
    let moved = wait_for_status(
        &c,
        "the move onto the new node",
        Duration::from_secs(180),
        |s| s["volumes_to_move"] == 0 && s["health"] == "ok",
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = reader.join().expect("a read during the move failed");
    let (fewest, progress_seen) = watcher
        .join()
        .expect("the in-sync set shrank during the move");
    assert!(rounds >= 1, "the reader never finished a round");
    assert!(
        progress_seen,
        "`allod volume show` never showed the rebalance's progress"
    );
    assert!(fewest >= 2, "fewest in-sync copies seen: {fewest}");
    assert_eq!(moved["nodes"].as_array().unwrap().len(), 4, "{moved:#}");
    verify(&c.uri(new, &id), objects);

    // Old copies go once every node has applied the move (two looks,
    // 15 s apart); then each node holds exactly what the map places there.
    tokio::time::sleep(Duration::from_secs(40)).await;
    for i in 0..4 {
        c.kill(i);
    }
    let counts: Vec<usize> = (0..4).map(|i| c.objects_on(i, &id).len()).collect();
    let total: usize = counts.iter().sum();
    eprintln!("copies per node after the move: {counts:?}; the reader checked every block {rounds} times during it");
    assert_eq!(
        total,
        3 * objects as usize,
        "copies per node {counts:?}: old copies were not all removed, or some are missing"
    );
    let share = counts[new] as f64 / total as f64;
    assert!(
        (share - 0.25).abs() <= 0.025,
        "the new node holds {} of {total} copies ({:.1} %), not a quarter within 10 %",
        counts[new],
        share * 100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_remove_drains_the_node_first_and_refuses_to_lose_an_only_copy() {
    let mut c = Cluster::start_nodes(4, &[]).await;
    // A node killed below stays down (not out) for the rest of the test.
    c.allod_ok(&["storage", "config", "--down-out-after", "1h"]);
    c.allod_ok(&["project", "create", "p"]);
    let objects = 32;
    let mut ids = Vec::new();
    for (name, replicas) in [("r3", "3"), ("r1", "1")] {
        let v = c.json(&[
            "volume",
            "create",
            name,
            "--project",
            "p",
            "--size",
            "128M",
            "--replicas",
            replicas,
        ]);
        let id = v["id"].as_str().unwrap().to_string();
        fill(&c.uri(0, &id), objects);
        ids.push(id);
    }
    wait_for_status(&c, "health ok", Duration::from_secs(30), |s| {
        s["health"] == "ok"
    })
    .await;

    // A live node leaves: its objects are copied elsewhere first.
    let leaving = c.node_id(3);
    let admin = c.dirs[0].to_str().unwrap().to_string();
    support::run(
        support::BIN,
        &[
            "cluster",
            "remove",
            "--data-dir",
            &admin,
            &leaving.to_string(),
        ],
    );
    let nodes = c.json(&["node", "list"]);
    assert_eq!(nodes.as_array().unwrap().len(), 3, "{nodes:#}");
    for name in ["r3", "r1"] {
        let v = c.json(&["volume", "show", name, "--project", "p"]);
        let in_sync: Vec<u64> = v["in_sync"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_u64().unwrap())
            .collect();
        assert!(!in_sync.contains(&leaving), "{v:#}");
        assert_eq!(in_sync.len(), 3, "{v:#}");
    }
    for id in &ids {
        verify(&c.uri(1, id), objects);
    }

    // A dead node that holds the only copy of some of r1's objects: refused.
    let victim = c.node_id(2);
    c.kill(2);
    wait_for_status(&c, "the killed node down", Duration::from_secs(30), |s| {
        node_state(s, victim) == "down"
    })
    .await;
    let out = std::process::Command::new(support::BIN)
        .args([
            "cluster",
            "remove",
            "--data-dir",
            &admin,
            &victim.to_string(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the removal should be refused");
    assert!(
        stderr.contains("p/r1") && stderr.contains("--force"),
        "{stderr}"
    );
    assert!(!stderr.contains("p/r3"), "r3 has other copies: {stderr}");
    let nodes = c.json(&["node", "list"]);
    assert_eq!(
        nodes.as_array().unwrap().len(),
        3,
        "nothing was removed: {nodes:#}"
    );
}

/// Flips one byte of object `index`'s data in node `i`'s copy, on disk,
/// `at` bytes into the 64 KiB the test wrote there.
fn flip_byte(c: &Cluster, i: usize, volume: &str, index: u64, at: u64) {
    use std::os::unix::fs::FileExt;
    let path = c.dirs[i]
        .join("storage")
        .join(volume)
        .join(format!("{index:016x}.head"));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let offset = storage::store::DATA_OFFSET + (index % 7) * 65536 + at;
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).unwrap();
    byte[0] ^= 0x5a;
    file.write_all_at(&byte, offset).unwrap();
    file.sync_all().unwrap();
}

/// Asks for a deep scrub of volume `name` and waits for its result.
async fn deep_scrub(c: &Cluster, name: &str) -> serde_json::Value {
    let before = c.json(&["volume", "show", name, "--project", "p"])["deep_scrubbed_at_ms"]
        .as_u64()
        .unwrap();
    c.allod_ok(&[
        "storage",
        "scrub",
        "--deep",
        "--volume",
        name,
        "--project",
        "p",
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = c.json(&["volume", "show", name, "--project", "p"]);
        if v["deep_scrubbed_at_ms"].as_u64().unwrap() > before && v["scrub_requested"].is_null() {
            return v;
        }
        assert!(Instant::now() < deadline, "no deep scrub of {name}: {v:#}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deep_scrub_repairs_flipped_bytes_from_the_copy_whose_checksums_verify() {
    let mut c = Cluster::start().await;
    c.allod_ok(&["project", "create", "p"]);
    let objects = 16;
    let v = c.json(&[
        "volume",
        "create",
        "s",
        "--project",
        "p",
        "--size",
        "64M",
        "--replicas",
        "3",
    ]);
    let id = v["id"].as_str().unwrap().to_string();
    fill(&c.uri(0, &id), objects);
    wait_for_status(&c, "health ok", Duration::from_secs(30), |s| {
        s["health"] == "ok"
    })
    .await;

    // One damaged copy.
    flip_byte(&c, 1, &id, 2, 100);
    let v = deep_scrub(&c, "s").await;
    assert_eq!(v["scrub_repairs"], 1, "{v:#}");
    assert_eq!(v["scrub_unrepairable"], 0, "{v:#}");

    // Two copies damaged differently: the third, intact, wins.
    flip_byte(&c, 0, &id, 5, 10);
    flip_byte(&c, 2, &id, 5, 5000);
    let v = deep_scrub(&c, "s").await;
    assert_eq!(v["scrub_repairs"], 3, "{v:#}");
    assert_eq!(v["scrub_unrepairable"], 0, "{v:#}");

    // Every copy reads back intact (checksums verified) and identical.
    let map = c.map();
    for i in 0..3 {
        c.kill(i);
    }
    copies_agree(&c, &[0, 1, 2], &id, &map, objects);
}
