//! The replication protocol under failure, through the real binary: three
//! `allod agent` processes, a volume written and read through each node's
//! `nbd.sock` by clients that record exactly what was acknowledged, while
//! agents are killed with SIGKILL and restarted.

mod common;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::linearizability::{check, Event, Op, Verdict};
use rand::Rng;
use support::nbd::{block_of, value_of, NbdClient};
use support::Cluster;

const BLOCK: u64 = 4096;

/// Opens the volume through node `i`, retrying while the cluster settles
/// (a leader election after a kill, a node starting).
async fn connect(c: &Cluster, i: usize, id: &str) -> NbdClient {
    let deadline = Instant::now() + Duration::from_secs(60);
    let (socket, export) = loop {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.export(i, id))) {
            Ok(pair) => break pair,
            Err(_) => {
                assert!(Instant::now() < deadline, "no export of {id} on node {i}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    loop {
        match NbdClient::connect(&socket, &export) {
            Ok(client) => return client,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "cannot open {id} on node {i}: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_killed_with_sigkill_loses_nothing_it_flushed() {
    let mut c = Cluster::start().await;
    c.allod_ok(&["project", "create", "p"]);
    let v = c.json(&["volume", "create", "w", "--project", "p", "--size", "16M"]);
    let id = v["id"].as_str().unwrap().to_string();
    // 64 blocks spread over the volume's four objects.
    let offset = |b: u64| b * 256 * 1024;
    let mut client = connect(&c, 1, &id).await;
    // The writer runs on node 1 (node 0 leads Raft: its death is not this
    // test's point) and is killed while it writes.
    let writes = Arc::new(Mutex::new(BTreeMap::<u64, BTreeSet<u64>>::new()));
    let flushed = Arc::new(Mutex::new(BTreeMap::<u64, u64>::new()));
    let (w, f) = (writes.clone(), flushed.clone());
    let writer = std::thread::spawn(move || {
        let mut last = BTreeMap::new();
        for n in 1u64.. {
            let b = n % 64;
            // Called, so it may have landed, acknowledged or not.
            w.lock().unwrap().entry(b).or_default().insert(n);
            if client.write(offset(b), &block_of(n)).is_err() {
                return n;
            }
            last.insert(b, n);
            if n % 16 == 0 {
                if client.flush().is_err() {
                    return n;
                }
                *f.lock().unwrap() = last.clone();
            }
        }
        unreachable!()
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.kill(1);
    let stopped_at = tokio::task::spawn_blocking(move || writer.join().unwrap())
        .await
        .unwrap();
    let flushed = flushed.lock().unwrap().clone();
    assert!(
        flushed.len() == 64,
        "the writer flushed too little before it was killed ({stopped_at} writes)"
    );
    // A new writer on another node: every block holds what was flushed or
    // a later write, never an older value, never a torn one.
    let mut reader = connect(&c, 2, &id).await;
    let writes = writes.lock().unwrap().clone();
    for b in 0..64 {
        let value = value_of(&reader.read(offset(b), BLOCK as u32).unwrap());
        let floor = flushed[&b];
        assert!(
            value >= floor && writes[&b].contains(&value),
            "block {b} holds {value}; {floor} was flushed"
        );
    }
    // The old writer's node returns; the volume keeps working through it.
    c.restart(1);
    let mut again = connect(&c, 1, &id).await;
    again.write(0, &block_of(u64::MAX)).unwrap();
    again.flush().unwrap();
    assert_eq!(value_of(&again.read(0, BLOCK as u32).unwrap()), u64::MAX);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_history_is_linearizable_while_a_replica_is_killed_with_sigkill_and_returns() {
    let mut c = Cluster::start().await;
    c.allod_ok(&["project", "create", "p"]);
    let v = c.json(&["volume", "create", "h", "--project", "p", "--size", "16M"]);
    let id = v["id"].as_str().unwrap().to_string();
    // One block in each of the four objects.
    let blocks: Vec<u64> = (0..4).map(|o| o * 4 * 1024 * 1024 + 8192).collect();
    let origin = Instant::now();
    let history = Arc::new(Mutex::new(BTreeMap::<u64, Vec<Event>>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    // Clients on every node, the one that dies included: each open moves
    // the writer lease, fencing the other nodes' writers.
    // A credential for each node, asked for while all are up.
    let exports: Vec<(std::path::PathBuf, String)> =
        (0..c.dirs.len()).map(|i| c.export(i, &id)).collect();
    for client_id in 0..3usize {
        let exports = exports.clone();
        let (history, stop, blocks) = (history.clone(), stop.clone(), blocks.clone());
        clients.push(std::thread::spawn(move || {
            let mut rng = rand::thread_rng();
            let mut seq = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let node = rng.gen_range(0..exports.len());
                let Ok(mut nbd) = NbdClient::connect(&exports[node].0, &exports[node].1) else {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                };
                for _ in 0..rng.gen_range(5..30) {
                    // Paced, so each block's history stays small enough
                    // to search.
                    std::thread::sleep(Duration::from_millis(rng.gen_range(60..180)));
                    let b = blocks[rng.gen_range(0..blocks.len())];
                    let call_ns = origin.elapsed().as_nanos();
                    let event = if rng.gen_bool(0.5) {
                        seq += 1;
                        let value = ((client_id as u64 + 1) << 32) | seq;
                        let ok = nbd.write(b, &block_of(value)).is_ok();
                        Some(Event {
                            client: client_id,
                            op: Op::Write(value.to_string()),
                            call_ns,
                            return_ns: ok.then(|| origin.elapsed().as_nanos()),
                        })
                    } else {
                        nbd.read(b, BLOCK as u32).ok().map(|d| {
                            let v = value_of(&d);
                            Event {
                                client: client_id,
                                op: Op::Read((v != 0).then(|| v.to_string())),
                                call_ns,
                                return_ns: Some(origin.elapsed().as_nanos()),
                            }
                        })
                    };
                    let failed = event.as_ref().is_none_or(|e| e.return_ns.is_none());
                    if let Some(e) = event {
                        history.lock().unwrap().entry(b).or_default().push(e);
                    }
                    if failed {
                        // A fenced or broken connection: open another.
                        break;
                    }
                }
            }
        }));
    }
    // The third replica's node dies and returns, twice.
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(4)).await;
        c.kill(2);
        tokio::time::sleep(Duration::from_secs(4)).await;
        c.restart(2);
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in clients {
        t.join().unwrap();
    }
    let history = history.lock().unwrap().clone();
    let mut acknowledged = 0;
    for (block, events) in history {
        acknowledged += events.iter().filter(|e| e.return_ns.is_some()).count();
        // The search recurses once per operation.
        let verdict = std::thread::Builder::new()
            .stack_size(1 << 30)
            .spawn(move || (check(&events), events))
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(
            verdict.0,
            Verdict::Linearizable,
            "block at {block} ({} operations): {:#?}",
            verdict.1.len(),
            verdict.1
        );
    }
    assert!(
        acknowledged > 100,
        "too few operations completed to mean anything: {acknowledged}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_verifies_for_three_minutes_while_replicas_are_killed_with_sigkill() {
    let mut c = Cluster::start().await;
    c.allod_ok(&["project", "create", "p"]);
    let v = c.json(&["volume", "create", "t", "--project", "p", "--size", "64M"]);
    let id = v["id"].as_str().unwrap().to_string();
    // The writer is node 0 (fio's socket); nodes 1 and 2 are thrashed.
    let uri = c.uri(0, &id);
    let fio = std::process::Command::new("fio")
        .args([
            "--name=thrash",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--size=64M",
            "--time_based",
            "--runtime=180",
            "--verify=crc32c",
            "--verify_backlog=256",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--do_verify=1",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let mut kills = 0;
    while started.elapsed() < Duration::from_secs(170) {
        let (wait, victim) = {
            let mut rng = rand::thread_rng();
            (rng.gen_range(10..20), rng.gen_range(1..3))
        };
        tokio::time::sleep(Duration::from_secs(wait)).await;
        c.kill(victim);
        kills += 1;
        tokio::time::sleep(Duration::from_secs(2)).await;
        c.restart(victim);
    }
    let out = tokio::task::spawn_blocking(move || fio.wait_with_output().unwrap())
        .await
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("err= 0"),
        "fio failed with {kills} replica kills:\n{text}"
    );
    assert!(kills >= 8, "only {kills} kills");
    // Every replica comes back in sync.
    common::wait_for("every replica in sync", Duration::from_secs(120), || {
        let v = c.json(&["volume", "show", "t", "--project", "p"]);
        v["state"] == "available" && v["in_sync"].as_array().unwrap().len() == 3
    })
    .await;
    // Every object holds the same bytes on every replica (the agents are
    // killed first so nothing moves while the stores are read).
    for i in 0..3 {
        c.kill(i);
    }
    let mut copies: Vec<BTreeMap<u64, Vec<u8>>> = Vec::new();
    for i in 0..3 {
        let store = storage::ObjectStore::open(&c.dirs[i].join("storage")).unwrap();
        let epoch = store.epoch(&id);
        let mut objects = BTreeMap::new();
        for o in store.list(&id).unwrap() {
            let data = store
                .read(&id, o.index, None, 0, 4 << 20, epoch)
                .unwrap()
                .unwrap_or_default();
            objects.insert(o.index, data);
        }
        copies.push(objects);
    }
    assert_eq!(copies[0].len(), 16, "objects on node 0");
    for i in 1..3 {
        assert!(
            copies[i] == copies[0],
            "node {i}'s replica differs from node 0's"
        );
    }
}
