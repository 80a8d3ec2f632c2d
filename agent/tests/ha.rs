//! High availability end to end, with three `allod agent` processes sharing
//! the machine's libvirt (`qemu:///system`, TCG) and a real guest that
//! writes numbered records to its disk and acknowledges each on its serial
//! console:
//! - a node whose agent and QEMU are killed (SIGKILL) is declared dead and
//!   its VM runs on another node, its acknowledged records intact, its
//!   volume's writer epoch moved on;
//! - a node cut off from its peers stops its own VM (self-fencing) before
//!   the others restart it, and does not start it again when it is back;
//! - a drain moves the VM off its node, and is refused when the VM has
//!   nowhere to go;
//! - every replica refuses the first writer's epoch in the end.

mod common;
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::{build_boot_disk, run, Cluster};

/// Destroys and undefines the test's domain however the test ends.
struct Domain(String);

impl Drop for Domain {
    fn drop(&mut self) {
        for verb in ["destroy", "undefine"] {
            let _ = Command::new("virsh")
                .args(["-c", "qemu:///system", verb, &self.0])
                .output();
        }
    }
}

/// `running`, `shut off`, … of the domain, or `None` when it is not defined.
fn domain_state(name: &str) -> Option<String> {
    let out = Command::new("virsh")
        .args(["-c", "qemu:///system", "domstate", name])
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The node key in the domain's Allod metadata.
fn domain_owner(name: &str) -> String {
    let xml = run("virsh", &["-c", "qemu:///system", "dumpxml", name]);
    let at = xml.find(" node=").expect("Allod metadata") + 6;
    let quote = xml[at..].chars().next().unwrap();
    let rest = &xml[at + 1..];
    rest[..rest.find(quote).unwrap()].to_string()
}

/// The guest: reads the last record on its disk (48 MiB in, past the boot
/// file system), then writes the next ones, each with fsync, and says
/// `ack:N` on the console once record N is on disk.
const GUEST: &str = "r=$(dd if=/dev/vda bs=512 skip=98304 count=1 2>/dev/null | tr -d '\\000' | head -n 1); \
    echo \"found:$r\" > /dev/ttyS0; \
    i=${r#rec-}; case \"$i\" in ''|*[!0-9]*) i=0;; esac; \
    while true; do i=$((i+1)); \
    echo \"rec-$i\" | dd of=/dev/vda bs=512 seek=98304 conv=fsync 2>/dev/null && echo \"ack:$i\" > /dev/ttyS0; \
    sleep 0.2; done";

/// The highest record the guest acknowledged in a console log.
fn last_ack(log: &str) -> Option<u64> {
    log.lines()
        .filter_map(|l| l.trim().strip_prefix("ack:")?.parse().ok())
        .max()
}

/// Waits until `vm show` satisfies `done`; the last answer.
async fn wait_vm(
    c: &Cluster,
    what: &str,
    timeout: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let started = Instant::now();
    let mut last = serde_json::Value::Null;
    while started.elapsed() < timeout {
        let out = c.allod(&["vm", "show", "ha1", "--project", "p", "--output", "json"]);
        if out.status.success() {
            last = serde_json::from_slice(&out.stdout).unwrap();
            if done(&last) {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("{what}: not within {timeout:?}; the VM: {last}");
}

/// The node's health, or `?` while the cluster cannot answer (electing).
fn health(c: &Cluster, node: u64) -> String {
    let out = c.allod(&["node", "show", &node.to_string(), "--output", "json"]);
    if !out.status.success() {
        return "?".into();
    }
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    shown["health"].as_str().unwrap_or("?").to_string()
}

fn console_log(c: &Cluster, node: u64, id: &str) -> String {
    let path = c.dirs[node as usize - 1]
        .join("console")
        .join(format!("{id}.log"));
    std::fs::read_to_string(path).unwrap_or_default()
}

fn lease_epoch(c: &Cluster) -> (u64, u64) {
    let v = c.json(&["volume", "show", "ha1-boot", "--project", "p"]);
    (
        v["lease"]["node"].as_u64().unwrap_or(0),
        v["lease"]["epoch"].as_u64().unwrap_or(0),
    )
}

/// Three agents and the guest's image; node 1, which answers the CLI, is in
/// maintenance, so the VM's moves are between nodes 2 and 3.
async fn cluster_for_guests() -> (Cluster, tempfile::TempDir) {
    let c = Cluster::start_with(&["--virt-type", "qemu", "--stop-timeout", "3"]).await;
    run("chmod", &["755", c.tmp.path().to_str().unwrap()]);
    let d1 = c.dirs[0].to_str().unwrap().to_string();
    c.allod_ok(&["node", "maintenance", "--data-dir", &d1, "on"]);
    c.allod_ok(&["project", "create", "p"]);
    let tmp = tempfile::tempdir().unwrap();
    let disk = build_boot_disk(tmp.path(), GUEST);
    c.allod_ok(&["image", "import", disk.to_str().unwrap(), "--name", "tiny"]);
    (c, tmp)
}

/// SIGKILLs node `node`'s agent and the QEMU of domain `name`; when.
fn kill_node_and_guest(c: &mut Cluster, node: u64, name: &str) -> Instant {
    let qemu = run("pgrep", &["-f", &format!("guest={name}")]);
    c.kill(node as usize - 1);
    let killed_at = Instant::now();
    for pid in qemu.split_whitespace() {
        run("kill", &["-9", pid]);
    }
    killed_at
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_or_cut_off_nodes_vm_runs_again_elsewhere_and_never_twice() {
    let (mut c, _tmp) = cluster_for_guests().await;
    let err = c.allod_fails(&[
        "vm",
        "create",
        "bad",
        "--project",
        "p",
        "--memory",
        "256M",
        "--priority",
        "5000",
    ]);
    assert!(err.contains("5000"), "{err}");

    let vm = c.json(&[
        "vm",
        "create",
        "ha1",
        "--project",
        "p",
        "--image",
        "tiny",
        "--memory",
        "256M",
        "--restart-policy",
        "always",
        "--priority",
        "10",
        "--wait",
    ]);
    let id = vm["id"].as_str().unwrap().to_string();
    let name = format!("allod-{id}");
    let _domain = Domain(name.clone());
    assert_eq!(vm["restart_policy"], "always", "{vm}");
    assert_eq!(vm["priority"], 10, "{vm}");
    let first = vm["node"].as_u64().unwrap();
    assert_ne!(first, 1, "node 1 is in maintenance");
    assert_eq!(health(&c, 1), "maintenance");
    assert_eq!(health(&c, first), "healthy");

    // The guest writes and acknowledges records.
    common::wait_for("acknowledged records", Duration::from_secs(120), || {
        last_ack(&console_log(&c, first, &id)).is_some_and(|n| n >= 5)
    })
    .await;
    let (holder, epoch_before) = lease_epoch(&c);
    assert_eq!(holder, first);

    // SIGKILL the VM's node: its agent and its QEMU.
    let killed_at = kill_node_and_guest(&mut c, first, &name);
    let acked = last_ack(&console_log(&c, first, &id)).unwrap();

    let vm = wait_vm(
        &c,
        "the VM running on another node",
        Duration::from_secs(180),
        |v| v["state"] == "running" && v["node"].as_u64() != Some(first),
    )
    .await;
    let restarted_in = killed_at.elapsed();
    let second = vm["node"].as_u64().unwrap();
    assert_eq!(vm["last_restart"]["from_node"], first, "{vm}");
    assert_eq!(vm["last_restart"]["to_node"], second, "{vm}");
    assert!(
        vm["last_restart"]["reason"]
            .as_str()
            .unwrap()
            .contains("died"),
        "{vm}"
    );
    assert_eq!(health(&c, first), "dead");
    eprintln!("node {first} killed: the VM ran on node {second} {restarted_in:?} later");
    // The volume's writer is the new node, at a newer epoch: the old
    // writer's is refused by every replica from the new writer's first
    // request.
    let (holder, epoch_after) = lease_epoch(&c);
    assert_eq!(holder, second);
    assert!(epoch_after > epoch_before, "{epoch_before} → {epoch_after}");
    // Nothing acknowledged was lost: the guest found the last record.
    let found = {
        let mut found = None;
        for _ in 0..600 {
            let log = console_log(&c, second, &id);
            if let Some(line) = log
                .lines()
                .find_map(|l| l.trim().strip_prefix("found:rec-"))
            {
                found = line.parse::<u64>().ok();
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        found.expect("the restarted guest reports the record it found")
    };
    assert!(found >= acked, "acknowledged {acked}, found {found}");
    assert_eq!(domain_state(&name).as_deref(), Some("running"));

    // The dead node comes back healthy; the VM stays where it runs.
    c.restart(first as usize - 1);
    common::wait_for_async(
        "the node healthy again",
        Duration::from_secs(60),
        || async { health(&c, first) == "healthy" },
    )
    .await;
    let vm = c.json(&["vm", "show", "ha1", "--project", "p"]);
    assert_eq!(vm["node"], second, "{vm}");

    // Cut the VM's node off from its peers: it stops its own VM once out
    // of touch for --fence-after (10 s), before the others may declare it
    // dead (15 s) and restart it; so the old copy is gone before the new
    // one starts.
    let d2 = c.dirs[second as usize - 1].clone();
    agent::daemon::admin::request(
        &d2,
        &agent::daemon::admin::AdminRequest::Isolate { on: true },
    )
    .await
    .unwrap();
    let cut_at = Instant::now();
    let mut stopped_at = None;
    while cut_at.elapsed() < Duration::from_secs(120) {
        let state = domain_state(&name);
        if stopped_at.is_none() && state.as_deref() != Some("running") {
            stopped_at = Some(cut_at.elapsed());
        }
        if stopped_at.is_some() && state.as_deref() == Some("running") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stopped_at = stopped_at.expect("the cut-off node stopped its VM");
    assert!(
        stopped_at >= Duration::from_secs(8),
        "stopped {stopped_at:?} after the cut: before it was out of touch for long"
    );
    let vm = wait_vm(
        &c,
        "the VM restarted off the cut-off node",
        Duration::from_secs(120),
        |v| v["state"] == "running" && v["node"].as_u64() == Some(first),
    )
    .await;
    assert_eq!(vm["last_restart"]["from_node"], second, "{vm}");
    eprintln!(
        "node {second} cut off: its VM stopped after {stopped_at:?}, ran again on node {first}"
    );
    let first_key = domain_owner(&name);
    assert!(first_key.ends_with(&format!("-{first}")), "{first_key}");
    let log = std::fs::read_to_string(d2.with_extension("log")).unwrap();
    assert!(
        log.contains("out of touch with a quorum"),
        "the cut-off node says why"
    );

    // Back in touch, the node catches up and starts nothing: one domain,
    // running where the cluster placed it.
    agent::daemon::admin::request(
        &d2,
        &agent::daemon::admin::AdminRequest::Isolate { on: false },
    )
    .await
    .unwrap();
    common::wait_for_async(
        "the cut-off node healthy again",
        Duration::from_secs(60),
        || async { health(&c, second) == "healthy" },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(domain_state(&name).as_deref(), Some("running"));
    assert_eq!(domain_owner(&name), first_key);

    // A drain of the VM's node: refused without consent to restart it,
    // then done with it; the VM runs on the other node and the drained
    // node is in maintenance until resumed.
    let err = c.allod_fails(&["node", "drain", &first.to_string()]);
    assert!(
        err.contains("p/ha1") && err.contains("--restart-unmovable"),
        "{err}"
    );
    let drained = c.json(&["node", "drain", &first.to_string(), "--restart-unmovable"]);
    assert_eq!(drained["health"], "maintenance", "{drained}");
    assert_eq!(drained["vms"], 0, "{drained}");
    let vm = wait_vm(
        &c,
        "the VM running off the drained node",
        Duration::from_secs(120),
        |v| v["state"] == "running" && v["node"].as_u64() == Some(second),
    )
    .await;
    assert!(
        vm["last_restart"]["reason"]
            .as_str()
            .unwrap()
            .contains("drained"),
        "{vm}"
    );
    assert_eq!(vm["power"], "running", "{vm}");
    assert_eq!(domain_state(&name).as_deref(), Some("running"));
    // Every other node is in maintenance now: the next drain is refused,
    // saying which VM has no place and why.
    let err = c.allod_fails(&["node", "drain", &second.to_string(), "--restart-unmovable"]);
    assert!(
        err.contains("VM p/ha1 fits on no other node") && err.contains("in maintenance"),
        "{err}"
    );
    assert_eq!(health(&c, second), "healthy");
    // Read through a follower right after the write: the read is
    // linearizable, so it shows the resume.
    let resumed = c.json(&["node", "resume", &first.to_string()]);
    assert_eq!(resumed["health"], "healthy", "{resumed}");

    // A writer of the first epoch is refused by every replica: with the
    // agents killed, each store, opened as its agent left it, refuses a
    // write and a read at that epoch (the first restart fenced them all).
    let volume_id = c.json(&["volume", "show", "ha1-boot", "--project", "p"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    for i in 0..3 {
        c.kill(i);
    }
    let mut refused = 0;
    for dir in &c.dirs {
        let store = storage::ObjectStore::open(&dir.join("storage")).unwrap();
        let current = store.epoch(&volume_id);
        if current == 0 {
            continue;
        }
        assert!(current > epoch_before, "{current} > {epoch_before}");
        let write = store.write(&volume_id, 0, 0, b"stale", 0, epoch_before);
        assert!(
            matches!(write, Err(storage::store::StoreError::StaleEpoch { .. })),
            "{write:?}"
        );
        let read = store.read(&volume_id, 0, None, 0, 4096, epoch_before);
        assert!(
            matches!(read, Err(storage::store::StoreError::StaleEpoch { .. })),
            "{read:?}"
        );
        refused += 1;
    }
    assert!(refused >= 2, "only {refused} replicas hold the volume");
}

/// The benchmark of `.ci/bench-ha` (not a timed test; ignored in the
/// suite): time from a node's failure (its agent and QEMU SIGKILLed) to
/// its VM running on another node, over `ALLOD_BENCH_TRIALS` (10) trials,
/// against the goal of 30 s, with the default timeouts (dead after 15 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run by .ci/bench-ha"]
async fn bench_restart_after_node_failure() {
    let trials: usize = std::env::var("ALLOD_BENCH_TRIALS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(10);
    let (mut c, _tmp) = cluster_for_guests().await;
    let vm = c.json(&[
        "vm",
        "create",
        "ha1",
        "--project",
        "p",
        "--image",
        "tiny",
        "--memory",
        "256M",
        "--wait",
    ]);
    let name = format!("allod-{}", vm["id"].as_str().unwrap());
    let _domain = Domain(name.clone());
    let mut times = Vec::new();
    for trial in 0..trials {
        let vm = c.json(&["vm", "show", "ha1", "--project", "p"]);
        let from = vm["node"].as_u64().unwrap();
        let killed_at = kill_node_and_guest(&mut c, from, &name);
        wait_vm(&c, "the VM elsewhere", Duration::from_secs(180), |v| {
            v["state"] == "running" && v["node"].as_u64() != Some(from)
        })
        .await;
        let took = killed_at.elapsed();
        eprintln!(
            "trial {}: node {from} killed, VM running elsewhere after {took:?}",
            trial + 1
        );
        times.push(took.as_secs_f64());
        c.restart(from as usize - 1);
        common::wait_for_async(
            "the node healthy again",
            Duration::from_secs(60),
            || async { health(&c, from) == "healthy" },
        )
        .await;
    }
    times.sort_by(f64::total_cmp);
    let p50 = times[times.len() / 2];
    println!(
        "BENCH-HA | node failure to VM running elsewhere, {} trials | p50 {:.1} s | min {:.1} s | max {:.1} s | goal < 30 s | {} |",
        times.len(),
        p50,
        times[0],
        times[times.len() - 1],
        if p50 < 30.0 { "met" } else { "not met" }
    );
    c.allod_ok(&["vm", "delete", "ha1", "--project", "p"]);
}
