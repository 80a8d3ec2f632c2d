//! Live migration end to end: two `allod agent` processes, each driving a
//! libvirt daemon of its own (the machine's, and a second one in a private
//! mount namespace with its own host UUID, state and config, as a second
//! machine would have), and a real guest (TCG) that writes numbered
//! records to its network disk and acknowledges each on its serial console:
//! - `allod vm migrate` moves the running guest to the other node and back:
//!   it does not reboot, its records go on from where they were, its disk's
//!   writer moves with it at a new epoch, the source's domain is gone, and
//!   the VM shows the migration done with its downtime;
//! - `allod node drain` migrates it live off its node (no consent to a
//!   restart needed), and `allod node resume` takes the node back;
//! - every replica refuses the first writer's epoch in the end.
//!
//! `bench_migration_downtime` (ignored; `.ci/bench-migration`) measures the
//! guest's pause for an idle and a busy guest.

mod common;
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::{build_boot_disk, run, Cluster};

/// A second libvirt daemon (with its own virtlogd) in a mount namespace of
/// its own: its `/run/libvirt`, `/var/lib/libvirt`, `/etc/libvirt`, … are
/// directories of `root`, so it shares nothing with the machine's but the
/// network and `/run` (where the agents' NBD sockets are). Stopped (SIGKILL,
/// its QEMUs too) when dropped.
struct SecondLibvirt {
    root: PathBuf,
}

impl SecondLibvirt {
    fn start() -> Self {
        let root = PathBuf::from(format!("/run/allod-test-libvirt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for d in ["run", "lib", "cache", "log/qemu", "etc", "host-run"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let r = root.display();
        // Its own configuration: the machine's, without its domains and
        // networks, with a host UUID of its own (libvirt refuses to
        // migrate to the host it runs on).
        let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap();
        let script = format!(
            "set -e
            cp -a /etc/libvirt/. {r}/etc/
            rm -rf {r}/etc/qemu/*.xml {r}/etc/qemu/autostart {r}/etc/qemu/networks/autostart
            echo 'host_uuid = \"{}\"' >> {r}/etc/libvirtd.conf
            install -d -o libvirt-qemu -g libvirt-qemu {r}/run/qemu {r}/lib/qemu {r}/cache/qemu
            mount --bind /run/libvirt {r}/host-run
            mount --bind {r}/run /run/libvirt
            mount --bind {r}/lib /var/lib/libvirt
            mount --bind {r}/cache /var/cache/libvirt
            mount --bind {r}/log /var/log/libvirt
            mount --bind {r}/etc /etc/libvirt
            virtlogd -d -p {r}/virtlogd.pid
            libvirtd -d -p {r}/libvirtd.pid",
            uuid.trim()
        );
        let out = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cannot start a second libvirtd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lv = SecondLibvirt { root };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !virsh_ok(&lv.uri(), &["version"]) {
            assert!(
                Instant::now() < deadline,
                "the second libvirtd does not answer"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        lv
    }

    /// Its URI from this (the machine's) mount namespace.
    fn uri(&self) -> String {
        format!(
            "qemu+unix:///system?socket={}/run/libvirt-sock",
            self.root.display()
        )
    }

    /// Node `{node}`'s libvirt as the agent reaches it (`local`) and as
    /// the other node's libvirt reaches it (`remote`): links under `root`
    /// to each daemon's socket directory. Node 1 runs on the machine's
    /// daemon, node 2 on this one.
    fn link_nodes(&self) -> (String, String) {
        let link = |name: &str, to: &Path| {
            std::os::unix::fs::symlink(to, self.root.join(name)).unwrap();
        };
        link("n1-local", Path::new("/run/libvirt"));
        // Seen from the second daemon, the machine's sockets are here.
        link("n1-remote", &self.root.join("host-run"));
        link("n2-local", &self.root.join("run"));
        link("n2-remote", &self.root.join("run"));
        let uri = |which: &str| {
            format!(
                "qemu+unix:///system?socket={}/n{{node}}-{which}/libvirt-sock",
                self.root.display()
            )
        };
        (uri("local"), uri("remote"))
    }
}

impl Drop for SecondLibvirt {
    fn drop(&mut self) {
        // Its guests first (they outlive their daemon), then the daemons.
        if let Ok(out) = Command::new("virsh")
            .args(["-c", &self.uri(), "list", "--all", "--name"])
            .output()
        {
            for name in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                for verb in ["destroy", "undefine"] {
                    let _ = Command::new("virsh")
                        .args(["-c", &self.uri(), verb, name])
                        .output();
                }
            }
        }
        for daemon in ["libvirtd", "virtlogd"] {
            if let Ok(pid) = std::fs::read_to_string(self.root.join(format!("{daemon}.pid"))) {
                let _ = Command::new("kill").args(["-9", pid.trim()]).output();
            }
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn virsh_ok(uri: &str, args: &[&str]) -> bool {
    Command::new("virsh")
        .args(["-c", uri])
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `running`, `paused`, … or `None` when the domain is not defined there.
fn domain_state(uri: &str, name: &str) -> Option<String> {
    let out = Command::new("virsh")
        .args(["-c", uri, "domstate", name])
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The guest of `ha.rs`: reads its last record, then writes the next ones
/// with fsync, saying `ack:N` once record N is on disk. `extra` runs
/// beside it.
fn guest(extra: &str) -> String {
    format!(
        "{extra} r=$(dd if=/dev/vda bs=512 skip=98304 count=1 2>/dev/null | tr -d '\\000' | head -n 1); \
        echo \"found:$r\" > /dev/ttyS0; \
        i=${{r#rec-}}; case \"$i\" in ''|*[!0-9]*) i=0;; esac; \
        while true; do i=$((i+1)); \
        echo \"rec-$i\" | dd of=/dev/vda bs=512 seek=98304 conv=fsync 2>/dev/null && echo \"ack:$i\" > /dev/ttyS0; \
        sleep 0.2; done"
    )
}

fn acks(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.trim().strip_prefix("ack:")?.parse().ok())
        .collect()
}

struct Setup {
    c: Cluster,
    lv: SecondLibvirt,
    _image: tempfile::TempDir,
    /// Domains to remove from the machine's libvirt however the test ends.
    domains: std::cell::RefCell<Vec<String>>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        for name in self.domains.borrow().iter() {
            for verb in ["destroy", "undefine"] {
                let _ = Command::new("virsh")
                    .args(["-c", "qemu:///system", verb, name])
                    .output();
            }
        }
    }
}

impl Setup {
    async fn new(guest_extra: &str) -> Self {
        let lv = SecondLibvirt::start();
        let (local, remote) = lv.link_nodes();
        let c = Cluster::start_nodes(
            2,
            &[
                "--virt-type",
                "qemu",
                "--stop-timeout",
                "3",
                "--libvirt-uri",
                &local,
                "--migration-uri",
                &remote,
            ],
        )
        .await;
        // QEMU (libvirt-qemu) writes console logs in the nodes' directories.
        run("chmod", &["755", c.tmp.path().to_str().unwrap()]);
        c.allod_ok(&["project", "create", "p"]);
        let image = tempfile::tempdir().unwrap();
        let disk = build_boot_disk(image.path(), &guest(guest_extra));
        c.allod_ok(&["image", "import", disk.to_str().unwrap(), "--name", "tiny"]);
        Setup {
            c,
            lv,
            _image: image,
            domains: Default::default(),
        }
    }

    /// The libvirt node `node` (1 or 2) runs on.
    fn libvirt(&self, node: u64) -> String {
        match node {
            1 => "qemu:///system".into(),
            _ => self.lv.uri(),
        }
    }

    fn console(&self, node: u64, id: &str) -> String {
        let path = self.c.dirs[node as usize - 1]
            .join("console")
            .join(format!("{id}.log"));
        std::fs::read_to_string(path).unwrap_or_default()
    }

    fn vm(&self, name: &str) -> serde_json::Value {
        self.c.json(&["vm", "show", name, "--project", "p"])
    }

    fn lease(&self, volume: &str) -> (u64, u64) {
        let v = self.c.json(&["volume", "show", volume, "--project", "p"]);
        (
            v["lease"]["node"].as_u64().unwrap_or(0),
            v["lease"]["epoch"].as_u64().unwrap_or(0),
        )
    }

    /// Creates a VM and waits until its guest acknowledges records.
    async fn running_guest(&self, name: &str) -> (String, u64) {
        let vm = self.c.json(&[
            "vm",
            "create",
            name,
            "--project",
            "p",
            "--image",
            "tiny",
            "--memory",
            "256M",
            "--wait",
        ]);
        let id = vm["id"].as_str().unwrap().to_string();
        self.domains.borrow_mut().push(format!("allod-{id}"));
        let node = vm["node"].as_u64().unwrap();
        common::wait_for(
            "the guest's first records",
            Duration::from_secs(180),
            || acks(&self.console(node, &id)).len() >= 3,
        )
        .await;
        (id, node)
    }

    /// Migrates VM `name` (to `to`, or where the scheduler says) and
    /// waits until the migration ends; the VM then.
    async fn migrate(&self, name: &str, to: Option<u64>) -> serde_json::Value {
        let mut args = vec!["vm", "migrate", name, "--project", "p", "--no-wait"];
        let to = to.map(|t| t.to_string());
        if let Some(t) = &to {
            args.extend(["--to", t.as_str()]);
        }
        let started = self.c.json(&args);
        assert_eq!(started["migration"]["phase"], "copying", "{started}");
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let vm = self.vm(name);
            match vm["migration"]["phase"].as_str() {
                Some("done") | Some("failed") => return vm,
                _ if Instant::now() > deadline => panic!("the migration did not end: {vm}"),
                _ => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }

    /// Checks that the guest moved from `from` to `to` without a reboot
    /// and goes on writing there.
    async fn check_moved(&self, name: &str, id: &str, from: u64, to: u64) {
        let domain = format!("allod-{id}");
        let vm = self.vm(name);
        assert_eq!(vm["node"].as_u64(), Some(to), "{vm}");
        assert_eq!(vm["state"], "running", "{vm}");
        assert_eq!(
            domain_state(&self.libvirt(from), &domain),
            None,
            "gone from node {from}"
        );
        assert_eq!(
            domain_state(&self.libvirt(to), &domain).as_deref(),
            Some("running")
        );
        // The guest goes on from its last record there: no reboot (a boot
        // says `found:` first), records after the move.
        let before = acks(&self.console(from, id)).into_iter().max().unwrap_or(0);
        common::wait_for(
            "records written after the move",
            Duration::from_secs(60),
            || acks(&self.console(to, id)).into_iter().any(|a| a > before),
        )
        .await;
        let after = self.console(to, id);
        let boots_there = after.matches("found:").count();
        let boots_before = self.console(from, id).matches("found:").count();
        assert!(
            boots_there + boots_before <= 1,
            "the guest booted again: node {from}'s console:\n{}\nnode {to}'s:\n{after}",
            self.console(from, id)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_guest_migrates_to_another_node_and_back_and_a_drain_migrates_it_live() {
    let mut s = Setup::new("").await;
    let (id, first) = s.running_guest("mig1").await;
    let other = 3 - first;
    let epoch = s.lease("mig1-boot");
    assert_eq!(epoch.0, first);

    // There and back, each to the only other node.
    for (from, to) in [(first, other), (other, first)] {
        let out = s.migrate("mig1", None).await;
        let m = &out["migration"];
        assert_eq!(m["phase"], "done", "{out}");
        assert_eq!(
            (m["from"].as_u64(), m["to"].as_u64()),
            (Some(from), Some(to))
        );
        let downtime = m["downtime_ms"].as_u64().expect("a downtime");
        assert!(downtime < 30_000, "{out}");
        s.check_moved("mig1", &id, from, to).await;
        let (holder, e) = s.lease("mig1-boot");
        assert_eq!(holder, to, "the writer moved with the guest");
        assert!(e > epoch.1, "at a new epoch: {e} after {}", epoch.1);
    }

    // Refused with the reason: a node is no target for itself, and a
    // stopped VM does not migrate live.
    let err = s.c.allod_fails(&[
        "vm",
        "migrate",
        "mig1",
        "--project",
        "p",
        "--to",
        &first.to_string(),
    ]);
    assert!(err.contains("already runs on"), "{err}");

    // A drain migrates it live: no --restart-unmovable needed.
    let drained = s.c.json(&["node", "drain", &first.to_string()]);
    assert_eq!(drained["health"], "maintenance", "{drained}");
    assert_eq!(drained["vms"], 0, "{drained}");
    let vm = s.vm("mig1");
    assert_eq!(vm["migration"]["phase"], "done", "{vm}");
    assert!(
        vm["migration"]["why"].as_str().unwrap().contains("drained"),
        "{vm}"
    );
    assert!(vm["last_restart"].is_null(), "moved, not restarted: {vm}");
    s.check_moved("mig1", &id, first, other).await;
    let resumed = s.c.json(&["node", "resume", &first.to_string()]);
    assert_eq!(resumed["health"], "healthy", "{resumed}");

    s.c.allod_ok(&["vm", "stop", "mig1", "--project", "p"]);
    let err =
        s.c.allod_fails(&["vm", "migrate", "mig1", "--project", "p"]);
    assert!(err.contains("only a running VM migrates live"), "{err}");

    // The first node's writer is refused by every replica: with the agents
    // killed (SIGKILL), each store, opened as its agent left it, refuses a
    // write and a read at the first epoch (each destination fenced them).
    let volume_id = s.c.json(&["volume", "show", "mig1-boot", "--project", "p"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    for i in 0..2 {
        s.c.kill(i);
    }
    let mut refused = 0;
    for dir in &s.c.dirs {
        let store = storage::ObjectStore::open(&dir.join("storage")).unwrap();
        let current = store.epoch(&volume_id);
        if current == 0 {
            continue;
        }
        assert!(current > epoch.1, "{current} > {}", epoch.1);
        let write = store.write(&volume_id, 0, 0, b"stale", 0, epoch.1);
        assert!(
            matches!(write, Err(storage::store::StoreError::StaleEpoch { .. })),
            "{write:?}"
        );
        let read = store.read(&volume_id, 0, None, 0, 4096, epoch.1);
        assert!(
            matches!(read, Err(storage::store::StoreError::StaleEpoch { .. })),
            "{read:?}"
        );
        refused += 1;
    }
    assert!(refused >= 1, "no replica holds the volume");
}

/// The guest's pause at the switch, idle and while it dirties memory as
/// fast as it can (TCG): `cargo test --release --test migration -- --ignored`
/// via `.ci/bench-migration`.
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn bench_migration_downtime() {
    let trials: usize = std::env::var("ALLOD_BENCH_TRIALS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(6);
    // Busy: rewrites 64 MiB of tmpfs memory in a loop, beside the records.
    let busy = "mount -t tmpfs -o size=80m tmpfs /tmp; \
                (while true; do dd if=/dev/zero of=/tmp/dirty bs=1M count=64 2>/dev/null; done) & ";
    for (label, extra) in [("idle", ""), ("busy", busy)] {
        let s = Setup::new(extra).await;
        let (id, _) = s.running_guest("bench").await;
        let mut downtimes = Vec::new();
        let mut totals = Vec::new();
        for _ in 0..trials {
            let out = s.migrate("bench", None).await;
            let m = &out["migration"];
            assert_eq!(m["phase"], "done", "{out}");
            downtimes.push(m["downtime_ms"].as_u64().unwrap());
            totals
                .push(m["finished_at_ms"].as_u64().unwrap() - m["started_at_ms"].as_u64().unwrap());
        }
        let _ = id;
        downtimes.sort();
        totals.sort();
        println!(
            "BENCH migration {label}: downtime ms p50 {} min {} max {}; whole migration ms p50 {} ({} trials, 256 MiB guest, TCG)",
            downtimes[downtimes.len() / 2],
            downtimes[0],
            downtimes[downtimes.len() - 1],
            totals[totals.len() / 2],
            trials
        );
        s.c.allod_ok(&["vm", "delete", "bench", "--project", "p"]);
    }
}
